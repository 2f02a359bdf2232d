"""The family and stage registries (families/, stages/): each family's data settings, and a toy family
and a toy stage registered at run time, each trained end to end through finetune.main."""

import json
import logging
import shutil

import pytest

import families
import finetune
import loading
import stages
from families.minicpmv2_6 import MiniCPMV2_6
from families.native import PACKING_PROBLEM
from launch import FAST_ARGS, LORA_ARGS, finetune_args
from stages.sft import SFT
from tiny_models.build import FAMILIES, LLM_TYPE, NATIVE_FAMILIES
from trainer import CPMTrainer


@pytest.mark.parametrize("family", FAMILIES)
def test_each_familys_data_settings_follow_its_published_config(tiny_checkpoint, family):
    """2.0 keeps its slicing fields flat on the config and feeds images one by one; 2.5 and later keep
    them in slice_config and batch the vision input; the Qwen-based ones (2.6, o-2.6, 4.5) number
    their images (use_image_id)."""
    config = loading.load_config(tiny_checkpoint(family))
    for slices in (1, 9):
        settings = families.family_for(config).data_settings(config, slices)
        flat = family == "minicpmv2_0"
        source = config.to_dict() if flat else config.slice_config.to_dict()
        assert settings.slice_config == {**source, "max_slice_nums": slices}
        assert settings.slice_config["scale_resolution"] == source["scale_resolution"]
        assert (settings.query_num, settings.patch_size) == (config.query_num, 14)
        assert settings.batch_vision is not flat
        assert settings.use_image_id is (LLM_TYPE[family] == "qwen")


@pytest.mark.parametrize("family", [*FAMILIES, *NATIVE_FAMILIES])
def test_raw_config_and_loaded_config_give_the_same_family(tiny_checkpoint, family):
    folder = tiny_checkpoint(family)
    raw = json.loads((folder / "config.json").read_text())
    assert families.family_for_dict(raw).name == families.family_for(loading.load_config(folder)).name


class Toy(MiniCPMV2_6):
    """A made-up MiniCPM-V 9.9: 2.6's code and layout, and no packing."""

    name = "toy9_9"
    versions = (9.9,)
    reasons = {**MiniCPMV2_6.reasons, "packing": "--packing: the toy 9.9 family cannot pack"}


class ToyTrainer(CPMTrainer):
    def train(self, *args, **kwargs):
        logging.getLogger(__name__).info("toy stage trains family %s", self.family.name)
        return super().train(*args, **kwargs)


class ToyStage(SFT):
    """SFT whose trainer says so, and which needs the packing capability (which the native families lack)."""

    name = "toy"
    requires = ("packing",)
    trainer_class = ToyTrainer


@pytest.fixture
def registries(monkeypatch):
    """Registries that forget what a test registers."""
    monkeypatch.setattr(families, "FAMILIES", list(families.FAMILIES))
    monkeypatch.setattr(stages, "STAGES", dict(stages.STAGES))


@pytest.fixture
def toy_checkpoint(tiny_checkpoint, tmp_path):
    """The tiny 2.6 checkpoint, its config saying version 9.9."""
    folder = shutil.copytree(tiny_checkpoint("minicpmv2_6"), tmp_path / "toy9_9")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "version": 9.9}))
    return folder


def run_main(model, data, out, *argv):
    return finetune.main([str(arg) for arg in finetune_args(
        model, data, out, *FAST_ARGS, *LORA_ARGS, "--tune_vision", "false", "--max_steps", "1",
        "--save_strategy", "no", *argv)])


def test_a_family_registered_at_run_time_is_found_and_trains(registries, toy_checkpoint, shapes, tmp_path, capsys):
    # Unregistered, a version no family claims goes to the fallback family (4.x).
    assert families.family_for(loading.load_config(toy_checkpoint)).name == "minicpmv4"
    families.register(Toy)
    assert families.family_for(loading.load_config(toy_checkpoint)).name == "toy9_9"
    trainer = run_main(toy_checkpoint, shapes, tmp_path / "out")
    assert trainer.family.name == "toy9_9" and trainer.state.global_step == 1
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    # Its own capabilities: what it lacks is refused with its reason.
    with pytest.raises(SystemExit):
        run_main(toy_checkpoint, shapes, tmp_path / "packed", "--packing", "true")
    assert "finetune.py: error: --packing: the toy 9.9 family cannot pack" in capsys.readouterr().err


def test_a_stage_registered_at_run_time_runs_and_is_refused_with_the_familys_reason(
    registries, tiny_checkpoint, shapes, tmp_path, capsys
):
    stages.register(ToyStage)
    trainer = run_main(tiny_checkpoint("minicpmv2_6"), shapes, tmp_path / "out", "--stage", "toy")
    assert isinstance(trainer, ToyTrainer) and trainer.state.global_step == 1
    assert "toy stage trains family minicpmv2_6" in capsys.readouterr().err  # finetune.main logs to stderr
    # A native family lacks the capability the stage requires: refused, with its reason, before any weights.
    with pytest.raises(SystemExit):
        run_main(tiny_checkpoint("minicpmv4_6"), shapes, tmp_path / "native", "--stage", "toy")
    assert f"finetune.py: error: --stage toy: {PACKING_PROBLEM}" in capsys.readouterr().err


def test_every_published_record_belongs_to_one_remote_code_family():
    """tiny_models/published_remote_code.json records each family's published files: each record is
    named by exactly one family descriptor."""
    from tiny_models.build import published_record

    named = [key for family in families.FAMILIES for key in family.published]
    assert sorted(named) == sorted(published_record()["families"])
