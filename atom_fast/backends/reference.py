"""The reference backend: plain-PyTorch ground truth for the attention-matching loss (docs/loss.md).

It implements the contract of :mod:`atom_fast.backends`, written like the math; every fast backend is
tested against these functions. They take already-validated arguments; the
public entry points in ``atom_fast.loss`` check them first. float16/bfloat16 features are upcast to
float32 before anything is summed; float64 stays float64.
"""

import torch

from atom_fast.constants import accumulation_dtype, norm_floor
from atom_fast.layout import class_counts


def _accumulation_dtype(x):
    return accumulation_dtype(x.dtype)


def abs_pow(x, p, scale=None):
    """|x / scale|^p elementwise (scale: a detached tensor broadcast over x, or None for 1), with
    derivative 0 at x == 0 for every p > 0.

    For p >= 1 this is ``(x.abs() / scale).pow(p)``; below 1 torch's derivative at 0 would be
    0 * inf = NaN, which post-ReLU features (full of exact zeros) would hit, so zeros are routed
    around ``pow``. Dividing |x| (not x) keeps autograd's saved tensors to those of ``x.abs().pow(p)``.
    """
    a = x.abs()
    if scale is not None:
        a = a / scale
    if p >= 1:
        return a.pow(p)
    nonzero = a != 0
    return torch.where(nonzero, torch.where(nonzero, a, 1.0).pow(p), 0.0)


def sample_scale(f):
    """m_n = max |F[n]| per sample (1 for a sample of zeros; NaN stays NaN), detached, (N, 1, 1, 1).

    The attention vectors are computed from F / m_n, so that |F / m_n|^p <= 1 neither overflows nor
    underflows at large p. The normalized vectors do not depend on m_n (see ``normalize_scaled``),
    so no gradient flows through it.
    """
    flat = f.detach().flatten(1)
    # max(amax, -amin): no |F| temporary, and faster on CPU than abs().amax() or aminmax()
    m = torch.maximum(flat.amax(dim=1), -flat.amin(dim=1)).reshape(-1, 1, 1, 1)
    return torch.where(m == 0, 1.0, m)


def normalize_scaled(x, scale, p):
    """``F.normalize(m^p x, dim=1, eps=NORM_EPS)`` for x = sum |F / m|^p (N, L), without forming m^p.

    m^p x / max(||m^p x||, eps) = x / max(||x||, eps / m^p): the eps floor is decided on the unscaled
    norm (``constants.norm_floor``: eps / m^p in log space).
    """
    return x / x.norm(p=2.0, dim=1, keepdim=True).clamp_min(norm_floor(scale.reshape(-1, 1), p))


def spatial_attention(features, p):
    """s_n[hw] = sum_c |F[n, c, hw]|^p, L2-normalized per sample: (N, C, H, W) -> (N, H*W)."""
    f = features.to(_accumulation_dtype(features))
    m = sample_scale(f)
    s = abs_pow(f, p, m).sum(dim=1).flatten(1)  # s_n / m_n^p
    return normalize_scaled(s, m, p)


def channel_attention(features, p):
    """t_n[c] = sum_hw |F[n, c, hw]|^p, L2-normalized per sample: (N, C, H, W) -> (N, C)."""
    f = features.to(_accumulation_dtype(features))
    m = sample_scale(f)
    t = abs_pow(f, p, m).flatten(2).sum(dim=2)  # t_n / m_n^p
    return normalize_scaled(t, m, p)


def class_means(x, layout, side):
    """Mean of each class's rows of x (N, L) -> (K, L); ``side`` is "real" or "syn".

    A class with no samples on this side (allowed only when it has none on the other side either)
    gets a zero row, so it adds nothing to the loss.
    """
    K = layout.num_classes
    labels = layout.labels(side)
    if labels is None:
        return x.reshape(K, layout.per_class(side), x.shape[1]).mean(dim=1)
    sums = x.new_zeros((K, x.shape[1])).index_add_(0, labels, x)
    counts = class_counts(labels, K).clamp_min(1).to(x.dtype)
    return sums / counts[:, None]


def matching_error(real_vectors, syn_vectors, layout):
    """sum_k || mean_real_k - mean_syn_k ||^2: DataDAM's "MSE_B" error, no other 1/N factors."""
    diff = class_means(real_vectors, layout, "real") - class_means(syn_vectors, layout, "syn")
    return diff.pow(2).sum()


def attention_loss(real_layers, syn_layers, layout, spatial_power, channel_power,
                   spatial_weight, channel_weight):
    """sum_layers [ws * err(spatial attention) + wc * err(channel attention)]; zero-weight terms are skipped."""
    terms = []
    for real, syn in zip(real_layers, syn_layers):
        if spatial_weight != 0:
            err = matching_error(spatial_attention(real, spatial_power),
                                 spatial_attention(syn, spatial_power), layout)
            terms.append(spatial_weight * err)
        if channel_weight != 0:
            err = matching_error(channel_attention(real, channel_power),
                                 channel_attention(syn, channel_power), layout)
            terms.append(channel_weight * err)
    if not terms:
        # Both weights 0: a zero that is still connected to the inputs (sums of empty slices, so
        # backward works and gives zero gradients, and NaN features cannot leak into it).
        zero = sum(f.reshape(-1)[:0].sum() for f in (*real_layers, *syn_layers))
        return zero.to(_accumulation_dtype(real_layers[0]))
    return torch.stack(terms).sum()


def mmd_loss(real_embedding, syn_embedding, layout):
    """sum_k || mean_real_k(e) - mean_syn_k(e) ||^2 on the flattened embeddings (N, ...) -> 0-dim."""
    real = real_embedding.flatten(1).to(_accumulation_dtype(real_embedding))
    syn = syn_embedding.flatten(1).to(_accumulation_dtype(syn_embedding))
    return matching_error(real, syn, layout)


# --------------------------------------------------------------------------------------------------
# the real side as class statistics (docs/scale.md)
# --------------------------------------------------------------------------------------------------


def class_sums(x, labels, num_classes):
    """Per-class sums of the rows of x (N, L) -> (K, L); ``labels`` None: equal contiguous blocks."""
    if labels is None:
        return x.reshape(num_classes, x.shape[0] // num_classes, x.shape[1]).sum(dim=1)
    return x.new_zeros((num_classes, x.shape[1])).index_add_(0, labels, x)


def class_attention_sums(features, labels, num_classes, spatial_power, channel_power,
                         has_spatial, has_channel, grouped=None):
    """(S (K, H*W), T (K, C)): per-class sums of the normalized spatial / channel attention vectors
    (None where the flag is off); detached. Sums by ``labels`` (``grouped`` is not needed)."""
    with torch.no_grad():
        S = (class_sums(spatial_attention(features, spatial_power), labels, num_classes)
             if has_spatial else None)
        T = (class_sums(channel_attention(features, channel_power), labels, num_classes)
             if has_channel else None)
    return S, T


def _syn_class_means(x, labels, num_classes):
    """Class means of the rows of x; a class without rows gets a zero row."""
    if labels is None:
        return x.reshape(num_classes, x.shape[0] // num_classes, x.shape[1]).mean(dim=1)
    counts = class_counts(labels, num_classes).clamp_min(1).to(x.dtype)
    return class_sums(x, labels, num_classes) / counts[:, None]


def mean_difference_error(real_sums, real_counts, syn_vectors, syn_labels, num_classes):
    """sum_k || real_sums[k] / n_k - mean_syn_k ||^2; classes with n_k == 0 (and, as checked by the
    caller, no synthetic rows) add nothing."""
    counts = real_counts.to(real_sums.dtype).clamp_min(1)
    diff = real_sums / counts[:, None] - _syn_class_means(syn_vectors, syn_labels, num_classes)
    return diff.pow(2).sum()


def attention_loss_from_sums(real_spatial, real_channel, real_counts, syn, syn_labels, num_classes,
                             spatial_power, channel_power, spatial_weight, channel_weight,
                             grouped=None):
    """The attention loss of one layer with the real side given as class sums (docs/scale.md).
    Groups by ``syn_labels`` (``grouped`` is not needed)."""
    terms = []
    if spatial_weight != 0:
        terms.append(spatial_weight * mean_difference_error(
            real_spatial, real_counts, spatial_attention(syn, spatial_power), syn_labels,
            num_classes))
    if channel_weight != 0:
        terms.append(channel_weight * mean_difference_error(
            real_channel, real_counts, channel_attention(syn, channel_power), syn_labels,
            num_classes))
    if not terms:
        return syn.reshape(-1)[:0].sum().to(_accumulation_dtype(syn))
    return torch.stack(terms).sum()
