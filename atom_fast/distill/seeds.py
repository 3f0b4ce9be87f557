"""Seeds of the driver, derived from integers so that a run is reproducible piece by piece.

Every random stream the driver draws (a distillation iteration's network and real batch, an
evaluation model's initialization and training) is seeded with ``derive_seed(seed, ...)`` of the
integers that name it, never from a shared generator, so a piece gives the same draws whichever
process runs it and whatever ran before it.
"""

from __future__ import annotations

_FNV_OFFSET = 1469598103934665603   # 64-bit FNV-1a offset basis
_FNV_PRIME = 1099511628211          # 64-bit FNV prime
_MASK64 = 0xFFFFFFFFFFFFFFFF
_MASK63 = 0x7FFFFFFFFFFFFFFF        # torch.manual_seed takes a signed 64-bit value


def derive_seed(*parts: int) -> int:
    """A seed in ``[0, 2**63)`` from integers: an FNV-1a style mix over whole 64-bit words.

    Stable across runs, processes and platforms (no ``hash()``). Each part is taken modulo 2**64
    (negative integers wrap). ``derive_seed(seed, m)`` and ``derive_seed(seed, m, 1)`` are the
    evaluation's per-model initialization and training seeds; the loop uses ``derive_seed(seed, it)``.
    """
    h = _FNV_OFFSET
    for p in parts:
        if isinstance(p, bool) or not isinstance(p, int):
            try:
                p = int(p.__index__())
            except (AttributeError, TypeError):
                raise TypeError(f"derive_seed parts must be integers, got {type(p).__name__}") from None
        h = ((h ^ (p & _MASK64)) * _FNV_PRIME) & _MASK63
    return h
