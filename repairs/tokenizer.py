"""Defect 11: a tokenizer reading sentencepiece's ids, which transformers 5's tokenizers lack."""

import inspect
import re
import sys

import transformers

from .log import warn_once

SENTENCEPIECE_READ = re.compile(r"self\.sp_model\.(bos|eos|unk|pad)_id\(\)|self\._convert_token_to_id\(")


class SentencePieceIds:
    """What remote code reads of a sentencepiece model's ids, from the tokenizer's own special tokens
    (sentencepiece's -1 where the tokenizer has none)."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer

    def _id(self, name):
        value = getattr(self._tokenizer, f"{name}_token_id")
        return -1 if value is None else value

    def bos_id(self):
        return self._id("bos")

    def eos_id(self):
        return self._id("eos")

    def unk_id(self):
        return self._id("unk")

    def pad_id(self):
        return self._id("pad")


def needs_sentencepiece_ids(tokenizer_class):
    """Whether `tokenizer_class` or a remote-code class it derives from reads `self.sp_model.*_id()`."""
    return any(SENTENCEPIECE_READ.search(inspect.getsource(sys.modules[cls.__module__]))
               for cls in tokenizer_class.__mro__
               if cls.__module__.partition(".")[0] not in ("transformers", "builtins", "tokenizers"))


def repair_sentencepiece_ids(tokenizer):
    """Defect 11. The published MiniCPM-V 2.0 tokenizer (a LlamaTokenizer subclass) reads its ids from
    `self.sp_model.bos_id()` and the like; transformers 5's LlamaTokenizer is backed by `tokenizers` and
    has no `sp_model`, so `tokenizer.bos_id` gives no id (its processor then fails building input ids).
    Its `im_start_id` calls the slow tokenizers' `_convert_token_to_id`, which it lacks too.
    Detected by reading the tokenizer's remote code, on a tokenizer without an sp_model; repaired by
    giving it one that answers those ids from its own special tokens, and `convert_tokens_to_ids` as
    `_convert_token_to_id`. Returns True when repaired."""
    if getattr(tokenizer, "sp_model", None) is not None or not needs_sentencepiece_ids(type(tokenizer)):
        return False
    tokenizer.sp_model = SentencePieceIds(tokenizer)
    if not hasattr(type(tokenizer), "_convert_token_to_id"):
        tokenizer._convert_token_to_id = tokenizer.convert_tokens_to_ids
    warn_once("Remote code %s reads its ids from sp_model, which transformers %s's tokenizers-backed "
              "tokenizer lacks: they come from its own special tokens.", type(tokenizer),
              transformers.__version__)
    return True
