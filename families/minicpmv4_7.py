"""MiniCPM-V 4.7: model_type minicpmv4_7, native in transformers."""

from families.native import NativeFamily


class MiniCPMV4_7(NativeFamily):
    name = "minicpmv4_7"
    model_type = "minicpmv4_7"
