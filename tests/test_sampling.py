"""--group_by_length: batches of similar length, from the lengths preflight measured."""

import json

import pytest
from torch.utils.data import Subset
from transformers import AutoModel
from transformers.trainer_pt_utils import LengthGroupedSampler

import arguments
import demo_data
import preflight
from dataset import SupervisedDataset
from launch import dataset_as_trained
from trainer import CPMTrainer


def test_group_by_length_uses_preflight_lengths_without_building_samples(tiny_checkpoint, tmp_path, monkeypatch):
    model_dir = tiny_checkpoint("minicpmv2_6")
    dataset, collator = dataset_as_trained(model_dir, demo_data.generate(tmp_path / "data", count=8))
    checked = preflight.run({"train": dataset, "eval": None}, str(tmp_path))
    expected = [len(dataset[i]["input_ids"]) for i in range(len(dataset))]
    assert checked.lengths["train"] == expected and len(set(expected)) > 1

    _, _, args, _ = arguments.parse_args(["--output_dir", str(tmp_path), "--use_cpu", "true", "--report_to", "none",
                                          "--group_by_length", "true", "--per_device_train_batch_size", "2"])
    assert args.train_sampling_strategy == "group_by_length"

    def refuse(self, index):
        raise AssertionError("a sample was built to learn its length")

    monkeypatch.setattr(SupervisedDataset, "__getitem__", refuse)
    model = AutoModel.from_pretrained(model_dir, trust_remote_code=True)
    trainer = CPMTrainer(model=model, args=args, train_dataset=checked.datasets["train"],
                         train_lengths=checked.lengths["train"], data_collator=collator)
    sampler = trainer._get_train_sampler()
    assert isinstance(sampler, LengthGroupedSampler) and sampler.lengths == expected
    assert sorted(sampler) == list(range(len(dataset)))


def test_skipped_records_lengths_follow_the_kept_indices(tiny_checkpoint, tmp_path):
    data = demo_data.generate(tmp_path / "data", count=4)
    records = json.loads(data.read_text())
    records[2]["conversations"] = []  # unusable: dropped by --skip_bad_samples
    data.write_text(json.dumps(records))
    dataset, _ = dataset_as_trained(tiny_checkpoint("minicpmv2_6"), data)
    checked = preflight.run({"train": dataset, "eval": None}, str(tmp_path), skip_bad=True)
    kept = checked.datasets["train"]
    assert isinstance(kept, Subset) and kept.indices == [i for i in range(len(dataset)) if i != 2]
    assert checked.lengths["train"] == [len(dataset[i]["input_ids"]) for i in kept.indices]


def test_group_by_length_contradicting_another_sampler_is_refused():
    with pytest.raises(ValueError, match="--group_by_length true contradicts --train_sampling_strategy sequential"):
        arguments.parse_args(["--output_dir", "unused", "--use_cpu", "true", "--group_by_length", "true",
                              "--train_sampling_strategy", "sequential"])
