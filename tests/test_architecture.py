"""docs/ARCHITECTURE.md's worked examples, run as they are written: a family, a stage and a data source,
each one file's code registered at run time (its one registration line), working through the same
paths as the built-in ones."""

import json
import re
import sys
import types
from pathlib import Path

import pytest

import data.sources
import families
import finetune
import loading
import preflight
import stages
from launch import FAST_ARGS, LORA_ARGS, finetune_args
from test_dpo import write_preferences

ARCHITECTURE = Path(__file__).resolve().parent.parent / "docs" / "ARCHITECTURE.md"


def example(file_name):
    """The module written in the page's python block that starts with ``# <file_name>``, imported."""
    blocks = re.findall(r"```python\n(.*?)```", ARCHITECTURE.read_text(), re.S)
    [code] = [block for block in blocks if block.startswith(f"# {file_name}\n")]
    name = file_name.removesuffix(".py").replace("/", ".")
    module = types.ModuleType(name)
    module.__file__ = file_name
    sys.modules[name] = module  # dataclasses look their module up
    exec(compile(code, file_name, "exec"), module.__dict__)
    return module


@pytest.fixture
def registries(monkeypatch):
    """Registries that forget what a test registers."""
    monkeypatch.setattr(families, "FAMILIES", list(families.FAMILIES))
    monkeypatch.setattr(stages, "STAGES", dict(stages.STAGES))
    monkeypatch.setattr(data.sources, "SOURCES", list(data.sources.SOURCES))
    yield
    for name in ("families.minicpmv5_0", "stages.ipo", "data.sources.csv_rows"):
        sys.modules.pop(name, None)


def test_the_family_example_is_found_for_its_configs_and_refuses_packing(registries):
    config = {"model_type": "minicpmv", "version": "5.0", "query_num": 64}
    assert families.family_for_dict(config).name == "minicpmv4"  # unregistered: the newest line's fallback
    module = example("families/minicpmv5_0.py")
    families.register(module.MiniCPMV5_0)
    family = families.family_for_dict(config)
    assert family.name == "minicpmv5_0" and family.llm_type == "qwen"
    assert family.refusal("packing").startswith("--packing is not supported for MiniCPM-V 5.0")
    assert family.refusal("preference") is None  # what it does not say, it inherits
    assert families.family_for_dict({**config, "version": "2.6"}).name == "minicpmv2_6"


def test_the_stage_example_trains_and_is_refused_where_it_cannot_run(registries, tiny_checkpoint, shapes, tmp_path,
                                                                     capsys):
    ipo = example("stages/ipo.py").IPO
    stages.register(ipo)
    pairs = write_preferences(shapes, tmp_path / "pairs.json")

    def run(model, out, *argv):
        return finetune.main([str(arg) for arg in finetune_args(
            model, pairs, tmp_path / out, *FAST_ARGS, *LORA_ARGS, "--tune_vision", "false", "--max_steps", "1",
            "--save_strategy", "no", *argv)])

    trainer = run(tiny_checkpoint("minicpmv2_6"), "ipo", "--stage", "ipo", "--ipo_tau", "0.05")
    assert trainer.state.global_step == 1 and (trainer.beta, trainer.loss_type) == (0.05, "ipo")
    # Its flag belongs to it; what the stage refuses (its own reason) is refused before any weights load.
    with pytest.raises(SystemExit):
        run(tiny_checkpoint("minicpmv2_6"), "sft", "--ipo_tau", "0.05")
    assert "--ipo_tau given without --stage ipo" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run(tiny_checkpoint("minicpmv2_6"), "packed", "--stage", "ipo", "--packing", "true")
    assert f"finetune.py: error: {ipo.refuses['packing']}" in capsys.readouterr().err


def test_the_data_source_example_feeds_preflight(registries, tiny_checkpoint, tmp_path):
    data.sources.register(example("data/sources/csv_rows.py").CsvRows)
    table = tmp_path / "qa.csv"
    table.write_text("id,question,answer\nq0,What is 2+2?,4\nq1,Say nothing,\nq2,Capital of France?,Paris\n")
    records = data.sources.load(table)
    assert type(records).__name__ == "CsvRows" and len(records) == 3
    assert records[2]["conversations"][1] == {"role": "assistant", "content": "Paris"}
    family = families.family_for_dict({"model_type": "minicpmv", "version": "2.6"})
    model = tiny_checkpoint("minicpmv2_6")
    dataset = family.make_dataset(records, family.load_processing(model), loading.load_config(model), max_length=512,
                                  image_root=tmp_path, data_path=str(table), max_slice_nums=2)
    with pytest.raises(preflight.PreflightFailed):
        preflight.run({"train": dataset}, str(tmp_path), workers=1, cache=False)
    problems = json.loads((tmp_path / preflight.REPORT_NAME).read_text())["problems"]
    assert [(p["index"], p["record_id"], p["reason"]) for p in problems] == [(1, "q1", "empty_answer")]
