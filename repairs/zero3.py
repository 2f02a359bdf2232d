"""Defect 9: the published resampler puts tensors on 'cuda' under ZeRO-3, on a machine without CUDA too."""

import inspect
import re
import sys
from pathlib import Path

import torch

from .log import logger

# The published 2.5 and 2.6 resampler.py, `_set_2d_pos_cache`: `if is_deepspeed_zero3_enabled(): device='cuda'`.
CUDA_UNDER_ZERO3 = re.compile(r"""if\s+is_deepspeed_zero3_enabled\(\)\s*:\s*\n\s*device\s*=\s*['"]cuda['"]""")


def repair_cuda_under_zero3(model_class):
    """Defect 9. Under DeepSpeed ZeRO-3 the published resampler builds its `pos_embed` buffer on
    'cuda', whatever the machine: a CPU ZeRO-3 run (this project's launchers on CPU) fails with "Found
    no NVIDIA driver". Detected by reading the modules beside `model_class`'s, on a machine without
    CUDA only; repaired by giving such a module an `is_deepspeed_zero3_enabled` that is also False
    without CUDA, so the buffer goes where it goes without ZeRO-3 (GPU runs are untouched).
    Returns the names of the modules repaired."""
    if torch.cuda.is_available():
        return []
    folder = Path(inspect.getfile(model_class)).parent
    repaired = []
    for module in list(sys.modules.values()):
        file = getattr(module, "__file__", None)
        if (not file or Path(file).parent != folder or getattr(module, "__cuda_under_zero3_repaired__", False)
                or not CUDA_UNDER_ZERO3.search(Path(file).read_text(encoding="utf-8"))):
            continue
        zero3_enabled = module.is_deepspeed_zero3_enabled
        module.is_deepspeed_zero3_enabled = lambda: zero3_enabled() and torch.cuda.is_available()
        module.__cuda_under_zero3_repaired__ = True
        logger.warning("Remote code %s puts tensors on 'cuda' whenever ZeRO-3 is on; this machine has no CUDA: "
                       "they stay where they go without ZeRO-3.", Path(file).name)
        repaired.append(module.__name__)
    return repaired
