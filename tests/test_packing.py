"""--packing: whole samples side by side in one row, each seeing only itself."""

import pytest
import torch
from transformers import AutoModel

import arguments
from families.base import PACKING_ATTENTION, packing_attention_problem
import numerics
import preflight
from data.packing import PackedDataset, pack_lengths, pack_samples
from data.records import IGNORE_INDEX
from data.slicing import model_pixels
from launch import dataset_as_trained
from trainer import CPMTrainer

# The remote-code families whose LLM packs (MiniCPM-V 2.0 is refused: families/minicpmv2_0.py MINICPM_PACKING_PROBLEM).
# o-2.6 runs 2.6's code with the same Qwen2 LLM.
PACKING_FAMILIES = ("minicpmv2_5", "minicpmv2_6", "minicpmv4_5")


def test_rows_are_filled_best_fit_decreasing_and_hold_every_sample_once():
    # 5 opens a row (3 free), 4 a second (4 free), 3 fills the first, 3 goes to the second (1 free),
    # 2 opens a third, 1 fills the second.
    assert pack_lengths([5, 4, 3, 3, 2, 1], 8) == [[0, 2], [1, 3, 5], [4]]
    lengths = [(7 * i) % 23 + 1 for i in range(200)]
    rows = pack_lengths(lengths, 40)
    assert sorted(i for row in rows for i in row) == list(range(200))
    assert all(sum(lengths[i] for i in row) <= 40 for row in rows)
    assert sum(lengths) / (40 * len(rows)) > 0.95
    assert pack_lengths(lengths, 40) == rows  # the same rows every time: a resumed run replays them
    with pytest.raises(ValueError, match=r"samples \[1\] are longer than the row length 8"):
        pack_lengths([8, 9], 8)


def test_a_sample_with_a_label_at_its_last_position_is_not_packed():
    sample = {"labels": torch.tensor([IGNORE_INDEX, 5]), "input_ids": torch.tensor([1, 2])}
    with pytest.raises(ValueError, match="sample 0 has a label at its last position"):
        pack_samples([sample])


@pytest.fixture(scope="module")
def model_of(tiny_checkpoint):
    loaded = {}

    def get(family):
        if family not in loaded:
            loaded[family] = AutoModel.from_pretrained(tiny_checkpoint(family), trust_remote_code=True,
                                                       dtype=torch.float32).eval()
        return loaded[family]

    return get


@pytest.mark.numerics
@pytest.mark.parametrize("family", PACKING_FAMILIES)
def test_a_packed_row_has_the_logits_and_loss_of_its_samples_unpacked(tiny_checkpoint, model_of, shapes, tmp_path,
                                                                      family):
    model_dir = tiny_checkpoint(family)
    dataset, collator = dataset_as_trained(model_dir, shapes)
    samples = [dataset[i] for i in (8, 9, 0)]  # two images, text only, one image
    assert [len(s["pixel_values"]) > 0 for s in samples] == [True, False, True]
    packed = collator([pack_samples(samples)])
    model = model_of(family)

    def logits_of(batch):  # the model called directly takes normalised pixels (the trainer's backend makes them)
        return model(data=dict(batch, pixel_values=model_pixels(batch["pixel_values"], torch.float32)),
                     use_cache=False).logits[0]

    _, _, args, _ = arguments.parse_args(["--output_dir", str(tmp_path), "--use_cpu", "true", "--report_to", "none"])
    trainer = CPMTrainer(model=model, args=args)
    for attention in PACKING_ATTENTION:
        model.llm.set_attn_implementation(attention)
        assert packing_attention_problem(model.llm) is None
        with torch.no_grad():
            logits = logits_of(packed)
            start = 0
            for sample in samples:
                alone = logits_of(collator([sample]))
                end = start + len(alone)
                numerics.assert_close(logits[start:end], alone)  # another sequence length: other blockings
                start = end
            # The loss of the packed row is the token-weighted loss of its samples in a padded batch.
            unpacked = trainer.compute_loss(model, collator(samples))
            numerics.assert_close(trainer.compute_loss(model, packed), unpacked)
            # Position ids running on across the row would let the later samples see the earlier ones.
            running = {**packed, "position_ids": torch.arange(packed["input_ids"].shape[1])[None]}
            assert (logits_of(running)[start - 1] - alone[-1]).abs().max() > 1e-3
    model.llm.config._attn_implementation = "flash_attention_2"  # finds packed samples only in a batch of one row
    try:
        assert "uses 'flash_attention_2'" in packing_attention_problem(model.llm)
    finally:
        model.llm.set_attn_implementation("sdpa")


def test_packed_dataset_rows_from_preflight_lengths(tiny_checkpoint, shapes, tmp_path):
    dataset, collator = dataset_as_trained(tiny_checkpoint("minicpmv2_6"), shapes)
    with pytest.raises(ValueError, match="run preflight over the dataset first"):
        PackedDataset(dataset, [], 160)
    checked = preflight.run({"train": dataset, "eval": None}, str(tmp_path))
    lengths = checked.lengths["train"]
    packed = PackedDataset(checked.datasets["train"], lengths, 160)
    assert sorted(i for row in packed.rows for i in row) == list(range(len(dataset)))
    assert 1 < len(packed) < len(dataset)
    assert packed.lengths == [len(packed[n]["input_ids"]) for n in range(len(packed))]
    row = packed.rows[0]
    batch = collator([packed[0], dataset[row[0]]])  # a packed row batched with an unpacked sample (as in eval)
    assert batch["records"] == [dataset[i]["record"] for i in row] + [dataset[row[0]]["record"]]
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist()
    assert starts[: len(row)] == [sum(lengths[i] for i in row[:n]) for n in range(len(row))]
