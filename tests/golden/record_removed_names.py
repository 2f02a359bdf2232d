"""Record golden outputs of transformers names that later releases removed.

Run under a transformers that still has them; it writes one JSON file per name it finds into
tests/golden/removed_names/ (with the version), skipping names this release lacks:

    PYTHONPATH=/path/to/transformers-4.51.3 python tests/golden/record_removed_names.py

Recorded from the last release that had each name: 5.23.0 (modeling_attn_mask_utils), 4.57.6
(is_torch_fx_available, from_legacy_cache / to_legacy_cache), 4.53.3 (seen_tokens,
get_usable_length), 4.48.3 (Cache.get_max_length), 4.52.4 (WHISPER_ATTENTION_CLASSES), 4.51.3 (PaliGemma's
_prepare_4d_causal_attention_mask_with_cache_position), 4.48.3 (LogitsWarper). Run them oldest
first; each later run overwrites only the names it still has.

tests/test_removed_names.py replays the same cases (`CASES`) on the stand-ins of repairs/stand_ins.py.
"""

import importlib
import json
import sys
from pathlib import Path

import torch

OUT = Path(__file__).parent / "removed_names"
MASK_UTILS = "transformers.modeling_attn_mask_utils"
PALIGEMMA = "transformers.models.paligemma.modeling_paligemma"
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


def embeds(batch, length, dtype=F32):
    return torch.zeros(batch, length, 4, dtype=dtype)


PADDED = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]])  # right- and left-padded rows
FULL = torch.ones(2, 4, dtype=torch.long)
LEFT_PAD_3 = torch.tensor([[0, 0, 1], [1, 1, 1]])


def mask_cases(get):
    converter = get("AttentionMaskConverter")
    prepare = get("_prepare_4d_attention_mask")
    causal = get("_prepare_4d_causal_attention_mask")
    sdpa = get("_prepare_4d_causal_attention_mask_for_sdpa")
    min32 = torch.finfo(F32).min
    return {
        "_prepare_4d_attention_mask": [
            ("padded f32", lambda: prepare(PADDED, F32)),
            ("padded bool f16 tgt 2", lambda: prepare(PADDED.bool(), F16, tgt_len=2)),
            ("full bf16", lambda: prepare(FULL, BF16)),
        ],
        "_prepare_4d_causal_attention_mask": [
            ("no mask", lambda: causal(None, (2, 4), embeds(2, 4), 0)),
            ("no mask past 2", lambda: causal(None, (1, 3), embeds(1, 3), 2)),
            ("no mask one query", lambda: causal(None, (1, 1), embeds(1, 1), 3)),
            ("padded", lambda: causal(PADDED, (2, 4), embeds(2, 4), 0)),
            ("padded f16", lambda: causal(PADDED, (2, 4), embeds(2, 4, F16), 0)),
            ("past 1 mask", lambda: causal(PADDED, (2, 3), embeds(2, 3), 1)),
            ("sliding 2", lambda: causal(FULL, (2, 4), embeds(2, 4), 0, sliding_window=2)),
            ("sliding 2 past 2", lambda: causal(None, (1, 2), embeds(1, 2), 2, sliding_window=2)),
            ("4d mask", lambda: causal(torch.tril(torch.ones(1, 1, 3, 3)), (1, 3), embeds(1, 3), 0)),
        ],
        "_prepare_4d_causal_attention_mask_for_sdpa": [
            ("full mask ignored", lambda: sdpa(FULL, (2, 4), embeds(2, 4), 0)),
            ("no mask ignored", lambda: sdpa(None, (2, 4), embeds(2, 4), 0)),
            ("no mask past 2", lambda: sdpa(None, (1, 3), embeds(1, 3), 2)),
            ("padded", lambda: sdpa(PADDED, (2, 4), embeds(2, 4), 0)),
            ("left pad", lambda: sdpa(LEFT_PAD_3, (2, 3), embeds(2, 3), 0)),
            ("full mask past 1", lambda: sdpa(FULL, (2, 3), embeds(2, 3), 1)),
            ("sliding 3 long", lambda: sdpa(FULL, (2, 4), embeds(2, 4), 0, sliding_window=3)),
            ("4d mask", lambda: sdpa(torch.zeros(1, 1, 2, 2), (1, 2), embeds(1, 2), 0)),
        ],
        "AttentionMaskConverter": [
            ("causal to_causal_4d", lambda: converter(True).to_causal_4d(2, 3, 5, F32)),
            ("causal to_causal_4d one query", lambda: converter(True).to_causal_4d(1, 1, 4, F32)),
            ("sliding to_causal_4d one query", lambda: converter(True, sliding_window=2).to_causal_4d(1, 1, 4, F32)),
            ("causal to_4d", lambda: converter(True).to_4d(PADDED, 4, F32, key_value_length=4)),
            ("causal to_4d past", lambda: converter(True).to_4d(PADDED, 2, BF16, key_value_length=4)),
            ("bidirectional to_4d", lambda: converter(False).to_4d(PADDED, 3, F16)),
            ("sliding to_4d", lambda: converter(True, sliding_window=1).to_4d(FULL, 4, F32, key_value_length=4)),
            ("make causal", lambda: converter._make_causal_mask((2, 3), F32, "cpu", past_key_values_length=2)),
            ("make causal sliding", lambda: converter._make_causal_mask((1, 4), F16, "cpu", 1, sliding_window=2)),
            ("expand", lambda: converter._expand_mask(PADDED, F32, tgt_len=3)),
            ("unmask unattended", lambda: converter._unmask_unattended(
                converter(True).to_4d(LEFT_PAD_3, 3, F32, key_value_length=3), min32)),
            ("ignore: no mask", lambda: converter._ignore_causal_mask_sdpa(None, embeds(1, 3), 0)),
            ("ignore: no mask past", lambda: converter._ignore_causal_mask_sdpa(None, embeds(1, 3), 2)),
            ("ignore: full", lambda: converter._ignore_causal_mask_sdpa(FULL, embeds(2, 4), 0)),
            ("ignore: padded", lambda: converter._ignore_causal_mask_sdpa(PADDED, embeds(2, 4), 0)),
            ("ignore: window", lambda: converter._ignore_causal_mask_sdpa(FULL, embeds(2, 4), 0, sliding_window=4)),
            ("ignore: 4d", lambda: converter._ignore_causal_mask_sdpa(torch.ones(1, 1, 2, 2), embeds(1, 2), 0)),
            ("bad sliding window", lambda: converter(True, sliding_window=0)),
            ("bidirectional to_causal_4d", lambda: converter(False).to_causal_4d(1, 2, 2, F32)),
        ],
    }


def paligemma_cases(get):
    prepare = get("_prepare_4d_causal_attention_mask_with_cache_position")
    min32 = torch.finfo(F32).min
    tti = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1]])

    def call(mask, seq, target, position, batch, **kwargs):
        return prepare(mask, seq, target, F32, "cpu", min32, position, batch, **kwargs)

    return {
        "_prepare_4d_causal_attention_mask_with_cache_position": [
            ("prefill", lambda: call(PADDED, 4, 4, torch.arange(4), 2)),
            ("prefill static cache", lambda: call(PADDED, 4, 6, torch.arange(4), 2)),
            ("decode", lambda: call(torch.ones(2, 5, dtype=torch.long), 1, 6, torch.tensor([4]), 2)),
            ("training", lambda: call(PADDED, 4, 4, torch.arange(4), 2, is_training=True, token_type_ids=tti)),
            ("no mask", lambda: call(None, 3, 4, torch.arange(3), 1)),
            ("4d mask", lambda: call(torch.zeros(1, 1, 2, 2), 2, 2, torch.arange(2), 1)),
        ]
    }


def filled_cache(cache_class):
    cache = cache_class()
    generator = torch.Generator().manual_seed(0)
    for step_length in (3, 2):
        for layer_idx in range(2):
            key = torch.randn(1, 2, step_length, 4, generator=generator)
            cache.update(key, key + 1, layer_idx)
    return cache


def legacy_pairs():
    generator = torch.Generator().manual_seed(1)
    return tuple((torch.randn(1, 2, 3, 4, generator=generator), torch.randn(1, 2, 3, 4, generator=generator))
                 for _ in range(2))


def cache_cases(dynamic_cache_class):
    return {
        "Cache.seen_tokens": [
            ("after two steps", lambda: filled_cache(dynamic_cache_class).seen_tokens),
        ],
        "Cache.get_usable_length": [
            ("dynamic, 3 new", lambda: filled_cache(dynamic_cache_class).get_usable_length(3)),
            ("dynamic, layer 1", lambda: filled_cache(dynamic_cache_class).get_usable_length(1, 1)),
            ("empty", lambda: dynamic_cache_class().get_usable_length(4)),
        ],
        "Cache.get_max_length": [
            ("dynamic", lambda: filled_cache(dynamic_cache_class).get_max_length()),
        ],
        "DynamicCache.from_legacy_cache": [
            ("two layers", lambda: legacy_layers(dynamic_cache_class.from_legacy_cache(legacy_pairs()))),
            ("none", lambda: dynamic_cache_class.from_legacy_cache(None).get_seq_length()),
        ],
        "DynamicCache.to_legacy_cache": [
            ("after two steps", lambda: filled_cache(dynamic_cache_class).to_legacy_cache()),
        ],
    }


def legacy_layers(cache):
    return [cache.get_seq_length(), cache.to_legacy_cache()]


def run(cases):
    """[{case, output}] for one name's cases; an exception is recorded by its type."""
    results = []
    for case, call in cases:
        try:
            output = encode(call())
        except Exception as error:  # noqa: BLE001 (the raised type is what is recorded)
            output = {"raises": type(error).__name__}
        results.append({"case": case, "output": output})
    return results


def encode(value):
    if isinstance(value, torch.Tensor):
        return {"dtype": str(value.dtype).removeprefix("torch."), "shape": list(value.shape),
                "values": value.float().flatten().tolist()}
    if isinstance(value, (list, tuple)):
        return [encode(item) for item in value]
    return value


def main():
    import transformers

    OUT.mkdir(exist_ok=True)
    recorded = {}

    def get_from(module_name):
        module = importlib.import_module(module_name)
        return lambda name: getattr(module, name)

    try:
        recorded.update(mask_cases(get_from(MASK_UTILS)))
    except (ImportError, AttributeError):
        pass
    try:
        recorded.update(paligemma_cases(get_from(PALIGEMMA)))
    except (ImportError, AttributeError):
        pass
    from transformers.cache_utils import Cache, DynamicCache

    for name, cases in cache_cases(DynamicCache).items():
        owner, attribute = name.split(".")
        # transformers 5.22 brought back a get_max_length of its own (-1 for "no limit", where the
        # removed one returned None): only the 4.x one is what remote code was written against.
        reintroduced = name == "Cache.get_max_length" and not transformers.__version__.startswith("4.")
        if hasattr({"Cache": Cache, "DynamicCache": DynamicCache}[owner], attribute) and not reintroduced:
            recorded[name] = cases
    outputs = {name: run(cases) for name, cases in recorded.items()}

    import_utils = importlib.import_module("transformers.utils.import_utils")
    if hasattr(import_utils, "is_torch_fx_available"):
        outputs["is_torch_fx_available"] = [{"case": "call", "output": import_utils.is_torch_fx_available()}]
    if hasattr(transformers, "LogitsWarper"):
        warper = transformers.LogitsWarper
        outputs["LogitsWarper"] = run([("call", lambda: warper()(torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 3)))])
    whisper = importlib.import_module("transformers.models.whisper.modeling_whisper")
    if hasattr(whisper, "WHISPER_ATTENTION_CLASSES"):
        outputs["WHISPER_ATTENTION_CLASSES"] = [{"case": "keys", "output": sorted(whisper.WHISPER_ATTENTION_CLASSES)}]

    for name, results in outputs.items():
        path = OUT / f"{name}.json"
        # One case a line: readable diffs when a case is added.
        lines = ",\n".join("  " + json.dumps(result) for result in results)
        header = json.dumps({"name": name, "transformers": transformers.__version__})[:-1]
        path.write_text(f'{header}, "cases": [\n{lines}\n]}}\n')
        print(f"{path.name}: {len(results)} cases from transformers {transformers.__version__}", file=sys.stderr)


if __name__ == "__main__":
    main()
