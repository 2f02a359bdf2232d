"""data/sources/: the sources registry; Parquet, Arrow and datasets folders as training data; the column mappings."""

import csv
import io
import json
import os
import pickle

import datasets
import numpy as np
import pytest
from PIL import Image

import preflight
from data import sources
from data.errors import DataError
from data.media import EmbeddedImage
from data.preference import PreferenceDataset, preference_pair
from data.sources.arrow import is_arrow_source
from data.sources.base import Source
from data.sources.columns import check_columns, to_record
from launch import dataset_as_trained, finetune_args, run_finetune, trainer_state
from usage import UsageError


def encoded(color, size=(56, 42)):
    """A PNG of noise around ``color`` (about 7 kB: the table's bulk is its images)."""
    noise = np.random.default_rng(sum(color)).integers(-40, 40, (size[1], size[0], 3))
    data = io.BytesIO()
    Image.fromarray(np.clip(noise + np.array(color), 0, 255).astype(np.uint8)).save(data, "PNG")
    return data.getvalue()


def sharegpt_rows(count):
    """LLaVA-style rows: an embedded image each (row 3's bytes are not an image), from/value messages."""
    rows = []
    for n in range(count):
        rows.append({
            "id": f"r{n}",
            "image": {"bytes": b"not an image" if n == 3 else encoded((40 * n % 255, 90, 200)), "path": f"{n}.png"},
            "conversations": [
                {"from": "human", "value": "<image>\nWhat colour is it?"},
                {"from": "gpt", "value": f"A colour of number {n}" + " and more" * (n % 4)},
            ],
        })
    return rows


SHAREGPT_FEATURES = datasets.Features({
    "id": datasets.Value("string"),
    "image": datasets.Image(),
    "conversations": datasets.List({"from": datasets.Value("string"), "value": datasets.Value("string")}),
})


def rlaif_rows(count):
    return [
        {"idx": n, "image": {"bytes": encoded((200, 10 * n, 30)), "path": None}, "question": f"Describe picture {n}.",
         "chosen": "A red picture.", "rejected": "A blue picture.", "ds_name": "test"}
        for n in range(count)
    ]


RLAIF_FEATURES = datasets.Features({
    "idx": datasets.Value("int64"), "image": datasets.Image(), "question": datasets.Value("string"),
    "chosen": datasets.Value("string"), "rejected": datasets.Value("string"), "ds_name": datasets.Value("string"),
})


def test_sharegpt_mapping():
    row = sharegpt_rows(1)[0]
    record = to_record(row, 0, "sharegpt")
    assert record["conversations"] == [
        {"role": "user", "content": "<image>\nWhat colour is it?"}, {"role": "assistant", "content": "A colour of number 0"},
    ]
    assert record["id"] == "r0" and isinstance(record["image"], EmbeddedImage) and record["image"] == "0.png"
    assert record["image"].data == row["image"]["bytes"]
    assert to_record(row, 0, "llava") == record


def test_rlaif_v_mapping_is_a_preference_record():
    record = to_record(rlaif_rows(2)[1], 1, "rlaif-v")
    assert record["id"] == 1 and record["conversations"] == [{"role": "user", "content": "<image>\nDescribe picture 1."}]
    assert (record["chosen"], record["rejected"]) == ("A red picture.", "A blue picture.")
    assert isinstance(record["image"], EmbeddedImage) and record["image"] == "image of row 1"  # no stored name
    assert set(preference_pair(record, 1)) == {"chosen", "rejected"}


def test_explicit_mapping_and_its_errors():
    row = {"uid": 7, "img": "a.png", "messages": [{"role": "user", "content": "<image>x"}], "extra": 1}
    assert to_record(row, 0, "id=uid,image=img,conversations=messages") == {
        "id": 7, "image": "a.png", "conversations": row["messages"]}
    assert to_record(row, 0, None) is row  # our names already: taken as it is
    images = to_record({"image": [{"bytes": b"1", "path": None}, {"bytes": None, "path": "b.png"}]}, 4, None)
    assert images["image"] == {"<image_00>": "image of row 4[0]", "<image_01>": "b.png"}
    assert check_columns("rlaif-v") is None and check_columns("id=uid") is None
    assert "KEY=COLUMN" in check_columns("nonsense")
    assert "'pictures' is not a record key" in check_columns("pictures=img")
    import arguments

    with pytest.raises(UsageError, match="--data_columns 'nonsense'"):
        arguments.DataArguments(data_columns="nonsense")


@pytest.fixture
def tables(tmp_path):
    """The same ShareGPT rows as a save_to_disk folder, a Parquet file, a folder of two Parquet files, an .arrow file."""
    table = datasets.Dataset.from_list(sharegpt_rows(8), features=SHAREGPT_FEATURES)
    table.save_to_disk(tmp_path / "saved")
    table.to_parquet(tmp_path / "one.parquet")
    (tmp_path / "parts").mkdir()
    table.select(range(5)).to_parquet(tmp_path / "parts" / "a.parquet")
    table.select(range(5, 8)).to_parquet(tmp_path / "parts" / "b.parquet")
    [table] = (tmp_path / "saved").glob("*.arrow")
    return {"saved": tmp_path / "saved", "parquet": tmp_path / "one.parquet", "parts": tmp_path / "parts", "arrow": table}


def test_every_table_form_reads_the_same_records(tables):
    expected = [to_record(row, n, "sharegpt") for n, row in enumerate(sharegpt_rows(8))]
    for name, path in tables.items():
        assert is_arrow_source(path), name
        records = sources.load(path, "sharegpt")
        assert len(records) == 8 and list(dict(records.items()).values()) == expected, name
        assert [r["image"].data for r in (records[n] for n in range(8))] == [r["image"].data for r in expected]
        # Memory-mapped: a copy (for another process) names the files, it does not carry the rows.
        assert len(pickle.dumps(records)) < sum(len(r["image"].data) for r in expected), name
    assert not is_arrow_source(tables["saved"].parent / "x.json")


def test_a_folder_of_splits_and_an_unreadable_table_are_data_errors(tmp_path):
    table = datasets.Dataset.from_list(rlaif_rows(2), features=RLAIF_FEATURES)
    datasets.DatasetDict({"train": table, "test": table}).save_to_disk(tmp_path / "dict")
    with pytest.raises(DataError, match=r"holds the splits train, test, not one table: give the folder of one") as info:
        sources.load(tmp_path / "dict", "rlaif-v")
    assert info.value.code == "unreadable_file"
    assert len(sources.load(tmp_path / "dict" / "train", "rlaif-v")) == 2
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataError, match="cannot read the table") as info:
        sources.load(tmp_path / "bad.parquet")
    assert info.value.data_path == str(tmp_path / "bad.parquet")


def test_embedded_images_are_checked_and_trained_as_files_are(tiny_checkpoint, tables, tmp_path):
    model = tiny_checkpoint("minicpmv2_6")
    train = dataset_as_trained(model, tables["parquet"], "--data_columns", "sharegpt")[0]
    bad, lengths = preflight.check_all({"train": train}, tmp_path / "out", skip_bad=False, preflight_only=True,
                                       progress=False, workers=2)
    assert bad == {"train": [3]}
    [problem] = json.loads((tmp_path / "out" / preflight.REPORT_NAME).read_text())["problems"]
    assert problem["reason"] == "not_an_image" and problem["record_id"] == "r3" and problem["path"] == "3.png"
    # The same records as JSON, their images written to files: the same samples, pixel for pixel.
    records = []
    for n, row in enumerate(sharegpt_rows(8)):
        (tmp_path / f"{n}.png").write_bytes(row["image"]["bytes"])
        records.append({**row, "image": f"{n}.png"})
    (tmp_path / "same.json").write_text(json.dumps(records))
    files = dataset_as_trained(model, tmp_path / "same.json", "--data_columns", "sharegpt")[0]
    for n in (0, 5):
        embedded, written = train[n], files[n]
        assert lengths["train"][n] == len(embedded["input_ids"])
        assert embedded["input_ids"].equal(written["input_ids"]) and embedded["labels"].equal(written["labels"])
        assert all(a.equal(b) for a, b in zip(embedded["pixel_values"], written["pixel_values"], strict=True))


def test_rlaif_v_parquet_builds_preference_pairs(tiny_checkpoint, tmp_path):
    datasets.Dataset.from_list(rlaif_rows(3), features=RLAIF_FEATURES).to_parquet(tmp_path / "rlaif.parquet")
    pairs = dataset_as_trained(tiny_checkpoint("minicpmv2_6"), tmp_path / "rlaif.parquet", "--data_columns", "rlaif-v",
                               "--stage", "dpo")[0]
    assert isinstance(pairs, PreferenceDataset) and len(pairs) == 3
    pair = pairs[2]
    assert set(pair) == {"chosen", "rejected"} and pair["chosen"]["record"] == pair["rejected"]["record"]


@pytest.mark.launch
def test_parquet_trains_with_skip_mode_packing_and_length_grouping(tiny_checkpoint, tables, tmp_path):
    out = tmp_path / "out"
    _, output = run_finetune(finetune_args(
        tiny_checkpoint("minicpmv2_6"), tables["parts"], out, "--data_columns", "sharegpt", "--skip_bad_samples", "true",
        "--packing", "true", "--group_by_length", "true", "--use_lora", "true", "--tune_llm", "false",
        "--num_train_epochs", "1", "--per_device_train_batch_size", "1", "--save_strategy", "no", "--logging_steps", "1",
    ))
    report = json.loads((out / preflight.REPORT_NAME).read_text())
    assert report["action"] == "skipped" and report["dropped"] == {"train": [3]}
    assert "dropping 1 of 8 train records" in output and "Packing: 7 samples into" in output
    assert trainer_state(out)["global_step"] >= 1


class CsvSource(Source):
    """A toy source for the registry test: a .csv of ``id,question,answer`` rows, a record each."""

    @classmethod
    def accepts(cls, path):
        return os.fspath(path).lower().endswith(".csv")

    def __init__(self, path, columns=None):
        super().__init__(path, columns)
        with open(self.path, newline="", encoding="utf-8") as f:
            self.rows = list(csv.DictReader(f))

    def __len__(self):
        return len(self.rows)

    def row(self, index):
        row = self.rows[index]
        return {"id": row["id"], "conversations": [{"role": "user", "content": row["question"]},
                                                   {"role": "assistant", "content": row["answer"]}]}


def test_a_registered_source_feeds_finetunes_data_path_and_preflight(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "SOURCES", list(sources.SOURCES))  # the registration ends with the test
    sources.register(CsvSource)
    path = tmp_path / "qa.csv"
    lines = ["id,question,answer"] + [f"q{n},What is {n} + 1?,{n + 1}" for n in range(10)]
    lines[5] = "q4,What is 4 + 1?,   "  # record 4: a white-space answer, nothing to learn
    path.write_text("\n".join(lines) + "\n")
    assert isinstance(sources.load(path), CsvSource) and len(sources.load(path)) == 10
    train = dataset_as_trained(tiny_checkpoint("minicpmv2_6"), path)[0]  # through finetune.build_datasets
    with pytest.raises(preflight.PreflightFailed, match="1 unusable records"):
        preflight.run({"train": train, "eval": None}, tmp_path / "out", workers=1)
    [problem] = json.loads((tmp_path / "out" / preflight.REPORT_NAME).read_text())["problems"]
    assert (problem["reason"], problem["index"], problem["record_id"]) == ("empty_answer", 4, "q4")
    checked = preflight.run({"train": train, "eval": None}, tmp_path / "out", skip_bad=True, workers=1)
    kept = [n for n in range(10) if n != 4]
    assert checked.datasets["train"].indices == kept
    assert checked.lengths["train"] == [len(train[n]["input_ids"]) for n in kept]
    assert train[0]["record"] == {"index": 0, "id": "q0"}
