"""Media files: images opened and fully decoded (or refused, saying why), and videos' frames decoded
with PyAV. A file that cannot be used raises MediaProblem (data/errors.py), which the dataset turns
into the DataError naming the record."""

import errno
import io
import os
import stat

import av
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from transformers.video_utils import VideoMetadata

from data.errors import MediaProblem

# Images with more pixels are refused before they are decoded. PIL only warns above its
# MAX_IMAGE_PIXELS and raises at twice that; a training set has no use for either.
MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS
# Errors PIL raises on a file it cannot decode (truncated streams, broken chunks).
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)
# Modes of more than 8 bits per value (see check_mode).
WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


FILE_KINDS = {stat.S_IFIFO: "a FIFO (named pipe)", stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a character device",
              stat.S_IFBLK: "a block device"}


def regular_file_size(path, media="image"):
    """The size of ``path`` (an ``image`` or ``video`` file), or MediaProblem if it is not a regular file.

    Checked before opening: opening a FIFO blocks until something writes to it, and a folder
    or a symlink loop would otherwise surface as a misleading decode error.
    """
    try:
        info = os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise MediaProblem("symlink_loop", "the path is a loop of symbolic links that never reaches a file") from e
        raise MediaProblem(f"missing_{media}", f"no such file ({e.strerror})") from e
    if stat.S_ISDIR(info.st_mode):
        raise MediaProblem(f"{media}_is_folder", f"the path is a folder, not {'an' if media == 'image' else 'a'} {media} file")
    if not stat.S_ISREG(info.st_mode):
        kind = FILE_KINDS.get(stat.S_IFMT(info.st_mode), "a special file")
        raise MediaProblem("not_a_file", f"the path is {kind}, not a regular {media} file; it was not opened")
    return info.st_size


class EmbeddedImage(str):
    """An image a record carries as bytes (a column of the ``datasets`` Image feature in a Parquet or
    Arrow source, see data/sources/arrow.py), not as a file.

    It is a str, its name (the file name it was stored under, else its place in the table), so a
    record keeps its form and messages can name it; ``data`` holds the encoded image, which is
    decoded as a file's content would be.
    """

    def __new__(cls, name, data):
        image = super().__new__(cls, name)
        image.data = data
        return image

    def __reduce__(self):
        return EmbeddedImage, (str(self), self.data)


def open_image(path, max_pixels=MAX_IMAGE_PIXELS):
    """Open and fully decode an image, or raise MediaProblem saying why not; its mode is kept.

    The whole file is decoded here (a truncated file fails now, not mid-training). EXIF
    orientation is applied, as viewers show the picture and transformers' ``load_image`` does. The
    mode is left for the model's processor to convert (check_mode: only where that is faithful);
    the remote-code dataset converts as that processor would (open_rgb).
    """
    if isinstance(path, EmbeddedImage):
        size, source = len(path.data), io.BytesIO(path.data)
    else:
        size, source = regular_file_size(path), path
    try:
        image = Image.open(source)
    except UnidentifiedImageError as e:
        if size == 0:
            raise MediaProblem("empty_image", "the file is empty (0 bytes)") from e
        raise MediaProblem("not_an_image", f"not an image file PIL can read: {e}") from e
    except Image.DecompressionBombError as e:
        raise MediaProblem("image_too_large", str(e)) from e
    except DECODE_ERRORS as e:
        raise MediaProblem("truncated_image", f"cannot read the image header: {e}") from e
    with image:
        width, height = image.size
        if width * height > max_pixels:
            raise MediaProblem(
                "image_too_large",
                f"{width}x{height} = {width * height} pixels is more than the limit of {max_pixels} "
                "(a decompression bomb, or an image far larger than the model uses); downscale it",
            )
        try:
            image.load()
        except DECODE_ERRORS as e:
            raise MediaProblem("truncated_image", f"the image data is truncated or corrupt: {e}") from e
        # Turned in place: a full-size copy would cost a few percent of building a sample.
        ImageOps.exif_transpose(image, in_place=True)
        check_mode(image)
        return image


def check_mode(image):
    """Raise MediaProblem (``image_mode``) unless the processors' conversion of ``image`` to 8-bit RGB
    keeps what it shows.

    Both kinds of processor convert with PIL (remote code: ``convert("RGB")``; transformers:
    ``convert_to_rgb``, which goes through ``convert("RGBA")`` for transparency), and PIL clips values
    of the wide modes (16- and 32-bit integers, floats) to 0..255 and truncates fractions. So a wide
    image converts faithfully only when every value is a whole number in 0..255; a typical 16-bit
    picture (0..65535) would turn white where it is brighter than 255/65535. Every 8-bit mode a file
    can hold (palette, CMYK, LAB, ...) PIL converts.
    """
    if image.mode in WIDE_MODES:
        values = np.asarray(image)
        finite = values[np.isfinite(values)]
        flaws = []
        if finite.size and (finite.min() < 0 or finite.max() > 255):
            flaws.append(f"values from {finite.min()} to {finite.max()}")
        if (finite != np.floor(finite)).any():
            flaws.append("fractions")
        if finite.size < values.size:
            flaws.append("NaN or infinite values")
        if flaws:
            raise MediaProblem(
                "image_mode",
                f"a {image.mode} image with {' and '.join(flaws)}: the model's processor converts it to 8 bits "
                "by clipping to 0..255 (and cutting fractions), which is not this picture; save it as an 8-bit "
                "image, scaled as you mean it (e.g. 16-bit values divided by 257)",
            )


def open_rgb(path, max_pixels=MAX_IMAGE_PIXELS):
    """open_image, converted to RGB as the remote-code models' processor converts every image:
    ``image.convert("RGB")`` (image_processing_minicpmv.py's preprocess). Transparency is dropped,
    not composited: the colour under a transparent pixel is what the model sees at inference too."""
    image = open_image(path, max_pixels)
    return image if image.mode == "RGB" else image.convert("RGB")


def count_frames(path):
    """The frames of ``path``'s first video stream, counted by decoding it: for containers that store
    no count (Matroska, WebM). Decoded, not demuxed: a packet need not be a shown frame (VP8's hidden
    alt-ref frames), and the count must be what decode_video can pick from."""
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        return sum(1 for _ in container.decode(stream))


def decode_video(path, sample_indices):
    """Decode the frames ``sample_indices(metadata)`` picks, as RGB ``[T, H, W, 3]``, with PyAV.

    Raises MediaProblem: missing, a folder, a symlink loop, a FIFO or device (never opened: that
    would block), empty, not a video, no frames, or frames that do not decode.
    """
    if regular_file_size(path, "video") == 0:
        raise MediaProblem("empty_video", "the file is empty (0 bytes)")
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise MediaProblem("no_video_frames", "the file has no video stream")
            stream = container.streams.video[0]
            total = stream.frames or count_frames(path)
            fps = float(stream.average_rate or 0)
            if not fps and total and container.duration:  # no frame rate stored: frames over the duration
                fps = total / (container.duration / av.time_base)
            if not total or not fps:
                raise MediaProblem("no_video_frames", f"no frames to sample ({total} frames at {fps} fps)")
            metadata = VideoMetadata(
                total_num_frames=int(total),
                fps=fps,
                duration=total / fps,
                video_backend="pyav",
                height=stream.height,
                width=stream.width,
            )
            indices = [int(i) for i in sample_indices(metadata=metadata)]
            wanted, frames = set(indices), {}
            for number, frame in enumerate(container.decode(stream)):
                if number in wanted:
                    frames[number] = frame.to_ndarray(format="rgb24")
                if number >= indices[-1]:
                    break
    except av.error.FFmpegError as e:
        raise MediaProblem("unreadable_video", f"PyAV cannot decode it: {e}") from e
    missing = sorted(wanted - set(frames))
    if missing:
        raise MediaProblem(
            "unreadable_video", f"frames {missing[:5]} of {metadata.total_num_frames} could not be decoded (truncated?)"
        )
    metadata.frames_indices = indices
    return np.stack([frames[i] for i in indices]), metadata
