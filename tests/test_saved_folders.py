"""What this project saves loads where users load it, and answers through its own chat().

Every folder saved for a remote-code model (full fine-tune, checkpoint, merged adapter) is loaded
in a fresh, isolated Python process with plain `AutoModel.from_pretrained(folder,
trust_remote_code=True)` (tests/plain_load.py, no import of this project, after the folder was
moved) and must give the logits this project's loader gives. The defect fixtures of
test_loading.py reproduce the published remote code's defects; with the repairs taken out of a
saved folder, the same check fails.
"""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from PIL import Image
from transformers import TrainingArguments

import demo_data
import loading
import merge
import numerics
from families.remote_code import REMOTE_CODE_LORA_TARGETS as DEFAULT_LORA_TARGETS
from repairs.files import REPAIRS_FILE_PREFIX
from launch import LORA_ARGS, REPO, finetune_args, run, run_finetune, subprocess_env
from test_loading import DEFECTS, batch, defective_checkpoint, load, logits  # noqa: F401 (a fixture)
from trainer import CPMTrainer

PLAIN_LOAD = REPO / "tests" / "plain_load.py"
# How a folder without its repairs fails to load with plain transformers, by defect.
UNREPAIRED_FAILURE = {
    "star_import": "NameError: name 'List' is not defined",
    "no_post_init": "all_tied_weights_keys",
    "stale_buffer": "logits differ",
    "all": "NameError: name 'List' is not defined",
}


def plain_load(jobs, tmp_path):
    """Run the jobs of tests/plain_load.py in one fresh isolated process with its own module cache."""
    jobs_path, results_path = tmp_path / "jobs.json", tmp_path / "results.pt"
    jobs_path.write_text(json.dumps([{k: str(v) if isinstance(v, Path) else v for k, v in job.items()} for job in jobs]))
    run([sys.executable, "-I", PLAIN_LOAD, jobs_path, results_path], cwd=tmp_path,
        env=subprocess_env(HF_MODULES_CACHE=tmp_path / "modules", HF_HUB_OFFLINE=1))
    results = torch.load(results_path)
    assert results.pop("project_modules_imported") == []
    return results


def moved(folder, tmp_path):
    """The folder, moved to another path under another name."""
    target = tmp_path / "moved" / f"{folder.parent.name}-{folder.name}-moved"
    target.parent.mkdir(exist_ok=True)
    return Path(shutil.move(folder, target))


def without_repairs(folder, tmp_path):
    """A copy of a saved folder as it was before this project added the repairs."""
    copy = shutil.copytree(folder, tmp_path / "stripped" / f"{folder.parent.name}-{folder.name}-stripped")
    config = json.loads((copy / "config.json").read_text())
    config["auto_map"] = config.pop(loading.PUBLISHED_AUTO_MAP)
    (copy / "config.json").write_text(json.dumps(config))
    (copy / f"{loading.REPAIRED_MODULE}.py").unlink()
    for repairs_copy in copy.glob(f"{REPAIRS_FILE_PREFIX}*.py"):
        repairs_copy.unlink()
    return copy


def mismatch(result, expected):
    """Why a plain load did not give the loader's logits, or None."""
    if "error" in result:
        return result["error"]
    # Another process (its own thread count, on another machine another instruction set): fp32 rounding.
    for key in ("logits", "resaved_logits"):
        if key in result and not numerics.close(result[key], expected):
            return f"{key} differ by {(result[key] - expected).abs().max().item():.3g}"
    return None


def save_full(model, tokenizer, base, out):
    """The final save of a full fine-tune: CPMTrainer.save_model, as finetune.train() calls it."""
    args = TrainingArguments(output_dir=str(out), use_cpu=True, report_to="none")
    CPMTrainer(model=model, args=args, processing_class=tokenizer, model_source=base).save_model(str(out))
    return out


def save_merged(base, out):
    """merge.py on an adapter whose LoRA weights are not zero (merging changes the weights)."""
    model = load(base)
    config = LoraConfig(target_modules=DEFAULT_LORA_TARGETS, r=4, init_lora_weights=False,
                        modules_to_save=["resampler"])
    adapter = out.parent / f"{out.name}-adapter"
    get_peft_model(model, config).save_pretrained(adapter)
    loading.load_tokenizer(base).save_pretrained(adapter)
    return merge.merge(base, adapter, out)


@pytest.fixture(scope="module")
def defect_folders(defective_checkpoint, tmp_path_factory):
    """For each defect: the loader's logits of its saved full and merged folders, and what a plain
    load gave for each (moved, and saved again) and for each without its repairs."""
    tmp_path = tmp_path_factory.mktemp("defect_folders")
    data = batch(loading.load_config(defective_checkpoint("all")).vocab_size)
    torch.save(data, tmp_path / "batch.pt")
    expected, jobs = {}, []
    for defect in DEFECTS:
        base = defective_checkpoint(defect)
        folders = {
            "full": save_full(load(base), loading.load_tokenizer(base), base, tmp_path / f"{defect}-full"),
            "merged": save_merged(base, tmp_path / f"{defect}-merged"),
        }
        for kind, folder in folders.items():
            expected[defect, kind] = logits(load(folder))
            stripped = without_repairs(folder, tmp_path)
            folder = moved(folder, tmp_path)
            jobs.append({"name": f"{defect}/{kind}", "folder": folder, "batch": tmp_path / "batch.pt",
                         "resave": tmp_path / "resaved" / f"{defect}-{kind}"})
            jobs.append({"name": f"{defect}/{kind}/stripped", "folder": stripped, "batch": tmp_path / "batch.pt"})
    return expected, plain_load(jobs, tmp_path)


@pytest.mark.numerics
@pytest.mark.launch
@pytest.mark.parametrize("defect", sorted(DEFECTS))
@pytest.mark.parametrize("kind", ["full", "merged"])
def test_saved_folder_loads_with_plain_transformers(defect_folders, defect, kind):
    expected, results = defect_folders
    result = results[f"{defect}/{kind}"]
    assert mismatch(result, expected[defect, kind]) is None, result.get("traceback")
    # Without the repairs the folder carries, the same check fails.
    assert UNREPAIRED_FAILURE[defect] in (mismatch(results[f"{defect}/{kind}/stripped"], expected[defect, kind]) or "")


def test_write_repaired_classes_keeps_the_published_targets(defective_checkpoint, tmp_path):
    folder = shutil.copytree(defective_checkpoint("all"), tmp_path / "folder")
    published = json.loads((folder / "config.json").read_text())["auto_map"]
    written = loading.write_repaired_classes(folder)
    assert written and all((folder / name).is_file() for name in written)
    # A copy of every module of the repairs package, the same code with its imports of its siblings
    # renamed as the copies are.
    modules = sorted(path.name for path in (REPO / "repairs").glob("*.py") if path.name != "__init__.py")
    assert sorted(path.name for path in folder.glob(f"{REPAIRS_FILE_PREFIX}*.py")) == [
        REPAIRS_FILE_PREFIX + name for name in modules]
    for name in modules:
        copied = (folder / f"{REPAIRS_FILE_PREFIX}{name}").read_text()
        assert copied.replace(f"from .{REPAIRS_FILE_PREFIX}", "from .") == (REPO / "repairs" / name).read_text()
    config = json.loads((folder / "config.json").read_text())
    assert config[loading.PUBLISHED_AUTO_MAP] == published
    assert set(config["auto_map"].values()) == {f"{loading.REPAIRED_MODULE}.MiniCPMVConfig",
                                               f"{loading.REPAIRED_MODULE}.MiniCPMVLegacy"}
    # Saving again (as a run started from a saved folder does) wraps the same published classes.
    loading.write_repaired_classes(folder)
    assert json.loads((folder / "config.json").read_text()) == config


# The two files write_repaired_classes wrote into the defect fixture's folder (DEFECTS "all") before the
# repairs became a package (at 94f27ba): a single remote_code_repairs.py beside repaired_classes.py.
SAVED_BEFORE_PACKAGE = Path(__file__).parent / "fixtures" / "saved_before_repairs_package"


def saved_before_package(defective_checkpoint, folder):
    """The defect fixture with every defect, as the previous version of this project saved it."""
    folder = shutil.copytree(defective_checkpoint("all"), folder)
    for path in SAVED_BEFORE_PACKAGE.glob("*.py"):
        shutil.copyfile(path, folder / path.name)
    config = json.loads((folder / "config.json").read_text())
    config[loading.PUBLISHED_AUTO_MAP] = config["auto_map"]
    config["auto_map"] = {key: f"{loading.REPAIRED_MODULE}.{target.rpartition('.')[2]}"
                          for key, target in config["auto_map"].items()}
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return folder


@pytest.mark.numerics
def test_a_folder_saved_before_the_repairs_package_still_loads_and_is_saved_anew(defective_checkpoint, tmp_path):
    """Its own copy of the repairs loads it with plain transformers and through the loader; writing the
    repairs again (as every save does) replaces that copy with the package's modules."""
    expected = logits(load(defective_checkpoint("all")))
    old = saved_before_package(defective_checkpoint, tmp_path / "old")
    assert torch.equal(logits(load(old)), expected)
    resaved = shutil.copytree(old, tmp_path / "resaved")
    written = loading.write_repaired_classes(resaved)
    assert not (resaved / "remote_code_repairs.py").exists()
    assert f"{REPAIRS_FILE_PREFIX}classes.py" in written and all((resaved / name).is_file() for name in written)
    assert json.loads((resaved / "config.json").read_text()) == json.loads((old / "config.json").read_text())
    torch.save(batch(loading.load_config(old).vocab_size), tmp_path / "batch.pt")
    results = plain_load([{"name": name, "folder": folder, "batch": tmp_path / "batch.pt"}
                          for name, folder in (("old", old), ("resaved", resaved))], tmp_path)
    for name in ("old", "resaved"):
        assert mismatch(results[name], expected) is None, results[name].get("traceback")


# ---- real runs: LoRA, merge, then a full fine-tune started from the merged folder -------------


@pytest.fixture(scope="module")
def trained_folders(defective_checkpoint, tmp_path_factory):
    """Runs with a non-default --max_slice_nums (launch.FAST_ARGS: 2) on the fixture with every
    defect: the merged folder of a LoRA run, and a full fine-tune started from that merged folder
    (its final folder and its checkpoint)."""
    tmp_path = tmp_path_factory.mktemp("trained")
    data = demo_data.generate(tmp_path / "data", count=2)
    base = defective_checkpoint("all")
    common = ["--max_steps", "1", "--learning_rate", "1e-3"]
    run_finetune(finetune_args(base, data, tmp_path / "lora", *LORA_ARGS, *common))
    merged = merge.merge(base, tmp_path / "lora", tmp_path / "merged")
    _, output = run_finetune(finetune_args(merged, data, tmp_path / "full", "--save_steps", "1", *common))
    assert f"Wrote {loading.REPAIRED_MODULE}.py and the repairs ({REPAIRS_FILE_PREFIX}*.py) into {tmp_path / 'full'}" in output
    # The checkpoint first: moving the run folder moves it too.
    return {"merged": merged, "checkpoint": tmp_path / "full" / "checkpoint-1", "full": tmp_path / "full"}


def chat(model, tokenizer):
    image = Image.new("RGB", (200, 150), (200, 40, 40))  # cut into slices at the tiny scale (112)
    return model.chat(image=image, msgs=[{"role": "user", "content": "What is this?"}], tokenizer=tokenizer,
                      sampling=False, max_new_tokens=4)


@pytest.mark.launch
def test_trained_folders_load_with_plain_transformers_and_chat(trained_folders, tmp_path):
    """Through the loader and through plain transformers: the same logits, and chat() answers."""
    data = batch(loading.load_config(trained_folders["full"]).vocab_size)
    torch.save(data, tmp_path / "batch.pt")
    expected, jobs = {}, []
    for kind, folder in trained_folders.items():
        # The training value of max_slice_nums is not saved: config and processor still agree.
        config = json.loads((folder / "config.json").read_text())
        processor = json.loads((folder / "preprocessor_config.json").read_text())
        assert config["slice_config"]["max_slice_nums"] == processor["max_slice_nums"] == 9
        model = load(folder)
        expected[kind] = logits(model)
        assert isinstance(chat(model, loading.load_tokenizer(folder)), str)
        jobs.append({"name": kind, "folder": moved(folder, tmp_path), "batch": tmp_path / "batch.pt", "chat": True})
    results = plain_load(jobs, tmp_path)
    for kind in trained_folders:
        assert mismatch(results[kind], expected[kind]) is None, results[kind].get("traceback")
        assert isinstance(results[kind]["answer"], str)


# ---- a folder names only files it holds ---------------------------------------------------------


def test_an_adapter_folder_naming_a_file_it_lacks_gets_it_or_the_base_tokenizer(tiny_checkpoint, tmp_path, caplog):
    """A tokenizer saved into an adapter folder carries the published auto_map, which may name the
    processor's file (2.6: AutoProcessor -> processing_minicpmv); the folder then gets the files it names
    (copy_named_files, as CPMTrainer's adapter saves do), and an older such folder makes inference take
    the base model's tokenizer instead of failing."""
    from families.inference import load_for_inference

    base = tiny_checkpoint("minicpmv2_6")
    adapter = tmp_path / "adapter"
    loading.load_tokenizer(str(base)).save_pretrained(adapter)
    config_path = adapter / "tokenizer_config.json"
    tokenizer_config = json.loads(config_path.read_text())
    tokenizer_config["auto_map"]["AutoProcessor"] = "processing_minicpmv.MiniCPMVProcessor"
    config_path.write_text(json.dumps(tokenizer_config))
    assert loading.named_files_missing(adapter) == [("tokenizer_config.json", "processing_minicpmv.py")]

    older = shutil.copytree(adapter, tmp_path / "older")
    model = get_peft_model(load(base), LoraConfig(r=2, target_modules=DEFAULT_LORA_TARGETS))
    model.save_pretrained(older)
    with caplog.at_level("WARNING", logger="families.inference"):
        _, tokenizer, _, _ = load_for_inference(str(base), str(older))
    assert f"taking the tokenizer and processor from {base}" in caplog.text
    assert type(tokenizer).__name__ == "MiniCPMVTokenizerFast"

    copied = loading.copy_named_files(base, adapter)
    assert "processing_minicpmv.py" in copied and "image_processing_minicpmv.py" in copied  # its relative import
    assert "preprocessor_config.json" in copied
    assert loading.named_files_missing(adapter) == []
    with pytest.raises(ValueError, match="names missing_module.py"):
        tokenizer_config["auto_map"]["AutoProcessor"] = "missing_module.Processor"
        config_path.write_text(json.dumps(tokenizer_config))
        loading.copy_named_files(base, adapter)
