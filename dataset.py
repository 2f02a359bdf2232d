"""Records -> tensors for MiniCPM-V fine-tuning. Never loads a model.

A record is ``{"id", "image", "conversations": [{"role", "content"}, ...]}`` where ``image`` is
a path (one image, tagged ``<image>``), a dict ``{"<image_00>": path, ...}`` (several images),
or absent (text only). ``SupervisedDataset`` turns a record into what the model's
``forward(data=...)`` reads: token ids with each image's placeholder spliced in, labels
shifted by one like the reference fine-tuner, ``image_bound`` pairs pointing at each
placeholder's query slots, and the image tensors (sliced like the model's own processor): raw
uint8 pixels, which ``model_pixels`` normalises where the batch meets the model.

Placeholder ids are built directly: the conversation is rendered and tokenized with each
query run left out (``<image></image>`` instead of ``<image><unk>*64</image>``), then the runs
of ``unk`` ids are inserted after every opening token. Query runs sit between special tokens,
which the tokenizer splits on before anything else, so the ids equal those of the full string
(a test checks this for every family) at a fraction of the tokenizing cost.

The pieces live in the data package, one concern a module: where records come from
(data/sources/), their form (data/schema.py), images (data/media.py, data/slicing.py), placeholders
(data/placeholders.py) and chat layouts (data/layouts.py); preference pairs (data/preference.py),
packing (data/packing.py) and the native models' pipeline (data/native.py) build on them.
"""

import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence

from data.layouts import LAYOUTS, special_token_id
from data.placeholders import (
    IMAGE_END,
    IMAGE_ID_END,
    IMAGE_ID_START,
    IMAGE_START,
    SLICE_END,
    SLICE_START,
    image_placeholder,
    place_images,
)
from data.records import IGNORE_INDEX, RecordDataset
from data.schema import MULTI_IMAGE_TAG, PREFERENCE_ANSWERS, SINGLE_IMAGE_TAG, record_images
from data.shipping import ShippedBatch
from data.slicing import best_grid, reshape_by_patch, slice_image

logger = logging.getLogger(__name__)

# The remote-code families' chat layouts, by name (--llm_type).
LLM_TYPES = tuple(LAYOUTS)


def shifted_labels(ids, context, end_of_turn_id):
    """The reference's labels: ``labels[i-1] = ids[i]`` where token ``i`` is learned; where a
    learned run ends, the last learned position gets ``end_of_turn_id``."""
    labels = torch.full_like(ids, IGNORE_INDEX)
    learned_next = context[1:] == 0
    labels[:-1][learned_next] = ids[1:][learned_next]
    labels[:-1][(context[1:] == 1) & (context[:-1] == 0)] = end_of_turn_id
    return labels


class SupervisedDataset(RecordDataset):
    """Records -> model inputs. See the module docstring and docs/CONTRACTS.md."""

    def __init__(
        self,
        records,
        tokenizer,
        *,
        slice_config,
        layout,
        patch_size,
        query_num,
        batch_vision,
        max_length,
        use_image_id,
        image_root,
        data_path=None,
    ):
        super().__init__(records, max_length=max_length, image_root=image_root, data_path=data_path)
        self.tokenizer = tokenizer
        self.slice_config = (
            None
            if slice_config is None
            else {key: slice_config[key] for key in ("max_slice_nums", "scale_resolution", "patch_size")}
        )
        self.layout = layout  # a data.layouts.ChatLayout
        self.takes_system = layout.takes_system
        self.new_schema = layout.new_schema
        self.patch_size = patch_size
        self.query_num = query_num
        self.batch_vision = batch_vision
        self.use_image_id = use_image_id

        # Every special token the layout uses, checked against the vocabulary before any record is built.
        sliced = slice_config is not None
        unk = tokenizer.unk_token or "<unk>"
        end_of_turn = layout.end_of_turn(tokenizer)
        needed = [IMAGE_START, IMAGE_END, unk, end_of_turn]
        needed += [SLICE_START, SLICE_END] if sliced else []
        needed += [IMAGE_ID_START, IMAGE_ID_END] if use_image_id else []
        ids = {token: special_token_id(tokenizer, token, f"the {layout.name} layout") for token in needed}
        self.unk_id = ids[unk]
        self.end_of_turn_id = ids[end_of_turn]
        slice_runs = self.new_schema and sliced  # the new schema gives each slice its own query run
        self.opener_ids = torch.tensor([ids[IMAGE_START]] + ([ids[SLICE_START]] if slice_runs else []), dtype=torch.long)
        self.closer_ids = torch.tensor([ids[IMAGE_END]] + ([ids[SLICE_END]] if slice_runs else []), dtype=torch.long)
        # The sliced old schema closes an image with slice_end after its last slice.
        self.image_end_extra = ids[SLICE_END] if sliced and not self.new_schema else None
        self.im_id_start_id = ids[IMAGE_ID_START] if use_image_id else None
        self.reserved_tokens = (IMAGE_END, SLICE_START, SLICE_END, IMAGE_ID_START, IMAGE_ID_END, unk)
        self.special_tokens = self.special_tokens_of(tokenizer)

    def __getitem__(self, index):
        return self._checked_build(index, True)

    def check_settings(self):
        return super().check_settings() | dict(
            layout=self.layout.name, slice_config=self.slice_config, patch_size=self.patch_size,
            query_num=self.query_num, batch_vision=self.batch_vision, use_image_id=self.use_image_id,
        )

    def validate(self, record, index):
        super().validate(record, index)
        if "video" in record:
            raise self._error(
                index, record, "the record has a 'video', but this model (remote code) takes no video; "
                "video needs a native MiniCPM-V (4.6, 4.7, MiniCPM-OCR)", code="video_unsupported",
            )

    def check(self, index):
        """Build record ``index`` exactly as training does, minus the image tensors.

        Raises DataError if the record is unusable; else returns ``{"tokens", "truncated", "length"}``.
        Every image is opened and decoded once. This is what preflight.py runs over a dataset.
        """
        return self._checked_build(index, False)

    def _build(self, record, index, pixels=True):
        paths = record_images(record)
        # Images are numbered, and their tensors ordered, as their tags appear in the text.
        if SINGLE_IMAGE_TAG in paths:
            order = [SINGLE_IMAGE_TAG]
        else:
            order = [tag for m in record["conversations"] for tag in MULTI_IMAGE_TAG.findall(m["content"])]

        views, placeholders, layouts = [], {}, []
        for number, tag in enumerate(order):
            image = self._load_image(index, record, tag, paths[tag])
            grid = None
            if self.slice_config is not None:
                grid = best_grid(image.size, self.slice_config["max_slice_nums"], self.slice_config["scale_resolution"])
            if pixels:  # slice_image cuts along the same best_grid
                source, slices = slice_image(image, **self.slice_config) if self.slice_config else (image, [])
                views.append([source] + [s for row in slices for s in row])
            layouts.append(1 + (grid[0] * grid[1] if grid else 0))  # query runs of this image: source + slices
            placeholders[tag] = image_placeholder(
                self.tokenizer,
                query_num=0,
                grid=grid,
                new_schema=self.new_schema,
                image_id=number if self.use_image_id else None,
            )

        messages = place_images(record["conversations"], placeholders)
        ids, context = self.layout.tokenize(messages, self.tokenizer)
        ids, context, bounds = self._splice_query_runs(ids, context)
        if len(bounds) != sum(layouts):
            raise self._error(
                index, record, f"found {len(bounds)} image query runs, expected {sum(layouts)}", code="build_failed"
            )
        spans = self._image_spans(ids, bounds, layouts)

        full_length = len(ids)
        truncated = full_length > self.max_length
        self._refuse_truncation(index, record, full_length)
        if truncated:
            cut = self.max_length
            for number, (first, last) in enumerate(spans):
                if first < cut <= last:
                    raise self._error(
                        index,
                        record,
                        f"{len(ids)} tokens: max_length {cut} would cut image {order[number]}'s placeholder "
                        f"(tokens {first}..{last}); raise model_max_length or shorten the record",
                        code="too_long",
                    )
            kept = sum(last < cut for _, last in spans)
            if pixels:  # a check (preflight) counts truncations in its own summary
                logger.warning(
                    "record %d (id %r) of %s: %d tokens truncated to max_length %d (%d of %d images kept)",
                    index, record.get("id"), self.data_path, len(ids), cut, kept, len(order),
                )
            ids, context = ids[:cut], context[:cut]
            bounds = bounds[: sum(layouts[:kept])]
            views = views[:kept]

        labels = shifted_labels(ids, context, self.end_of_turn_id)
        for start, end in bounds.tolist():
            labels[start - 1 : end - 1] = IGNORE_INDEX  # image features are never prediction targets
        if not (labels != IGNORE_INDEX).any():
            after = f" after truncation to max_length {self.max_length}" if truncated else ""
            raise self._error(index, record, f"no learnable token left{after}", code="no_learnable_tokens")
        if not pixels:
            return {"tokens": full_length, "truncated": truncated, "length": len(ids)}

        pixel_values, tgt_sizes = self._image_tensors([v for group in views for v in group])
        return dict(
            record={"index": index, "id": record.get("id")},  # names the record if its loss goes bad
            input_ids=ids,
            position_ids=torch.arange(len(ids), dtype=torch.long),
            labels=labels,
            attention_mask=torch.ones(len(ids), dtype=torch.bool),
            pixel_values=pixel_values,
            tgt_sizes=tgt_sizes,
            image_bound=bounds,
        )

    def _splice_query_runs(self, ids, context):
        """Insert ``query_num`` unk ids after every opening token; return ids, context, bounds.

        In numpy: these arrays are a few hundred elements, and torch's multi-threaded
        repeat_interleave costs milliseconds per call on a machine whose cores are busy.
        """
        q = self.query_num
        ids, context = ids.numpy(), context.numpy()
        is_opener = (ids[:, None] == self.opener_ids.numpy()).any(axis=1)
        counts = 1 + q * is_opener
        new_positions = np.cumsum(counts) - counts
        ids = np.repeat(ids, counts)
        context = np.repeat(context, counts)
        starts = new_positions[is_opener] + 1
        ids[(starts[:, None] + np.arange(q)).reshape(-1)] = self.unk_id
        bounds = np.stack([starts, starts + q], axis=1).reshape(-1, 2)
        ends = bounds[:, 1]
        if (ends >= len(ids)).any() or not (ids[ends.clip(max=len(ids) - 1), None] == self.closer_ids.numpy()).any(axis=1).all():
            raise ValueError("an image start token is not followed by its end token after the chat template")
        return torch.from_numpy(ids), torch.from_numpy(context), torch.from_numpy(bounds.astype(np.int64))

    def _image_spans(self, ids, bounds, layouts):
        """Per image, the (first, last) token of its whole placeholder, id prefix included."""
        id_starts = torch.where(ids == self.im_id_start_id)[0] if self.im_id_start_id is not None else None
        spans, run = [], 0
        for runs in layouts:
            first = int(bounds[run, 0]) - 1
            last = int(bounds[run + runs - 1, 1])
            if id_starts is not None:
                first = int(id_starts[id_starts < first].max())
            if runs > 1 and self.image_end_extra is not None:
                last += 1  # the old schema's slice_end
            spans.append((first, last))
            run += runs
        return spans

    def _image_tensors(self, images):
        """The views' uint8 pixels (model_pixels normalises them) and their patch grids.

        A sample's tensors are views of one buffer: a DataLoader worker hands them to the training
        process as one shared-memory block, not one per view (measured: benchmarks/pipeline.py).
        """
        arrays = [np.asarray(image) for image in images]  # [H, W, 3], read-only views of PIL's bytes
        p = self.patch_size
        if self.batch_vision:
            layouts = [reshape_by_patch(a, p) for a in arrays]
            shapes = [(3, p, -1)] * len(arrays)
            sizes = torch.tensor([[a.shape[0] // p, a.shape[1] // p] for a in arrays], dtype=torch.int32)
        else:
            layouts = [a.transpose(2, 0, 1) for a in arrays]  # [3, H, W]
            shapes = [layout.shape for layout in layouts]
            sizes = torch.zeros((0, 2), dtype=torch.int32)
        buffer = torch.empty(sum(layout.size for layout in layouts), dtype=torch.uint8)
        tensors, start = [], 0
        for layout, shape in zip(layouts, shapes):
            tensor = buffer[start : start + layout.size]
            np.copyto(tensor.numpy().reshape(layout.shape), layout)
            tensors.append(tensor.view(shape))
            start += layout.size
        return tensors, sizes.reshape(-1, 2)


class DataCollator:
    """Pads a list of samples into a batch; images, bounds and sizes stay per-sample lists (images
    as uint8: the family's forward normalises them, see data.slicing.model_pixels).

    Samples are expected to be truncated by the dataset already (it knows where images are);
    cutting here is a last resort and refuses to cut through an image placeholder. The batch is a
    ShippedBatch: from a DataLoader worker, its tensors travel as one block (data/shipping.py).
    """

    def __init__(self, max_length, pad_token_id=0):
        self.max_length = max_length
        self.pad_token_id = pad_token_id

    def __call__(self, examples):
        for n, example in enumerate(examples):
            bounds = example["image_bound"]
            if len(bounds) and int(bounds[:, 1].max()) >= self.max_length:
                raise ValueError(
                    f"sample {n} of the batch ({len(example['input_ids'])} tokens) has an image placeholder past "
                    f"max_length {self.max_length}; build the dataset with the same max_length"
                )

        def pad(key, value):
            return pad_sequence([e[key][: self.max_length] for e in examples], batch_first=True, padding_value=value)

        return ShippedBatch({
            "input_ids": pad("input_ids", self.pad_token_id),
            "position_ids": pad("position_ids", 0),
            "labels": pad("labels", IGNORE_INDEX),
            "attention_mask": pad("attention_mask", False),
            "pixel_values": [e["pixel_values"] for e in examples],
            "image_bound": [e["image_bound"] for e in examples],
            # The same list under the name the published MiniCPM-V 2.0 forward reads (its revision
            # "adapt for transformers processing", HwwwwwwwH/MiniCPM-V-2@84ce9b0); the others read image_bound.
            "image_bounds": [e["image_bound"] for e in examples],
            "tgt_sizes": [e["tgt_sizes"] for e in examples],
            # A packed row (pack_samples) names all the records it holds.
            "records": [record for e in examples for record in (e["records"] if "records" in e else [e["record"]])],
        })


# --------------------------------------------------------------------------------------------
# The dataset as training and inference build it from a model config


@dataclass(frozen=True)
class DataSettings:
    """What the dataset needs from the model config: slicing, placeholder size, image layout."""

    slice_config: dict | None  # max_slice_nums, scale_resolution, patch_size; None: no slicing
    query_num: int
    patch_size: int
    batch_vision: bool
    use_image_id: bool


def make_dataset(records, tokenizer, settings, *, layout, max_length, image_root, data_path=None, preference=False):
    """A SupervisedDataset in chat ``layout`` (a data.layouts.ChatLayout) laid out as training lays it out
    (infer.py asks its questions through it too); with ``preference``, a PreferenceDataset of the same layout."""
    # Imported here: data.preference builds its classes on this module's.
    from data.preference import PreferenceDataset

    return (PreferenceDataset if preference else SupervisedDataset)(
        records,
        tokenizer,
        slice_config=settings.slice_config,
        layout=layout,
        patch_size=settings.patch_size,
        query_num=settings.query_num,
        batch_vision=settings.batch_vision,
        max_length=max_length,
        use_image_id=settings.use_image_id,
        image_root=image_root,
        data_path=data_path,
    )


def log_sample(dataset, tokenizer):
    """Log the first sample as the model reads it, and the tokens it learns (both rows of a pair)."""
    sample = dataset[0]
    rows = {key: sample[key] for key in PREFERENCE_ANSWERS} if PREFERENCE_ANSWERS[0] in sample else {"sample": sample}
    for name, row in rows.items():
        ids, labels = row["input_ids"].tolist(), row["labels"].tolist()
        logger.info("First training %s, as the model reads it:\n%s", name, tokenizer.decode(ids))
        learned = [label for label in labels if label != IGNORE_INDEX]
        logger.info("...and the tokens it learns to predict (%d):\n%s", len(learned), tokenizer.decode(learned))
