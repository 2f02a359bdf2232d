"""Stand-ins for the transformers names that MiniCPM-V remote code imports and transformers has
removed (defect 4; `removed_names` finds where they are missing and installs them).

Each behaves as the removed name did, pinned by golden values recorded from the last release that
had it (tests/test_removed_names.py). They carry the removed names, so that code wrapping them by
name (torch.fx.wrap, as MiniCPM-V 2.0 does) sees what it saw before.
"""

import torch

def _is_tracing(tensor):
    return torch.jit.is_tracing() or isinstance(tensor, torch.fx.Proxy) or torch.compiler.is_compiling()


def _bias(blocked, dtype):
    """Additive attention bias: 0 where attending is allowed, the dtype's minimum where blocked."""
    return torch.zeros(blocked.shape, dtype=dtype, device=blocked.device).masked_fill(blocked, torch.finfo(dtype).min)


def _prepare_4d_attention_mask(mask, dtype, tgt_len=None):
    """[batch, kv] mask (1 attends; anything else is blocked) -> [batch, 1, tgt_len or kv, kv] bias."""
    batch, kv_length = mask.shape
    query_length = kv_length if tgt_len is None else tgt_len
    kept = mask[:, None, None, :].expand(batch, 1, query_length, kv_length).to(dtype)
    return _bias((1 - kept) != 0, dtype)


class AttentionMaskConverter:
    """Builds additive 4D attention masks: causal (optionally within a sliding window) and/or padding."""

    def __init__(self, is_causal, sliding_window=None):
        if sliding_window is not None and sliding_window <= 0:
            raise ValueError(f"sliding_window must be a positive integer, not {sliding_window}")
        self.is_causal = is_causal
        self.sliding_window = sliding_window

    @staticmethod
    def _make_causal_mask(input_ids_shape, dtype, device, past_key_values_length=0, sliding_window=None):
        batch, query_length = input_ids_shape
        # Query i sits at absolute position past + i and may see every key up to that position.
        query_positions = torch.arange(query_length, device=device)[:, None] + past_key_values_length
        key_positions = torch.arange(query_length + past_key_values_length, device=device)[None, :]
        blocked = key_positions > query_positions
        if sliding_window is not None:
            blocked |= key_positions < query_positions - sliding_window
        return _bias(blocked, dtype)[None, None].expand(batch, 1, *blocked.shape)

    @staticmethod
    def _expand_mask(mask, dtype, tgt_len=None):
        return _prepare_4d_attention_mask(mask, dtype, tgt_len)

    @staticmethod
    def _unmask_unattended(expanded_mask, min_dtype):
        """Rows that attend to nothing attend to everything instead (SDPA's memory-efficient kernel
        returns NaN for fully masked rows)."""
        if expanded_mask.dtype == torch.bool:
            raise ValueError("_unmask_unattended expects a float mask, got a BoolTensor")
        fully_masked = (expanded_mask == min_dtype).all(dim=-1, keepdim=True)
        return expanded_mask.mul(~fully_masked)

    @staticmethod
    def _ignore_causal_mask_sdpa(attention_mask, inputs_embeds, past_key_values_length, sliding_window=None,
                                 is_training=False):
        """Whether SDPA's own `is_causal` can replace the mask (nothing padded, no cache offset)."""
        query_length = inputs_embeds.shape[1]
        kv_length = query_length + past_key_values_length
        square = query_length == 1 or kv_length == query_length
        within_window = sliding_window is None or kv_length < sliding_window
        tracing = _is_tracing(inputs_embeds)
        if attention_mask is None:
            return bool((is_training or not tracing) and square and within_window)
        if not within_window or attention_mask.dim() == 4:
            return False
        return bool(not tracing and square and torch.all(attention_mask == 1))

    def to_causal_4d(self, batch_size, query_length, key_value_length, dtype, device="cpu"):
        if not self.is_causal:
            raise ValueError("to_causal_4d needs a causal AttentionMaskConverter")
        if query_length == 1 and self.sliding_window is None:
            return None
        return self._make_causal_mask((batch_size, query_length), dtype, device,
                                      key_value_length - query_length, self.sliding_window)

    def to_4d(self, attention_mask_2d, query_length, dtype, key_value_length=None):
        causal = None
        if self.is_causal and (query_length > 1 or self.sliding_window is not None):
            if key_value_length is None:
                raise ValueError("a causal AttentionMaskConverter needs key_value_length")
            causal = self._make_causal_mask((attention_mask_2d.shape[0], query_length), dtype,
                                            attention_mask_2d.device, key_value_length - query_length,
                                            self.sliding_window)
        elif self.sliding_window is not None:
            raise NotImplementedError("a sliding window needs a causal AttentionMaskConverter")
        padding = self._expand_mask(attention_mask_2d, dtype, query_length).to(attention_mask_2d.device)
        if causal is None:
            return padding
        return causal.masked_fill(padding.bool(), torch.finfo(dtype).min)


def _causal_mask(attention_mask, input_shape, inputs_embeds, past_key_values_length, sliding_window):
    """The causal mask, with a 2D `attention_mask`'s padding folded in (both helpers below)."""
    converter = AttentionMaskConverter(is_causal=True, sliding_window=sliding_window)
    query_length = input_shape[-1]
    kv_length = query_length + past_key_values_length
    if attention_mask is not None and attention_mask.dim() == 2:
        return converter.to_4d(attention_mask, query_length, inputs_embeds.dtype, key_value_length=kv_length)
    return converter.to_causal_4d(input_shape[0], query_length, kv_length, inputs_embeds.dtype, inputs_embeds.device)


def _prepare_4d_causal_attention_mask(attention_mask, input_shape, inputs_embeds, past_key_values_length,
                                      sliding_window=None):
    if attention_mask is not None and attention_mask.dim() == 4:  # 1 attends, 0 is blocked
        expected = (input_shape[0], 1, input_shape[-1], input_shape[-1] + past_key_values_length)
        if tuple(attention_mask.shape) != expected:
            raise ValueError(f"Incorrect 4D attention_mask shape: {tuple(attention_mask.shape)}; expected: {expected}.")
        inverted = 1.0 - attention_mask  # a bias in the mask's own dtype
        return torch.zeros_like(inverted).masked_fill(inverted != 0, torch.finfo(inputs_embeds.dtype).min)
    return _causal_mask(attention_mask, input_shape, inputs_embeds, past_key_values_length, sliding_window)


def _prepare_4d_causal_attention_mask_for_sdpa(attention_mask, input_shape, inputs_embeds, past_key_values_length,
                                               sliding_window=None):
    """As `_prepare_4d_causal_attention_mask`, but None where SDPA's `is_causal` does the job, and a
    4D mask is taken as the bias itself."""
    if AttentionMaskConverter._ignore_causal_mask_sdpa(attention_mask, inputs_embeds, past_key_values_length,
                                                       sliding_window):
        return None
    if attention_mask is not None and attention_mask.dim() == 4:
        mask = attention_mask
    else:
        mask = _causal_mask(attention_mask, input_shape, inputs_embeds, past_key_values_length, sliding_window)
    if attention_mask is not None and not _is_tracing(inputs_embeds) and mask.device.type in ("cuda", "xpu"):
        mask = AttentionMaskConverter._unmask_unattended(mask, torch.finfo(inputs_embeds.dtype).min)
    return mask


def _prepare_4d_causal_attention_mask_with_cache_position(attention_mask, sequence_length, target_length, dtype,
                                                          device, min_dtype, cache_position, batch_size,
                                                          is_training=False, token_type_ids=None, **kwargs):
    """PaliGemma's mask: the prefix (token_type_ids == 0) is seen whole while training, the rest
    causally; at inference every query sees the whole prompt. A 4D mask is returned as given."""
    if attention_mask is not None and attention_mask.dim() == 4:
        return attention_mask
    keys = torch.arange(target_length, device=device)[None, :]
    if sequence_length == 1:
        blocked = torch.ones(sequence_length, target_length, dtype=torch.bool, device=device)
    elif is_training:
        blocked = keys > torch.arange(sequence_length, device=device)[:, None]
    else:
        blocked = (keys >= sequence_length).expand(sequence_length, target_length)
    blocked = blocked & (torch.arange(target_length, device=cache_position.device) > cache_position.reshape(-1, 1)).to(device)
    blocked = blocked[None, None].expand(batch_size, 1, -1, -1).clone()
    if attention_mask is not None:
        length = attention_mask.shape[-1]
        padded = (attention_mask[:, None, None, :] == 0).to(blocked.device)
        blocked[..., :length] |= padded
        if is_training:
            blocked[..., :length] &= (token_type_ids[:, None, None, :] != 0).to(blocked.device)
    return torch.zeros(blocked.shape, dtype=dtype, device=device).masked_fill(blocked, min_dtype)


def is_torch_fx_available():
    return True  # torch.fx ships with every torch this project runs on


class LogitsWarper:
    """Abstract base of logits warpers (transformers folded them into LogitsProcessor)."""

    def __call__(self, input_ids, scores):
        raise NotImplementedError(f"{self.__class__} is an abstract class. Only classes inheriting this class can be called.")


def _whisper_attention_classes():
    """Every implementation name maps to WhisperAttention, which now dispatches on the config."""
    from transformers.models.whisper.modeling_whisper import WhisperAttention

    return {"eager": WhisperAttention, "flash_attention_2": WhisperAttention, "sdpa": WhisperAttention}


def cache_limit(cache, layer_idx):
    """The cache's maximum length, or None for one that grows without bound."""
    if hasattr(cache, "get_max_cache_shape"):  # transformers 5.0 to 5.21
        limit = cache.get_max_cache_shape(layer_idx)
    else:  # later: each layer knows its own (and get_max_length may be this module's stand-in)
        limit = cache.layers[layer_idx].get_max_length() if layer_idx < len(cache.layers) else -1
    return None if limit is None or limit < 0 else limit


def _seen_tokens(cache):
    return cache.get_seq_length()


def _get_usable_length(cache, new_seq_length, layer_idx=0):
    """How much of the cache the next `new_seq_length` tokens can attend to."""
    limit = cache_limit(cache, layer_idx)
    previous = cache.get_seq_length(layer_idx)
    if limit is not None and previous + new_seq_length > limit:
        return limit - new_seq_length
    return previous


def _get_max_length(cache):
    # Installed only where transformers lacks the name (before 5.22); from 5.22 the native method
    # answers -1, not None, for a dynamic cache. That difference does not decide whether the
    # published MiniCPM-V 2.0 LLM generates: its prepare_inputs_for_generation (MiniCPM-2B, the
    # transformers 4.36 Llama one) reads get_max_length only when handed a Cache, and from 5.3 to
    # 5.23 generate hands it an empty DynamicCache at the first step, where it already drops the
    # inputs_embeds for the empty input_ids; from 5.24 the cache arrives as `cache=`, so it never
    # sees one and feeds the prompt embeddings again at every step. Both are defect 5, repaired by
    # repair_generation_inputs, which also gives that call None in place of the -1.
    return cache_limit(cache, 0)


def _from_legacy_cache(cls, past_key_values=None):
    """A cache holding a tuple of per-layer (key, value) pairs."""
    cache = cls()
    for layer_idx, (key, value, *_) in enumerate(past_key_values or ()):
        cache.update(key, value, layer_idx)
    return cache


def _to_legacy_cache(cache):
    return tuple((layer.keys, layer.values) for layer in cache.layers)


# (module, name) -> a function returning the stand-in. "Class.attribute" names a class attribute.
STAND_INS = {
    ("transformers.modeling_attn_mask_utils", "AttentionMaskConverter"): lambda: AttentionMaskConverter,
    ("transformers.modeling_attn_mask_utils", "_prepare_4d_attention_mask"): lambda: _prepare_4d_attention_mask,
    ("transformers.modeling_attn_mask_utils", "_prepare_4d_causal_attention_mask"):
        lambda: _prepare_4d_causal_attention_mask,
    ("transformers.modeling_attn_mask_utils", "_prepare_4d_causal_attention_mask_for_sdpa"):
        lambda: _prepare_4d_causal_attention_mask_for_sdpa,
    ("transformers.models.paligemma.modeling_paligemma", "_prepare_4d_causal_attention_mask_with_cache_position"):
        lambda: _prepare_4d_causal_attention_mask_with_cache_position,
    ("transformers.utils.import_utils", "is_torch_fx_available"): lambda: is_torch_fx_available,
    ("transformers", "LogitsWarper"): lambda: LogitsWarper,
    ("transformers.models.whisper.modeling_whisper", "WHISPER_ATTENTION_CLASSES"): _whisper_attention_classes,
    ("transformers.cache_utils", "Cache.seen_tokens"): lambda: property(_seen_tokens),
    ("transformers.cache_utils", "Cache.get_usable_length"): lambda: _get_usable_length,
    ("transformers.cache_utils", "Cache.get_max_length"): lambda: _get_max_length,
    ("transformers.cache_utils", "DynamicCache.from_legacy_cache"): lambda: classmethod(_from_legacy_cache),
    ("transformers.cache_utils", "DynamicCache.to_legacy_cache"): lambda: _to_legacy_cache,
}
