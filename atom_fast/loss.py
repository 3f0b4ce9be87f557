"""Public loss API: argument checks, then dispatch to a backend (reference, Triton, native C++/CUDA)."""

import math
import numbers
import os
import warnings
from typing import Optional, Sequence, Union

import torch
from torch import nn

from atom_fast import _native, reference
from atom_fast.layout import ClassLayout

BACKENDS = ("auto", "triton", "native", "reference")
BACKEND_ENV = "ATOM_FAST_BACKEND"

Layers = Union[torch.Tensor, Sequence[torch.Tensor]]


# --------------------------------------------------------------------------------------------------
# argument checks
# --------------------------------------------------------------------------------------------------


def _check_layers(real, syn):
    """Both arguments as equal-length tuples of 4-D floating tensors with matching C, H, W."""
    reals = _as_layers(real, "real")
    syns = _as_layers(syn, "syn")
    if len(reals) != len(syns):
        raise ValueError(f"real has {len(reals)} layers but syn has {len(syns)}; pass one tensor "
                         "per layer on both sides")
    first = reals[0]
    for i, (r, s) in enumerate(zip(reals, syns)):
        rn, sn = _layer_name("real", i, len(reals)), _layer_name("syn", i, len(syns))
        for t, name in ((r, rn), (s, sn)):
            if t.ndim != 4:
                raise ValueError(f"{name} must be 4-D (N, C, H, W), got shape {tuple(t.shape)}")
            _check_dtype_and_layout(t, name)
            if t.dtype != first.dtype:
                raise TypeError(f"{name} has dtype {t.dtype} but real has {first.dtype}; "
                                "all features must share one dtype")
            if t.device != first.device:
                raise ValueError(f"{name} is on {t.device} but real is on {first.device}")
        if r.shape[1:] != s.shape[1:]:
            raise ValueError(f"{sn} has (C, H, W) = {tuple(s.shape[1:])} but {rn} has "
                             f"{tuple(r.shape[1:])}")
        if 0 in r.shape[1:]:
            raise ValueError(f"{rn} has an empty (C, H, W) = {tuple(r.shape[1:])}")
        for t, name, ref in ((r, rn, reals[0]), (s, sn, syns[0])):
            if t.shape[0] == 0:
                raise ValueError(f"{name} has no samples")
            if t.shape[0] != ref.shape[0]:
                raise ValueError(f"{name} has {t.shape[0]} samples but layer 0 has {ref.shape[0]}; "
                                 "every layer must come from the same batch")
    return reals, syns


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


def _check_num_classes(num_classes):
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral):
        raise TypeError(f"num_classes must be an int, got {type(num_classes).__name__}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    return int(num_classes)


def class_layout(num_real, num_syn, num_classes, real_labels, syn_labels, device,
                 names=("real", "syn")):
    """Validate the class arguments and build the ClassLayout.

    With labels this reads them on the host (range and per-class counts), one synchronization.
    Without ``num_classes`` the labels are renumbered 0..K-1 over the classes that occur: a class
    absent from both sides adds nothing to the loss, so only the present ones are kept.
    ``names`` are the feature arguments' names, for messages.
    """
    if real_labels is None and syn_labels is None:
        if num_classes is None:
            raise ValueError("num_classes is required unless real_labels and syn_labels are given")
        K = _check_num_classes(num_classes)
        for n, name in zip((num_real, num_syn), names):
            if n % K:
                raise ValueError(f"{name} has {n} samples, not divisible by num_classes={K}; "
                                 "samples must come in equal contiguous blocks per class "
                                 "(or pass real_labels/syn_labels)")
        return ClassLayout(K, real_per_class=num_real // K, syn_per_class=num_syn // K)
    if real_labels is None or syn_labels is None:
        missing = "real_labels" if real_labels is None else "syn_labels"
        raise ValueError(f"{missing} is missing: pass real_labels and syn_labels together")
    K = None if num_classes is None else _check_num_classes(num_classes)
    for labels, n, name in ((real_labels, num_real, "real_labels"), (syn_labels, num_syn, "syn_labels")):
        if not isinstance(labels, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(labels).__name__}")
        if labels.dtype != torch.int64:
            raise TypeError(f"{name} must be int64 (torch.long), got {labels.dtype}")
        if labels.ndim != 1 or labels.shape[0] != n:
            raise ValueError(f"{name} must have shape ({n},) to match the features, "
                             f"got {tuple(labels.shape)}")
        if labels.device != device:
            raise ValueError(f"{name} is on {labels.device} but the features are on {device}")
    for labels, name in ((real_labels, "real_labels"), (syn_labels, "syn_labels")):
        lo, hi = (int(v) for v in torch.aminmax(labels))
        if lo < 0:
            raise ValueError(f"{name} holds {lo}: labels must be non-negative")
        if K is not None and hi >= K:
            raise ValueError(f"{name} holds {hi}, out of range for num_classes={K}")
    # The kernels index labels with unit stride.
    real_labels, syn_labels = real_labels.contiguous(), syn_labels.contiguous()
    if K is None:
        classes, compact = torch.unique(torch.cat([real_labels, syn_labels]), return_inverse=True)
        K = classes.numel()
        real_labels, syn_labels = compact[:num_real], compact[num_real:]
    real_counts = torch.bincount(real_labels, minlength=K)
    syn_counts = torch.bincount(syn_labels, minlength=K)
    only_real = (real_counts > 0) & (syn_counts == 0)
    only_syn = (syn_counts > 0) & (real_counts == 0)
    if only_real.any():
        k = int(only_real.nonzero()[0])
        raise ValueError(f"syn_labels has no sample of class {k}, which has real samples; "
                         "every class needs samples on both sides")
    if only_syn.any():
        k = int(only_syn.nonzero()[0])
        raise ValueError(f"real_labels has no sample of class {k}, which has synthetic samples; "
                         "every class needs samples on both sides")
    return ClassLayout(K, real_labels=real_labels, syn_labels=syn_labels,
                       real_counts=real_counts, syn_counts=syn_counts)


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

    Returns:
        A 0-dim tensor: float32, or float64 for float64 features.
    """
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


def mmd_loss(real_emb: torch.Tensor, syn_emb: torch.Tensor, num_classes: Optional[int] = None, *,
             real_labels: Optional[torch.Tensor] = None,
             syn_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Output feature matching of DM/DataDAM: ``sum_k ||mean_real_k(e) - mean_syn_k(e)||^2``.

    Args:
        real_emb, syn_emb: ``(N, ...)`` embeddings, flattened per sample.
        num_classes, real_labels, syn_labels: the class layout, as in :func:`attention_loss`.
    """
    for t, name in ((real_emb, "real_emb"), (syn_emb, "syn_emb")):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        _check_dtype_and_layout(t, name)
        if t.ndim < 2 or t.shape[0] == 0:
            raise ValueError(f"{name} must be (N, ...) with N >= 1, got shape {tuple(t.shape)}")
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
        self.num_classes = None if num_classes is None else _check_num_classes(num_classes)
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
