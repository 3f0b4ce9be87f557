"""The reference against an independent float64 NumPy loop, finite differences, and DataDAM's code."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import atom_fast
from _data import class_labels, make_layers


def numpy_attention_loss(reals, syns, real_labels, syn_labels, ps, pc, ws, wc):
    """The loss of docs/loss.md written out with explicit loops over layers, classes and samples, in float64 NumPy."""
    total = 0.0
    for R, S in zip(reals, syns):
        R, S = R.double().numpy(), S.double().numpy()
        for power, weight, axis in ((ps, ws, "spatial"), (pc, wc, "channel")):
            if weight == 0:
                continue

            def vec(x):  # one sample (C, H, W) -> normalized attention vector
                a = np.abs(x) ** power
                v = a.sum(axis=0).ravel() if axis == "spatial" else a.reshape(a.shape[0], -1).sum(axis=1)
                return v / max(np.sqrt((v * v).sum()), 1e-12)

            for k in sorted(set(real_labels.tolist())):
                mr = np.mean([vec(R[i]) for i in range(len(R)) if real_labels[i] == k], axis=0)
                ms = np.mean([vec(S[i]) for i in range(len(S)) if syn_labels[i] == k], axis=0)
                total += weight * ((mr - ms) ** 2).sum()
    return total


@pytest.mark.parametrize("ps,pc,ws,wc", [(4, 4, 1, 1), (1, 8, 0.5, 2), (2.5, 2, 1, 0), (8, 2.5, 0, 1)])
@pytest.mark.parametrize("use_labels", [False, True])
def test_reference_matches_numpy_loops(ps, pc, ws, wc, use_labels):
    K, B, IPC = 3, 4, 2
    reals, syns = make_layers([(5, 3, 4), (6, 2, 2)], K * B, K * IPC, torch.float64, "cpu")
    rl, sl = class_labels(K, B, use_labels), class_labels(K, IPC, use_labels)
    kw = dict(spatial_power=ps, channel_power=pc, spatial_weight=ws, channel_weight=wc,
              backend="reference")
    if use_labels:
        loss = atom_fast.attention_loss(reals, syns, real_labels=rl, syn_labels=sl, **kw)
    else:
        loss = atom_fast.attention_loss(reals, syns, K, **kw)
    expected = numpy_attention_loss(reals, syns, rl, sl, ps, pc, ws, wc)
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert expected > 1e-3  # a loss near zero would make the comparison meaningless


@pytest.mark.parametrize("ps,pc", [(4, 4), (1, 2.5), (8, 1)])
def test_reference_gradcheck(ps, pc):
    K, B, IPC = 2, 3, 2
    reals, syns = make_layers([(3, 2, 3)], K * B, K * IPC, torch.float64, "cpu", real_relu=False)
    r, s = reals[0].requires_grad_(), syns[0].requires_grad_()

    def loss(r, s):
        return atom_fast.attention_loss(r, s, K, spatial_power=ps, channel_power=pc,
                                        spatial_weight=0.7, channel_weight=1.3, backend="reference")

    assert torch.autograd.gradcheck(loss, (r, s))


def test_attention_vectors_follow_definition():
    Fm = torch.randn(4, 5, 3, 2, dtype=torch.float64)
    s = atom_fast.spatial_attention(Fm, 3)
    t = atom_fast.channel_attention(Fm, 3)
    raw_s = torch.stack([sum(Fm[n, c].abs() ** 3 for c in range(5)).flatten() for n in range(4)])
    raw_t = torch.stack([torch.stack([(Fm[n, c].abs() ** 3).sum() for c in range(5)]) for n in range(4)])
    torch.testing.assert_close(s, raw_s / raw_s.norm(dim=1, keepdim=True), rtol=1e-12, atol=0)
    torch.testing.assert_close(t, raw_t / raw_t.norm(dim=1, keepdim=True), rtol=1e-12, atol=0)
    # sum and mean over the reduced axis give the same normalized vector
    mean_t = F.normalize((Fm.abs() ** 3).mean(dim=(2, 3)), dim=1)
    torch.testing.assert_close(t, mean_t, rtol=1e-12, atol=0)


def test_fractional_power_below_one_has_zero_gradient_at_zero():
    Fm = torch.randn(4, 3, 2, 2, dtype=torch.float64).relu().requires_grad_()
    atom_fast.spatial_attention(Fm, 0.5).sum().backward()
    assert torch.isfinite(Fm.grad).all()
    assert (Fm.grad[Fm.detach() == 0] == 0).all()


# DataDAM's published loss, restated from its code (utils.get_attention with param=1, norm='l2', and
# the "MSE_B" branch of utils.error): the sum over classes of squared differences of class means.
def datadam_get_attention(feature_set, param=1, exp=4, norm="l2"):
    assert param == 1 and norm == "l2"
    attention_map = torch.sum(torch.abs(feature_set) ** exp, dim=1)
    vectorized_attention_map = attention_map.view(feature_set.size(0), -1)
    return F.normalize(vectorized_attention_map, p=2.0)


def datadam_error_mse_b(real, syn, num_classes, batch_real, ipc):
    return torch.sum((torch.mean(real.reshape(num_classes, batch_real, -1), dim=1)
                      - torch.mean(syn.reshape(num_classes, ipc, -1), dim=1)) ** 2)


def dm_embedding_loss(output_real, output_syn, num_classes, batch_real, ipc):
    # DM/DataDAM output matching: squared distance of per-class mean embeddings, summed.
    return torch.sum((torch.mean(output_real.reshape(num_classes, batch_real, -1), dim=1)
                      - torch.mean(output_syn.reshape(num_classes, ipc, -1), dim=1)) ** 2)


@pytest.mark.parametrize("p", [1, 2, 4, 2.5])
def test_datadam_drop_in_contract(p):
    K, B, IPC = 4, 6, 3
    reals, syns = make_layers([(8, 4, 4), (8, 2, 2)], K * B, K * IPC, torch.float32, "cpu")
    expected = sum(datadam_error_mse_b(datadam_get_attention(r, 1, p), datadam_get_attention(s, 1, p),
                                       K, B, IPC) for r, s in zip(reals, syns))
    ours = atom_fast.attention_loss(reals, syns, K, spatial_power=p, channel_weight=0,
                                    backend="reference")
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=0)
    emb_r, emb_s = torch.randn(K * B, 32), torch.randn(K * IPC, 32)
    torch.testing.assert_close(atom_fast.mmd_loss(emb_r, emb_s, K),
                               dm_embedding_loss(emb_r, emb_s, K, B, IPC), rtol=1e-6, atol=0)


def test_labels_and_blocks_agree():
    K, B, IPC = 3, 4, 2
    reals, syns = make_layers([(4, 3, 3)], K * B, K * IPC, torch.float64, "cpu")
    blocks = atom_fast.attention_loss(reals, syns, K, backend="reference")
    perm_r, perm_s = torch.randperm(K * B), torch.randperm(K * IPC)
    rl, sl = class_labels(K, B, False)[perm_r], class_labels(K, IPC, False)[perm_s]
    shuffled = atom_fast.attention_loss([reals[0][perm_r]], [syns[0][perm_s]], real_labels=rl,
                                        syn_labels=sl, backend="reference")
    torch.testing.assert_close(shuffled, blocks, rtol=1e-12, atol=0)
    emb = atom_fast.mmd_loss(reals[0][perm_r], syns[0][perm_s], real_labels=rl, syn_labels=sl)
    torch.testing.assert_close(emb, atom_fast.mmd_loss(reals[0], syns[0], K), rtol=1e-12, atol=0)


def test_classes_absent_from_both_sides_add_nothing():
    reals, syns = make_layers([(4, 3, 3)], 6, 3, torch.float64, "cpu")
    rl, sl = torch.tensor([0, 0, 3, 3, 3, 0]), torch.tensor([3, 0, 0])
    with_gap = atom_fast.attention_loss(reals, syns, 5, real_labels=rl, syn_labels=sl,
                                        backend="reference")
    compact = atom_fast.attention_loss(reals, syns, real_labels=(rl > 0).long(),
                                       syn_labels=(sl > 0).long(), backend="reference")
    torch.testing.assert_close(with_gap, compact, rtol=1e-12, atol=0)


# ---- large powers: a per-sample scale keeps |F|^p finite ------------------------


def per_sample_magnitudes(n, C, H, W, lo, hi, generator=None, signed=True):
    """Features whose samples have magnitudes log-uniform in [lo, hi] (one scale per sample)."""
    base = torch.randn(n, C, H, W, dtype=torch.float64, generator=generator)
    if not signed:
        base = base.abs()
    exponent = torch.rand(n, 1, 1, 1, dtype=torch.float64, generator=generator)
    return base / base.abs().amax(dim=(1, 2, 3), keepdim=True) * lo * (hi / lo) ** exponent


@pytest.mark.parametrize("p", [16, 50, 64])
def test_float64_reference_at_large_powers_matches_unscaled_numpy(p):
    # The NumPy loop forms |F|^p without any scaling; in float64 it is finite for |F| in 1e-2..1e2.
    K, B, IPC, shape = 2, 3, 2, (4, 3, 2)
    real = per_sample_magnitudes(K * B, *shape, 1e-2, 1e2, signed=False)
    syn = per_sample_magnitudes(K * IPC, *shape, 1e-2, 1e2)
    rl, sl = class_labels(K, B, False), class_labels(K, IPC, False)
    loss = atom_fast.attention_loss(real, syn, K, spatial_power=p, channel_power=p, backend="reference")
    expected = numpy_attention_loss([real], [syn], rl, sl, p, p, 1.0, 1.0)
    assert expected > 1e-3
    assert loss.item() == pytest.approx(expected, rel=1e-12)


# (power, per-sample magnitudes from lo to hi): below, at and far above the eps floor of |F|^p
LARGE_POWER_ROWS = [(50, 1.0, 3.0), (50, 3.0, 10.0), (64, 1e-2, 1e2), (64, 0.5, 1.0), (8, 30.0, 1e2)]


@pytest.mark.parametrize("p,lo,hi", LARGE_POWER_ROWS)
def test_float32_agrees_with_float64_at_large_powers(p, lo, hi):
    # Unscaled float32 gave exactly 0 at p = 50, |F| ~ 3 (|F|^p overflows) and NaN at |F| ~ 10.
    K, B, IPC, shape = 2, 3, 2, (4, 3, 2)
    real = per_sample_magnitudes(K * B, *shape, lo, hi, signed=False).float()
    syn = per_sample_magnitudes(K * IPC, *shape, lo, hi).float()
    losses, grads = [], []
    for dtype in (torch.float64, torch.float32):
        s = syn.to(dtype).requires_grad_()
        loss = atom_fast.attention_loss(real.to(dtype), s, K, spatial_power=p, channel_power=p,
                                        backend="reference")
        losses.append(loss)
        grads.append(torch.autograd.grad(loss, s)[0].double())
    assert losses[0].item() > 1e-3 and torch.isfinite(grads[1]).all()
    torch.testing.assert_close(losses[1].double(), losses[0], rtol=1e-5, atol=0)
    # float32's own limit at large p: the normalization's backward cancels in float32 (the same
    # error, ~3e-4 of the largest gradient at p = 50, with or without the fused kernels).
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=1e-3 * grads[0].abs().max().item())


def test_eps_floor_is_decided_on_the_unscaled_norm():
    # p = 50 and |F| around eps^(1/50) = 0.575: some samples' unscaled norms fall below 1e-12 (there
    # normalize divides by eps, not by the norm), others above; the scaled vectors x' = x / m^p are
    # far above eps in every sample, so deciding on them would be wrong.
    p = 50
    f = per_sample_magnitudes(8, 3, 2, 2, 0.4, 0.8).requires_grad_()
    raw = (f.abs() ** p).sum(dim=1).flatten(1)
    norms = raw.norm(dim=1)
    assert (norms < 1e-12).any() and (norms > 1e-12).any()
    expected = F.normalize(raw, dim=1, eps=1e-12)
    ours = atom_fast.spatial_attention(f, p)
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=0)
    weights = torch.randn_like(expected)
    (g,) = torch.autograd.grad((ours * weights).sum(), f)
    (g_ref,) = torch.autograd.grad((expected * weights).sum(), f)
    torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12 * g_ref.abs().max().item())


def test_zero_sample_and_nan_keep_their_meaning():
    f = torch.randn(3, 2, 2, 2, dtype=torch.float64)
    f[1] = 0  # a sample of zeros: its normalized vectors are 0 (scale 1, never 0/0)
    out = atom_fast.channel_attention(f, 50)
    assert torch.isfinite(out).all() and (out[1] == 0).all()
    f[2, 0, 0, 0] = float("nan")
    assert torch.isnan(atom_fast.spatial_attention(f, 50)[2]).all()
