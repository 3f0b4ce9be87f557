"""float64 to 1e-12 on every backend reachable here, with weights and powers that are not exact in
float32 (0.3, 1/3, 0.01; 2.5, 3.7).

A float64 loss must not pass through float32 anywhere: a weight, power or eps rounded to float32 on
its way into a kernel (0.3 -> 0.30000001192...) moves the loss and the gradient by ~1e-8 relative,
which the 1e-10 tolerances elsewhere would catch only with weights that happen to be exact in
float32. Here every backend is checked against an independent float64 implementation written with
NumPy and explicit loops (the loss, its gradient w.r.t. both sides worked out by hand, and the
class sums), on the features path (``attention_loss(real, syn)``) and the statistics path
(``class_statistics`` then ``attention_loss(stats, syn)``), forward and backward. The Triton kernels
run with shrunken blocks as well, so every block loop runs more than once.
"""

import math

import numpy as np
import pytest
import torch

import atom_fast
from atom_fast.backends import native_available, triton_available
from _data import class_labels, make_layers
from conftest import DEVICE

RTOL = 1e-12
EPS = 1e-12  # torch.nn.functional.normalize's floor, written out rather than imported

# backend -> skip mark. "triton-small-blocks": the Triton kernels with every block shrunk, so that
# each block loop (spatial and channel tiles, vector blocks, class members) runs more than once on
# these shapes; it runs one case per path (the interpreter is slow).
NO_TRITON = pytest.mark.skipif(not triton_available(), reason="triton not installed")
BACKENDS = {
    "reference": (),
    "native": pytest.mark.skipif(not native_available(DEVICE), reason="native op not built"),
    "triton": NO_TRITON,
    "triton-small-blocks": NO_TRITON,
}
# (spatial power, channel power, spatial weight, channel weight): non-dyadic weights, fractional
# powers, one integer power pair (the kernels' unrolled path) and each term alone.
TERMS = {
    "p2.5,3.7-w0.3,1/3": (2.5, 3.7, 0.3, 1 / 3),
    "p3,3-w0.01,0.3": (3.0, 3.0, 0.01, 0.3),
    "p3.7,2-w1/3,0": (3.7, 2.0, 1 / 3, 0.0),
    "p4,2.5-w0,0.01": (4.0, 2.5, 0.0, 0.01),
    "p1.5,1.5-w0.3,1/3": (1.5, 1.5, 0.3, 1 / 3),  # the native op's square-root path, both terms at once
}
LABELS = {"equal-blocks": False, "labels": True}
SMALL_BLOCKS = ("p2.5,3.7-w0.3,1/3", "labels")  # the one case run with "triton-small-blocks"
SHAPES = [(5, 3, 4), (3, 2, 2)]  # two layers, odd sizes
UPSTREAM = 0.7  # a non-dyadic upstream gradient


def _cases():
    """(backend, ps, pc, ws, wc, use_labels) for every backend, term row and class layout."""
    for backend, marks in BACKENDS.items():
        for terms_id, terms in TERMS.items():
            for labels_id, use_labels in LABELS.items():
                if backend == "triton-small-blocks" and (terms_id, labels_id) != SMALL_BLOCKS:
                    continue
                yield pytest.param(backend, *terms, use_labels, marks=marks,
                                   id=f"{backend}-{terms_id}-{labels_id}")


CASES = list(_cases())


# --------------------------------------------------------------------------------------------------
# the loss by hand: float64 NumPy, explicit loops, unscaled, the eps floor as in F.normalize
# --------------------------------------------------------------------------------------------------


def _attention(x, power, axis):
    """One sample (C, H, W): the raw attention vector, sum |x|^p over channels (spatial, length H*W)
    or over positions (channel, length C)."""
    a = np.abs(x) ** power
    if axis == "spatial":
        v = a.sum(axis=0).ravel()
    else:
        v = a.reshape(a.shape[0], -1).sum(axis=1)
    return v


def _attention_vjp(x, power, axis, g):
    """g . d v / d x for v = _attention(x, power, axis): p |x|^(p-1) sgn(x) times g broadcast."""
    C, H, W = x.shape
    d = power * np.abs(x) ** (power - 1) * np.sign(x)
    if axis == "spatial":
        return d * g.reshape(1, H, W)
    return d * g.reshape(C, 1, 1)


def _normalized(v):
    """v / max(||v||, eps) and ||v||."""
    norm = math.sqrt(float((v * v).sum()))
    return v / max(norm, EPS), norm


def _normalized_vjp(v, norm, g):
    """g . d (v / max(||v||, eps)) / d v: the projection term only above the floor (as torch)."""
    if norm >= EPS:
        u = v / norm
        return (g - u * float((u * g).sum())) / norm
    return g / EPS


def numpy_loss_and_grads(reals, syns, real_labels, syn_labels, ps, pc, ws, wc, upstream=1.0):
    """The loss summed over layers and ``upstream`` times its gradient w.r.t. every real and
    synthetic layer (lists of NumPy arrays), in float64 with loops over layers, terms, classes and
    samples. Labels: NumPy int arrays."""
    total = 0.0
    real_grads = [np.zeros(R.shape) for R in reals]
    syn_grads = [np.zeros(S.shape) for S in syns]
    classes = sorted(set(real_labels.tolist()) | set(syn_labels.tolist()))
    for li, (R, S) in enumerate(zip(reals, syns)):
        for power, weight, axis in ((ps, ws, "spatial"), (pc, wc, "channel")):
            if weight == 0:
                continue
            for k in classes:
                members = {"real": [i for i in range(len(R)) if real_labels[i] == k],
                           "syn": [i for i in range(len(S)) if syn_labels[i] == k]}
                vectors = {side: [_attention(X[i], power, axis) for i in members[side]]
                           for side, X in (("real", R), ("syn", S))}
                unit = {side: [_normalized(v) for v in vectors[side]] for side in vectors}
                mean_r = sum(u for u, _ in unit["real"]) / len(unit["real"])
                mean_s = sum(u for u, _ in unit["syn"]) / len(unit["syn"])
                D = mean_r - mean_s
                total += weight * float((D * D).sum())
                for side, X, grads, sign in (("real", R, real_grads, 1.0),
                                             ("syn", S, syn_grads, -1.0)):
                    count = len(members[side])
                    for i, v, (_, norm) in zip(members[side], vectors[side], unit[side]):
                        g_unit = upstream * weight * 2.0 * sign * D / count
                        g_vec = _normalized_vjp(v, norm, g_unit)
                        grads[li][i] += _attention_vjp(X[i], power, axis, g_vec)
    return total, real_grads, syn_grads


def numpy_class_sums(R, labels, K, power, axis):
    """(K, L) per-class sums of the normalized attention vectors of one layer, by hand."""
    rows = [_normalized(_attention(R[i], power, axis))[0] for i in range(len(R))]
    out = np.zeros((K, rows[0].shape[0]))
    for i, row in enumerate(rows):
        out[labels[i]] += row
    return out


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def relative_error(got, want):
    """|got - want| / |want| for scalars; max |got - want| / max |want| for arrays."""
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    return float(np.abs(got - want).max() / np.abs(want).max())


def _use_backend(backend, monkeypatch):
    """The backend name to pass; for "triton-small-blocks", "triton" with its blocks shrunk."""
    if backend == "triton-small-blocks":
        import atom_fast.kernels.attention as kernels

        monkeypatch.setattr(kernels, "MAX_BLOCK_HW", 4)
        monkeypatch.setattr(kernels, "TILE_ELEMENTS", 8)
        monkeypatch.setattr(kernels, "MAX_BLOCK_VEC", 4)
        monkeypatch.setattr(kernels, "BLOCK_MEMBERS", 2)
        return "triton"
    return backend


def _inputs(K, B, IPC, use_labels, seed=0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    reals, syns = make_layers(SHAPES, K * B, K * IPC, torch.float64, DEVICE)
    rl, sl = class_labels(K, B, use_labels, g), class_labels(K, IPC, use_labels, g)
    return reals, syns, rl, sl


def _expected(reals, syns, rl, sl, ps, pc, ws, wc):
    loss, real_grads, syn_grads = numpy_loss_and_grads(
        [r.cpu().numpy() for r in reals], [s.cpu().numpy() for s in syns], rl.numpy(), sl.numpy(),
        ps, pc, ws, wc, upstream=UPSTREAM)
    assert loss > 1e-3  # a loss near zero would make a relative comparison meaningless
    return loss, real_grads, syn_grads


def _assert_close(what, got, want):
    err = relative_error(got, want)
    assert err <= RTOL, f"{what}: relative error {err:.3g} > {RTOL:g}"


# --------------------------------------------------------------------------------------------------
# the tests
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend,ps,pc,ws,wc,use_labels", CASES)
def test_features_path_float64_exact(backend, ps, pc, ws, wc, use_labels, monkeypatch):
    """attention_loss(real, syn): loss and gradient w.r.t. both sides, to 1e-12 of the NumPy loops."""
    backend = _use_backend(backend, monkeypatch)
    K, B, IPC = 3, 3, 2
    reals, syns, rl, sl = _inputs(K, B, IPC, use_labels)
    want_loss, want_real, want_syn = _expected(reals, syns, rl, sl, ps, pc, ws, wc)

    reals = [r.clone().requires_grad_() for r in reals]
    syns = [s.clone().requires_grad_() for s in syns]
    kw = dict(spatial_power=ps, channel_power=pc, spatial_weight=ws, channel_weight=wc,
              backend=backend)
    if use_labels:
        loss = atom_fast.attention_loss(reals, syns, real_labels=rl.to(DEVICE),
                                        syn_labels=sl.to(DEVICE), **kw)
    else:
        loss = atom_fast.attention_loss(reals, syns, K, **kw)
    assert loss.dtype == torch.float64
    grads = torch.autograd.grad(loss, reals + syns,
                                torch.tensor(UPSTREAM, dtype=torch.float64, device=DEVICE))
    _assert_close("loss", loss.item(), want_loss)
    for i, (g, want) in enumerate(zip(grads, want_real + want_syn)):
        _assert_close(f"gradient {i}", g.cpu().numpy(), want)


@pytest.mark.parametrize("backend,ps,pc,ws,wc,use_labels", CASES)
def test_statistics_path_float64_exact(backend, ps, pc, ws, wc, use_labels, monkeypatch):
    """class_statistics (in two chunks that split a class) then attention_loss(stats, syn): the sums,
    the loss and the gradient w.r.t. syn, to 1e-12 of the NumPy loops."""
    backend = _use_backend(backend, monkeypatch)
    K, B, IPC = 3, 3, 2
    reals, syns, rl, sl = _inputs(K, B, IPC, use_labels)
    want_loss, _, want_syn = _expected(reals, syns, rl, sl, ps, pc, ws, wc)

    chunks = (slice(0, 4), slice(4, K * B))  # class 1 straddles the two chunks
    stats = sum(atom_fast.class_statistics([r[c] for r in reals], K, labels=rl[c].to(DEVICE),
                                           spatial_power=ps, channel_power=pc, spatial=ws != 0,
                                           channel=wc != 0, backend=backend)
                for c in chunks)
    for i, R in enumerate(reals):
        R = R.cpu().numpy()
        if ws:
            _assert_close(f"spatial sums {i}", stats.spatial[i].cpu().numpy(),
                          numpy_class_sums(R, rl.numpy(), K, ps, "spatial"))
        if wc:
            _assert_close(f"channel sums {i}", stats.channel[i].cpu().numpy(),
                          numpy_class_sums(R, rl.numpy(), K, pc, "channel"))

    syns = [s.clone().requires_grad_() for s in syns]
    loss = atom_fast.attention_loss(stats, syns, syn_labels=sl.to(DEVICE) if use_labels else None,
                                    spatial_power=ps, channel_power=pc, spatial_weight=ws,
                                    channel_weight=wc, backend=backend)
    assert loss.dtype == torch.float64
    grads = torch.autograd.grad(loss, syns, torch.tensor(UPSTREAM, dtype=torch.float64, device=DEVICE))
    _assert_close("loss", loss.item(), want_loss)
    for i, (g, want) in enumerate(zip(grads, want_syn)):
        _assert_close(f"gradient {i}", g.cpu().numpy(), want)


def test_numpy_loops_match_finite_differences():
    """The hand-written gradient above is itself right (central differences, to 1e-6)."""
    K, B, IPC = 2, 2, 2
    reals, syns, rl, sl = _inputs(K, B, IPC, True, seed=3)
    R = [r.cpu().numpy() for r in reals][:1]
    S = [s.cpu().numpy() for s in syns][:1]
    args = (rl.numpy(), sl.numpy(), 2.5, 3.7, 0.3, 1 / 3)
    _, real_grads, syn_grads = numpy_loss_and_grads(R, S, *args)
    h = 1e-6
    for X, grads in ((R[0], real_grads[0]), (S[0], syn_grads[0])):
        for idx in [(0, 0, 0, 0), (1, 2, 1, 3), (3, 4, 2, 1)]:
            if X[idx] == 0:
                continue
            old = X[idx]
            X[idx] = old + h
            up = numpy_loss_and_grads(R, S, *args)[0]
            X[idx] = old - h
            down = numpy_loss_and_grads(R, S, *args)[0]
            X[idx] = old
            assert (up - down) / (2 * h) == pytest.approx(grads[idx], rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("backend", [pytest.param(b, marks=m, id=b) for b, m in BACKENDS.items()
                                     if b != "triton-small-blocks"])
def test_norm_floor_float64_exact(backend):
    """Samples whose attention vectors have a norm far below eps = 1e-12 (normalized by eps, not by
    their norm) beside samples far above it: the floor, log2(eps) in the kernels, is exact too. Each
    sample's gradient to 1e-12 of its own size."""
    K, B, IPC, ps, pc, ws, wc = 2, 3, 2, 2.5, 3.7, 0.3, 1 / 3
    reals, syns, rl, sl = _inputs(K, B, IPC, True, seed=1)
    reals, syns = reals[:1], syns[:1]
    tiny = 1e-6  # |F| ~ 1e-6: |F|^2.5 summed over 5 channels ~ 1e-14, |F|^3.7 ~ 1e-22
    reals[0][[0, 3]] *= tiny
    syns[0][1] *= tiny
    R, S = reals[0].cpu().numpy(), syns[0].cpu().numpy()
    for X, below in ((R, {0, 3}), (S, {1})):
        for i in range(len(X)):
            for power, axis in ((ps, "spatial"), (pc, "channel")):
                norm = _normalized(_attention(X[i], power, axis))[1]
                assert (norm < EPS / 10) if i in below else (norm > EPS * 10), (i, axis, norm)
    want_loss, want_real, want_syn = numpy_loss_and_grads([R], [S], rl.numpy(), sl.numpy(), ps, pc,
                                                          ws, wc, upstream=UPSTREAM)
    real = reals[0].clone().requires_grad_()
    syn = syns[0].clone().requires_grad_()
    loss = atom_fast.attention_loss(real, syn, real_labels=rl.to(DEVICE), syn_labels=sl.to(DEVICE),
                                    spatial_power=ps, channel_power=pc, spatial_weight=ws,
                                    channel_weight=wc, backend=backend)
    grads = torch.autograd.grad(loss, [real, syn],
                                torch.tensor(UPSTREAM, dtype=torch.float64, device=DEVICE))
    _assert_close("loss", loss.item(), want_loss)
    for side, g, want in (("real", grads[0], want_real[0]), ("syn", grads[1], want_syn[0])):
        g = g.cpu().numpy()
        for i in range(len(g)):
            _assert_close(f"{side} sample {i} gradient", g[i], want[i])
