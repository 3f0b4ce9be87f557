"""Argument checks of the public API (``atom_fast.loss``, ``atom_fast.statistics``).

Each check raises ``TypeError`` (wrong kind) or ``ValueError`` (wrong value) with a message that
names the argument, and returns the argument in the form the backends take. The class-layout checks
(labels, blocks, classes present on both sides) are in ``atom_fast.layout``, beside the layout they
build. Nothing here reads a device tensor on the host except ``layout.check_labels`` given labels on
a device (host labels are read where they are).
"""

import math
import numbers

import torch

from atom_fast.constants import accumulation_dtype
from atom_fast.layout import (check_blocks, check_labels, check_num_classes, check_presence,
                              on_device)

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def layer_name(name, i, count):
    """``name`` for a single layer, ``name[i]`` for one of several."""
    return name if count == 1 else f"{name}[{i}]"


def check_float_tensor(t, name):
    """A dense floating tensor of a supported dtype."""
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {t.dtype}")
    if t.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {t.layout}")


def as_layers(x, name):
    """A tensor or a non-empty sequence of tensors, as a tuple."""
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


def check_side(x, name):
    """One side's features as a tuple of 4-D floating tensors that share dtype, device and N."""
    layers = as_layers(x, name)
    first = layers[0]
    for i, t in enumerate(layers):
        tn = layer_name(name, i, len(layers))
        if t.ndim != 4:
            raise ValueError(f"{tn} must be 4-D (N, C, H, W), got shape {tuple(t.shape)}")
        check_float_tensor(t, tn)
        if t.dtype != first.dtype:
            raise TypeError(f"{tn} has dtype {t.dtype} but {layer_name(name, 0, len(layers))} has "
                            f"{first.dtype}; all features must share one dtype")
        if t.device != first.device:
            raise ValueError(f"{tn} is on {t.device} but {layer_name(name, 0, len(layers))} is on "
                             f"{first.device}")
        if 0 in t.shape[1:]:
            raise ValueError(f"{tn} has an empty (C, H, W) = {tuple(t.shape[1:])}")
        if t.shape[0] == 0:
            raise ValueError(f"{tn} has no samples")
        if t.shape[0] != first.shape[0]:
            raise ValueError(f"{tn} has {t.shape[0]} samples but layer 0 has {first.shape[0]}; "
                             "every layer must come from the same batch")
    return layers


def check_layers(real, syn):
    """Both arguments as equal-length tuples of 4-D floating tensors with matching C, H, W."""
    reals = as_layers(real, "real")
    syns = as_layers(syn, "syn")
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
            raise ValueError(f"{layer_name('syn', i, len(syns))} has (C, H, W) = "
                             f"{tuple(s.shape[1:])} but {layer_name('real', i, len(reals))} has "
                             f"{tuple(r.shape[1:])}")
    return reals, syns


def check_features(F, name="F"):
    """One ``(N, C, H, W)`` floating tensor."""
    if not isinstance(F, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(F).__name__}")
    check_float_tensor(F, name)
    if F.ndim != 4:
        raise ValueError(f"{name} must be 4-D (N, C, H, W), got shape {tuple(F.shape)}")
    return F


def check_embedding(t, name):
    """An ``(N, ...)`` floating tensor with N >= 1."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    check_float_tensor(t, name)
    if t.ndim < 2 or t.shape[0] == 0:
        raise ValueError(f"{name} must be (N, ...) with N >= 1, got shape {tuple(t.shape)}")
    return t


def check_embeddings(real_emb, syn_emb):
    """Two embeddings of one dtype, device and per-sample shape."""
    for t, name in ((real_emb, "real_emb"), (syn_emb, "syn_emb")):
        check_embedding(t, name)
    if syn_emb.dtype != real_emb.dtype:
        raise TypeError(f"syn_emb has dtype {syn_emb.dtype} but real_emb has {real_emb.dtype}")
    if syn_emb.device != real_emb.device:
        raise ValueError(f"syn_emb is on {syn_emb.device} but real_emb is on {real_emb.device}")
    if real_emb.shape[1:] != syn_emb.shape[1:]:
        raise ValueError(f"syn_emb has per-sample shape {tuple(syn_emb.shape[1:])} but real_emb "
                         f"has {tuple(real_emb.shape[1:])}")


def _check_scalar(value, name, allow_zero):
    if type(value) is not float and (  # float first: the abc check costs microseconds per call
            isinstance(value, bool) or not isinstance(value, numbers.Real)):
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


def check_terms(spatial_power, channel_power, spatial_weight, channel_weight):
    """``(ps, pc, ws, wc)`` as floats: positive powers, non-negative weights."""
    return (check_power(spatial_power, "spatial_power"), check_power(channel_power, "channel_power"),
            check_weight(spatial_weight, "spatial_weight"),
            check_weight(channel_weight, "channel_weight"))


def check_flag(value, name):
    """A bool."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


# --------------------------------------------------------------------------------------------------
# the real side given as ClassStatistics
# --------------------------------------------------------------------------------------------------


def check_statistics_device(stats, device, dtype, what):
    """Statistics on ``device`` in the accumulation dtype of features of ``dtype``."""
    if stats.device != device:
        raise ValueError(f"the real statistics are on {stats.device} but {what} is on {device}")
    acc = accumulation_dtype(dtype)
    if stats.dtype != acc:
        raise TypeError(f"the real statistics are {stats.dtype} but {what} ({dtype}) accumulates "
                        f"in {acc}; compute them from features of the same dtype")


def check_syn_against_statistics(stats, num_syn, num_classes, real_labels, syn_labels, device,
                                 syn_name):
    """Validated synthetic labels (or None for equal blocks) against statistics ``stats``, on
    ``device``, and their per-class counts (int64, on the host)."""
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
        syn_counts = torch.bincount(syn_labels, minlength=K).cpu()  # host labels: no device read
        syn_labels = on_device(syn_labels, device)
    check_presence(stats.counts, syn_counts, real_name="the real statistics")
    return syn_labels, syn_counts


def check_layers_against_statistics(stats, syns, ps, pc, ws, wc):
    """Synthetic layers and terms that the statistics can be matched against."""
    if len(syns) != stats.num_layers:
        raise ValueError(f"the real statistics hold {stats.num_layers} layers but syn has "
                         f"{len(syns)}; pass one tensor per layer")
    for i, (shape, s) in enumerate(zip(stats.shapes, syns)):
        if tuple(s.shape[1:]) != shape:
            raise ValueError(f"{layer_name('syn', i, len(syns))} has (C, H, W) = "
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


def check_embedding_against_statistics(stats, syn_emb):
    """A synthetic embedding the statistics' embedding sums can be matched against."""
    check_embedding(syn_emb, "syn_emb")
    if stats.embedding is None:
        raise ValueError("the real statistics hold no embedding sums "
                         "(class_statistics(..., embedding=...))")
    per_sample = math.prod(syn_emb.shape[1:])
    if per_sample != stats.embedding.shape[1]:
        raise ValueError(f"syn_emb has {per_sample} values per sample but the real "
                         f"statistics' embedding has {stats.embedding.shape[1]}")
    check_statistics_device(stats, syn_emb.device, syn_emb.dtype, "syn_emb")
