"""The tiny native checkpoints (4.6, 4.7, MiniCPM-OCR): transformers' own classes, loaded through
the Auto classes with their processor, train and generate."""

import hashlib
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

import finetune
import families
import loading
import merge
from families.native import NATIVE_LORA_TARGETS, NATIVE_TRANSFORMERS_FLOOR
from launch import finetune_args
from tiny_models.build import NATIVE_CLASSES, NATIVE_FAMILIES, NATIVE_MEDIA_TOKENS, build_checkpoint


def random_image(width, height, seed=0):
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def test_a_transformers_older_than_the_native_floor_is_a_usage_error(tiny_checkpoint, shapes, tmp_path, capsys,
                                                                     monkeypatch):
    native, remote = tiny_checkpoint("minicpm_ocr"), tiny_checkpoint("minicpmv2_6")
    monkeypatch.setattr(loading.transformers, "__version__", "5.20.0")
    floor = re.escape(NATIVE_TRANSFORMERS_FLOOR)
    with pytest.raises(families.TransformersTooOld, match=rf"minicpm_ocr checkpoint, which needs transformers {floor} or newer \(installed: 5\.20\.0\)"):
        families.load_config(native)
    # finetune.py and merge.py (infer.py as merge.py) say so in one line, exit 2, no traceback.
    with pytest.raises(SystemExit) as stop:
        finetune.main([str(a) for a in finetune_args(native, shapes, tmp_path / "out", "--report_to", "none")])
    assert stop.value.code == finetune.EXIT_USAGE
    assert "finetune.py: error: " in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        merge.main(["--model", str(native), "--adapter", str(native), "--out", str(tmp_path / "merged")])
    assert stop.value.code == 2 and "which needs transformers" in capsys.readouterr().err
    # Remote-code checkpoints keep the whole supported range.
    assert families.load_config(remote).version == 2.6
    monkeypatch.setattr(loading.transformers, "__version__", NATIVE_TRANSFORMERS_FLOOR)
    assert families.load_config(native).model_type == "minicpm_ocr"


def test_requirements_state_the_native_floor():
    requirements = (Path(__file__).parent.parent / "requirements.txt").read_text()
    assert f"native-models transformers>={NATIVE_TRANSFORMERS_FLOOR}\n" in requirements


@pytest.mark.parametrize("family", NATIVE_FAMILIES)
def test_native_checkpoint_loads_with_the_auto_classes(tiny_checkpoint, family):
    folder = tiny_checkpoint(family)
    assert not list(folder.glob("*.py")), "a native checkpoint carries no model code"
    config = AutoConfig.from_pretrained(folder)
    assert config.model_type == family
    assert type(config) is getattr(transformers, NATIVE_CLASSES[family][0])
    model = AutoModelForImageTextToText.from_pretrained(folder)
    assert type(model).__module__.startswith(f"transformers.models.{family}.")
    processor = AutoProcessor.from_pretrained(folder)
    assert type(processor) is getattr(transformers, NATIVE_CLASSES[family][1])
    assert type(processor.image_processor).__name__ == NATIVE_CLASSES[family][2]
    assert type(processor.video_processor).__name__ == NATIVE_CLASSES[family][3]
    assert processor.chat_template

    tokenizer = processor.tokenizer
    for name, token in NATIVE_MEDIA_TOKENS.items():
        assert getattr(tokenizer, name) == token
        assert tokenizer.encode(token, add_special_tokens=False) == [getattr(tokenizer, f"{name}_id")]
    assert config.image_token_id == tokenizer.image_token_id
    assert config.video_token_id == tokenizer.video_token_id

    # The language model mixes both attention kinds of Qwen3.5, as the real ones do.
    names = {name for name, _ in model.named_modules()}
    for projection in ("linear_attn.in_proj_qkv", "linear_attn.in_proj_z", "linear_attn.in_proj_a",
                       "linear_attn.in_proj_b", "linear_attn.out_proj", "self_attn.q_proj", "self_attn.o_proj"):
        assert any(name.startswith("model.language_model.") and name.endswith(projection) for name in names), projection
    assert any(name.startswith("model.vision_tower.vit_merger") for name in names)
    assert "model.merger" in names


@pytest.mark.parametrize("family", NATIVE_FAMILIES)
def test_native_checkpoint_trains_and_generates(tiny_checkpoint, family):
    folder = tiny_checkpoint(family)
    model = AutoModelForImageTextToText.from_pretrained(folder)
    processor = AutoProcessor.from_pretrained(folder)
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What shape is in the picture?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A red circle."}]},
    ]
    # 250x120 is above the tiny scale_resolution (112): a source image and slices.
    image = random_image(250, 120)
    text = processor.apply_chat_template(messages, tokenize=False)
    inputs = processor(text=text, images=[image], return_tensors="pt")
    assert len(inputs["target_sizes"]) > 1, "the image is sliced"
    output = model(**inputs, labels=inputs["input_ids"])
    assert torch.isfinite(output.loss)
    output.loss.backward()
    for part in ("model.vision_tower.", "model.merger.", "model.language_model."):
        grads = [p.grad for name, p in model.named_parameters() if name.startswith(part)]
        assert any(g is not None and g.abs().sum() > 0 for g in grads), f"no gradient reaches {part}"

    prompt = processor.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    inputs = processor(text=prompt, images=[image], return_tensors="pt")
    generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert generated.shape == (1, inputs["input_ids"].shape[1] + 3)


@pytest.mark.parametrize("family", NATIVE_FAMILIES)
def test_default_lora_targets_are_both_attention_kinds_of_the_language_model(tiny_checkpoint, family):
    model = AutoModelForImageTextToText.from_pretrained(tiny_checkpoint(family))
    matched = {name for name, _ in model.named_modules() if re.fullmatch(NATIVE_LORA_TARGETS, name)}
    layers = "model.language_model.layers"
    assert matched == {f"{layers}.0.linear_attn.{p}" for p in ("in_proj_qkv", "in_proj_z", "in_proj_a", "in_proj_b", "out_proj")} | {
        f"{layers}.1.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")
    }


def test_native_build_is_deterministic_given_the_seed(tiny_checkpoint, tmp_path):
    def digests(folder):
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}

    built = digests(tiny_checkpoint("minicpmv4_6"))
    assert digests(build_checkpoint("minicpmv4_6", tmp_path / "again")) == built
    other = digests(build_checkpoint("minicpmv4_6", tmp_path / "other", seed=1))
    assert other["model.safetensors"] != built["model.safetensors"]
    assert other["tokenizer.json"] == built["tokenizer.json"]
