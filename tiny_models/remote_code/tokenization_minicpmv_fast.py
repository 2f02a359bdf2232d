"""Tokenizer of the tiny MiniCPM-V checkpoints: a byte-level BPE with MiniCPM-V's special tokens.

The image placeholder tokens and the `*_id` properties match the real tokenizers'; the llama3
family (MiniCPM-Llama3-V 2.5) also has `eot_id`.
"""

from transformers import PreTrainedTokenizerFast


class MiniCPMVTokenizerFast(PreTrainedTokenizerFast):
    im_start = "<image>"
    im_end = "</image>"
    ref_start = "<ref>"
    ref_end = "</ref>"
    box_start = "<box>"
    box_end = "</box>"
    quad_start = "<quad>"
    quad_end = "</quad>"
    point_start = "<point>"
    point_end = "</point>"
    slice_start = "<slice>"
    slice_end = "</slice>"
    im_id_start = "<image_id>"
    im_id_end = "</image_id>"

    @property
    def eos_id(self):
        return self.eos_token_id

    @property
    def bos_id(self):
        return self.bos_token_id

    @property
    def unk_id(self):
        return self.unk_token_id

    @property
    def im_start_id(self):
        return self.convert_tokens_to_ids(self.im_start)

    @property
    def im_end_id(self):
        return self.convert_tokens_to_ids(self.im_end)

    @property
    def slice_start_id(self):
        return self.convert_tokens_to_ids(self.slice_start)

    @property
    def slice_end_id(self):
        return self.convert_tokens_to_ids(self.slice_end)

    @property
    def im_id_start_id(self):
        return self.convert_tokens_to_ids(self.im_id_start)

    @property
    def im_id_end_id(self):
        return self.convert_tokens_to_ids(self.im_id_end)

    @property
    def newline_id(self):
        (token_id,) = self.encode("\n", add_special_tokens=False)
        return token_id


class MiniCPMVLlama3TokenizerFast(MiniCPMVTokenizerFast):
    eot_token = "<|eot_id|>"

    @property
    def eot_id(self):
        return self.convert_tokens_to_ids(self.eot_token)
