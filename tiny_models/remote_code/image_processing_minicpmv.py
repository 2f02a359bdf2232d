"""Image processor of the tiny MiniCPM-V 2.6-style checkpoints (remote code, copied into each checkpoint).

Behaves as the published 2.6 `MiniCPMVImageProcessor` does where it matters: its settings come
from preprocessor_config.json (`max_slice_nums`, `scale_resolution`, `patch_size`,
`image_feature_size`, `use_image_id`, `slice_mode`, the placeholder token strings, the
normalisation), it slices each image into a resized source plus a grid of slices, turns every
piece into a `[3, patch, n * patch]` tensor with its `[h_patches, w_patches]`, and writes each
image's text placeholder (image id, source, slice rows).
"""

import math

import numpy as np
import torch
from PIL import Image
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature


def nested_map(function, value):
    if isinstance(value, (list, tuple)):
        return [nested_map(function, item) for item in value]
    return function(value)


class MiniCPMVBatchFeature(BatchFeature):
    """A BatchFeature whose values are nested lists of tensors (one list per sample)."""

    def __init__(self, data=None, tensor_type=None):
        super().__init__(data)
        if tensor_type is not None:
            for key, value in self.items():
                self[key] = nested_map(lambda item: item if torch.is_tensor(item) else torch.as_tensor(item), value)

    def to(self, *args, **kwargs):
        def move(item):
            if not torch.is_tensor(item):
                return item
            if item.is_floating_point():
                return item.to(*args, **kwargs)
            device = kwargs.get("device", args[0] if args and not isinstance(args[0], torch.dtype) else None)
            return item if device is None else item.to(device=device)

        self.data = {key: nested_map(move, value) for key, value in self.items()}
        return self


class MiniCPMVImageProcessor(BaseImageProcessor):
    model_input_names = ["pixel_values"]

    def __init__(self, max_slice_nums=9, scale_resolution=448, patch_size=14, **kwargs):
        self.use_image_id = kwargs.pop("use_image_id", False)
        self.image_feature_size = kwargs.pop("image_feature_size", 64)
        self.im_start_token = kwargs.pop("im_start", "<image>")
        self.im_end_token = kwargs.pop("im_end", "</image>")
        self.slice_start_token = kwargs.pop("slice_start", "<slice>")
        self.slice_end_token = kwargs.pop("slice_end", "</slice>")
        self.unk_token = kwargs.pop("unk", "<unk>")
        self.im_id_start = kwargs.pop("im_id_start", "<image_id>")
        self.im_id_end = kwargs.pop("im_id_end", "</image_id>")
        self.slice_mode = kwargs.pop("slice_mode", True)
        self.norm_mean = list(kwargs.pop("norm_mean", [0.5, 0.5, 0.5]))
        self.norm_std = list(kwargs.pop("norm_std", [0.5, 0.5, 0.5]))
        self.version = kwargs.pop("version", 2.0)
        super().__init__(**kwargs)
        self.max_slice_nums = max_slice_nums
        self.scale_resolution = scale_resolution
        self.patch_size = patch_size

    # ---- the slicing geometry ----------------------------------------------------------------

    @staticmethod
    def ensure_divide(length, patch_size):
        return max(round(length / patch_size) * patch_size, patch_size)

    def find_best_resize(self, size, patch_size, allow_upscale=False):
        width, height = size
        if width * height > self.scale_resolution**2 or allow_upscale:
            aspect = width / height
            height = int(self.scale_resolution / math.sqrt(aspect))
            width = int(height * aspect)
        return self.ensure_divide(width, patch_size), self.ensure_divide(height, patch_size)

    def get_refine_size(self, size, grid, patch_size):
        (width, height), (columns, rows) = size, grid
        cell = (self.ensure_divide(width, columns) / columns, self.ensure_divide(height, rows) / rows)
        cell_width, cell_height = self.find_best_resize(cell, patch_size, allow_upscale=True)
        return cell_width * columns, cell_height * rows

    def get_sliced_grid(self, size, max_slice_nums):
        """(columns, rows) of the slices, or None for an image that is not sliced."""
        width, height = size
        count = min(math.ceil(width * height / self.scale_resolution**2), max_slice_nums)
        if count <= 1:
            return None
        grids = [
            (columns, total // columns)
            for total in (count - 1, count, count + 1)
            if 1 < total <= max_slice_nums
            for columns in range(1, total + 1)
            if total % columns == 0
        ]
        target = math.log(width / height)
        # min() keeps the first of equally good grids, in the order listed.
        return min(grids, key=lambda grid: abs(target - math.log(grid[0] / grid[1])))

    def slice_image(self, image, max_slice_nums):
        """(source image, rows of slice images)."""
        grid = self.get_sliced_grid(image.size, max_slice_nums)
        if grid is None:
            size = self.find_best_resize(image.size, self.patch_size, allow_upscale=True)
            return image.resize(size, Image.Resampling.BICUBIC), []
        source = image.resize(self.find_best_resize(image.size, self.patch_size), Image.Resampling.BICUBIC)
        refined = image.resize(self.get_refine_size(image.size, grid, self.patch_size), Image.Resampling.BICUBIC)
        columns, rows = grid
        cell_width, cell_height = refined.width // columns, refined.height // rows
        return source, [
            [
                refined.crop((x * cell_width, y * cell_height, (x + 1) * cell_width, (y + 1) * cell_height))
                for x in range(columns)
            ]
            for y in range(rows)
        ]

    # ---- the text placeholder ----------------------------------------------------------------

    def get_slice_image_placeholder(self, image_size, image_idx=0, max_slice_nums=None, use_image_id=None):
        max_slice_nums = self.max_slice_nums if max_slice_nums is None else int(max_slice_nums)
        if max_slice_nums < 1:
            raise ValueError(f"max_slice_nums must be at least 1, not {max_slice_nums}")
        use_image_id = self.use_image_id if use_image_id is None else bool(use_image_id)
        queries = self.unk_token * self.image_feature_size
        text = f"{self.im_id_start}{image_idx}{self.im_id_end}" if use_image_id else ""
        text += self.im_start_token + queries + self.im_end_token
        grid = self.get_sliced_grid(image_size, max_slice_nums) if self.slice_mode else None
        if grid is not None:
            columns, rows = grid
            slice_text = self.slice_start_token + queries + self.slice_end_token
            text += "\n".join(slice_text * columns for _ in range(rows))
        return text

    # ---- pixels ------------------------------------------------------------------------------

    def to_patches(self, image):
        """A PIL image -> normalised `[3, patch, n * patch]` (patches side by side) and its patch grid."""
        pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
        mean = torch.tensor(self.norm_mean, dtype=torch.float32)[:, None, None]
        std = torch.tensor(self.norm_std, dtype=torch.float32)[:, None, None]
        pixels = (pixels - mean) / std
        patch = self.patch_size
        columns = torch.nn.functional.unfold(pixels[None], (patch, patch), stride=(patch, patch))[0]
        patches = columns.reshape(3, patch, patch, -1).permute(0, 1, 3, 2).reshape(3, patch, -1)
        return patches, (pixels.shape[1] // patch, pixels.shape[2] // patch)

    def preprocess(self, images, do_pad=True, max_slice_nums=None, return_tensors=None, **kwargs):
        """`images`: one image, a list (one sample) or a list of lists (a batch)."""
        if isinstance(images, Image.Image):
            images = [[images]]
        elif images and isinstance(images[0], Image.Image):
            images = [images]
        max_slice_nums = self.max_slice_nums if max_slice_nums is None else int(max_slice_nums)
        pixel_values, image_sizes, tgt_sizes = [], [], []
        for sample in images:
            pieces, sizes = [], []
            for image in sample or []:
                if self.slice_mode:
                    source, rows = self.slice_image(image.convert("RGB"), max_slice_nums)
                    parts = [source] + [piece for row in rows for piece in row]
                else:
                    parts = [image]
                for part in parts:
                    patches, grid = self.to_patches(part)
                    pieces.append(patches)
                    sizes.append(grid)
            pixel_values.append(pieces)
            image_sizes.append([image.size for image in sample or []])
            tgt_sizes.append(torch.tensor(sizes, dtype=torch.int32).reshape(-1, 2))
        return MiniCPMVBatchFeature(
            {"pixel_values": pixel_values, "image_sizes": image_sizes, "tgt_sizes": tgt_sizes},
            tensor_type=return_tensors,
        )
