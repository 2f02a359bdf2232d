"""How close two float results must be when different kernels computed them.

Exact equality holds only where the same kernels run on the same inputs in one process. Another
process may use another thread count, another machine another instruction set (AVX-512 or AVX2),
another batch shape or code path other matrix-product blockings: sums are then added in another
order, and each result moves by a few units in the last place (ulp) of the largest terms summed
into it. So a tolerance here is a number of ulps of the dtype, scaled by the magnitude of the values
compared, not a fixed absolute number.

Measured on tiny 2.6's fp32 logits (largest about 8): 1 vs 2 threads, and AVX2 vs the baseline
(`ATEN_CPU_CAPABILITY=default`) kernels, each move them by 3 ulps of the largest logit (2.7e-6).
`ULPS` leaves a factor of 20 over that; a real defect (a stale buffer, a wrong weight) moves logits
by whole units.
"""

import pytest
import torch

ULPS = 64


def eps(dtype=torch.float32):
    return torch.finfo(dtype).eps


def tolerance(expected, ulps=ULPS):
    """``rtol``/``atol`` for ``expected``'s dtype: ``ulps`` ulps relative to each value, and as much of the
    largest magnitude in ``expected`` (rounding follows the size of the terms summed, so a value near zero
    carries the error of its large neighbours)."""
    rtol = ulps * eps(expected.dtype)
    return {"rtol": rtol, "atol": rtol * expected.detach().abs().max().item()}


def assert_close(actual, expected, ulps=ULPS, name=None):
    """``torch.testing.assert_close`` at ``tolerance(expected, ulps)``; ``name`` heads the message."""
    torch.testing.assert_close(actual, expected, **tolerance(expected, ulps),
                               msg=None if name is None else lambda message: f"{name}: {message}")


def assert_close_grads(actual, expected, ulps=ULPS):
    """Gradients by parameter name: each within ``ulps`` ulps of the largest gradient of its module.

    A parameter's gradient sums terms of its module's gradient size: a key projection's bias, whose
    gradient is zero in exact arithmetic, gets rounding noise of its weight's gradient size.
    """
    assert actual.keys() == expected.keys() and expected
    for name, grad in expected.items():
        module = name.rpartition(".")[0]
        scale = max(g.abs().max().item() for n, g in expected.items() if n.rpartition(".")[0] == module)
        rtol = ulps * eps(grad.dtype)
        torch.testing.assert_close(actual[name], grad, rtol=rtol, atol=rtol * scale,
                                   msg=lambda message, name=name: f"{name}: {message}")


def close(actual, expected, ulps=ULPS):
    return torch.allclose(actual, expected, **tolerance(expected, ulps))


def approx(expected, scale=None, ulps=ULPS, dtype=torch.float32):
    """``pytest.approx`` for a scalar (a loss) that other kernels computed in ``dtype``: ``ulps`` ulps of
    ``scale`` (the magnitude of the terms it was computed from; default: the value itself)."""
    scale = abs(expected) if scale is None else scale
    return pytest.approx(expected, abs=ulps * eps(dtype) * scale)
