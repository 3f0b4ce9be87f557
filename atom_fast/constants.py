"""The rules every backend shares, defined once for Python (``csrc/constants.h`` is the C++ copy).

NORM_EPS: the floor on a vector's L2 norm in the normalization (torch.nn.functional.normalize's).
MAX_UNROLLED_POWER: the largest integer power the fused kernels unroll into multiplications; larger
or fractional powers take a general path.
accumulation_dtype: what sums and results are kept in for features of a dtype.
norm_floor: NORM_EPS as a floor on the norm of a vector computed from features scaled by 1/m.
"""

import math

import torch

NORM_EPS = 1e-12
MAX_UNROLLED_POWER = 16


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 features, float32 for float32, float16 and bfloat16 ones: every sum,
    statistic and loss is kept in it (half-precision features are upcast before anything is summed)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def norm_floor(scale: torch.Tensor, power) -> torch.Tensor:
    """``NORM_EPS / scale**power``, formed in log space (0 where ``scale**power`` would overflow,
    inf where it would underflow), in ``scale``'s dtype.

    Every backend computes an attention vector from the features divided by their per-sample
    maximum m (so ``|F / m|^p`` neither overflows nor underflows) and normalizes
    ``x' = x / m^p`` by ``max(||x'||, norm_floor(m, p))``: the eps floor of ``F.normalize(x)`` decided
    on the unscaled norm ``m^p ||x'||``, without forming ``m^p``.
    """
    return torch.exp2(math.log2(NORM_EPS) - float(power) * torch.log2(scale))
