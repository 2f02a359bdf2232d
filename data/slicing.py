"""Images as the remote-code models' processor lays them out: the slice grid, the slices, the patch
layout (these must match the model's own image processor exactly), and the uint8 pixels the dataset
hands on, normalised where the batch meets the model (model_pixels)."""

import math

import numpy as np
import torch
from PIL import Image
from torchvision import transforms


def ensure_divide(length, patch_size):
    return max(round(length / patch_size) * patch_size, patch_size)


def find_best_resize(original_size, scale_resolution, patch_size, allow_upscale=False):
    width, height = original_size
    if width * height > scale_resolution * scale_resolution or allow_upscale:
        aspect = width / height
        height = int(scale_resolution / math.sqrt(aspect))
        width = int(height * aspect)
    return ensure_divide(width, patch_size), ensure_divide(height, patch_size)


def get_refine_size(original_size, grid, scale_resolution, patch_size, allow_upscale=False):
    width, height = original_size
    grid_x, grid_y = grid
    refine_width = ensure_divide(width, grid_x)
    refine_height = ensure_divide(height, grid_y)
    slice_width, slice_height = find_best_resize(
        (refine_width / grid_x, refine_height / grid_y), scale_resolution, patch_size, allow_upscale=allow_upscale
    )
    return slice_width * grid_x, slice_height * grid_y


def best_grid(size, max_slice_nums, scale_resolution):
    """The ``[cols, rows]`` grid the image is cut into, or None when it is not sliced."""
    width, height = size
    multiple = min(math.ceil(width * height / (scale_resolution * scale_resolution)), max_slice_nums)
    if multiple <= 1:
        return None
    counts = [n for n in (multiple - 1, multiple, multiple + 1) if n != 1 and n <= max_slice_nums]
    candidates = [[m, n // m] for n in counts for m in range(1, n + 1) if n % m == 0]
    log_ratio = math.log(width / height)
    # min() keeps the first of equal errors, like the processor's strict "<" scan.
    return min(candidates, key=lambda grid: abs(log_ratio - math.log(grid[0] / grid[1])))


def slice_image(image, max_slice_nums, scale_resolution, patch_size):
    """Return ``(source_image, rows_of_slices)``; ``rows_of_slices`` is ``[]`` when not sliced."""
    grid = best_grid(image.size, max_slice_nums, scale_resolution)
    if grid is None:
        size = find_best_resize(image.size, scale_resolution, patch_size, allow_upscale=True)
        return image.resize(size, Image.Resampling.BICUBIC), []
    source = image.resize(find_best_resize(image.size, scale_resolution, patch_size), Image.Resampling.BICUBIC)
    refine_size = get_refine_size(image.size, grid, scale_resolution, patch_size, allow_upscale=True)
    refined = image.resize(refine_size, Image.Resampling.BICUBIC)
    cols, rows = grid
    slice_w, slice_h = refine_size[0] // cols, refine_size[1] // rows
    slices = [
        [refined.crop((c * slice_w, r * slice_h, (c + 1) * slice_w, (r + 1) * slice_h)) for c in range(cols)]
        for r in range(rows)
    ]
    return source, slices


def reshape_by_patch(pixels, patch_size):
    """``[H, W, 3]`` array -> ``[3, patch, rows, cols, patch]`` view of it (nothing copied).

    Flattened over its last three axes it is ``[3, patch, H*W/patch]``, the layout of the model
    processor's ``reshape_by_patch`` (``unfold`` + permute): element ``[c, i, k * patch + j]`` is
    channel ``c`` of pixel ``(i, j)`` of patch ``k``, patches in raster order, side by side.
    """
    height, width, channels = pixels.shape
    rows, cols = height // patch_size, width // patch_size
    patches = pixels[: rows * patch_size, : cols * patch_size].reshape(rows, patch_size, cols, patch_size, channels)
    return patches.transpose(4, 1, 0, 2, 3)


# --------------------------------------------------------------------------------------------
# Pixels: uint8 from the dataset, normalised where the batch meets the model

# The vision tower's input normalisation: to tensor, then mean = std = 0.5 per channel. The dataset
# hands on raw uint8 pixels instead (a quarter of the bytes to build, copy and send from DataLoader
# workers, and no float work on the loader side); model_pixels gives the model this transform's values.
IMAGE_TRANSFORM = transforms.Compose(
    [transforms.ToTensor(), transforms.Normalize(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))]
)


def value_table(transform):
    """``[3, 256]`` float: what ``transform`` (a per-pixel map of an RGB image) makes of each 8-bit
    value, per channel."""
    levels = np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 3, axis=2)  # a 1 x 256 RGB image
    return transform(Image.fromarray(levels, "RGB"))[:, 0, :]


PIXEL_VALUES = value_table(IMAGE_TRANSFORM)


def model_pixels(pixel_values, dtype):
    """The collator's ``pixel_values`` (per sample, a list of uint8 tensors ``[3, ...]``) as the vision
    tower takes them: IMAGE_TRANSFORM's values in ``dtype``, on the pixels' device, same nesting.

    The values are looked up per 8-bit value, not computed: a lookup copies IMAGE_TRANSFORM's float32
    values to the bit on any device (CUDA would divide by 255 through its reciprocal), and a lower
    precision rounds each once, as casting the float32 pixels would.
    """
    tables = {}

    def normalised(pixels):
        if pixels.dtype != torch.uint8:
            raise TypeError(f"model_pixels takes the dataset's uint8 pixels, got {pixels.dtype} (normalised twice?)")
        if pixels.device not in tables:
            tables[pixels.device] = PIXEL_VALUES.to(device=pixels.device, dtype=dtype)
        return tables[pixels.device].gather(1, pixels.reshape(3, -1).long()).view(pixels.shape)

    return [[normalised(pixels) for pixels in sample] for sample in pixel_values]
