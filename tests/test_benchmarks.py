"""benchmarks/gpu_train.py: the full-size model is the published 2.6 one, and the script runs on
CPU at reduced size (its numbers are measured, not asserted)."""

import importlib.util
import json
from pathlib import Path

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
