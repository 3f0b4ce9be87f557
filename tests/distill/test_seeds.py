"""The driver's seeds (atom_fast/distill/seeds.py): derive_seed is the mix results were produced with."""

import pytest

from atom_fast.distill import evaluate as ev
from atom_fast.distill.seeds import derive_seed


def test_derive_seed_is_the_old_mix():
    def fnv(*parts):  # the formula evaluate.py's _mix used, written out again
        h = 1469598103934665603
        for p in parts:
            h = ((h ^ (p & 0xFFFFFFFFFFFFFFFF)) * 1099511628211) & 0x7FFFFFFFFFFFFFFF
        return h

    for parts in [(), (0,), (0, 7), (3, 1, 1), (2 ** 70, -5), (123456789, 0x1A17), (0, 5, 0x7E7)]:
        assert derive_seed(*parts) == fnv(*parts)
    assert derive_seed(0, 7) == 1903078709129691514  # a value results were produced with
    assert 0 <= derive_seed(2 ** 64 - 1, 2 ** 63) < 2 ** 63
    assert derive_seed(1, 2) != derive_seed(2, 1)
    assert ev._mix is derive_seed
    with pytest.raises(TypeError, match="integers"):
        derive_seed(1.5)
