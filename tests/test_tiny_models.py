"""tiny_models: the tiny checkpoints load offline through the Auto classes and behave like MiniCPM-V."""

import functools
import hashlib
import inspect
import json

import pytest
import torch
from transformers.dynamic_module_utils import get_imports
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from PIL import Image
from transformers import AutoConfig, AutoModel, AutoProcessor, AutoTokenizer, PreTrainedTokenizerFast

import numerics
from repairs.embeddings import repair_input_embeddings
from launch import dataset_as_trained
from test_loss import enable_checkpointing
from families.remote_code import REMOTE_CODE_LORA_TARGETS as DEFAULT_LORA_TARGETS
from families.remote_code import RemoteCodeFamily
from tiny_models.build import (
    FAMILIES,
    LLM_TYPE,
    PIPELINE_CONFIG_FIELDS,
    build_checkpoint,
    main,
    published_config_fields,
    published_interfaces,
    published_record,
)


def load(path, **kwargs):
    model = AutoModel.from_pretrained(path, trust_remote_code=True, **kwargs)
    return model, AutoTokenizer.from_pretrained(path, trust_remote_code=True)


def text_ids(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


def sliced_image_sample(tokenizer, config):
    """ids and bounds of "Look:" + one image cut into a source and two slices + an answer,
    in the family's placeholder layout, plus matching pixel tensors and tgt_sizes."""
    q = config.query_num
    new_schema = getattr(config, "use_image_id", False)
    ids, bounds = text_ids(tokenizer, "Look:"), []
    # From the vocabulary: not every family's tokenizer has slice_start_id and the like.
    token = tokenizer.convert_tokens_to_ids

    def placeholder(start, end):
        bounds.append((len(ids) + 1, len(ids) + 1 + q))
        ids.extend([token(start)] + [tokenizer.unk_token_id] * q + [token(end)])

    if new_schema:
        ids.extend([token("<image_id>")] + text_ids(tokenizer, "0") + [token("</image_id>")])
    placeholder("<image>", "</image>")
    if new_schema:
        placeholder("<slice>", "</slice>")
        placeholder("<slice>", "</slice>")
    else:
        ids.append(token("<slice>"))
        placeholder("<image>", "</image>")
        placeholder("<image>", "</image>")
        ids.append(token("</slice>"))
    ids.extend(text_ids(tokenizer, "\nred circle"))

    generator = torch.Generator().manual_seed(0)
    patch = config.patch_size
    grids = [(2, 3), (2, 2), (2, 2)]
    if hasattr(config, "slice_config"):  # NaViT packing: [3, patch, rows * cols * patch]
        pixels = [torch.randn(3, patch, h * w * patch, generator=generator) for h, w in grids]
        tgt_sizes = torch.tensor(grids, dtype=torch.int32)
    else:  # 2.0: plain [3, H, W] images
        pixels = [torch.randn(3, h * patch, w * patch, generator=generator) for h, w in grids]
        tgt_sizes = torch.zeros(0, 2, dtype=torch.int32)
    return ids, torch.tensor(bounds), pixels, tgt_sizes


def two_sample_batch(tokenizer, config):
    """Sample 0: a sliced image and text; sample 1: text only. Right-padded to one length."""
    ids0, bounds0, pixels0, tgt0 = sliced_image_sample(tokenizer, config)
    ids1 = text_ids(tokenizer, "What colour is the shape?\nblue square")
    length = max(len(ids0), len(ids1))
    input_ids = torch.zeros(2, length, dtype=torch.int32)
    input_ids[0, : len(ids0)] = torch.tensor(ids0)
    input_ids[1, : len(ids1)] = torch.tensor(ids1)
    labels = torch.full((2, length), -100)
    for row, ids in enumerate((ids0, ids1)):
        answer = len(text_ids(tokenizer, "\nred circle"))  # the last tokens of each sample are learned
        for i in range(len(ids) - answer, len(ids)):
            labels[row, i - 1] = ids[i]
    return {
        "input_ids": input_ids,
        "position_ids": torch.arange(length).repeat(2, 1),
        "attention_mask": input_ids != 0,
        "labels": labels,
        "pixel_values": [pixels0, []],
        "tgt_sizes": [tgt0, torch.zeros(0, 2, dtype=torch.int32)],
        "image_bound": [bounds0, torch.zeros(0, 2, dtype=torch.long)],
        "image_bounds": [bounds0, torch.zeros(0, 2, dtype=torch.long)],  # as DataCollator: 2.0 reads this name
    }


def loss_of(model, batch):
    logits = model(data=batch, use_cache=False).logits
    return F.cross_entropy(logits.view(-1, logits.shape[-1]).float(), batch["labels"].view(-1), ignore_index=-100)


@functools.cache
def fresh_pos_embed(embed_dim, max_size):
    from tiny_models.remote_code.resampler import sincos_pos_embed_2d

    return sincos_pos_embed_2d(embed_dim, max_size)


# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_family_loads_offline_with_the_contract_config(tiny_checkpoint, family):
    path = tiny_checkpoint(family)
    config = AutoConfig.from_pretrained(path, trust_remote_code=True)
    model, tokenizer = load(path)
    assert config.model_type == "minicpmv"
    assert set(config.auto_map) >= {"AutoConfig", "AutoModel", "AutoModelForCausalLM"}
    assert getattr(config, "version", None) == published_config_fields(family).get("version")
    assert config.patch_size == 14 and config.vocab_size == len(tokenizer)
    llm_class = {"qwen": "Qwen2ForCausalLM", "minicpm": "MiniCPMForCausalLM"}.get(LLM_TYPE[family], "LlamaForCausalLM")
    assert type(model.llm).__name__ == llm_class
    assert "llm.model.layers.1.self_attn.q_proj.weight" in model.state_dict()
    if family == "minicpmv2_0":
        assert not hasattr(config, "batch_vision_input") and not hasattr(config, "slice_config")
        assert (config.slice_mode, config.max_slice_nums, config.scale_resolution) == (True, 9, 112)
    else:
        assert config.batch_vision_input is True
        assert {"max_slice_nums": 9, "patch_size": 14, "scale_resolution": 112}.items() <= config.slice_config.to_dict().items()
    assert getattr(config, "use_image_id", False) == (LLM_TYPE[family] == "qwen")
    buffers = {name for name, _ in model.named_buffers()} - set(model.state_dict())
    assert {name for name in buffers if "rotary" not in name} == {"resampler.pos_embed"}
    assert torch.equal(model.resampler.pos_embed, fresh_pos_embed(config.hidden_size, (70, 70)))
    assert model.resampler.query.shape == (config.query_num, config.hidden_size)


@pytest.mark.parametrize("family", FAMILIES)
def test_tokenizer_has_the_real_special_tokens(tiny_checkpoint, family):
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint(family), trust_remote_code=True)
    for token in ("<image>", "</image>", "<slice>", "</slice>", "<image_id>", "</image_id>", "<unk>"):
        assert tokenizer.encode(token, add_special_tokens=False) == [tokenizer.convert_tokens_to_ids(token)]
    # The *_id properties a family has (which ones: test_stand_in_tokenizer_has_exactly_the_published_names)
    # answer the vocabulary's ids.
    for name in ("im_start", "im_end", "slice_start", "slice_end", "im_id_start", "im_id_end", "eot", "audio_start"):
        if hasattr(tokenizer, f"{name}_id"):
            string = getattr(tokenizer, name if name != "eot" else "eot_token")
            assert getattr(tokenizer, f"{name}_id") == tokenizer.convert_tokens_to_ids(string) != tokenizer.unk_token_id
    if hasattr(tokenizer, "newline_id"):
        # As published: convert_tokens_to_ids("\n") on a byte-level vocabulary, which spells a
        # newline "Ċ" -- so the property answers unk, and the pipeline must not use it.
        assert tokenizer.newline_id == tokenizer.unk_token_id != text_ids(tokenizer, "\n")[0]
    assert tokenizer.unk_id == tokenizer.convert_tokens_to_ids("<unk>")
    assert tokenizer.eos_id == tokenizer.eos_token_id is not None
    for word in ("red", " red", " circle", " blue", " square", "user", "assistant"):
        assert len(text_ids(tokenizer, word)) == 1, word
    llm_type = LLM_TYPE[family]
    messages = [{"role": "user", "content": "What colour is the shape?"}, {"role": "assistant", "content": "red circle"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    if llm_type == "minicpm":
        assert tokenizer.encode("hi")[0] == tokenizer.bos_id == tokenizer.convert_tokens_to_ids("<s>")
        assert tokenizer.eos_token == "</s>"
        assert len(text_ids(tokenizer, "<用户>")) == 1 and len(text_ids(tokenizer, "<AI>")) == 1
        assert rendered == "<s><用户>What colour is the shape?<AI>red circle"
    elif llm_type == "llama3":
        assert tokenizer.encode("hi")[0] == tokenizer.bos_id == tokenizer.convert_tokens_to_ids("<|begin_of_text|>")
        assert tokenizer.eos_token == "<|end_of_text|>"
        assert tokenizer.eot_id == tokenizer.convert_tokens_to_ids("<|eot_id|>")
        header = text_ids(tokenizer, "<|start_header_id|>assistant<|end_header_id|>")
        assert len(header) == 3
        assert rendered.endswith("<|start_header_id|>assistant<|end_header_id|>\n\nred circle<|eot_id|>")
    else:
        assert tokenizer.bos_id is None and tokenizer.eos_token == "<|im_end|>"
        assert tokenizer.encode("hi") == text_ids(tokenizer, "hi")
        assert "<|im_start|>user\nWhat colour is the shape?<|im_end|>\n" in rendered
    if family == "minicpmv4_5":
        assert rendered.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\nred circle<|im_end|>\n")
        thought = [messages[0], {"role": "assistant", "content": "<think>\nIt is round.\n</think>\n\nred circle"}]
        assert tokenizer.apply_chat_template(thought, tokenize=False).endswith(
            "<|im_start|>assistant\n<think>\nIt is round.\n</think>\n\nred circle<|im_end|>\n")
        prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True,
                                               enable_thinking=False)
        assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
        assert len(text_ids(tokenizer, "<think>")) == 1
    elif llm_type == "qwen":
        assert rendered.endswith("<|im_start|>assistant\nred circle<|im_end|>\n")


# The stand-ins expose what each family's published remote code does, no more
# (tiny_models/published_remote_code.json).


def recorded_tokenizer_names(entry):
    tokenizer = entry["tokenizer"]
    return set(tokenizer["attributes"]) | set(tokenizer["properties"]) | set(tokenizer["static_methods"])


def test_the_record_covers_every_remote_code_family_with_its_sources():
    families = published_record()["families"]
    assert set(FAMILIES) < set(families)  # and 4.0, which has no stand-in yet
    for family, entry in families.items():
        for part in ("tokenizer", "config"):
            source = entry[part]["source"]
            assert source["path"] and isinstance(source["verified"], bool), (family, part)
        assert {"eos_id", "unk_id", "im_start_id", "im_end_id"} <= set(entry["tokenizer"]["properties"]), family


@pytest.mark.parametrize("family", FAMILIES)
def test_stand_in_tokenizer_has_exactly_the_published_names(tiny_checkpoint, family):
    families = published_record()["families"]
    published = families[family]["tokenizer"]
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint(family), trust_remote_code=True)
    for name, value in published["attributes"].items():
        assert getattr(tokenizer, name) == value, name
    for name in published["properties"]:
        assert isinstance(inspect.getattr_static(type(tokenizer), name, None), property), name
        getattr(tokenizer, name)  # and it answers
    for name in published["static_methods"]:
        assert isinstance(inspect.getattr_static(type(tokenizer), name, None), staticmethod), name
    # What other families' published classes define and this family's lacks, its stand-in lacks
    # too; names any fast tokenizer has (unk_token) aside.
    plain = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer)
    others = set().union(*map(recorded_tokenizer_names, families.values())) - recorded_tokenizer_names(families[family])
    assert sorted(name for name in others if hasattr(tokenizer, name) and not hasattr(plain, name)) == []


@pytest.mark.parametrize("family", FAMILIES)
def test_stand_in_config_carries_the_published_pipeline_fields(tiny_checkpoint, family):
    published = published_record()["families"][family]["config"]
    fields = published["config_json"]
    written = json.loads((tiny_checkpoint(family) / "config.json").read_text())
    assert {name for name in PIPELINE_CONFIG_FIELDS if name in written} == set(fields)
    if "slice_config" in fields:
        assert set(written["slice_config"]) == set(fields["slice_config"]) | {"model_type"}
    for name in ("version", "slice_mode", "batch_vision_input"):  # as published; the sizes are tiny
        assert written.get(name) == fields.get(name), name
    # The config class fills in what config.json leaves out, as the published class does.
    config = AutoConfig.from_pretrained(tiny_checkpoint(family), trust_remote_code=True)
    assert getattr(config, "use_image_id", False) == published["class_defaults"].get("use_image_id", False)


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_mixes_sliced_images_and_text_only_samples(tiny_checkpoint, family):
    model, tokenizer = load(tiny_checkpoint(family))
    batch = two_sample_batch(tokenizer, model.config)
    model.eval()
    with torch.no_grad():
        logits = model(data=batch).logits
        assert logits.shape == (*batch["input_ids"].shape, model.config.vocab_size)
        assert torch.isfinite(logits).all()
        # The image reaches the logits of sample 0 and nothing of sample 1.
        other = dict(batch, pixel_values=[[p + 1 for p in batch["pixel_values"][0]], []])
        changed = model(data=other).logits
        assert not torch.allclose(changed[0], logits[0])
        assert torch.equal(changed[1], logits[1])
        text_only = dict(batch, pixel_values=[[], []], tgt_sizes=[[], []], image_bound=[[], []], image_bounds=[[], []])
        assert torch.isfinite(model(data=text_only).logits).all()
    model.train()
    loss = loss_of(model, text_only)
    loss.backward()  # a text-only batch in train mode still touches every vision weight (DDP)
    assert model.vpm.embeddings.patch_embedding.weight.grad is not None
    assert model.resampler.query.grad is not None


def test_forward_rejects_bounds_that_do_not_match_the_images(tiny_checkpoint):
    model, tokenizer = load(tiny_checkpoint("minicpmv2_6"))
    batch = two_sample_batch(tokenizer, model.config)
    with pytest.raises(ValueError, match="image bounds"):
        model(data=dict(batch, image_bound=[batch["image_bound"][0][:2], batch["image_bound"][1]]))


@pytest.mark.parametrize("family", FAMILIES)
def test_twenty_adamw_steps_halve_the_loss(tiny_checkpoint, family):
    torch.manual_seed(0)
    model, tokenizer = load(tiny_checkpoint(family))
    batch = two_sample_batch(tokenizer, model.config)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        loss = loss_of(model, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(map(torch.isfinite, map(torch.tensor, losses)))
    assert losses[-1] < losses[0] / 2, losses


def test_default_lora_regex_matches_llm_attention_only(tiny_checkpoint):
    import re

    for family in ("minicpmv2_6", "minicpmv2_0"):
        model, _ = load(tiny_checkpoint(family))
        matched = {name for name, _ in model.named_modules() if re.fullmatch(DEFAULT_LORA_TARGETS, name)}
        expected = {f"llm.model.layers.{i}.self_attn.{p}" for i in range(model.config.num_hidden_layers)
                    for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
        assert matched == expected
        assert any(name.startswith("vpm.") and name.endswith("self_attn.q_proj") for name, _ in model.named_modules())


@pytest.mark.parametrize("family", ["minicpmv2_6", "minicpmv2_0"])
def test_lora_with_modules_to_save_trains_saves_and_reloads(tiny_checkpoint, tmp_path, family):
    path = tiny_checkpoint(family)
    model, tokenizer = load(path)
    if family == "minicpmv2_0":  # like the published 2.0 code, its get_input_embeddings fails: the loader's repair
        with pytest.raises(AttributeError):
            model.get_input_embeddings()
        assert repair_input_embeddings(model)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=DEFAULT_LORA_TARGETS, modules_to_save=["embed_tokens", "resampler"]
    )
    peft_model = get_peft_model(model, config)
    batch = two_sample_batch(tokenizer, model.config)
    vpm_before = model.vpm.embeddings.patch_embedding.weight.detach().clone()
    query_before = peft_model.base_model.model.resampler.modules_to_save["default"].query.detach().clone()
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model.train()
    for _ in range(3):
        loss = loss_of(peft_model, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert torch.equal(model.vpm.embeddings.patch_embedding.weight, vpm_before)
    assert not torch.equal(peft_model.base_model.model.resampler.modules_to_save["default"].query, query_before)
    # Frozen like the reloaded adapter: CPU kernels may pick another (1-ulp different) path
    # when weights require grad, and the comparison below is exact.
    peft_model.eval().requires_grad_(False)
    with torch.no_grad():
        expected = peft_model(data=batch).logits
    peft_model.save_pretrained(tmp_path / "adapter")

    base, _ = load(path)
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(data=batch).logits, expected)


@pytest.mark.parametrize("family", ["minicpmv2_5", "minicpmv2_0"])
def test_bf16_lora_with_gradient_checkpointing_backpropagates(tiny_checkpoint, family):
    model, tokenizer = load(tiny_checkpoint(family), dtype=torch.bfloat16)
    assert model.llm.model.embed_tokens.weight.dtype == torch.bfloat16
    repair_input_embeddings(model)  # 2.0: as loading.load_model does
    model.requires_grad_(False)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=DEFAULT_LORA_TARGETS))
    enable_checkpointing(peft_model)
    peft_model.enable_input_require_grads()
    assert model.llm.model.layers[0].gradient_checkpointing
    peft_model.train()
    loss = loss_of(peft_model, two_sample_batch(tokenizer, model.config))
    loss.backward()
    # lora_B starts at zero, so lora_A gets no gradient on the first step; lora_B must.
    grads = [p.grad for name, p in peft_model.named_parameters() if "lora_B" in name]
    assert len(grads) == 4 * model.config.num_hidden_layers  # q, k, v, o
    assert all(g is not None and torch.isfinite(g.float()).all() and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("family", ["minicpmv2_6", "minicpmv2_0"])
def test_save_and_reload_reproduce_logits_and_rebuild_the_position_buffer(tiny_checkpoint, tmp_path, family):
    model, tokenizer = load(tiny_checkpoint(family))
    batch = two_sample_batch(tokenizer, model.config)
    with torch.no_grad():  # perturb the weights so the reload is not just a rebuild from the seed
        for parameter in model.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    model.eval()
    with torch.no_grad():
        expected = model(data=batch).logits
    model.save_pretrained(tmp_path)
    assert "resampler.pos_embed" not in model.state_dict()
    assert (tmp_path / "modeling_minicpmv.py").exists()  # the folder carries its own code
    reloaded = AutoModel.from_pretrained(tmp_path, trust_remote_code=True).eval()
    assert torch.equal(reloaded.resampler.pos_embed, fresh_pos_embed(model.config.hidden_size, (70, 70)))
    with torch.no_grad():
        assert torch.equal(reloaded(data=batch).logits, expected)


def test_omni_init_switches(tiny_checkpoint):
    omni = AutoModel.from_pretrained(tiny_checkpoint("minicpmo2_6"), trust_remote_code=True,
                                     init_vision=True, init_audio=False, init_tts=False)
    assert (omni.config.init_vision, omni.config.init_audio, omni.config.init_tts) == (True, False, False)
    with pytest.raises(ValueError, match="vision tower only"):
        AutoModel.from_pretrained(tiny_checkpoint("minicpmo2_6"), trust_remote_code=True, init_audio=True)
    # As with the real MiniCPM-o: with an explicit config object the switches would reach
    # __init__ as keywords, which it does not take; they belong on the config.
    config = AutoConfig.from_pretrained(tiny_checkpoint("minicpmo2_6"), trust_remote_code=True)
    with pytest.raises(TypeError):
        AutoModel.from_pretrained(tiny_checkpoint("minicpmo2_6"), config=config, trust_remote_code=True, init_vision=True,
                                  init_audio=False, init_tts=False)
    config = AutoConfig.from_pretrained(tiny_checkpoint("minicpmv2_6"), trust_remote_code=True)
    with pytest.raises(TypeError):
        AutoModel.from_pretrained(tiny_checkpoint("minicpmv2_6"), config=config, trust_remote_code=True,
                                  init_vision=True, init_audio=False, init_tts=False)


def test_generate_is_greedy_and_decodes(tiny_checkpoint):
    model, tokenizer = load(tiny_checkpoint("minicpmv2_6"))
    model.eval()
    ids, bounds, pixels, tgt_sizes = sliced_image_sample(tokenizer, model.config)
    inputs = dict(input_ids=torch.tensor([ids]), pixel_values=[pixels], tgt_sizes=[tgt_sizes], image_bound=[bounds],
                  attention_mask=torch.ones(1, len(ids), dtype=torch.long), tokenizer=tokenizer, max_new_tokens=4)
    first, second = model.generate(**inputs), model.generate(**inputs)
    assert first.shape[0] == 1 and 1 <= first.shape[1] <= 4
    assert torch.equal(first, second)
    # Greedy: the first new token is the argmax of the forward pass at the last position.
    with torch.no_grad():
        logits = model(data={"input_ids": inputs["input_ids"], "position_ids": torch.arange(len(ids))[None],
                             "pixel_values": [pixels], "tgt_sizes": [tgt_sizes], "image_bound": [bounds]}).logits
    assert first[0, 0] == logits[0, -1].argmax()
    (text,) = model.generate(**inputs, decode_text=True)
    assert isinstance(text, str) and text == tokenizer.decode([t for t in first[0].tolist()
                                                               if t not in (tokenizer.eos_id, tokenizer.pad_token_id)])


def file_digests(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_build_is_deterministic_given_the_seed(tiny_checkpoint, tmp_path):
    main(["minicpmv2_6", str(tmp_path / "again")])  # the CLI, seed 0 by default
    assert file_digests(tmp_path / "again") == file_digests(tiny_checkpoint("minicpmv2_6"))
    build_checkpoint("minicpmv2_6", tmp_path / "other", seed=1)
    other = file_digests(tmp_path / "other")
    assert other["model.safetensors"] != file_digests(tiny_checkpoint("minicpmv2_6"))["model.safetensors"]
    assert other["tokenizer.json"] == file_digests(tiny_checkpoint("minicpmv2_6"))["tokenizer.json"]
    with pytest.raises(ValueError, match="unknown family"):
        build_checkpoint("minicpmv3", tmp_path / "bad")


@pytest.mark.numerics
@pytest.mark.parametrize("mode", ["RGB", "RGBA"])
def test_processor_lays_out_a_prompt_as_training_does(tiny_checkpoint, tmp_path, mode):
    """The 2.6-style processor (what chat() uses) and dataset.py give the same prompt ids, image
    bounds, pixels and patch grids for a sliced image, at a non-default max_slice_nums; a transparent
    image is converted as the processor converts it (PIL's convert("RGB"): alpha dropped)."""
    folder = tiny_checkpoint("minicpmv2_6")
    image = Image.effect_noise((250, 120), 64).convert(mode)
    if mode == "RGBA":
        image.putalpha(Image.effect_noise((250, 120), 100))
    image.save(tmp_path / "noise.png")
    record = {"id": "0", "image": "noise.png", "conversations": [
        {"role": "user", "content": "<image>\nWhat is this?"}, {"role": "assistant", "content": "Noise."}]}
    (tmp_path / "data.json").write_text(json.dumps([record]))
    dataset, _ = dataset_as_trained(folder, tmp_path / "data.json", "--max_slice_nums", "3")
    trained = RemoteCodeFamily().prompt_inputs(dataset[0], "cpu")

    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    prompt = processor.tokenizer.apply_chat_template(
        [{"role": "user", "content": "(<image>./</image>)\nWhat is this?"}], tokenize=False, add_generation_prompt=True)
    asked = processor([prompt], [[Image.open(tmp_path / "noise.png")]], max_slice_nums=3)
    assert len(asked["pixel_values"][0]) == 3  # the source and a 2x1 grid of slices
    assert asked["input_ids"].tolist() == trained["input_ids"].tolist()
    assert asked["image_bound"][0].tolist() == trained["image_bound"][0].tolist()
    assert asked["tgt_sizes"][0].tolist() == trained["tgt_sizes"][0].tolist()
    for got, expected in zip(asked["pixel_values"][0], trained["pixel_values"][0], strict=True):
        numerics.assert_close(got, expected)  # the processor's float path vs the dataset's per-level lookup


def parameters_as_written(method):
    """`name` or `name=default` for each parameter, `*args` / `**kwargs` marked, as the record lists them."""
    written = []
    for parameter in inspect.signature(method).parameters.values():
        if parameter.kind is inspect.Parameter.VAR_POSITIONAL:
            written.append(f"*{parameter.name}")
        elif parameter.kind is inspect.Parameter.VAR_KEYWORD:
            written.append(f"**{parameter.name}")
        elif parameter.default is inspect.Parameter.empty:
            written.append(parameter.name)
        else:
            written.append(f"{parameter.name}={parameter.default!r}")
    return written


@pytest.mark.parametrize("family", sorted(published_record()["interfaces"]))
def test_stand_in_has_the_published_interfaces(tiny_checkpoint, family):
    """Each stand-in exposes what the journey touches of its family's published code, as recorded
    (with the repo@commit:path each row was read from): generate's parameters, chat's (2.6), the
    tokenizer_config auto_map's layout, config.json's auto_map and nulls, and the third-party modules
    its files import at the top."""
    published = published_interfaces(family)
    folder = tiny_checkpoint(family)
    config = json.loads((folder / "config.json").read_text())
    model_module, model_class = config["auto_map"]["AutoModel"].split(".")
    model_type = getattr(__import__(f"tiny_models.remote_code.{model_module}", fromlist=[model_class]), model_class)
    assert parameters_as_written(model_type.generate) == published["generate"]["parameters"], published["generate"]["source"]
    if family == "minicpmv2_6":  # the 2.0 and 2.5 stand-ins ship no processor, which their published chat() needs
        assert parameters_as_written(model_type.chat) == published["chat"]["parameters"], published["chat"]["source"]
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    [(slot, empty)] = [tokenizer_config["auto_map"]["AutoTokenizer"]]
    [(published_slot, published_empty)] = [published["tokenizer_auto_map"]["auto_map"]["AutoTokenizer"]]
    assert tokenizer_config["auto_map"].keys() == published["tokenizer_auto_map"]["auto_map"].keys()
    assert (slot is None, empty is None) == (published_slot is None, published_empty is None)
    assert slot.rpartition(".")[2] == tokenizer_config["tokenizer_class"]
    assert config["auto_map"].keys() == published["config_auto_map"]["auto_map"].keys()
    assert sorted(key for key, value in config.items() if value is None) == published["config_nulls"]["fields"]
    imports = {module for path in folder.glob("*.py") for module in get_imports(str(path))}
    assert set(published["third_party_imports"]["modules"]) <= imports, published["third_party_imports"]["source"]
