"""The launchers' command lines; demo_data.py, infer.py, merge.py and the demo itself, on the tiny checkpoints."""

import ast
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModel

import demo_data
import families
import infer
import loading
import numerics
from data.layouts import LAYOUTS
from data.slicing import model_pixels
from dataset import DataCollator, make_dataset
from families.remote_code import RemoteCodeFamily
from launch import LORA_ARGS, REPO, finetune_args, run, run_finetune, subprocess_env


@pytest.fixture(scope="module")
def demo_set(tmp_path_factory):
    """The demo's own dataset (demo_data defaults: 16 shapes, a two-image and a text-only record)."""
    return demo_data.generate(tmp_path_factory.mktemp("demo_data"))


@pytest.fixture(scope="module")
def adapter(tiny_checkpoint, demo_set, tmp_path_factory):
    out = tmp_path_factory.mktemp("adapter")
    run_finetune(finetune_args(
        tiny_checkpoint("minicpmv2_6"), demo_set, out, *LORA_ARGS,
        "--max_steps", "40", "--learning_rate", "3e-3", "--lr_scheduler_type", "cosine", "--logging_steps", "10",
    ))
    return out


def samples(model_dir, data, indices):
    config, tokenizer = loading.load_config(model_dir), loading.load_tokenizer(model_dir)
    dataset = make_dataset(
        json.loads(data.read_text()), tokenizer, families.family_for(config).data_settings(config, max_slice_nums=2),
        layout=LAYOUTS["qwen"], max_length=512, image_root=data.parent,
    )
    if not indices:
        return None, dataset
    batch = DataCollator(512)([dataset[i] for i in indices])
    return dict(batch, pixel_values=model_pixels(batch["pixel_values"], torch.float32)), dataset  # as the model takes it


def test_demo_data_passes_the_pipeline(tiny_checkpoint, demo_set):
    records = json.loads(demo_set.read_text())
    assert len(records) == 18 and len({r["id"] for r in records}) == 18
    model_dir = tiny_checkpoint("minicpmv2_6")
    batch, dataset = samples(model_dir, demo_set, range(len(records)))
    image_counts = [len(p) for p in batch["pixel_values"]]
    by_id = dict(zip((r["id"] for r in records), image_counts))
    assert by_id["text-only"] == 0
    assert by_id["shape-00"] == 1  # 112x112: the source image alone
    assert by_id["shape-03"] == 3  # 224x112: source plus a 2x1 grid of slices
    assert by_id["two-shapes"] == 1 + 1  # two unsliced images
    for i in range(len(records)):
        assert (dataset[i]["labels"] != -100).any()
    model = AutoModel.from_pretrained(model_dir, trust_remote_code=True).eval()
    with torch.no_grad():
        logits = model(data=batch, use_cache=False).logits
    assert logits.shape[:2] == batch["input_ids"].shape and torch.isfinite(logits).all()


def test_prompt_ends_where_the_answer_starts(tiny_checkpoint, demo_set):
    model_dir = tiny_checkpoint("minicpmv2_6")
    _, dataset = samples(model_dir, demo_set, [])
    tokenizer = loading.load_tokenizer(model_dir)
    prompt = RemoteCodeFamily().prompt_inputs(dataset[0], "cpu")
    text = tokenizer.decode(prompt["input_ids"][0])
    assert text.endswith("<|im_start|>assistant\n")
    assert "a red square" not in text and text.count("<image>") == 1
    assert prompt["image_bound"][0].tolist() == dataset[0]["image_bound"].tolist()


@pytest.mark.launch
def test_merge_is_standalone_and_matches_the_adapter(tiny_checkpoint, demo_set, adapter, tmp_path):
    base = tiny_checkpoint("minicpmv2_6")
    out = tmp_path / "merged"
    run([sys.executable, REPO / "merge.py", "--model", base, "--adapter", adapter, "--out", out])
    for name in ("config.json", "model.safetensors", "modeling_minicpmv.py", "resampler.py",
                 "tokenizer_config.json", "tokenizer.json", "generation_config.json"):
        assert (out / name).is_file(), name
    assert not (out / "adapter_config.json").exists()

    batch, _ = samples(base, demo_set, [0, 3, 16, 17])
    wrapped = PeftModel.from_pretrained(AutoModel.from_pretrained(base, trust_remote_code=True), adapter).eval()
    merged = AutoModel.from_pretrained(out, trust_remote_code=True).eval()
    plain = AutoModel.from_pretrained(base, trust_remote_code=True).eval()
    with torch.no_grad():
        expected = wrapped(data=batch, use_cache=False).logits
        got = merged(data=batch, use_cache=False).logits
        untouched = plain(data=batch, use_cache=False).logits
    numerics.assert_close(got, expected)  # merged weights: other sums than base + LoRA, to fp32 rounding
    assert (untouched - expected).abs().max().item() > 1e-2  # the adapter changed the model


@pytest.mark.launch
def test_inference_and_merging_import_no_training_code():
    """infer.py and merge.py depend on loading, data and evaluation code only, never on the training modules.
    (usage.py, the command-line error type every entry point shares, is not training code: the metrics
    registry raises it for an unknown metric name, in infer.py's --metrics as in finetune.py's.)"""
    training = {"finetune", "arguments", "distributed", "lora", "trainer", "loss", "preflight", "resilience",
                "stages", "evaluation.during_training"}
    _, output = run([sys.executable, "-c", "import sys, infer, merge; print('modules:', sorted(sys.modules))"])
    imported = set(ast.literal_eval(re.search(r"^modules: (.*)$", output, flags=re.M).group(1)))
    assert {"loading", "dataset"} <= imported and not imported & training, imported & training


def answers(output):
    return re.findall(r"^    generated: (.*)$", output, flags=re.M)


@pytest.mark.launch
def test_infer_cli_adapter_and_merged_model_answer_alike(tiny_checkpoint, demo_set, adapter, tmp_path):
    base = tiny_checkpoint("minicpmv2_6")
    merged = tmp_path / "merged"
    run([sys.executable, REPO / "merge.py", "--model", base, "--adapter", adapter, "--out", merged])
    common = ["--questions", demo_set, "--max_slice_nums", "2", "--max_new_tokens", "8"]
    _, with_adapter = run([sys.executable, REPO / "infer.py", "--model", base, "--adapter", adapter, *common])
    _, with_merged = run([sys.executable, REPO / "infer.py", "--model", merged, *common])
    _, without = run([sys.executable, REPO / "infer.py", "--model", base, *common])
    records = json.loads(demo_set.read_text())
    assert len(answers(with_adapter)) == len(records)
    assert answers(with_adapter) == answers(with_merged)
    assert answers(with_adapter) != answers(without)
    assert with_adapter.count("expected:") == len(records)

    _, single = run([sys.executable, REPO / "infer.py", "--model", base, "--adapter", adapter,
                     "--image", demo_set.parent / records[0]["image"], "--question", "What is in the image?",
                     "--max_slice_nums", "2", "--max_new_tokens", "8"])
    assert answers(single) == answers(with_adapter)[:1]


@pytest.mark.numerics
@pytest.mark.launch
def test_demo_learns_the_training_answers(tmp_path):
    """The README's first command, end to end: at least 90% of the answers reproduced exactly."""
    code, output = run([sys.executable, REPO / "demo.py", "--out", tmp_path / "demo"], env=subprocess_env(),
                       timeout=600, expect_ok=False)
    table = output[output.find("\nid "):output.find("answers reproduced exactly") + 40]
    assert code == 0, table or output[-4000:]
    correct, total = map(int, re.search(r"(\d+)/(\d+) answers reproduced exactly", output).groups())
    assert total == 18 and correct >= 0.9 * total
    assert (tmp_path / "demo" / "lora" / "loss.png").stat().st_size > 0
    assert (tmp_path / "demo" / "lora" / "adapter_model.safetensors").is_file()


def test_infer_names_a_bad_questions_line_before_loading_weights(tmp_path, capsys):
    questions = tmp_path / "questions.jsonl"
    good = {"id": "a", "conversations": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hi."}]}
    questions.write_text(json.dumps(good) + "\n{not json\n")
    # The model folder does not exist: reaching the weights would fail differently.
    with pytest.raises(SystemExit) as stop:
        infer.main(["--model", str(tmp_path / "no_model"), "--questions", str(questions)])
    assert stop.value.code == 2
    message = capsys.readouterr().err
    assert "record 1" in message and "line 2 is not valid JSON" in message and str(questions) in message


# The finetune.py command line each launcher runs, recorded from the launchers as they were before
# they shared launch.sh (commit 94f27ba) by record_launcher_argv(). A change to a launcher's
# variables or flags is a change to this file, made on purpose:
#   python -c "import sys; sys.path[:0] = ['.', 'tests']; import test_scripts; test_scripts.record_launcher_argv()"
LAUNCHER_ARGV = REPO / "tests" / "golden" / "launcher_argv.json"
LAUNCHERS = {  # name: (script, environment)
    "lora": ("finetune_lora.sh", {}),
    "full": ("finetune_ds.sh", {}),
    "dpo": ("finetune_dpo.sh", {}),
    "dpo full": ("finetune_dpo.sh", {"USE_LORA": "false"}),
}
EVERY_VARIABLE = {
    "GPUS_PER_NODE": "2", "NNODES": "3", "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.7", "MASTER_PORT": "7001",
    "MODEL": "my models/MiniCPM-V-4_5", "LLM_TYPE": "qwen", "DATA": "train data.json", "EVAL_DATA": "eval.jsonl",
    "OUTPUT_DIR": "runs/one", "MODEL_MAX_Length": "4096", "DS_CONFIG": "my_zero2.json", "DATALOADER_WORKERS": "4",
}
LAUNCHER_CASES = {  # name: (environment, arguments after the script, what the GPU probe answers)
    "defaults, CPU": ({}, [], "cpu"),
    "defaults, bf16 GPU": ({}, [], "bf16"),
    "every variable, fp16 chosen on a bf16 GPU, arguments": (
        {**EVERY_VARIABLE, "PRECISION": "fp16"}, ["--max_steps", "5", "--learning_rate", "1e-5"], "bf16"),
    "no evaluation, own device flags, own torchrun": (
        {"EVAL_DATA": "", "DEVICE_ARGS": "--bf16 true --tf32 true", "TORCHRUN": "{python} my_torchrun"}, [], "fp16"),
    "fp32 on an fp16 GPU": ({"PRECISION": "fp32"}, ["--seed", "3"], "fp16"),
}


def launcher_argv(folder, script, env, args, gpu, tmp_path):
    """The command line ``bash folder/script args`` executes, with a stand-in Python that answers the
    GPU probe with ``gpu`` and, run as torchrun (the default TORCHRUN), prints its arguments; the
    script's folder reads ``{HERE}``."""
    python = tmp_path / "python"
    python.write_text(f"#!{sys.executable}\nimport json, sys\n"
                      f"print({gpu!r} if sys.argv[1] == '-c' else json.dumps(sys.argv[1:]))\n")
    python.chmod(0o755)
    env = {"PATH": os.environ["PATH"], "PYTHON": str(python),
           **{key: value.format(python=python) for key, value in env.items()}}
    result = subprocess.run(["bash", str(Path(folder) / script), *args], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    return [arg.replace(str(folder), "{HERE}") for arg in json.loads(result.stdout)]


def launcher_argvs(folder, tmp_path):
    return {f"{launcher} | {case}": launcher_argv(folder, script, {**script_env, **env}, args, gpu, tmp_path)
            for launcher, (script, script_env) in LAUNCHERS.items()
            for case, (env, args, gpu) in LAUNCHER_CASES.items()}


def record_launcher_argv():
    with tempfile.TemporaryDirectory() as tmp:
        LAUNCHER_ARGV.write_text(json.dumps(launcher_argvs(REPO, Path(tmp)), indent=1) + "\n")


@pytest.mark.launch
def test_launchers_run_the_recorded_command_lines(tmp_path):
    """Every variable users set and every flag each launcher passes, as the launchers passed them
    before they shared launch.sh."""
    expected = json.loads(LAUNCHER_ARGV.read_text())
    got = launcher_argvs(REPO, tmp_path)
    assert got.keys() == expected.keys()
    for case in expected:
        assert got[case] == expected[case], case
