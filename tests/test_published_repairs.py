"""Repairs the conformance run of the published MiniCPM-V code called for (the repairs
package, defects 6 to 11): each on a small piece of remote code written here the way the published file
writes it, repaired only where its defect is there. (Defect 8, the failing get_input_embeddings, is
the tiny 2.0 stand-in's: tests/test_tiny_models.py.)"""

import importlib.util
import json
import shutil
import sys

import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

import loading
from repairs.embeddings import repair_tied_weights_keys
from repairs.generation import repair_generation_mixin
from repairs.rope import repair_legacy_rope_scaling
from repairs.tokenizer import repair_sentencepiece_ids
from repairs.zero3 import repair_cuda_under_zero3


def remote_module(tmp_path, name, source):
    """Import ``source`` as module ``name`` from its own file (as transformers imports remote code)."""
    folder = tmp_path / name
    folder.mkdir()
    path = folder / f"{name}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(f"remote_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module, path


LEGACY_ROPE = '''
from transformers import PretrainedConfig

class LegacyConfig(PretrainedConfig):
    model_type = "legacy_rope_test"

def init_rope(config):
    if config.rope_scaling is None:
        return "plain"
    return config.rope_scaling["type"], config.rope_scaling["factor"]
'''


def test_rope_scaling_reads_as_transformers_4_did_where_code_reads_its_type(tmp_path):
    module, path = remote_module(tmp_path, "legacy_rope", LEGACY_ROPE)
    # What transformers 5 holds for the published 2.0 config.json ("rope_scaling": null, rope_theta 1e4).
    unscaled = {"rope_type": "default", "rope_theta": 10000.0}
    with pytest.raises(KeyError, match="type"):
        module.init_rope(module.LegacyConfig(rope_parameters=dict(unscaled)))
    assert repair_legacy_rope_scaling(module.LegacyConfig, [path]) == [path.name]
    assert module.init_rope(module.LegacyConfig(rope_parameters=dict(unscaled))) == "plain"
    scaled = module.LegacyConfig(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})
    assert module.init_rope(scaled) == ("linear", 2.0)
    assert scaled.rope_parameters["rope_type"] == "linear"  # transformers' own view is unchanged
    # Code that never reads rope_scaling["type"] keeps transformers' view.
    other, other_path = remote_module(tmp_path, "modern_rope", LEGACY_ROPE.replace('["type"]', '["rope_type"]'))
    assert repair_legacy_rope_scaling(other.LegacyConfig, [other_path]) == []
    assert other.LegacyConfig(rope_parameters=dict(unscaled)).rope_scaling == unscaled


TIED_LIST = '''
import torch
from transformers import PretrainedConfig, PreTrainedModel

class TinyLM(PreTrainedModel):
    config_class = PretrainedConfig
    _tied_weights_keys = ["lm_head.weight"]

    def __init__(self, config):
        super().__init__(config)
        self.embed = torch.nn.Embedding(8, 4)
        self.lm_head = torch.nn.Linear(4, 8, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed
'''


def test_a_list_of_tied_weights_becomes_the_mapping_and_the_model_saves(tmp_path):
    module, _ = remote_module(tmp_path, "tied_list", TIED_LIST)
    model = module.TinyLM(transformers.PretrainedConfig(tie_word_embeddings=False))
    with pytest.raises(AttributeError, match="keys"):
        model.save_pretrained(tmp_path / "before")
    assert repair_tied_weights_keys(model) == ["TinyLM"]
    assert model._tied_weights_keys == {"lm_head.weight": "embed.weight"}
    model.save_pretrained(tmp_path / "after")
    assert (tmp_path / "after" / "model.safetensors").is_file()
    assert repair_tied_weights_keys(model) == []  # done once


NO_MIXIN = '''
import torch
from transformers import PretrainedConfig, PreTrainedModel

class OldLM(PreTrainedModel):
    config_class = PretrainedConfig

    def __init__(self, config):
        super().__init__(config)
        self.lm_head = torch.nn.Linear(4, 8)

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, **kwargs):
        return {"input_ids": input_ids}
'''


def test_a_language_model_without_generation_mixin_gets_it(tmp_path):
    module, _ = remote_module(tmp_path, "no_mixin", NO_MIXIN)
    assert not hasattr(module.OldLM, "generate")
    assert repair_generation_mixin(module.OldLM) == ["OldLM"]
    assert issubclass(module.OldLM, transformers.GenerationMixin) and hasattr(module.OldLM, "generate")
    assert module.OldLM(transformers.PretrainedConfig()).generation_config is not None
    assert repair_generation_mixin(module.OldLM) == []


CUDA_UNDER_ZERO3 = '''
import torch
from transformers.integrations import is_deepspeed_zero3_enabled

class Holder(torch.nn.Module):
    def place(self, device="cpu"):
        if is_deepspeed_zero3_enabled():
            device='cuda'
        return torch.zeros(1).to(device)
'''


def test_cuda_under_zero3_stays_off_cuda_on_a_machine_without_it(tmp_path, monkeypatch):
    module, _ = remote_module(tmp_path, "cuda_zero3", CUDA_UNDER_ZERO3)
    monkeypatch.setattr(module, "is_deepspeed_zero3_enabled", lambda: True)  # as under a ZeRO-3 run
    repaired = repair_cuda_under_zero3(module.Holder)
    if torch.cuda.is_available():
        assert repaired == [] and module.Holder().place().device.type == "cuda"
    else:
        assert repaired == [module.__name__]
        assert module.Holder().place().device.type == "cpu"


SENTENCEPIECE_TOKENIZER = '''
from transformers import LlamaTokenizer

class OldTokenizer(LlamaTokenizer):
    @property
    def eos_id(self):
        return self.sp_model.eos_id()

    @property
    def bos_id(self):
        return self.sp_model.bos_id()

    @property
    def im_start_id(self):
        return self._convert_token_to_id("<image>")
'''


def test_a_tokenizer_reading_sentencepiece_ids_gets_them_from_its_special_tokens(tmp_path):
    module, path = remote_module(tmp_path, "sp_tokenizer", SENTENCEPIECE_TOKENIZER)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<image>": 3, "a": 4}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = module.OldTokenizer(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    # transformers 5's LlamaTokenizer has no sp_model: eos_id raises (5.3) or is no id (later releases)
    try:
        broken = not isinstance(tokenizer.eos_id, int)
    except AttributeError:
        broken = True
    assert broken
    assert repair_sentencepiece_ids(tokenizer)
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.im_start_id) == (1, 2, 3)

    # A saved folder: tokenizer_config.json's auto_map goes through repaired_tokenizer.py; plain
    # AutoTokenizer then gives a repaired tokenizer.
    folder = tmp_path / "saved"
    tokenizer.save_pretrained(folder)
    shutil.copyfile(path, folder / path.name)
    loading.copy_repairs(folder)
    config_path = folder / "tokenizer_config.json"
    tokenizer_config = json.loads(config_path.read_text())
    tokenizer_config["auto_map"] = {"AutoTokenizer": ["sp_tokenizer.OldTokenizer", None]}
    config_path.write_text(json.dumps(tokenizer_config))
    assert loading.write_repaired_tokenizer(folder) == ["repaired_tokenizer.py", "tokenizer_config.json"]
    written = json.loads(config_path.read_text())
    assert written["auto_map"] == {"AutoTokenizer": ["repaired_tokenizer.OldTokenizer", None]}
    assert written[loading.PUBLISHED_AUTO_MAP] == {"AutoTokenizer": ["sp_tokenizer.OldTokenizer", None]}
    reloaded = transformers.AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    assert (reloaded.bos_id, reloaded.eos_id, reloaded.im_start_id) == (1, 2, 3)
    assert loading.write_repaired_tokenizer(folder) == ["repaired_tokenizer.py", "tokenizer_config.json"]  # again: same
    assert json.loads(config_path.read_text())["auto_map"] == written["auto_map"]
