"""Tokenizers of the tiny MiniCPM-V checkpoints: a byte-level BPE with MiniCPM-V's special tokens.

One class per published tokenizer, each with exactly the attribute, property and static-method
names of its family's published class (recorded in tiny_models/published_remote_code.json and held
to it by a test): the published classes differ -- 2.5 has no `slice_start_id` or `im_id_start`,
only 2.0 has `point_start`, only 2.5 has `eot_id` -- and a stand-in richer than the real one would
hide code that relies on a name the real tokenizer lacks.
"""

from transformers import PreTrainedTokenizerFast


def _id_of(attribute):
    """A property answering the vocabulary id of the token string in ``attribute``, as published."""
    return property(lambda self: self.convert_tokens_to_ids(getattr(self, attribute)))


class _MiniCPMVTokenizerBase(PreTrainedTokenizerFast):
    """The names every published family has."""

    im_start = "<image>"
    im_end = "</image>"
    ref_start = "<ref>"
    ref_end = "</ref>"
    box_start = "<box>"
    box_end = "</box>"
    quad_start = "<quad>"
    quad_end = "</quad>"
    slice_start = "<slice>"
    slice_end = "</slice>"

    @property
    def eos_id(self):
        return self.eos_token_id

    @property
    def bos_id(self):
        return self.bos_token_id

    @property
    def unk_id(self):
        return self.unk_token_id

    im_start_id = _id_of("im_start")
    im_end_id = _id_of("im_end")


class MiniCPMV2TokenizerFast(_MiniCPMVTokenizerBase):
    """MiniCPM-V 2.0 (published: the slow `MiniCPMVTokenizer`)."""

    point_start = "<point>"
    point_end = "</point>"


class _EscapeMixin:
    @staticmethod
    def escape(text):
        return text

    @staticmethod
    def unescape(text):
        return text


class MiniCPMVLlama3TokenizerFast(_EscapeMixin, _MiniCPMVTokenizerBase):
    """MiniCPM-Llama3-V 2.5: no slice or image-id ids, no image-id strings; has `eot_id`."""

    eot_token = "<|eot_id|>"
    eot_id = _id_of("eot_token")


class _ImageIdTokenizer(_EscapeMixin, _MiniCPMVTokenizerBase):
    """2.6 and later: slice and image-id ids."""

    im_id_start = "<image_id>"
    im_id_end = "</image_id>"

    slice_start_id = _id_of("slice_start")
    slice_end_id = _id_of("slice_end")
    im_id_start_id = _id_of("im_id_start")
    im_id_end_id = _id_of("im_id_end")


class MiniCPMVTokenizerFast(_ImageIdTokenizer):
    """MiniCPM-V 2.6 and 4.5."""

    @property
    def newline_id(self):
        return self.convert_tokens_to_ids("\n")


class MiniCPMOTokenizerFast(_ImageIdTokenizer):
    """MiniCPM-o 2.6: the audio and speech tokens on top; no `newline_id`."""

    image_tag = "(<image>./</image>)"
    image_pattern = r"\(<image>./</image>\)"
    audio_start = "<|audio_start|>"
    audio_end = "<|audio_end|>"
    spk_start = "<|spk_bos|>"
    spk_end = "<|spk_eos|>"
    tts_start = "<|tts_bos|>"
    tts_end = "<|tts_eos|>"
    audio_tag = "(<audio>./</audio>)"
    audio_pattern = r"\(<audio>./</audio>\)"
    split_pattern = f"({image_pattern}|{audio_pattern})"
    terminator_tokens = ["<|im_end|>", "<|endoftext|>", tts_end]

    @property
    def terminators(self):
        return self.terminator_tokens

    audio_start_id = _id_of("audio_start")
    audio_end_id = _id_of("audio_end")
    spk_start_id = _id_of("spk_start")
    spk_end_id = _id_of("spk_end")
    tts_start_id = _id_of("tts_start")
    tts_end_id = _id_of("tts_end")

    @property
    def terminator_ids(self):
        return [self.convert_tokens_to_ids(token) for token in self.terminator_tokens]
