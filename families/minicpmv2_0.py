"""MiniCPM-V 2.0 (openbmb/MiniCPM-V-2): a config without ``version``, its slicing fields flat on the config."""

from families.remote_code import VIDEO_PROBLEM, RemoteCodeFamily

# Why it cannot pack (its published modeling_minicpm.py).
MINICPM_PACKING_PROBLEM = (
    "--packing is not supported for MiniCPM-V 2.0: its MiniCPM language model builds one causal mask over the "
    "whole row and ignores where position ids restart, so packed samples would attend to each other; "
    "train without --packing (--group_by_length true also cuts padding)"
)


class MiniCPMV2_0(RemoteCodeFamily):
    name = "minicpmv2_0"
    llm_type = "minicpm"
    versions = (None, 2.0)
    published = ("minicpmv2_0",)
    slicing = "config"  # slice_mode, max_slice_nums, scale_resolution on the config itself
    batch_vision = False  # one image at a time through its timm tower
    use_image_id = False
    reasons = {"video": VIDEO_PROBLEM, "packing": MINICPM_PACKING_PROBLEM}
