"""Processor of the tiny MiniCPM-V 2.6-style checkpoints (remote code, copied into each checkpoint).

Like the published 2.6 `MiniCPMVProcessor`: `AutoProcessor.from_pretrained(folder,
trust_remote_code=True)` pairs the image processor with the tokenizer; a call replaces each
`(<image>./</image>)` in a prompt with that image's placeholder, tokenises, finds the image
bounds and left-pads the batch. It reads only tokenizer attributes the published 2.6 tokenizer
has (`encode`, `decode`, the `*_id` properties of the image and slice tokens, `bos_id`, `eos_id`).
"""

import torch
from transformers.processing_utils import ProcessorMixin

from .image_processing_minicpmv import MiniCPMVBatchFeature

IMAGE_TAG = "(<image>./</image>)"


class MiniCPMVProcessor(ProcessorMixin):
    attributes = ["image_processor", "tokenizer"]
    image_processor_class = "AutoImageProcessor"
    tokenizer_class = "AutoTokenizer"

    def __init__(self, image_processor=None, tokenizer=None):
        super().__init__(image_processor, tokenizer)
        self.version = image_processor.version

    def __call__(self, text, images=None, max_length=None, do_pad=True, max_slice_nums=None, use_image_id=None,
                 return_tensors="pt"):
        texts = [text] if isinstance(text, str) else list(text)
        if images is None or not len(images):
            return MiniCPMVBatchFeature(dict(self.tokenizer(texts, return_tensors=return_tensors, max_length=max_length)))
        image_inputs = self.image_processor(images, do_pad=do_pad, max_slice_nums=max_slice_nums,
                                            return_tensors=return_tensors)
        ids, bounds = [], []
        for index, prompt in enumerate(texts):
            sizes = image_inputs["image_sizes"][index]
            chunks = prompt.split(IMAGE_TAG)
            if len(chunks) - 1 != len(sizes):
                raise ValueError(f"prompt {index} has {len(chunks) - 1} image tags for {len(sizes)} images")
            expanded = chunks[0]
            for i, (size, chunk) in enumerate(zip(sizes, chunks[1:], strict=True)):
                size = tuple(int(value) for value in size)
                expanded += self.image_processor.get_slice_image_placeholder(size, i, max_slice_nums, use_image_id)
                expanded += chunk
            sample_ids, sample_bounds = self.encode_with_bounds(expanded, max_length)
            ids.append(sample_ids)
            bounds.append(sample_bounds)
        longest = max(len(sample) for sample in ids)
        padded = torch.zeros(len(ids), longest, dtype=torch.int32)
        for row, sample in enumerate(ids):
            padded[row, longest - len(sample):] = sample
            bounds[row] = bounds[row] + (longest - len(sample))  # left padding shifts every bound
        return MiniCPMVBatchFeature({
            "input_ids": padded,
            "attention_mask": padded.ne(0),
            "pixel_values": image_inputs["pixel_values"],
            "image_sizes": image_inputs["image_sizes"],
            "image_bound": bounds,
            "tgt_sizes": image_inputs["tgt_sizes"],
        })

    def encode_with_bounds(self, text, max_length=None):
        """Token ids (int32) and `[n, 2]` bounds: from after each image/slice start to its end token."""
        ids = self.tokenizer.encode(text)
        if self.version <= 2.5 and getattr(self.tokenizer, "add_bos_token", False):
            ids = [self.tokenizer.bos_id] + ids
        ids = torch.tensor(ids[:max_length] if max_length else ids, dtype=torch.int32)
        tokenizer = self.tokenizer
        starts = torch.where((ids == tokenizer.im_start_id) | (ids == tokenizer.slice_start_id))[0] + 1
        ends = torch.where((ids == tokenizer.im_end_id) | (ids == tokenizer.slice_end_id))[0]
        count = min(len(starts), len(ends))  # a prompt cut by max_length may lose its last end
        return ids, torch.stack([starts[:count], ends[:count]], dim=1)

    def decode(self, ids, **kwargs):
        ids = ids[ids != 0]
        if len(ids) and ids[0] == self.tokenizer.bos_id:
            ids = ids[1:]
        if len(ids) and ids[-1] == self.tokenizer.eos_id:
            ids = ids[:-1]
        return self.tokenizer.decode(ids, **kwargs).strip()

    def batch_decode(self, ids, **kwargs):
        return [self.decode(row, **kwargs) for row in ids]
