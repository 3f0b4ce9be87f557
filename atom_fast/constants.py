"""Numbers shared by every backend, defined once for Python (csrc/ has its own single header).

NORM_EPS: the floor on a vector's L2 norm in the normalization (torch.nn.functional.normalize's).
MAX_UNROLLED_POWER: the largest integer power the fused kernels unroll into multiplications; larger
or fractional powers take a general path.
"""

NORM_EPS = 1e-12
MAX_UNROLLED_POWER = 16
