"""MiniCPM-Llama3-V 2.5 (openbmb/MiniCPM-Llama3-V-2_5): version 2.5, the Llama 3 chat layout."""

from families.remote_code import RemoteCodeFamily


class MiniCPMV2_5(RemoteCodeFamily):
    name = "minicpmv2_5"
    llm_type = "llama3"
    versions = (2.5,)
    published = ("minicpmv2_5",)
    use_image_id = False  # its config class has no image ids
