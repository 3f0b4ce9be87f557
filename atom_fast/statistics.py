"""The real side of the loss as per-class statistics (docs/scale.md): compute, add up, all-reduce.

The real features enter the attention loss only through, per matched layer and class k, the sums
``S_k = sum_{n in k} s_hat_n`` (H*W values) and ``T_k = sum_{n in k} t_hat_n`` (C values) of the
normalized per-sample attention vectors and the count ``n_k``; the embedding term only through
``E_k = sum_{n in k} e_n``. Sums add up, so a real batch can go through the network in chunks, each
reduced to a :class:`ClassStatistics` at once and freed, and chunks on different processes combine
with one ``all_reduce``::

    stats = sum(atom_fast.class_statistics(net_maps(x)[:-1], K, labels=y, embedding=embed(x))
                for x, y in real_chunks)                  # under torch.no_grad()
    stats = stats.all_reduce()                            # only under torch.distributed
    loss = atom_fast.attention_loss(stats, syn_maps[:-1], K) + lam * atom_fast.mmd_loss(stats, syn_emb, K)

``attention_loss`` and ``mmd_loss`` take a ClassStatistics in place of the real features, with the same
value and the same gradient w.r.t. the synthetic features as the full real batch would give.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional, Sequence, Tuple, Union

import torch

from atom_fast import backends, checks
from atom_fast.backends.reference import class_sums
from atom_fast.constants import accumulation_dtype
from atom_fast.layout import check_blocks, check_labels, check_num_classes, grouping, on_device

# Largest statistics one ClassStatistics may hold (elements): K x (H*W + C) per layer. A
# ``num_classes`` far above any dataset's (e.g. 10**9 by mistake) is an error, not an allocation.
MAX_STATISTICS_ELEMENTS = 2 ** 31


@dataclass(frozen=True)
class ClassStatistics:
    """Per-class sums of the real side of one batch (or of many chunks, or of many processes).

    Attributes:
        num_classes: K.
        counts: ``(K,)`` int64 on the CPU: real samples per class (read on the host, so the loss's
            class checks need no device synchronization).
        spatial: one ``(K, H*W)`` tensor per layer (``None`` when not computed): sums of the
            L2-normalized spatial attention vectors.
        channel: one ``(K, C)`` tensor per layer (or ``None``): sums of the normalized channel attention.
        shapes: ``(C, H, W)`` of each layer's features.
        embedding: ``(K, D)`` sums of the flattened embeddings, or ``None``.
        spatial_power, channel_power: the powers the attention was computed with.

    Sums are float32 (float64 for float64 features) on the features' device. ``a + b`` adds two
    compatible statistics (``sum([...])`` works too); :meth:`all_reduce` adds them across processes;
    :meth:`select` keeps some classes.
    """

    num_classes: int
    counts: torch.Tensor
    spatial: Tuple[Optional[torch.Tensor], ...]
    channel: Tuple[Optional[torch.Tensor], ...]
    shapes: Tuple[Tuple[int, int, int], ...]
    spatial_power: float
    channel_power: float
    embedding: Optional[torch.Tensor] = None

    # -- description --------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.shapes)

    @property
    def has_spatial(self) -> bool:
        return self.num_layers > 0 and self.spatial[0] is not None

    @property
    def has_channel(self) -> bool:
        return self.num_layers > 0 and self.channel[0] is not None

    def _tensors(self):
        """Every sum tensor, in a fixed order."""
        out = [t for t in (*self.spatial, *self.channel) if t is not None]
        if self.embedding is not None:
            out.append(self.embedding)
        return out

    @property
    def dtype(self) -> torch.dtype:
        tensors = self._tensors()
        return tensors[0].dtype if tensors else torch.float32

    @property
    def device(self) -> torch.device:
        tensors = self._tensors()
        return tensors[0].device if tensors else torch.device("cpu")

    @property
    def numel(self) -> int:
        """Values one all_reduce moves (the counts included)."""
        return self.num_classes + sum(t.numel() for t in self._tensors())

    def __repr__(self):
        terms = [n for n, on in (("spatial", self.has_spatial), ("channel", self.has_channel),
                                 ("embedding", self.embedding is not None)) if on]
        return (f"ClassStatistics(num_classes={self.num_classes}, samples={int(self.counts.sum())}, "
                f"layers={list(self.shapes)}, terms={terms}, spatial_power={self.spatial_power}, "
                f"channel_power={self.channel_power}, dtype={self.dtype}, device={self.device})")

    # -- arithmetic ---------------------------------------------------------------------------
    def _check_compatible(self, other: "ClassStatistics") -> None:
        if not isinstance(other, ClassStatistics):
            raise TypeError(f"can only add ClassStatistics, got {type(other).__name__}")
        mine = (self.num_classes, self.shapes, self.has_spatial, self.has_channel,
                self.embedding is None, self.spatial_power if self.has_spatial else None,
                self.channel_power if self.has_channel else None)
        theirs = (other.num_classes, other.shapes, other.has_spatial, other.has_channel,
                  other.embedding is None, other.spatial_power if other.has_spatial else None,
                  other.channel_power if other.has_channel else None)
        if mine != theirs:
            raise ValueError(f"cannot add statistics of different kinds: {self!r} and {other!r}")
        if self.embedding is not None and self.embedding.shape != other.embedding.shape:
            raise ValueError(f"cannot add embedding sums of shapes {tuple(self.embedding.shape)} "
                             f"and {tuple(other.embedding.shape)}")
        if other.dtype != self.dtype or other.device != self.device:
            raise ValueError(f"cannot add statistics in {other.dtype} on {other.device} to ones in "
                             f"{self.dtype} on {self.device}")

    def __add__(self, other: "ClassStatistics") -> "ClassStatistics":
        self._check_compatible(other)

        def add(a, b):
            return None if a is None else a + b

        return replace(self, counts=self.counts + other.counts,
                       spatial=tuple(map(add, self.spatial, other.spatial)),
                       channel=tuple(map(add, self.channel, other.channel)),
                       embedding=add(self.embedding, other.embedding))

    def __radd__(self, other):
        if isinstance(other, int) and other == 0:  # sum([...]) starts from 0
            return self
        return NotImplemented

    def select(self, classes: Union[range, Sequence[int], torch.Tensor]) -> "ClassStatistics":
        """The statistics of ``classes`` only, renumbered 0..len(classes)-1 in that order."""
        idx = torch.as_tensor(list(classes) if isinstance(classes, range) else classes,
                              dtype=torch.int64).flatten()
        if idx.numel() == 0:
            raise ValueError("classes is empty")
        if int(idx.min()) < 0 or int(idx.max()) >= self.num_classes:
            raise ValueError(f"classes must lie in [0, {self.num_classes}), got "
                             f"{int(idx.min())}..{int(idx.max())}")
        dev = idx.to(self.device)

        def pick(t):
            return None if t is None else t.index_select(0, dev)

        return replace(self, num_classes=idx.numel(), counts=self.counts.index_select(0, idx),
                       spatial=tuple(map(pick, self.spatial)), channel=tuple(map(pick, self.channel)),
                       embedding=pick(self.embedding))

    def all_reduce(self, group=None) -> "ClassStatistics":
        """The sum of these statistics over every process of ``group`` (torch.distributed).

        One ``all_reduce`` of a single flat buffer (the counts travel in it as floats: exact up to
        2**24 samples per class in float32). Every process must call it, with statistics of the same
        kind. Returns new statistics; ``self`` is left unchanged.
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("ClassStatistics.all_reduce needs an initialized torch.distributed "
                               "process group (e.g. under torchrun); a single process has nothing "
                               "to add")
        tensors = self._tensors()
        flat = torch.cat([self.counts.to(device=self.device, dtype=self.dtype)] +
                         [t.reshape(-1) for t in tensors])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        counts = flat[:self.num_classes].round().to(torch.int64).cpu()
        out, offset = [], self.num_classes
        for t in tensors:
            out.append(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()
        it = iter(out)

        def take(t):
            return None if t is None else next(it)

        spatial = tuple(take(t) for t in self.spatial)
        channel = tuple(take(t) for t in self.channel)
        embedding = take(self.embedding)
        return replace(self, counts=counts, spatial=spatial, channel=channel, embedding=embedding)


def class_statistics(real=None, num_classes: Optional[int] = None, *,
                     labels: Optional[torch.Tensor] = None,
                     embedding: Optional[torch.Tensor] = None,
                     spatial_power: float = 4.0, channel_power: float = 4.0,
                     spatial: bool = True, channel: bool = True,
                     backend: str = "auto") -> ClassStatistics:
    """Reduce a batch (or a chunk of one) of real features to per-class sums (docs/scale.md).

    Args:
        real: ``(N, C, H, W)`` features, or a sequence of them (one per matched layer), or ``None``
            when only the embedding is reduced (DM).
        num_classes: K, required: statistics of several chunks add up only over the same classes.
        labels: int64 ``(N,)`` class of each sample, or ``None`` for equal contiguous blocks per class
            (``(K*B, ...)``, the DataDAM/DM layout). On the host (CPU) they are checked and counted
            without reading device memory, then copied to the features' device; on the features'
            device they are read once (a synchronization on a GPU).
        embedding: ``(N, ...)`` embeddings of the same samples (the MMD term), or ``None``.
        spatial_power, channel_power: ps, pc of the loss that will use them.
        spatial, channel: which attention sums to compute (DataDAM needs only spatial, ATOM's
            channel-only variant only channel).
        backend: as in :func:`atom_fast.attention_loss`.

    Returns:
        A :class:`ClassStatistics`, detached: the real side gets no gradient through it.
    """
    K = check_num_classes(num_classes) if num_classes is not None else None
    if K is None:
        raise ValueError("num_classes is required: statistics of several chunks or processes add "
                         "up only over the same classes")
    layers = () if real is None else checks.check_side(real, "real")
    if not layers and embedding is None:
        raise ValueError("nothing to reduce: pass real features, an embedding, or both")
    checks.check_flag(spatial, "spatial")
    checks.check_flag(channel, "channel")
    if layers and not (spatial or channel):
        raise ValueError("spatial and channel are both False: no attention sums to compute "
                         "(pass real=None to reduce only the embedding)")
    ps = checks.check_power(spatial_power, "spatial_power")
    pc = checks.check_power(channel_power, "channel_power")
    if embedding is not None:
        checks.check_embedding(embedding, "embedding")
    first = layers[0] if layers else embedding
    n, device = first.shape[0], first.device
    if embedding is not None:
        if embedding.shape[0] != n:
            raise ValueError(f"embedding has {embedding.shape[0]} samples but real has {n}")
        if embedding.device != device:
            raise ValueError(f"embedding is on {embedding.device} but real is on {device}")
    elements = K * (sum(f.shape[2] * f.shape[3] + f.shape[1] for f in layers) +
                    (math.prod(embedding.shape[1:]) if embedding is not None else 0))
    if elements > MAX_STATISTICS_ELEMENTS:
        raise ValueError(f"num_classes={K} would need {elements:,} values of statistics (more than "
                         f"{MAX_STATISTICS_ELEMENTS:,}); is num_classes right?")
    if labels is None:
        check_blocks(n, K, "real" if layers else "embedding")
        counts = torch.full((K,), n // K, dtype=torch.int64)
    else:
        labels = check_labels(labels, n, "labels", device, K)
        counts = torch.bincount(labels, minlength=K).cpu()  # host labels: no device read
    # the class layout once for all layers, where the labels are (the host, usually)
    grouped = grouping(labels, n, K, device, counts) if layers else None
    if labels is not None:
        labels = on_device(labels, device)
    S, T = [], []
    if layers:
        impl = backends.backend_module(backend, device)
        for f in layers:
            s, t = impl.class_attention_sums(f, labels, K, ps, pc, spatial, channel, grouped=grouped)
            S.append(s)
            T.append(t)
    E = None
    if embedding is not None:
        with torch.no_grad():
            E = class_sums(embedding.detach().flatten(1).to(accumulation_dtype(first.dtype)), labels,
                           K)
    return ClassStatistics(num_classes=K, counts=counts, spatial=tuple(S), channel=tuple(T),
                           shapes=tuple(tuple(int(d) for d in f.shape[1:]) for f in layers),
                           spatial_power=ps, channel_power=pc, embedding=E)
