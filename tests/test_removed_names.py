"""Stand-ins for transformers names the published MiniCPM-V remote code imports but transformers
removed (repairs.removed_names and repairs.stand_ins, defect 4), the imports table of the published code, and the
checkpoints whose remote code imports those names (tests/fixtures/removed_names).

Golden values: tests/golden/removed_names/*.json, recorded by tests/golden/record_removed_names.py
from the last transformers release that had each name; the same cases run here on the stand-ins.
"""

import csv
import importlib.metadata
import importlib.util
import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers.cache_utils import DynamicCache

import demo_data
import loading
import numerics
from repairs.removed_names import SUPPORTED_TRANSFORMERS, UnsupportedTransformersError, resolves
from repairs.stand_ins import STAND_INS
from golden import record_removed_names as recorded
from launch import LORA_ARGS, dataset_as_trained, eval_loss, eval_losses, finetune_args, run, run_finetune, train_losses
from tiny_models.build import LLM_TYPE

GOLDEN = Path(__file__).parent / "golden" / "removed_names"
IMPORTS_TABLE = Path(__file__).parent.parent / "docs" / "published_remote_code_imports.csv"
FIXTURES = Path(__file__).parent / "fixtures" / "removed_names"
# family -> (fixture folder, tiny checkpoint it modifies)
FIXTURE_CASES = {
    "2.6": ("v2_6", "minicpmv2_6"),
    "4.5": ("v2_6", "minicpmv4_5"),
    "2.0": ("v2_0", "minicpmv2_0"),
    "o-2.6": ("o2_6", "minicpmo2_6"),
    "o-4.5": ("o4_5", "minicpmo2_6"),
}


def stand_in(module_name, name):
    return STAND_INS[(module_name, name)]()


class CacheWithStandIns(DynamicCache):
    """DynamicCache with the cache stand-ins, so this process's transformers stays unpatched."""


for (_module, _name), _build in STAND_INS.items():
    if _module == "transformers.cache_utils":
        setattr(CacheWithStandIns, _name.split(".")[1], _build())


def stand_in_cases():
    cases = {}
    cases.update(recorded.mask_cases(lambda name: stand_in(recorded.MASK_UTILS, name)))
    cases.update(recorded.paligemma_cases(lambda name: stand_in(recorded.PALIGEMMA, name)))
    cases.update(recorded.cache_cases(CacheWithStandIns))
    outputs = {name: recorded.run(calls) for name, calls in cases.items()}
    outputs["is_torch_fx_available"] = [
        {"case": "call", "output": stand_in("transformers.utils.import_utils", "is_torch_fx_available")()}
    ]
    warper = stand_in("transformers", "LogitsWarper")
    outputs["LogitsWarper"] = recorded.run([("call", lambda: warper()(None, None))])
    classes = stand_in("transformers.models.whisper.modeling_whisper", "WHISPER_ATTENTION_CLASSES")
    outputs["WHISPER_ATTENTION_CLASSES"] = [{"case": "keys", "output": sorted(classes)}]
    return outputs


@pytest.fixture(scope="module")
def stand_in_outputs():
    return stand_in_cases()


def test_every_stand_in_has_golden_values():
    names = {name for _, name in STAND_INS}
    assert {path.stem for path in GOLDEN.glob("*.json")} == names


@pytest.mark.numerics
@pytest.mark.parametrize("path", sorted(GOLDEN.glob("*.json")), ids=lambda path: path.stem)
def test_stand_in_reproduces_the_removed_name(path, stand_in_outputs):
    golden = json.loads(path.read_text())
    actual = {case["case"]: case["output"] for case in stand_in_outputs[golden["name"]]}
    assert [case["case"] for case in golden["cases"]] == list(actual)
    for case in golden["cases"]:
        assert actual[case["case"]] == case["output"], (golden["transformers"], case["case"])


def test_every_published_import_resolves_or_is_supplied():
    """Each row: a transformers name a family's published remote code needs. A release that
    removes one fails here, not in a user's run."""
    rows = [row for row in csv.DictReader(IMPORTS_TABLE.open(encoding="utf-8")) if is_transformers_row(row)]
    assert {row["family"] for row in rows} == {"2.0", "2.5", "2.6", "4.0", "4.5", "o-2.6", "o-4.5"}
    unresolved = [
        (row["family"], row["file"], row["module"], row["name"])
        for row in rows
        if not resolves(row["module"], row["name"])
        and (row["module"], row["name"]) not in STAND_INS
    ]
    assert unresolved == []


def is_transformers_row(row):
    return row["module"].partition(".")[0] == "transformers"


def requirement_names():
    """The distribution names requirements.txt installs, normalised as pip compares them."""
    lines = (Path(__file__).parent.parent / "requirements.txt").read_text().splitlines()
    names = (re.match(r"[A-Za-z0-9_.-]+", line.strip()) for line in lines if line.strip() and not line.startswith("#"))
    return {re.sub(r"[-_.]+", "-", match.group(0)).lower() for match in names if match}


def test_every_third_party_module_the_published_code_imports_is_installed_by_requirements():
    """Each row without a transformers module: a module a published file imports at its top (what
    transformers' check_imports demands before it runs remote code). A fresh install from
    requirements.txt must provide it (MiniCPM-V 2.0's resampler.py imports requests)."""
    rows = [row for row in csv.DictReader(IMPORTS_TABLE.open(encoding="utf-8")) if not is_transformers_row(row)]
    assert {row["module"] for row in rows} >= {"requests", "timm", "PIL", "numpy", "torchvision"}
    distributions = importlib.metadata.packages_distributions()
    required = requirement_names()
    for row in rows:
        where = f"{row['family']} {row['file']} imports {row['module']}"
        assert importlib.util.find_spec(row["module"]) is not None, f"{where}: not installed"
        provided_by = {re.sub(r"[-_.]+", "-", name).lower() for name in distributions.get(row["module"], [])}
        assert provided_by & required, f"{where}: requirements.txt installs none of {sorted(provided_by)}"


def test_requirements_state_the_supported_range():
    requirements = (Path(__file__).parent.parent / "requirements.txt").read_text().splitlines()
    [line] = [line for line in requirements if line.startswith("transformers")]
    assert line == "transformers" + SUPPORTED_TRANSFORMERS


# ---- checkpoints whose remote code imports removed names --------------------------------------


def build_fixture_checkpoint(fixture, family, folder):
    """The tiny `family` checkpoint with `fixture`'s files in place of its own; each replaced file
    stays as tiny_<name>.py, which the fixture builds on."""
    shutil.copytree(family, folder)
    for file in sorted((FIXTURES / fixture).glob("*.py")):
        (folder / file.name).rename(folder / f"tiny_{file.name}")
        shutil.copyfile(file, folder / file.name)
    return folder


@pytest.fixture(scope="module")
def fixture_checkpoint(tiny_checkpoint, tmp_path_factory):
    built = {}

    def get(family):
        if family not in built:
            fixture, tiny_family = FIXTURE_CASES[family]
            folder = tmp_path_factory.mktemp("removed_names") / f"{fixture}_{tiny_family}"
            built[family] = build_fixture_checkpoint(fixture, tiny_checkpoint(tiny_family), folder)
        return built[family]

    return get


def sample(config):
    """One sample: text around one image of 2x3 patches over query_num placeholders."""
    generator = torch.Generator().manual_seed(0)
    length = config.query_num + 16
    patch = config.patch_size
    if not hasattr(config, "slice_config"):  # 2.0: plain [3, H, W] images
        image = torch.rand(3, 2 * patch, 3 * patch, generator=generator)
    else:  # NaViT-packed [3, patch, n * patch]
        image = torch.rand(3, patch, 6 * patch, generator=generator)
    return {
        "input_ids": torch.randint(0, config.vocab_size, (1, length), generator=generator),
        "position_ids": torch.arange(length)[None],
        "pixel_values": [[image]],
        "tgt_sizes": [torch.tensor([[2, 3]], dtype=torch.int32)],
        "image_bound": [torch.tensor([[3, 3 + config.query_num]])],
        "image_bounds": [torch.tensor([[3, 3 + config.query_num]])],  # as DataCollator: 2.0 reads this name
    }


def logits(model):
    with torch.no_grad():
        return model(data=sample(model.config)).logits


@pytest.mark.parametrize("family", sorted(FIXTURE_CASES))
def test_fixture_loads_through_the_loader_with_the_twins_logits(family, fixture_checkpoint, tiny_checkpoint):
    folder = fixture_checkpoint(family)
    config = loading.load_config(folder)  # the config's remote code already imports removed names
    tokenizer = loading.load_tokenizer(folder)
    model = loading.load_model(folder, config, dtype=torch.float32).eval()
    # The twin through the loader too: transformers before 5.x's later releases cannot import
    # nested relative imports (2.0) from a cold module cache on its own. The loader repairs nothing
    # on it (test_twins_load_unpatched_and_each_repair_is_logged_once).
    twin_folder = tiny_checkpoint(FIXTURE_CASES[family][1])
    twin = loading.load_model(twin_folder, loading.load_config(twin_folder), dtype=torch.float32).eval()
    assert len(tokenizer) == config.vocab_size
    assert torch.equal(logits(model), logits(twin))


def test_o_2_6_fixture_uses_its_stand_ins(fixture_checkpoint):
    """Beyond the forward: the audio layer, the logits warper and the legacy KV cache."""
    from transformers import WhisperConfig

    folder = fixture_checkpoint("o-2.6")
    model = loading.load_model(folder, loading.load_config(folder), dtype=torch.float32)
    module = sys.modules[type(model).__module__]
    audio_config = WhisperConfig(d_model=8, encoder_attention_heads=2)
    audio_config._attn_implementation = "sdpa"  # set by the model that owns the config
    layer = module.MiniCPMWhisperEncoderLayer(audio_config)
    assert layer.self_attn(torch.rand(1, 3, 8))[0].shape == (1, 3, 8)
    warper = module.CustomRepetitionPenaltyLogitsProcessorRepeat(2.0, 5, 4)
    assert torch.equal(warper(torch.tensor([[1, 1]]), torch.tensor([[1.0, 4.0, -1.0]])),
                       torch.tensor([[1.0, 1.0, -1.0]]))
    pairs = tuple((torch.zeros(1, 2, 3, 4), torch.ones(1, 2, 3, 4)) for _ in range(2))
    new = torch.full((1, 2, 1, 4), 2.0)
    legacy, usable, seen = module.MiniCPMO.extend_legacy_cache(pairs, new, new)
    assert (usable, seen) == (3, 4)
    assert [tuple(key.shape) for key, _ in legacy] == [(1, 2, 4, 4)] * 2
    assert torch.equal(legacy[1][1][:, :, 3:], new)


def test_unsupported_removed_name_is_named_before_anything_loads(tiny_checkpoint, tmp_path):
    folder = build_fixture_checkpoint("unsupported", tiny_checkpoint("minicpmv2_6"), tmp_path / "unsupported")
    with pytest.raises(UnsupportedTransformersError) as raised:
        loading.load_config(folder)
    message = str(raised.value)
    for part in ("MiniCPM-V 2.6", "LlamaFlashAttention2", "modeling_navit_siglip.py",
                 SUPPORTED_TRANSFORMERS):
        assert part in message, message


PROBE = """
import json, logging, sys
import torch, transformers
import loading, repairs
from repairs.removed_names import resolves
from repairs.stand_ins import STAND_INS

records = []
handler = logging.Handler()
handler.emit = lambda record: records.append(record.getMessage())
logging.getLogger(repairs.__name__).addHandler(handler)
logging.getLogger(repairs.__name__).setLevel(logging.INFO)
# Which removed names this transformers lacks before anything loads.
result = {"missing": [name for (module, name) in STAND_INS
                      if not resolves(module, name)]}
for name, folder in json.loads(sys.argv[1]):
    before = len(records)
    config = loading.load_config(folder)
    loading.load_tokenizer(folder)
    loading.load_model(folder, config, dtype=torch.float32)
    mask_module = sys.modules.get("transformers.modeling_attn_mask_utils")
    result[name] = {
        "messages": records[before:],
        "stand_in_mask_module": mask_module is not None and getattr(mask_module, "__file__", None) is None,
        "fx_available": resolves("transformers.utils.import_utils", "is_torch_fx_available"),
        "legacy_cache": resolves("transformers.cache_utils", "DynamicCache.from_legacy_cache"),
    }
result["messages"] = records
print("PROBE", json.dumps(result))
"""


def probe(loads):
    """Load [(name, folder)] through loading.py in a fresh process; what was patched and logged."""
    _, output = run([sys.executable, "-c", PROBE, json.dumps([(name, str(folder)) for name, folder in loads])])
    [line] = [line for line in output.splitlines() if line.startswith("PROBE ")]
    return json.loads(line.removeprefix("PROBE "))


# What the 2.0 fixture imports that transformers has removed or may remove.
V2_0_NAMES = ("AttentionMaskConverter", "_prepare_4d_attention_mask", "_prepare_4d_causal_attention_mask",
              "_prepare_4d_causal_attention_mask_for_sdpa", "is_torch_fx_available")


# What the log says when a legacy prepare_inputs_for_generation is wrapped (defect 5).
GENERATION_REPAIR = "prepare_inputs_for_generation takes past_key_values and none of"
# What the log says when a failing get_input_embeddings is replaced by the LLM's (defect 8).
INPUT_EMBEDDINGS_REPAIR = ".get_input_embeddings fails ("


@pytest.mark.launch
def test_twins_load_unpatched_and_each_repair_is_logged_once(fixture_checkpoint, tiny_checkpoint):
    # The tiny 2.0's LLM has the published one's prepare_inputs_for_generation: it is not defect-free.
    twins = [(family, tiny_checkpoint(tiny)) for family, (_, tiny) in sorted(FIXTURE_CASES.items()) if family != "2.0"]
    fixtures = [("twin 2.0", tiny_checkpoint("minicpmv2_0")), ("fixture 2.0", fixture_checkpoint("2.0")),
                ("fixture 2.0 again", fixture_checkpoint("2.0")), ("fixture o-2.6", fixture_checkpoint("o-2.6"))]
    result = probe(twins + fixtures)
    missing, messages = result["missing"], result["messages"]
    assert "is_torch_fx_available" in missing  # gone in every supported release
    for family, _ in twins:  # nothing touched while only defect-free code loads
        assert result[family] == {"messages": [], "stand_in_mask_module": False, "fx_available": False,
                                  "legacy_cache": False}
    twin_2_0 = result["twin 2.0"]["messages"]
    assert sum(GENERATION_REPAIR in message for message in twin_2_0) == 1
    # Its get_input_embeddings fails as the published one does (defect 8), as the fixture's does: repaired
    # on each instance, said once for the class name, by whichever loads first.
    embeddings_repaired = {name: sum(INPUT_EMBEDDINGS_REPAIR in m for m in result[name]["messages"])
                           for name in ("twin 2.0", "fixture 2.0")}
    assert sum(embeddings_repaired.values()) == 1
    # and the stand-ins for the cache methods its prepare_inputs_for_generation reads, where missing
    assert len(twin_2_0) == 1 + embeddings_repaired["twin 2.0"] + sum(
        name in missing for name in ("Cache.seen_tokens", "Cache.get_max_length"))
    missing_2_0 = [name for name in V2_0_NAMES if name in missing]
    # The fixture's folder holds its own copy of the LLM class, wrapped (and logged) in turn.
    assert len(result["fixture 2.0"]["messages"]) == len(missing_2_0) + 1 + embeddings_repaired["fixture 2.0"]
    assert result["fixture 2.0"]["fx_available"]
    assert result["fixture 2.0"]["stand_in_mask_module"] == ("AttentionMaskConverter" in missing)
    assert result["fixture 2.0 again"]["messages"] == []  # nothing logged twice
    assert result["fixture o-2.6"]["legacy_cache"]
    assert len(messages) == len(set(messages))
    for name in [*missing_2_0, "LogitsWarper", "WHISPER_ATTENTION_CLASSES", "DynamicCache.from_legacy_cache",
                 "Cache.seen_tokens"]:
        assert sum(f"needs {name} from" in message for message in messages) == 1, (name, messages)


@pytest.mark.launch
@pytest.mark.parametrize("family", ["2.6", "2.0", "o-2.6", "o-4.5"])
def test_lora_run_on_fixture_trains_and_reloads(family, fixture_checkpoint, tmp_path):
    model_dir, out = fixture_checkpoint(family), tmp_path / "lora"
    data = demo_data.generate(tmp_path / "data", count=2)
    eval_file = data.parent / "eval_one.json"
    eval_file.write_text(json.dumps(json.loads(data.read_text())[:1]))
    llm_type = LLM_TYPE[FIXTURE_CASES[family][1]]
    run_finetune(finetune_args(
        model_dir, data, out, *LORA_ARGS, "--eval_data_path", eval_file, "--max_steps", "2", "--logging_steps", "1",
        "--learning_rate", "1e-3", "--eval_strategy", "steps", "--eval_steps", "2", "--max_slice_nums", "1",
        llm_type=llm_type,
    ))
    losses = [loss for _, loss in train_losses(out)]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))

    [(_, reported)] = eval_losses(out)
    base = loading.load_model(model_dir, loading.load_config(model_dir), dtype=torch.float32)
    reloaded = PeftModel.from_pretrained(base, out)
    dataset, collator = dataset_as_trained(model_dir, eval_file, "--llm_type", llm_type, "--max_slice_nums", "1")
    got, largest_logit = eval_loss(reloaded, dataset, collator)
    assert got == numerics.approx(reported, scale=largest_logit)  # computed by the run's processes
