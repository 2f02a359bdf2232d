"""MiniCPM-OCR: model_type minicpm_ocr, native in transformers."""

from families.native import NativeFamily


class MiniCPMOcr(NativeFamily):
    name = "minicpm_ocr"
    model_type = "minicpm_ocr"
