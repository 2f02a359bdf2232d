"""Write a tiny, randomly initialised MiniCPM-V checkpoint.

(About 580 lines, over the ~400 a module should hold: the remote-code and native halves share the BPE
trainer, the chat templates and the sizes, and the tests, the demo and conformance.py take them all
from this one builder, test scaffolding rather than the training pipeline.)

    python -m tiny_models.build minicpmv2_6 /tmp/tiny-2_6 [--seed 0]

Remote-code families (FAMILIES): the folder holds config.json (auto_map to the remote code), the
remote code itself, safetensors weights, a byte-level BPE tokenizer with the family's special
tokens and chat template, generation_config.json, and for the 2.6-style families (2.6, o-2.6, 4.5) a processor
(preprocessor_config.json, AutoProcessor) that their chat() uses; it loads with trust_remote_code.

Native families (NATIVE_FAMILIES: 4.6, 4.7, MiniCPM-OCR, whose code ships in transformers): the
model is transformers' own class built from its own config classes, saved with its processor
(image and video processor, tokenizer carrying the processor's special tokens, chat template), so
that AutoModelForImageTextToText and AutoProcessor load the folder.

Everything is built offline in about a second per family and is deterministic given the seed.
"""

import argparse
import importlib
import json
import pathlib
import shutil

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
import transformers
from transformers import GenerationConfig

from .corpus import corpus_lines
from .remote_code.configuration_minicpm import TINY_SCALE_RESOLUTION

# What each family's published remote code exposes: tokenizer names, config.json fields (data).
PUBLISHED_RECORD = pathlib.Path(__file__).parent / "published_remote_code.json"
# The config fields the data pipeline reads (each family's data_settings, families/remote_code.py).
PIPELINE_CONFIG_FIELDS = tuple(json.loads(PUBLISHED_RECORD.read_text())["pipeline_config_fields"])

FAMILIES = ("minicpmv2_0", "minicpmv2_5", "minicpmv2_6", "minicpmo2_6", "minicpmv4_5")
LLM_TYPE = {
    "minicpmv2_0": "minicpm",
    "minicpmv2_5": "llama3",
    "minicpmv2_6": "qwen",
    "minicpmo2_6": "qwen",
    "minicpmv4_5": "qwen",
}

# Native in transformers: family -> (config, processor, image processor, video processor) classes.
NATIVE_CLASSES = {
    "minicpmv4_6": ("MiniCPMV4_6Config", "MiniCPMV4_6Processor", "MiniCPMV4_6ImageProcessor", "MiniCPMV4_6VideoProcessor"),
    # 4.7 uses 4.6's image and video processors (transformers' auto mappings say so too).
    "minicpmv4_7": ("MiniCPMV4_7Config", "MiniCPMV4_7Processor", "MiniCPMV4_6ImageProcessor", "MiniCPMV4_6VideoProcessor"),
    "minicpm_ocr": ("MiniCPMOcrConfig", "MiniCPMOcrProcessor", "MiniCPMOcrImageProcessor", "MiniCPMOcrVideoProcessor"),
}
NATIVE_FAMILIES = tuple(NATIVE_CLASSES)
ALL_FAMILIES = FAMILIES + NATIVE_FAMILIES

REMOTE_CODE = pathlib.Path(__file__).parent / "remote_code"
SHARED_FILES = (
    "configuration_minicpm.py",
    "modeling_minicpmv.py",
    "modeling_navit_siglip.py",
    "resampler.py",
    "tokenization_minicpmv_fast.py",
)
# The 2.6-style families (image ids, new placeholder schema) also ship a processor, which their
# chat() loads with AutoProcessor.
PROCESSOR_FILES = ("image_processing_minicpmv.py", "processing_minicpmv.py")
BPE_VOCAB_SIZE = 768  # including the 256 byte symbols; special tokens come on top
SCALE_RESOLUTION = TINY_SCALE_RESOLUTION
PATCH_SIZE = 14
OUTPUT_HEAD_STD = 0.25

# Tokens every family's tokenizer has (the real ones carry the same placeholders).
IMAGE_TOKENS = [
    "<unk>",
    "<image>",
    "</image>",
    "<slice>",
    "</slice>",
    "<image_id>",
    "</image_id>",
    "<ref>",
    "</ref>",
    "<box>",
    "</box>",
    "<quad>",
    "</quad>",
    "<point>",
    "</point>",
]

QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Qwen3-style: the assistant turns after the last user message carry a think block (an empty one
# when the message has none); earlier turns lose theirs; enable_thinking=False closes the block
# of the generation prompt. `content` is the Jinja expression of a message's text.
def qwen3_chat_template(content="message['content']"):
    return (
        "{%- set ns = namespace(last_query=-1) -%}"
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'user' -%}{%- set ns.last_query = loop.index0 -%}{%- endif -%}"
        "{%- endfor -%}"
        "{%- for message in messages -%}"
        "{%- set content = " + content + " -%}"
        "{%- if message['role'] == 'assistant' -%}"
        "{%- set reasoning = '' -%}"
        "{%- if '</think>' in content -%}"
        "{%- set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\n') -%}"
        "{%- set content = content.split('</think>')[-1].lstrip('\n') -%}"
        "{%- endif -%}"
        "{%- if loop.index0 > ns.last_query -%}"
        "{{- '<|im_start|>assistant\n<think>\n' + reasoning + '\n</think>\n\n' + content + '<|im_end|>\n' -}}"
        "{%- else -%}"
        "{{- '<|im_start|>assistant\n' + content + '<|im_end|>\n' -}}"
        "{%- endif -%}"
        "{%- else -%}"
        "{{- '<|im_start|>' + message['role'] + '\n' + content + '<|im_end|>\n' -}}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}"
        "{{- '<|im_start|>assistant\n' -}}"
        "{%- if enable_thinking is defined and enable_thinking is false -%}{{- '<think>\n\n</think>\n\n' -}}{%- endif -%}"
        "{%- endif -%}"
    )


QWEN3_CHAT_TEMPLATE = qwen3_chat_template()

LLAMA3_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

MINICPM_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '<用户>' + message['content'] }}"
    "{% else %}{{ '<AI>' + message['content'] }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<AI>' }}{% endif %}"
)

TOKENIZER_SPECS = {
    "minicpm": {
        "extra_tokens": ["<s>", "</s>", "<用户>", "<AI>"],
        "bos": "<s>",
        "eos": "</s>",
        "pad": None,
        "template": MINICPM_CHAT_TEMPLATE,
        "terminators": ["</s>"],
    },
    "llama3": {
        "extra_tokens": [
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eot_id|>",
        ],
        "bos": "<|begin_of_text|>",
        "eos": "<|end_of_text|>",
        "pad": None,
        "template": LLAMA3_CHAT_TEMPLATE,
        "terminators": ["<|end_of_text|>", "<|eot_id|>"],
    },
    "qwen": {
        "extra_tokens": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        "bos": None,
        "eos": "<|im_end|>",
        "pad": "<|endoftext|>",
        "template": QWEN_CHAT_TEMPLATE,
        "terminators": ["<|im_end|>", "<|endoftext|>"],
    },
}


# Each family's stand-in tokenizer class (remote_code/tokenization_minicpmv_fast.py): the names it
# exposes are those of the family's published class, as recorded in PUBLISHED_RECORD.
TOKENIZER_CLASS = {
    "minicpmv2_0": "MiniCPMV2TokenizerFast",
    "minicpmv2_5": "MiniCPMVLlama3TokenizerFast",
    "minicpmv2_6": "MiniCPMVTokenizerFast",
    "minicpmo2_6": "MiniCPMOTokenizerFast",
    "minicpmv4_5": "MiniCPMVTokenizerFast",
}
# Tokens a family's vocabulary has on top of IMAGE_TOKENS and its LLM's.
FAMILY_TOKENS = {
    "minicpmo2_6": ["<|audio_start|>", "<|audio_end|>", "<|spk_bos|>", "<|spk_eos|>", "<|tts_bos|>", "<|tts_eos|>"],
    "minicpmv4_5": ["<think>", "</think>"],
}


def train_bpe(special_tokens, bos):
    """A byte-level BPE on the shipped corpus, special tokens appended after the learned vocab."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus_lines(), trainer=trainer)
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in special_tokens])
    if bos is None:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    else:
        bos_id = tokenizer.token_to_id(bos)
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
    return tokenizer


def remote_module(name):
    return importlib.import_module(f"{__package__}.remote_code.{name}")


def build_tokenizer(family):
    spec = TOKENIZER_SPECS[LLM_TYPE[family]]
    special_tokens = IMAGE_TOKENS + spec["extra_tokens"] + FAMILY_TOKENS.get(family, [])
    tokenizer_class = getattr(remote_module("tokenization_minicpmv_fast"), TOKENIZER_CLASS[family])
    tokenizer = tokenizer_class(
        tokenizer_object=train_bpe(special_tokens, spec["bos"]),
        bos_token=spec["bos"],
        eos_token=spec["eos"],
        unk_token="<unk>",
        pad_token=spec["pad"],
        add_bos_token=spec["bos"] is not None,
        chat_template=QWEN3_CHAT_TEMPLATE if family == "minicpmv4_5" else spec["template"],
    )
    return tokenizer, spec


def published_record():
    """The record of what each family's published remote code exposes (see PUBLISHED_RECORD)."""
    return json.loads(PUBLISHED_RECORD.read_text())


def published_config_fields(family):
    """The pipeline-read fields the family's published config.json carries, with their values."""
    return published_record()["families"][family]["config"]["config_json"]


def published_interfaces(family):
    """What the journey touches of the family's published code (signatures, auto_maps, config nulls,
    imports), or None where no copy of its files was read (o-2.6, 4.5)."""
    return published_record()["interfaces"].get(family)


def build_config(family, tokenizer, terminators):
    config_module = remote_module("configuration_minicpm")
    llm_type = LLM_TYPE[family]
    fields = {
        "llm_model_type": "qwen2" if llm_type == "qwen" else "llama",
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "image_size": 224,
        "terminators": terminators,
        "vision_config": {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": 224,
            "patch_size": PATCH_SIZE,
        },
    }
    # The pipeline's fields are the published config.json's, flags and version as published, sizes tiny.
    tiny = {
        "query_num": 16 if llm_type in ("minicpm", "llama3") else 8,
        "patch_size": PATCH_SIZE,
        "max_slice_nums": 9,
        "scale_resolution": SCALE_RESOLUTION,
    }
    for name, value in published_config_fields(family).items():
        if name == "slice_config":
            fields[name] = {key: tiny[key] for key in value}
        else:
            fields[name] = tiny.get(name, value)
    if family == "minicpmo2_6":
        fields.update(init_vision=True, init_audio=False, init_tts=False)
    return config_module.MiniCPMVConfig(**fields)


def write_published_config_fields(family, path):
    """Rewrite config.json so the pipeline's fields are exactly those of the published file.

    save_pretrained also writes what the config classes fill in (``use_image_id``, the slice
    config's ``scale_resolution`` and PretrainedConfig's own defaults); the published files carry
    none of it and leave it to the class, as the stand-in's class does on loading.
    """
    published = published_config_fields(family)
    config = json.loads(path.read_text())
    for name in set(PIPELINE_CONFIG_FIELDS) - set(published):
        config.pop(name, None)
    interfaces = published_interfaces(family)
    if interfaces is not None:
        # Nulls as published (2.0, 2.5: rope_scaling), and no others: a field the class leaves None is left out.
        nulls = interfaces["config_nulls"]["fields"]
        config = {name: value for name, value in config.items() if value is not None or name in nulls}
        config.update(dict.fromkeys(nulls))
    if "slice_config" in published:
        # The published slice_config holds its recorded fields and model_type, nothing else.
        config["slice_config"] = {key: config["slice_config"][key] for key in [*published["slice_config"], "model_type"]}
    path.write_text(json.dumps(config, indent=2) + "\n")


def model_entry(family):
    """(remote-code module, class name) of the family's model."""
    if family == "minicpmv2_0":
        return "modeling_minicpmv2", "MiniCPMV"
    if family == "minicpmv2_5":
        return "modeling_minicpmv2_5", "MiniCPMV"
    if family == "minicpmo2_6":
        return "modeling_minicpmo", "MiniCPMO"
    return "modeling_minicpmv", "MiniCPMV"


def build_checkpoint(family, out_dir, seed=0):
    """Build `family` into `out_dir` (created if needed) and return its path."""
    if family not in ALL_FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose one of {', '.join(ALL_FAMILIES)}")
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if family in NATIVE_CLASSES:
        return build_native_checkpoint(family, out_dir, seed)

    tokenizer, spec = build_tokenizer(family)
    config = build_config(family, tokenizer, spec["terminators"])
    module_name, class_name = model_entry(family)
    config.auto_map = auto_map(family)
    torch.manual_seed(seed)
    model = getattr(remote_module(module_name), class_name)(config)
    with torch.no_grad():
        # A trained LM head turns unit-RMS hidden states into confident logits; a random one at
        # initializer_range (0.02) spans about one nat, so with the LLM frozen (LoRA) no
        # fine-tune could fit even a few answers. Give the random head a trained head's scale.
        model.llm.lm_head.weight.normal_(0.0, OUTPUT_HEAD_STD)
    model.save_pretrained(out_dir)
    write_published_config_fields(family, out_dir / "config.json")

    tokenizer.save_pretrained(out_dir)
    tokenizer_config_path = out_dir / "tokenizer_config.json"
    tokenizer_config = json.loads(tokenizer_config_path.read_text())
    tokenizer_config["tokenizer_class"] = TOKENIZER_CLASS[family]
    # As published: the (fast) class in the first slot of the pair, the second empty.
    tokenizer_config["auto_map"] = {"AutoTokenizer": [f"tokenization_minicpmv_fast.{TOKENIZER_CLASS[family]}", None]}
    tokenizer_config_path.write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False) + "\n")

    terminator_ids = [tokenizer.convert_tokens_to_ids(token) for token in spec["terminators"]]
    GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=terminator_ids,
        pad_token_id=0,
        do_sample=False,
    ).save_pretrained(out_dir)

    if getattr(config, "use_image_id", False):
        write_preprocessor_config(config, out_dir)
    copy_remote_code(family, config, out_dir)
    return out_dir


def auto_map(family):
    """config.json's auto_map: the Auto classes of the family's stand-in remote code."""
    module_name, class_name = model_entry(family)
    return {
        "AutoConfig": "configuration_minicpm.MiniCPMVConfig",
        "AutoModel": f"{module_name}.{class_name}",
        "AutoModelForCausalLM": f"{module_name}.{class_name}",
    }


def copy_remote_code(family, config, out_dir):
    """Copy the family's stand-in remote code into ``out_dir`` (the processor's too where the
    config uses image ids, as the 2.6-style families do)."""
    module_name, _ = model_entry(family)
    extra = {"modeling_minicpmv2": ["modeling_minicpmv2.py"], "modeling_minicpmv2_5": ["modeling_minicpmv2_5.py"],
             "modeling_minicpmo": ["modeling_minicpmo.py"]}
    files = SHARED_FILES + tuple(extra.get(module_name, []))
    if getattr(config, "use_image_id", False):
        files += PROCESSOR_FILES
    for name in files:
        shutil.copyfile(REMOTE_CODE / name, pathlib.Path(out_dir) / name)


def write_preprocessor_config(config, out_dir):
    """The processor settings of the 2.6-style families, laid out as the published 2.6
    preprocessor_config.json is: the slicing and image layout agree with config.json's."""
    slicing = config.slice_config
    fields = {
        "image_processor_type": "MiniCPMVImageProcessor",
        "processor_class": "MiniCPMVProcessor",
        "auto_map": {
            "AutoProcessor": "processing_minicpmv.MiniCPMVProcessor",
            "AutoImageProcessor": "image_processing_minicpmv.MiniCPMVImageProcessor",
        },
        "max_slice_nums": slicing.max_slice_nums,
        "scale_resolution": slicing.scale_resolution,
        "patch_size": slicing.patch_size,
        "use_image_id": config.use_image_id,
        "image_feature_size": config.query_num,
        "slice_mode": config.slice_mode,
        "im_start": "<image>",
        "im_end": "</image>",
        "slice_start": "<slice>",
        "slice_end": "</slice>",
        "unk": "<unk>",
        "im_id_start": "<image_id>",
        "im_id_end": "</image_id>",
        "norm_mean": [0.5, 0.5, 0.5],
        "norm_std": [0.5, 0.5, 0.5],
        "version": config.version,
    }
    (out_dir / "preprocessor_config.json").write_text(json.dumps(fields, indent=2) + "\n")


# --------------------------------------------------------------------------------------------
# Native families (4.6, 4.7, MiniCPM-OCR): transformers' own classes, saved with their processor.

# The processor reads these names off the tokenizer (tokenizer.image_token, ...); the published
# tokenizers carry them as named extra special tokens.
NATIVE_MEDIA_TOKENS = {
    "image_token": "<|image_pad|>",
    "video_token": "<|video_pad|>",
    "image_start_token": "<image>",
    "image_end_token": "</image>",
    "slice_start_token": "<slice>",
    "slice_end_token": "</slice>",
    "image_id_start_token": "<image_id>",
    "image_id_end_token": "</image_id>",
}
NATIVE_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<unk>"] + list(
    NATIVE_MEDIA_TOKENS.values()
)
NATIVE_TERMINATORS = ["<|im_end|>", "<|endoftext|>"]

# Qwen3-style ChatML (as QWEN3_CHAT_TEMPLATE) over multimodal content: a message's content is a
# string or a list of parts; an image part writes the image token, a video part the video token,
# which the processor expands into the full placeholder.
NATIVE_CHAT_TEMPLATE = (
    "{%- macro render(content) -%}"
    "{%- if content is string -%}{{- content -}}"
    "{%- else -%}{%- for part in content -%}"
    "{%- if part['type'] == 'image' -%}{{- '" + NATIVE_MEDIA_TOKENS["image_token"] + "' -}}"
    "{%- elif part['type'] == 'video' -%}{{- '" + NATIVE_MEDIA_TOKENS["video_token"] + "' -}}"
    "{%- else -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
) + qwen3_chat_template(content="render(message['content'])")


def build_native_tokenizer():
    return transformers.TokenizersBackend(
        tokenizer_object=train_bpe(NATIVE_SPECIAL_TOKENS, None),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<unk>",
        extra_special_tokens=dict(NATIVE_MEDIA_TOKENS),
    )


def build_native_config(family, tokenizer):
    """A tiny config of the family's own class: a 2-layer Qwen3.5 LM (one linear-attention and one
    full-attention layer, the two kinds the real models mix) and a 2-layer vision tower whose
    window-attention merger follows layer 0."""
    config_class = getattr(transformers, NATIVE_CLASSES[family][0])
    text_config = {
        "model_type": "qwen3_5_text",
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "layer_types": ["linear_attention", "full_attention"],
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "linear_conv_kernel_dim": 2,
        "linear_key_head_dim": 16,
        "linear_value_head_dim": 16,
        "linear_num_key_heads": 2,
        "linear_num_value_heads": 4,
        "max_position_embeddings": 4096,
        # Qwen3.5 rotates a quarter of each head (8 of 32 dims); M-RoPE splits those 4 frequencies.
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10000.0,
            "partial_rotary_factor": 0.25,
            "mrope_section": [2, 1, 1],
        },
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    vision_config = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": SCALE_RESOLUTION,
        "patch_size": PATCH_SIZE,
    }
    fields = dict(
        text_config=text_config,
        vision_config=vision_config,
        insert_layer_id=0,
        image_token_id=tokenizer.image_token_id,
        video_token_id=tokenizer.video_token_id,
    )
    if family == "minicpmv4_7":
        # Canvas M-RoPE pins positions to these tokens; the real config stores their ids.
        (newline_id,) = tokenizer.encode("\n", add_special_tokens=False)
        fields.update(
            image_start_id=tokenizer.image_start_token_id,
            image_end_id=tokenizer.image_end_token_id,
            slice_start_id=tokenizer.slice_start_token_id,
            slice_end_id=tokenizer.slice_end_token_id,
            newline_id=newline_id,
        )
    if family != "minicpm_ocr":
        fields["image_size"] = SCALE_RESOLUTION
    return config_class(**fields)


def build_native_processor(family, tokenizer):
    _, processor_name, image_processor_name, video_processor_name = NATIVE_CLASSES[family]
    resolution = {"scale_resolution": SCALE_RESOLUTION, "patch_size": PATCH_SIZE}
    return getattr(transformers, processor_name)(
        image_processor=getattr(transformers, image_processor_name)(**resolution),
        video_processor=getattr(transformers, video_processor_name)(**resolution),
        tokenizer=tokenizer,
        chat_template=NATIVE_CHAT_TEMPLATE,
    )


def build_native_checkpoint(family, out_dir, seed):
    tokenizer = build_native_tokenizer()
    config = build_native_config(family, tokenizer)
    torch.manual_seed(seed)
    model = transformers.AutoModelForImageTextToText.from_config(config)
    with torch.no_grad():
        # As for the remote-code families: a trained head's scale (OCR ties it to the embeddings).
        model.get_output_embeddings().weight.normal_(0.0, OUTPUT_HEAD_STD)
    model.generation_config = GenerationConfig(
        eos_token_id=[tokenizer.convert_tokens_to_ids(token) for token in NATIVE_TERMINATORS],
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    model.save_pretrained(out_dir)
    build_native_processor(family, tokenizer).save_pretrained(out_dir)
    return out_dir


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("family", choices=ALL_FAMILIES)
    parser.add_argument("out_dir", type=pathlib.Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(build_checkpoint(args.family, args.out_dir, seed=args.seed))


if __name__ == "__main__":
    main()
