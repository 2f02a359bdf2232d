"""Small byte-level tokenizers shaped like each MiniCPM-V family's, for dataset tests.

Stand-ins with the attributes docs/CONTRACTS.md gives the tiny checkpoints' tokenizers
(``im_start``, ``slice_start``, ``unk_id``, ``eos_id``, ...), built with the ``tokenizers``
library: every byte is a token, and the special tokens are single tokens.
"""

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

IMAGE_TOKENS = ["<image>", "</image>", "<slice>", "</slice>", "<image_id>", "</image_id>"]

QWEN_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen3-style: the last assistant turn always carries a think block (an empty one if it had none).
QWEN_THINKING_TEMPLATE = (
    "{% for message in messages %}"
    "{% set content = message['content'] %}"
    "{% if message['role'] == 'assistant' %}"
    "{% if '</think>' in content %}"
    "{% set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\n') %}"
    "{% set content = content.split('</think>')[-1].lstrip('\n') %}"
    "{% else %}{% set reasoning = '' %}{% endif %}"
    "{% if loop.last or reasoning %}"
    "{% set content = '<think>\n' + reasoning + '\n</think>\n\n' + content %}"
    "{% endif %}"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ content }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)

FAMILY_SPECIALS = {
    "minicpm": dict(bos="<s>", eos="</s>", extra=["<用户>", "<AI>"]),
    "llama3": dict(
        bos="<|begin_of_text|>",
        eos="<|end_of_text|>",
        extra=["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "user", "assistant"],
    ),
    "qwen": dict(bos=None, eos="<|im_end|>", extra=["<|im_start|>", "<think>", "</think>"]),
}


class FamilyTokenizer(PreTrainedTokenizerFast):
    im_start, im_end = "<image>", "</image>"
    slice_start, slice_end = "<slice>", "</slice>"
    im_id_start, im_id_end = "<image_id>", "</image_id>"

    def _id(self, token):
        return self.convert_tokens_to_ids(token)

    im_start_id = property(lambda self: self._id(self.im_start))
    im_end_id = property(lambda self: self._id(self.im_end))
    slice_start_id = property(lambda self: self._id(self.slice_start))
    slice_end_id = property(lambda self: self._id(self.slice_end))
    im_id_start_id = property(lambda self: self._id(self.im_id_start))
    im_id_end_id = property(lambda self: self._id(self.im_id_end))
    unk_id = property(lambda self: self.unk_token_id)
    eos_id = property(lambda self: self.eos_token_id)
    bos_id = property(lambda self: self.bos_token_id)
    newline_id = property(lambda self: self._id("\n"))


class Llama3Tokenizer(FamilyTokenizer):
    eot_id = property(lambda self: self._id("<|eot_id|>"))


def build_tokenizer(llm_type, thinking=False):
    specials = FAMILY_SPECIALS[llm_type]
    byte_chars = sorted(set(pre_tokenizers.ByteLevel.alphabet()))
    vocab = {"<unk>": 0, **{c: i + 1 for i, c in enumerate(byte_chars)}}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    core.decoder = decoders.ByteLevel()
    special = [t for t in [specials["bos"], specials["eos"], "<unk>"] + IMAGE_TOKENS + specials["extra"] if t]
    core.add_special_tokens(special)
    if llm_type == "minicpm":  # encode() prepends bos, like the 2.0 tokenizer
        bos = specials["bos"]
        core.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, core.token_to_id(bos))]
        )
    cls = Llama3Tokenizer if llm_type == "llama3" else FamilyTokenizer
    tokenizer = cls(
        tokenizer_object=core, bos_token=specials["bos"], eos_token=specials["eos"], unk_token="<unk>"
    )
    if llm_type == "qwen":
        tokenizer.chat_template = QWEN_THINKING_TEMPLATE if thinking else QWEN_TEMPLATE
    return tokenizer
