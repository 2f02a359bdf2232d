"""demo_data.py, infer.py, merge.py and the demo itself, on the tiny checkpoints."""

import ast
import json
import re
import sys

import pytest
import torch
from peft import PeftModel
from transformers import AutoModel

import demo_data
import infer
import loading
import numerics
from backends import RemoteCodeBackend
from dataset import DataCollator, data_settings, make_dataset, model_pixels
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
        json.loads(data.read_text()), tokenizer, data_settings(config, max_slice_nums=2),
        llm_type="qwen", max_length=512, image_root=data.parent,
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
    prompt = RemoteCodeBackend("qwen").prompt_inputs(dataset[0], "cpu")
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
    """infer.py and merge.py depend on loading and data code only, never on the training modules."""
    training = {"finetune", "arguments", "distributed", "lora", "trainer", "loss", "preflight", "resilience", "usage"}
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
