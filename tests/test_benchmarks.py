"""The scripts under benchmarks/, each at a tiny size so none can rot. gpu_train.py: the full-size
model is the published 2.6 one, and the script runs on CPU at reduced size (its numbers are
measured, not asserted); the others run as a user launches them, and what they print is checked."""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_train.py"
spec = importlib.util.spec_from_file_location("gpu_train", SCRIPT)
gpu_train = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_train)


def test_full_size_model_has_the_published_size(tmp_path):
    gpu_train.write_model_folder(tmp_path, "full")
    model, config = gpu_train.build_model(tmp_path, "meta")
    # The model card: "built on SigLip-400M and Qwen2-7B with a total of 8B parameters" (8.1B on the hub).
    assert 8.0e9 < sum(p.numel() for p in model.parameters()) < 8.2e9
    assert 7.5e9 < sum(p.numel() for p in model.llm.parameters()) < 7.7e9
    assert 0.40e9 < sum(p.numel() for p in model.vpm.parameters()) < 0.43e9
    assert model.get_output_embeddings().weight.shape == (gpu_train.PUBLISHED_2_6["vocab_size"], 3584)
    assert len(model.llm.model.layers) == 28 and len(model.vpm.encoder.layers) == 27


def test_reduced_run_on_cpu(tmp_path):
    out = tmp_path / "result.json"
    result = gpu_train.main(["--size", "reduced", "--device", "cpu", "--batch", "2", "--length", "192",
                             "--warmup", "1", "--steps", "1", "--packing", "both", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["vocab_size"] == gpu_train.PUBLISHED_2_6["vocab_size"]
    # Old (full logits) and new (labelled positions) losses of the same batch and weights agree
    # within bf16 rounding.
    check = result["loss_check"]
    assert abs(check["old"] - check["new"]) <= 2**-8 * abs(check["old"])
    cases = {(case["packing"], case["path"]): case for case in result["cases"]}
    assert set(cases) == {(packing, path) for packing in (False, True) for path in gpu_train.PATHS}
    # Packed rows hold more real tokens than padded single samples.
    assert cases[True, "new"]["real_token_share"] > cases[False, "new"]["real_token_share"]
    for case in result["cases"]:
        assert case["tokens_per_s"] > 0 and case["padded_tokens_per_s"] >= case["tokens_per_s"]
        assert 0 < case["real_token_share"] <= 1
        assert case["peak_memory_gib"] is None  # CPU: no resettable peak
        assert all(torch.isfinite(torch.tensor(case["losses"])))
    # Training moved every LoRA tensor (lora_B starts at zero).
    assert result["lora_tensors"] > 0 and result["lora_changed"] == result["lora_tensors"]


# Every script under benchmarks/ runs here at a tiny size, as a user launches it, so none can rot.
# gpu_train.py runs in-process above (test_reduced_run_on_cpu).
TINY = {
    "preflight_speed.py": ["--records", "41", "--images", "7", "--size", "64x48", "--workers", "1", "2"],
    "padding.py": ["--records", "24", "--batch", "4", "--epochs", "1"],
    "pipeline.py": ["--repeats", "1", "--passes", "1", "--workers", "0", "1", "--images", "8", "--ships", "5",
                    "--step_ms", "0", "--native"],
    "import_time.py": ["--repeats", "1"],
    "records_memory.py": ["--records", "5000"],
    "startup.py": ["--records", "12", "--distinct", "4", "--world", "1"],
    "loss_memory.py": ["--vocabs", "512", "--lengths", "64", "--fractions", "0.2", "--dtypes", "float32"],
    "eval_answers.py": ["--records", "3", "--batches", "1", "3", "--new_tokens", "4"],
    "grpo_speed.py": ["--steps", "2", "--batch", "1", "--generations", "2", "--max-new-tokens", "2"],
}
IN_PROCESS = {"gpu_train.py"}


def test_every_benchmark_runs_in_the_suite():
    scripts = {path.name for path in SCRIPT.parent.glob("*.py")}
    assert scripts == set(TINY) | IN_PROCESS


def run_benchmark(name, tmp_path):
    env = dict(os.environ, TMPDIR=str(tmp_path))
    done = subprocess.run([sys.executable, str(SCRIPT.parent / name), *TINY[name]], capture_output=True, text=True,
                          env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.launch
def test_preflight_speed_decodes_each_image_reference_once(tmp_path):
    out = run_benchmark("preflight_speed.py", tmp_path)
    found = re.search(r"preflight, 1 worker: 41 records \((\d+) image references\).* (\d+) image decodes", out)
    assert found, out
    references, decodes = map(int, found.groups())
    # 41 records: every 20th has two images, every 50th (n % 50 == 1) none, the rest one.
    assert references == 3 * 2 + 41 - 3 - 1
    assert decodes == references
    assert re.search(r"preflight, 2 workers: 41 records .* s per 1,000 records", out)


@pytest.mark.launch
def test_padding_benchmark(tmp_path):
    out = run_benchmark("padding.py", tmp_path)
    shares = dict(re.findall(r"^\s*([a-z ]+): ([\d.]+)% ", out, re.MULTILINE))
    assert set(shares) == {"random order", "length grouping", "packing", "sorted globally"}, out
    assert all(0 < float(v) <= 100 for v in shares.values())


@pytest.mark.launch
def test_pipeline_benchmark(tmp_path):
    out = run_benchmark("pipeline.py", tmp_path)
    assert "uint8 and float outputs identical" in out  # printed after check_identical's assertions
    # One block shipped now, storage by storage before, for both kinds of collator.
    for family in ("remote-code", "native 4.6"):
        found = re.search(rf"{family}: (\d+) tensor storages.*\n.*before \(\s*(\d+) shipped\).*\n.*now \(\s*1 shipped\)", out)
        assert found and found[1] == found[2] and int(found[1]) > 1, out
    for workers in (0, 1):
        for way in ("before", "now"):
            assert re.search(rf"step\s+0 ms, {workers} workers,\s+{way}: +[\d.]+ samples/s", out), out


@pytest.mark.launch
def test_loss_memory_benchmark(tmp_path):
    out = run_benchmark("loss_memory.py", tmp_path)
    row = [line.split() for line in out.splitlines() if line.split()[:1] == ["512"]]
    assert len(row) == 1, out
    vocab, length, fraction, dtype, old, new, ratio, diff = row[0]
    assert (length, fraction, dtype) == ("64", "20%", "float32")
    # The same float32 loss by two summation orders over 64 x 0.2 positions: a few ulps apart.
    assert float(diff) <= 1e-5


@pytest.mark.launch
def test_import_time_benchmark(tmp_path):
    out = run_benchmark("import_time.py", tmp_path)
    rows = dict(re.findall(r"^\s*(.+?):\s+[\d.]+\s+[\d.]+\s+\((bitsandbytes: \w+)", out, re.MULTILINE))
    assert set(rows) == {"--help", "--help --q_lora true", "import finetune"}, out
    # Ours to keep out; the other two import it where peft does (peft 0.22 no longer does at import).
    assert rows["--help"] == "bitsandbytes: no", out


@pytest.mark.launch
def test_startup_benchmark(tmp_path):
    out = run_benchmark("startup.py", tmp_path)
    rows = re.findall(r"^\s+12\s+1\s+new\s+(first|resumed)\s+([\d.]+)\s+([\d.]+)\s", out, re.MULTILINE)
    assert [run for run, _, _ in rows] == ["first", "resumed"], out
    assert all(float(seconds) > 0 and 0.1 < float(peak) < 64 for _, seconds, peak in rows)


@pytest.mark.launch
def test_records_memory_benchmark(tmp_path):
    out = run_benchmark("records_memory.py", tmp_path)
    growth = {way: float(mib) for way, mib in re.findall(r"^\s+5000\s+[\d.]+\s+(\w+)\s+([\d.]+)", out, re.MULTILINE)}
    assert set(growth) == {"parsed", "indexed", "rank_of_2", "parquet_first", "parquet"}, out
    # 5,000 parsed records hold several MiB; their offsets 80 kB.
    assert growth["indexed"] < growth["parsed"] / 4, out


@pytest.mark.launch
def test_eval_answers_benchmark(tmp_path):
    out = run_benchmark("eval_answers.py", tmp_path)
    rows = re.findall(r"^\s+batch\s+(\d+):\s+([\d.]+) answers/s .*, (same answers as the first|ANSWERS DIFFER.*)$", out,
                      re.MULTILINE)
    assert [batch for batch, _, _ in rows] == ["1", "3"], out
    assert all(float(rate) > 0 for _, rate, _ in rows)
    assert {same for _, _, same in rows} == {"same answers as the first"}, out


@pytest.mark.launch
def test_grpo_speed_benchmark(tmp_path):
    out = run_benchmark("grpo_speed.py", tmp_path)
    found = re.search(r"1 prompts x 2 answers of at most 2 tokens a step: ([\d.]+) answers/s .* ([\d.]+)% of the step generating", out)
    assert found, out
    assert float(found.group(1)) > 0 and 0 < float(found.group(2)) < 100
