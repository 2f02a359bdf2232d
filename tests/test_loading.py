"""loading.py and the repairs package: MiniCPM-V remote code written for transformers 4.4x.

The defective fixtures (tests/fixtures/defective_remote_code) are the tiny 2.6 model with the
real code's defects: a resampler that gets `List` from `from torch.nn.functional import *`
(defect 1), a model whose `__init__` never calls `post_init()` (2), and one whose
`_init_weights` leaves the non-persistent `pos_embed` as transformers 5 rebuilds it, empty (3).
Each checkpoint holds the defect-free checkpoint's weights, so logits must match exactly.
"""

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModel

import families
from families.inference import load_for_inference
from families.minicpmo2_6 import OMNI_INIT_KWARGS
from families.remote_code import generate_call
import demo_data
import infer
import loading
import numerics
import repairs
from repairs.generation import prepares_inputs_as_in_4_36
from repairs.typing_names import missing_typing_names
from launch import LORA_ARGS, dataset_as_trained, eval_loss, eval_losses, finetune_args, run_finetune, train_losses

FIXTURES = Path(__file__).parent / "fixtures" / "defective_remote_code"
REPAIRS_LOGGER = repairs.__name__  # every repair logs through the package's logger
# defect name -> (replace resampler.py, model class in fixtures' modeling_legacy.py or None)
DEFECTS = {
    "star_import": (True, None),
    "no_post_init": (False, "MiniCPMVWithoutPostInit"),
    "stale_buffer": (False, "MiniCPMVStaleBuffer"),
    "all": (True, "MiniCPMVLegacy"),
}
# What the log names for each repair.
MESSAGES = {
    "star_import": "resampler.py uses List without importing it",
    "no_post_init": "__init__ never calls post_init()",
    "stale_buffer": "Non-persistent buffer resampler.pos_embed did not hold",
}


@pytest.fixture(scope="module")
def defective_checkpoint(tiny_checkpoint, tmp_path_factory):
    """A factory: the tiny 2.6 checkpoint with one defect (or "all") in its remote code."""
    built = {}

    def get(defect, name=None):
        """`name`: the folder's name. Transformers keys the imported remote code by folder name and
        code hash, so a new name gives a copy whose code this process has not imported yet."""
        name = name or defect
        if name not in built:
            folder = tmp_path_factory.mktemp("defective") / name
            shutil.copytree(tiny_checkpoint("minicpmv2_6"), folder)
            star_import, model_class = DEFECTS[defect]
            if star_import:
                shutil.copyfile(FIXTURES / "resampler.py", folder / "resampler.py")
            if model_class:
                shutil.copyfile(FIXTURES / "modeling_legacy.py", folder / "modeling_legacy.py")
                config = json.loads((folder / "config.json").read_text())
                for auto_class in ("AutoModel", "AutoModelForCausalLM"):
                    config["auto_map"][auto_class] = f"modeling_legacy.{model_class}"
                (folder / "config.json").write_text(json.dumps(config, indent=2))
            built[name] = folder
        return built[name]

    return get


def load(folder, dtype=torch.float32):
    return loading.load_model(folder, loading.load_config(folder), dtype=dtype).eval()


def batch(vocab_size):
    """One sample: text around one 2x3-patch image (tiny 2.6: query_num 8)."""
    generator = torch.Generator().manual_seed(0)
    length = 24
    return {
        "input_ids": torch.randint(0, vocab_size, (1, length), generator=generator),
        "position_ids": torch.arange(length)[None],
        "pixel_values": [[torch.rand(3, 14, 6 * 14, generator=generator)]],
        "tgt_sizes": [torch.tensor([[2, 3]], dtype=torch.int32)],
        "image_bound": [torch.tensor([[3, 11]])],
    }


def logits(model):
    with torch.no_grad():
        return model(data=batch(model.config.vocab_size)).logits


def repair_messages(caplog):
    return [record.getMessage() for record in caplog.records if record.name == REPAIRS_LOGGER]


@pytest.fixture(scope="module")
def reference_logits(tiny_checkpoint):
    return logits(AutoModel.from_pretrained(tiny_checkpoint("minicpmv2_6"), trust_remote_code=True,
                                            dtype=torch.float32).eval())


def test_defect_free_model_loads_untouched(tiny_checkpoint, reference_logits, caplog):
    caplog.set_level(logging.DEBUG, logger=REPAIRS_LOGGER)
    model = load(tiny_checkpoint("minicpmv2_6"))
    assert repair_messages(caplog) == []
    model_class = type(model).__mro__[1]  # AutoModel's copy with GenerationMixin added, then the class itself
    assert not hasattr(model_class.__init__, "__wrapped__")
    assert torch.equal(logits(model), reference_logits)


def test_defects_reproduce_without_the_loader(defective_checkpoint, tiny_checkpoint):
    """The fixtures fail the way the real 2.6 code does on torch 2.14 / transformers 5."""
    with pytest.raises(NameError, match="'List' is not defined"):
        AutoModel.from_pretrained(defective_checkpoint("star_import", "raw_star_import"), trust_remote_code=True)
    with pytest.raises(AttributeError, match="all_tied_weights_keys"):
        AutoModel.from_pretrained(defective_checkpoint("no_post_init", "raw_no_post_init"), trust_remote_code=True)
    stale = AutoModel.from_pretrained(defective_checkpoint("stale_buffer", "raw_stale_buffer"), trust_remote_code=True,
                                      dtype=torch.float32)
    good = AutoModel.from_pretrained(tiny_checkpoint("minicpmv2_6"), trust_remote_code=True, dtype=torch.float32)
    assert not torch.allclose(stale.resampler.pos_embed, good.resampler.pos_embed, equal_nan=False)


@pytest.mark.parametrize("defect", sorted(DEFECTS))
def test_defective_remote_code_loads_repaired(defective_checkpoint, reference_logits, caplog, defect):
    caplog.set_level(logging.INFO, logger=REPAIRS_LOGGER)
    model = load(defective_checkpoint(defect))

    messages = repair_messages(caplog)
    expected = sorted(MESSAGES) if defect == "all" else [defect]
    assert len(messages) == len(expected), messages
    for name in expected:
        assert any(MESSAGES[name] in message for message in messages), (name, messages)
    assert all(record.levelno == logging.WARNING for record in caplog.records if record.name == REPAIRS_LOGGER)
    assert torch.equal(logits(model), reference_logits)
    # The class is patched only while loading.
    for cls in type(model).__mro__:
        assert not hasattr(cls.__dict__.get("__init__"), "__wrapped__"), cls


def test_every_non_persistent_buffer_matches_a_fresh_construction(defective_checkpoint, tiny_checkpoint):
    """pos_embed and the LLM's rotary inv_freq, against the defect-free class built on CPU."""
    model = load(defective_checkpoint("all"))
    fresh_class = type(AutoModel.from_pretrained(tiny_checkpoint("minicpmv2_6"), trust_remote_code=True))
    fresh = fresh_class(loading.load_config(tiny_checkpoint("minicpmv2_6")))
    loaded = dict(model.named_non_persistent_buffers())
    expected = dict(fresh.named_non_persistent_buffers())
    assert {"resampler.pos_embed", "llm.model.rotary_emb.inv_freq"} <= set(expected)
    assert loaded.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(loaded[name], value), name


def test_bf16_load_repairs_and_matches(defective_checkpoint, tiny_checkpoint, caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger=REPAIRS_LOGGER)
    # Instance repairs are said once per process (repairs.log.warn_once): as in a fresh process, whatever
    # an earlier test loaded.
    monkeypatch.setattr(repairs.log, "_warned", set())
    good = load(tiny_checkpoint("minicpmv2_6"), dtype=torch.bfloat16)
    assert repair_messages(caplog) == []  # a fine model in bf16 is not flagged
    repaired = load(defective_checkpoint("all"), dtype=torch.bfloat16)
    assert len(repair_messages(caplog)) == 3
    assert repaired.resampler.pos_embed.dtype == good.resampler.pos_embed.dtype
    assert torch.equal(logits(repaired), logits(good))


def test_missing_typing_names_detection():
    detect = missing_typing_names
    # torch.nn.functional still exports Optional (it imports it itself), no longer List or Tuple.
    assert detect("from torch.nn.functional import *\ndef f(x: List[int]) -> Optional[Tuple[int]]: ...\n") == [
        "List", "Tuple"
    ]
    assert detect("from typing import List\ndef f(x: List[int]): ...\n") == []
    assert detect("from typing import *\ndef f(x: List[int]): ...\n") == []  # the star import provides it
    assert detect("from __future__ import annotations\ndef f(x: List[int]): ...\n") == []  # never evaluated
    assert detect("from __future__ import annotations\nx = List[int]\n") == ["List"]
    assert detect("def f(List):\n    return List\n") == []  # a bound name, not typing's
    assert detect("from .sibling import *\nx: List[int] = []\n") == []  # unknowable: left alone


def test_omni_init_kwargs_only_for_configs_that_declare_them(tiny_checkpoint):
    config_2_6 = loading.load_config(tiny_checkpoint("minicpmv2_6"))
    config_o_2_6 = loading.load_config(tiny_checkpoint("minicpmo2_6"))
    assert families.family_for(config_2_6).init_kwargs == {}
    assert families.family_for(config_o_2_6).init_kwargs == OMNI_INIT_KWARGS
    with pytest.raises(TypeError):  # like the real 2.6 code
        AutoModel.from_pretrained(tiny_checkpoint("minicpmv2_6"), trust_remote_code=True, **OMNI_INIT_KWARGS)
    omni = families.family_for(config_o_2_6).load_model(tiny_checkpoint("minicpmo2_6"), config_o_2_6, dtype=torch.float32)
    assert (omni.config.init_vision, omni.config.init_audio, omni.config.init_tts) == (True, False, False)


@pytest.mark.launch
def test_lora_run_on_defective_model_trains_and_reloads(defective_checkpoint, tmp_path):
    model_dir, out = defective_checkpoint("all"), tmp_path / "lora"
    data = demo_data.generate(tmp_path / "data", count=4)
    eval_file = data.parent / "eval_one.json"
    eval_file.write_text(json.dumps(json.loads(data.read_text())[:1]))
    _, output = run_finetune(finetune_args(
        model_dir, data, out, *LORA_ARGS, "--eval_data_path", eval_file, "--max_steps", "3", "--logging_steps", "1",
        "--learning_rate", "1e-3", "--eval_strategy", "steps", "--eval_steps", "3",
    ))
    for message in MESSAGES.values():
        assert message in output
    losses = [loss for _, loss in train_losses(out)]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert (out / "adapter_model.safetensors").is_file()

    # The adapter reloads over the base loaded through the loader and gives the reported eval loss.
    [(_, reported)] = eval_losses(out)
    reloaded = PeftModel.from_pretrained(load(model_dir), out)
    dataset, collator = dataset_as_trained(model_dir, eval_file)
    got, largest_logit = eval_loss(reloaded, dataset, collator)
    assert got == numerics.approx(reported, scale=largest_logit)  # computed by the run's processes


def greedy_without_cache(model, inputs, steps, terminators):
    """Greedy tokens, each the argmax of a forward pass over the whole sequence so far (no cache)."""
    tokens = []
    with torch.no_grad():
        embeds, _ = model.get_vllm_embedding(dict(inputs, image_bounds=inputs["image_bound"]))  # 2.0's name
        for _ in range(steps):
            token = model.llm(inputs_embeds=embeds).logits[:, -1].argmax(-1)
            tokens.append(int(token))
            if tokens[-1] in terminators:
                break
            embeds = torch.cat([embeds, model.llm.get_input_embeddings()(token)[:, None]], dim=1)
    return tokens


def test_minicpmv2_0_generates_as_greedy_decoding_without_a_cache(tiny_checkpoint, tmp_path):
    """The 2.0 LLM's prepare_inputs_for_generation is written for transformers 4.36's generate (defect
    5): through the loader and through a saved folder, generation matches a cacheless greedy decode."""
    steps = 6
    data = demo_data.generate(tmp_path / "data", count=2)
    folder = shutil.copytree(tiny_checkpoint("minicpmv2_0"), tmp_path / "saved")
    loading.write_repaired_classes(folder)
    model, tokenizer, config, backend = load_for_inference(tiny_checkpoint("minicpmv2_0"))
    assert prepares_inputs_as_in_4_36(type(model.llm).__dict__["prepare_inputs_for_generation"])
    record = json.loads(data.read_text())[0]
    dataset = backend.make_dataset([infer.first_exchange(record)], tokenizer, config, max_length=4096,
                                   image_root=data.parent, max_slice_nums=1)
    inputs = backend.prompt_inputs(dataset[0], model.device)
    terminators = [tokenizer.convert_tokens_to_ids(token) for token in model.terminators]
    expected = greedy_without_cache(model, inputs, steps, terminators)
    assert len(expected) == steps and not set(expected) & set(terminators)  # every step after the first uses the cache
    assert backend.generate(model, tokenizer, inputs, steps) == tokenizer.decode(expected).strip()
    saved = AutoModel.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
    assert type(saved.llm) is not type(model.llm)  # the folder's own copy of the class, wrapped by its repairs
    args, kwargs = generate_call(saved.generate, inputs)  # in the published 2.0 signature
    assert saved.generate(*args, **kwargs, tokenizer=tokenizer, max_new_tokens=steps)[0].tolist() == expected


def test_first_exchange_keeps_a_leading_system_message():
    """infer.py asks a record's first question; a system message before it is part of the prompt."""
    system, user = {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}
    record = {"id": "s", "conversations": [system, user, {"role": "assistant", "content": "Hello."}, user,
                                           {"role": "assistant", "content": "Again."}]}
    assert infer.first_exchange(record)["conversations"] == [system, user, {"role": "assistant", "content": "Hello."}]
    assert infer.first_exchange({"conversations": [system, user]})["conversations"] == [
        system, user, {"role": "assistant", "content": "?"}]
    assert infer.first_exchange({"conversations": [user]})["conversations"] == [user, {"role": "assistant", "content": "?"}]
