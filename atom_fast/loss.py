"""Public loss API: argument checks, then dispatch to a backend (reference, Triton, native C++/CUDA)."""

import math
import numbers
import os
import warnings
from typing import Optional, Sequence, Union

import torch
from torch import nn

from atom_fast import _native, reference
from atom_fast.layout import (check_blocks, check_labels, check_num_classes, check_presence,
                              class_layout)
from atom_fast.statistics import ClassStatistics

BACKENDS = ("auto", "triton", "native", "reference")
BACKEND_ENV = "ATOM_FAST_BACKEND"

Layers = Union[torch.Tensor, Sequence[torch.Tensor]]


# --------------------------------------------------------------------------------------------------
# argument checks
# --------------------------------------------------------------------------------------------------


def check_side(x, name):
    """One side's features as a tuple of 4-D floating tensors that share dtype, device and N."""
    layers = _as_layers(x, name)
    first = layers[0]
    for i, t in enumerate(layers):
        tn = _layer_name(name, i, len(layers))
        if t.ndim != 4:
            raise ValueError(f"{tn} must be 4-D (N, C, H, W), got shape {tuple(t.shape)}")
        _check_dtype_and_layout(t, tn)
        if t.dtype != first.dtype:
            raise TypeError(f"{tn} has dtype {t.dtype} but {_layer_name(name, 0, len(layers))} has "
                            f"{first.dtype}; all features must share one dtype")
        if t.device != first.device:
            raise ValueError(f"{tn} is on {t.device} but {_layer_name(name, 0, len(layers))} is on "
                             f"{first.device}")
        if 0 in t.shape[1:]:
            raise ValueError(f"{tn} has an empty (C, H, W) = {tuple(t.shape[1:])}")
        if t.shape[0] == 0:
            raise ValueError(f"{tn} has no samples")
        if t.shape[0] != first.shape[0]:
            raise ValueError(f"{tn} has {t.shape[0]} samples but layer 0 has {first.shape[0]}; "
                             "every layer must come from the same batch")
    return layers


def _check_layers(real, syn):
    """Both arguments as equal-length tuples of 4-D floating tensors with matching C, H, W."""
    reals = _as_layers(real, "real")
    syns = _as_layers(syn, "syn")
    if len(reals) != len(syns):
        raise ValueError(f"real has {len(reals)} layers but syn has {len(syns)}; pass one tensor "
                         "per layer on both sides")
    reals, syns = check_side(reals, "real"), check_side(syns, "syn")
    if syns[0].dtype != reals[0].dtype:
        raise TypeError(f"syn has dtype {syns[0].dtype} but real has {reals[0].dtype}; "
                        "all features must share one dtype")
    if syns[0].device != reals[0].device:
        raise ValueError(f"syn is on {syns[0].device} but real is on {reals[0].device}")
    for i, (r, s) in enumerate(zip(reals, syns)):
        if r.shape[1:] != s.shape[1:]:
            raise ValueError(f"{_layer_name('syn', i, len(syns))} has (C, H, W) = "
                             f"{tuple(s.shape[1:])} but {_layer_name('real', i, len(reals))} has "
                             f"{tuple(r.shape[1:])}")
    return reals, syns


def check_embedding(t, name):
    """An ``(N, ...)`` floating tensor with N >= 1."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    _check_dtype_and_layout(t, name)
    if t.ndim < 2 or t.shape[0] == 0:
        raise ValueError(f"{name} must be (N, ...) with N >= 1, got shape {tuple(t.shape)}")


def _as_layers(x, name):
    if isinstance(x, torch.Tensor):
        return (x,)
    if isinstance(x, (list, tuple)):
        if len(x) == 0:
            raise ValueError(f"{name} is an empty sequence; pass at least one (N, C, H, W) tensor")
        for i, t in enumerate(x):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name}[{i}] must be a torch.Tensor, got {type(t).__name__}")
        return tuple(x)
    raise TypeError(f"{name} must be a torch.Tensor or a sequence of them, got {type(x).__name__}")


FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check_dtype_and_layout(t, name):
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {t.dtype}")
    if t.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {t.layout}")


def _layer_name(name, i, count):
    return name if count == 1 else f"{name}[{i}]"


def _check_scalar(value, name, allow_zero):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    # Comparisons, not math.isfinite: torch.compile(dynamic=True) cannot trace math.isfinite.
    if not (-math.inf < value < math.inf) or value < 0 or (value == 0 and not allow_zero):
        bound = "non-negative" if allow_zero else "positive"
        raise ValueError(f"{name} must be finite and {bound}, got {value}")
    return value


def check_power(value, name):
    """A finite positive power, as a float."""
    return _check_scalar(value, name, allow_zero=False)


def check_weight(value, name):
    """A finite non-negative weight, as a float."""
    return _check_scalar(value, name, allow_zero=True)


# --------------------------------------------------------------------------------------------------
# backend choice
# --------------------------------------------------------------------------------------------------


def triton_available():
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _triton_interpreted():
    from atom_fast.kernels import attention
    return type(attention._attention_stats_kernel).__name__ == "InterpretedFunction"


def native_available(device=None):
    """Whether the native op (csrc/, built as atom_fast._C) is loaded, with kernels for ``device``."""
    if not _native.AVAILABLE:
        return False
    return device is None or device.type == "cpu" or (device.type == "cuda" and _native.HAS_CUDA)


_FALLBACK_WARNED = False


def _warn_native_missing():
    """One warning per process when "auto" wanted the native op on CPU but it is not built."""
    global _FALLBACK_WARNED
    if not _FALLBACK_WARNED:
        _FALLBACK_WARNED = True
        warnings.warn("atom_fast: the native C++ op is not built (" + str(_native.LOAD_ERROR) +
                      "); backend='auto' falls back to the slower reference on CPU. Reinstall with "
                      "scripts/install.sh (pip install --no-build-isolation -e .) to build it.",
                      RuntimeWarning, stacklevel=4)


def resolve_backend(backend, device):
    """The concrete backend ("triton", "native" or "reference") for ``backend`` on ``device``."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        env = os.environ.get(BACKEND_ENV, "").strip()
        if env:
            if env not in BACKENDS:
                raise ValueError(f"environment variable {BACKEND_ENV} must be one of {BACKENDS}, "
                                 f"got {env!r}")
            backend = env
    if backend == "auto":
        if device.type == "cuda" and triton_available():
            return "triton"
        if native_available(device):
            return "native"
        if device.type == "cpu":
            _warn_native_missing()
        return "reference"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' needs the triton package (pip install triton)")
        if device.type != "cuda" and not _triton_interpreted():
            raise RuntimeError(f"backend='triton' runs on CUDA tensors, got {device}; on CPU set "
                               "TRITON_INTERPRET=1 before triton is imported (slow: for tests)")
    if backend == "native" and not native_available(device):
        if not _native.AVAILABLE:
            raise RuntimeError("backend='native': the native C++ op (atom_fast._C) is not built ("
                               f"{_native.LOAD_ERROR}). Reinstall with scripts/install.sh, i.e. "
                               "pip install --no-build-isolation -e . with torch installed first; "
                               "or use backend='reference'")
        raise RuntimeError(f"backend='native': this build has no kernels for {device.type} tensors "
                           "(the CUDA kernels are built only with a CUDA torch and toolkit; "
                           "ATOM_FAST_BUILD_CUDA=1 forces them)")
    return backend


def backend_module(chosen):
    """The module implementing a concrete backend ("triton", "native" or "reference")."""
    if chosen == "triton":
        from atom_fast import _triton
        return _triton
    return _native if chosen == "native" else reference


# --------------------------------------------------------------------------------------------------
# public functions
# --------------------------------------------------------------------------------------------------


def attention_loss(real: Layers, syn: Layers, num_classes: Optional[int] = None, *,
                   real_labels: Optional[torch.Tensor] = None,
                   syn_labels: Optional[torch.Tensor] = None,
                   spatial_power: float = 4.0, channel_power: float = 4.0,
                   spatial_weight: float = 1.0, channel_weight: float = 1.0,
                   backend: str = "auto") -> torch.Tensor:
    """Attention-matching loss between real and synthetic features of one or many layers.

    ``loss = sum_layers sum_k [ws ||mean_real_k(s) - mean_syn_k(s)||^2 + wc ||mean_real_k(t) - mean_syn_k(t)||^2]``
    with s, t the L2-normalized spatial (H*W) and channel (C) attention of each sample.

    Args:
        real, syn: ``(N, C, H, W)`` tensors, or equal-length sequences of them (one per layer).
        num_classes: K, with samples in equal contiguous blocks per class (real ``(K*B, ...)``,
            syn ``(K*IPC, ...)``). Optional when labels are given (then K = max label + 1).
        real_labels, syn_labels: int64 ``(N,)`` class of each sample, in any order.
        spatial_power, channel_power: ps, pc > 0 (integers are fastest).
        spatial_weight, channel_weight: ws, wc >= 0; 0 skips that term.
        backend: "auto", "triton", "native" or "reference"; ``ATOM_FAST_BACKEND`` overrides "auto".

    ``real`` may also be a :class:`~atom_fast.ClassStatistics` (from :func:`atom_fast.class_statistics`,
    summed over chunks or processes): the same value and the same gradient w.r.t. ``syn``; then
    ``num_classes`` defaults to the statistics' and ``syn_labels`` may be given alone.

    Returns:
        A 0-dim tensor: float32, or float64 for float64 features.
    """
    if isinstance(real, ClassStatistics):
        return _attention_loss_from_statistics(real, syn, num_classes, real_labels, syn_labels,
                                               spatial_power, channel_power, spatial_weight,
                                               channel_weight, backend)
    reals, syns = _check_layers(real, syn)
    ps = check_power(spatial_power, "spatial_power")
    pc = check_power(channel_power, "channel_power")
    ws = check_weight(spatial_weight, "spatial_weight")
    wc = check_weight(channel_weight, "channel_weight")
    device = reals[0].device
    layout = class_layout(reals[0].shape[0], syns[0].shape[0], num_classes, real_labels,
                          syn_labels, device)
    chosen = resolve_backend(backend, device)
    if chosen == "triton":
        from atom_fast._triton import FusedAttentionLoss
        return FusedAttentionLoss.apply(layout, ps, pc, ws, wc, *reals, *syns)
    if chosen == "native" and (ws != 0 or wc != 0):
        return _native.attention_loss(reals, syns, layout, ps, pc, ws, wc)
    return reference.attention_loss(reals, syns, layout, ps, pc, ws, wc)


def mmd_loss(real_emb, syn_emb: torch.Tensor, num_classes: Optional[int] = None, *,
             real_labels: Optional[torch.Tensor] = None,
             syn_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Output feature matching of DM/DataDAM: ``sum_k ||mean_real_k(e) - mean_syn_k(e)||^2``.

    Args:
        real_emb, syn_emb: ``(N, ...)`` embeddings, flattened per sample. ``real_emb`` may also be a
            :class:`~atom_fast.ClassStatistics` holding embedding sums (same value and gradient).
        num_classes, real_labels, syn_labels: the class layout, as in :func:`attention_loss`.
    """
    if isinstance(real_emb, ClassStatistics):
        return _mmd_loss_from_statistics(real_emb, syn_emb, num_classes, real_labels, syn_labels)
    for t, name in ((real_emb, "real_emb"), (syn_emb, "syn_emb")):
        check_embedding(t, name)
    if syn_emb.dtype != real_emb.dtype:
        raise TypeError(f"syn_emb has dtype {syn_emb.dtype} but real_emb has {real_emb.dtype}")
    if syn_emb.device != real_emb.device:
        raise ValueError(f"syn_emb is on {syn_emb.device} but real_emb is on {real_emb.device}")
    if real_emb.shape[1:] != syn_emb.shape[1:]:
        raise ValueError(f"syn_emb has per-sample shape {tuple(syn_emb.shape[1:])} but real_emb "
                         f"has {tuple(real_emb.shape[1:])}")
    layout = class_layout(real_emb.shape[0], syn_emb.shape[0], num_classes, real_labels, syn_labels,
                          real_emb.device, names=("real_emb", "syn_emb"))
    return reference.mmd_loss(real_emb, syn_emb, layout)


# --------------------------------------------------------------------------------------------------
# the real side as class statistics (docs/scale.md)
# --------------------------------------------------------------------------------------------------


def _syn_layout(stats, num_syn, num_classes, real_labels, syn_labels, device, syn_name):
    """Validated synthetic labels (or None for equal blocks) against statistics ``stats``."""
    if real_labels is not None:
        raise ValueError("real_labels cannot be given with ClassStatistics: the statistics already "
                         "hold the real side's classes")
    K = stats.num_classes
    if num_classes is not None and check_num_classes(num_classes) != K:
        raise ValueError(f"num_classes={num_classes} but the statistics hold {K} classes")
    if syn_labels is None:
        per_class = check_blocks(num_syn, K, syn_name)
        syn_counts = torch.full((K,), per_class, dtype=torch.int64)
    else:
        syn_labels = check_labels(syn_labels, num_syn, "syn_labels", device, K)
        syn_counts = torch.bincount(syn_labels, minlength=K).cpu()
    check_presence(stats.counts, syn_counts, real_name="the real statistics")
    return syn_labels


def _check_statistics_device(stats, device, dtype, what):
    if stats.device != device:
        raise ValueError(f"the real statistics are on {stats.device} but {what} is on {device}")
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    if stats.dtype != acc:
        raise TypeError(f"the real statistics are {stats.dtype} but {what} ({dtype}) accumulates "
                        f"in {acc}; compute them from features of the same dtype")


def _attention_loss_from_statistics(stats, syn, num_classes, real_labels, syn_labels,
                                    spatial_power, channel_power, spatial_weight, channel_weight,
                                    backend):
    syns = check_side(syn, "syn")
    ps = check_power(spatial_power, "spatial_power")
    pc = check_power(channel_power, "channel_power")
    ws = check_weight(spatial_weight, "spatial_weight")
    wc = check_weight(channel_weight, "channel_weight")
    if len(syns) != stats.num_layers:
        raise ValueError(f"the real statistics hold {stats.num_layers} layers but syn has "
                         f"{len(syns)}; pass one tensor per layer")
    for i, (shape, s) in enumerate(zip(stats.shapes, syns)):
        if tuple(s.shape[1:]) != shape:
            raise ValueError(f"{_layer_name('syn', i, len(syns))} has (C, H, W) = "
                             f"{tuple(s.shape[1:])} but the real statistics were computed on "
                             f"{shape}")
    for weight, present, power, stats_power, name in (
            (ws, stats.has_spatial, ps, stats.spatial_power, "spatial"),
            (wc, stats.has_channel, pc, stats.channel_power, "channel")):
        if weight == 0:
            continue
        if not present:
            raise ValueError(f"{name}_weight is {weight} but the real statistics hold no {name} "
                             f"sums (class_statistics(..., {name}=True))")
        if power != stats_power:
            raise ValueError(f"{name}_power is {power} but the real statistics were computed with "
                             f"{name}_power={stats_power}")
    device = syns[0].device
    _check_statistics_device(stats, device, syns[0].dtype, "syn")
    labels = _syn_layout(stats, syns[0].shape[0], num_classes, real_labels, syn_labels, device,
                         "syn")
    chosen = resolve_backend(backend, device)
    impl = backend_module(chosen)
    counts = stats.counts.to(device, non_blocking=True)
    total = None
    for s, S, T in zip(syns, stats.spatial, stats.channel):
        loss = impl.attention_loss_from_sums(S, T, counts, s, labels, stats.num_classes, ps, pc,
                                             ws, wc)
        total = loss if total is None else total + loss
    return total


def _mmd_loss_from_statistics(stats, syn_emb, num_classes, real_labels, syn_labels):
    check_embedding(syn_emb, "syn_emb")
    if stats.embedding is None:
        raise ValueError("the real statistics hold no embedding sums "
                         "(class_statistics(..., embedding=...))")
    if syn_emb[0].numel() != stats.embedding.shape[1]:
        raise ValueError(f"syn_emb has {syn_emb[0].numel()} values per sample but the real "
                         f"statistics' embedding has {stats.embedding.shape[1]}")
    _check_statistics_device(stats, syn_emb.device, syn_emb.dtype, "syn_emb")
    labels = _syn_layout(stats, syn_emb.shape[0], num_classes, real_labels, syn_labels,
                         syn_emb.device, "syn_emb")
    syn = syn_emb.flatten(1).to(stats.dtype)
    return reference.mean_difference_error(stats.embedding, stats.counts.to(syn.device), syn,
                                           labels, stats.num_classes)


def _check_features(F):
    if not isinstance(F, torch.Tensor):
        raise TypeError(f"F must be a torch.Tensor, got {type(F).__name__}")
    _check_dtype_and_layout(F, "F")
    if F.ndim != 4:
        raise ValueError(f"F must be 4-D (N, C, H, W), got shape {tuple(F.shape)}")


def spatial_attention(F: torch.Tensor, p: float = 4.0) -> torch.Tensor:
    """L2-normalized ``sum_c |F|^p`` per sample: ``(N, C, H, W) -> (N, H*W)`` (float32 for half inputs)."""
    _check_features(F)
    return reference.spatial_attention(F, check_power(p, "p"))


def channel_attention(F: torch.Tensor, p: float = 4.0) -> torch.Tensor:
    """L2-normalized ``sum_hw |F|^p`` per sample: ``(N, C, H, W) -> (N, C)`` (float32 for half inputs)."""
    _check_features(F)
    return reference.channel_attention(F, check_power(p, "p"))


class AttentionLoss(nn.Module):
    """``nn.Module`` form of :func:`attention_loss`; arguments are checked when it is built."""

    def __init__(self, num_classes: Optional[int] = None, *, spatial_power: float = 4.0,
                 channel_power: float = 4.0, spatial_weight: float = 1.0,
                 channel_weight: float = 1.0, backend: str = "auto"):
        super().__init__()
        self.num_classes = None if num_classes is None else check_num_classes(num_classes)
        self.spatial_power = check_power(spatial_power, "spatial_power")
        self.channel_power = check_power(channel_power, "channel_power")
        self.spatial_weight = check_weight(spatial_weight, "spatial_weight")
        self.channel_weight = check_weight(channel_weight, "channel_weight")
        if not isinstance(backend, str):
            raise TypeError(f"backend must be a str, got {type(backend).__name__}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.backend = backend

    def forward(self, real: Layers, syn: Layers, real_labels: Optional[torch.Tensor] = None,
                syn_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        return attention_loss(real, syn, self.num_classes, real_labels=real_labels,
                              syn_labels=syn_labels, spatial_power=self.spatial_power,
                              channel_power=self.channel_power, spatial_weight=self.spatial_weight,
                              channel_weight=self.channel_weight, backend=self.backend)

    def extra_repr(self):
        return (f"num_classes={self.num_classes}, spatial_power={self.spatial_power}, "
                f"channel_power={self.channel_power}, spatial_weight={self.spatial_weight}, "
                f"channel_weight={self.channel_weight}, backend={self.backend!r}")
