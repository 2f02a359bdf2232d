"""MiniCPM-V 4.6: model_type minicpmv4_6, native in transformers."""

from families.native import NativeFamily


class MiniCPMV4_6(NativeFamily):
    name = "minicpmv4_6"
    model_type = "minicpmv4_6"
