"""MiniCPM-V 4.0 and 4.5 (openbmb/MiniCPM-V-4, -4_5): 2.6's layout and slicing over a Qwen3 / Llama LLM.

Also the fallback of the registry: a remote-code config whose version no family claims is read as this
line's (as it was before the registry), the newest of the remote-code layouts.
"""

from families.remote_code import RemoteCodeFamily


class MiniCPMV4(RemoteCodeFamily):
    name = "minicpmv4"
    llm_type = "qwen"
    versions = (4.0, 4.5)
    published = ("minicpmv4_0", "minicpmv4_5")
    fallback = True
