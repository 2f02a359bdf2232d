"""MiniCPM-V 2.6 (openbmb/MiniCPM-V-2_6): version 2.6, the Qwen2 chat layout, image ids."""

from families.remote_code import RemoteCodeFamily


class MiniCPMV2_6(RemoteCodeFamily):
    name = "minicpmv2_6"
    llm_type = "qwen"
    versions = (2.6,)  # MiniCPM-o 2.6 says 2.6 too: its descriptor is registered first
    published = ("minicpmv2_6",)
