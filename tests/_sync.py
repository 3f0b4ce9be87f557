"""Device reads detected on the host: a TorchDispatchMode that records every ATen op, and which of
them read device memory on the host (``.item()``, ``int(t)``, ``bool(t)``, ``nonzero``, ``tolist``
all dispatch one of READS). On the meta device such a read raises by itself, and so do the reads
READS does not name (boolean-mask indexing, ``.cpu()``, ``.tolist()``, which dispatch other ops or
none): the tests run on meta for that reason. On another device the mode names only the READS, so
it is not a complete sync detector there (``torch.cuda.set_sync_debug_mode`` is, on a GPU)."""

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

# ops whose result the host needs the device's values for (a data-dependent read)
READS = frozenset({"_local_scalar_dense", "item", "nonzero", "is_nonzero", "equal", "tolist",
                   "unique", "_unique2", "bincount", "masked_select", "repeat_interleave"})


class OpCounter(TorchDispatchMode):
    """Counts the ATen ops dispatched under it (``ops``: name -> count) and records the reads of
    ``device`` memory (``reads``: op names, in order). Ops inside a custom op's implementation run
    with the mode set aside and are not seen: a custom op counts once."""

    def __init__(self, device=None):
        super().__init__()
        self.device = None if device is None else torch.device(device)
        self.ops = Counter()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        self.ops[name] += 1
        if name in READS and self.device is not None:
            if any(isinstance(t, torch.Tensor) and t.device.type == self.device.type
                   for t in tree_leaves((args, kwargs))):
                self.reads.append(name)
        return func(*args, **kwargs)

    @property
    def total(self):
        return sum(self.ops.values())
