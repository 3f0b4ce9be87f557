"""The native op's streamed real-statistics interface (docs/scale.md): ``class_attention_sums`` and
``attention_loss_from_sums`` of atom_fast._native give the same loss and the same gradient w.r.t. the
synthetic features as the full-feature native loss, with the sums accumulated chunk by chunk."""

import pytest
import torch

import atom_fast
from atom_fast.backends import native as _native
from _data import class_labels, make_layers
from conftest import DEVICE

ops = torch.ops.atom_fast
# the op's OpenMP loops run with torch's default thread count here (conftest.py: one thread elsewhere)
pytestmark = pytest.mark.default_threads

# (dtype, relative tolerance of loss and gradient against the full-feature native loss)
ROWS = [pytest.param(torch.float64, 1e-10, id="fp64"), pytest.param(torch.float32, 1e-5, id="fp32")]


def _streamed_sums(real, labels, K, ps, pc, has_s, has_t, chunks):
    """Class sums over ``chunks`` slices of the real batch (chunk edges split classes) and counts."""
    N = real.shape[0]
    edges = sorted({0, N, *torch.randint(1, N, (chunks - 1,)).tolist()})
    S = T = None
    for a, b in zip(edges[:-1], edges[1:]):
        s, t = _native.class_attention_sums(real[a:b], labels[a:b], K, ps, pc, has_s, has_t)
        S = s if S is None else S + s
        T = t if T is None else T + t
    counts = torch.zeros(K, dtype=torch.int64, device=real.device).index_add_(
        0, labels, torch.ones_like(labels))
    return S, T, counts


def _check(shape, K, B, IPC, dtype, tol, labels, ps=4.0, pc=4.0, ws=1.0, wc=1.0, chunks=3,
           upstream=0.7):
    reals, syns = make_layers([shape], K * B, K * IPC, dtype, DEVICE)
    real, syn = reals[0], syns[0]
    rl = class_labels(K, B, labels).to(DEVICE)
    sl = class_labels(K, IPC, labels).to(DEVICE)
    kw = dict(spatial_power=ps, channel_power=pc, spatial_weight=ws, channel_weight=wc)

    s_full = syn.detach().clone().requires_grad_()
    if labels:
        want = atom_fast.attention_loss(real, s_full, real_labels=rl, syn_labels=sl, backend="native", **kw)
    else:
        want = atom_fast.attention_loss(real, s_full, K, backend="native", **kw)
    (g_want,) = torch.autograd.grad(want, s_full, torch.tensor(upstream, dtype=want.dtype))

    S, T, counts = _streamed_sums(real, rl, K, ps, pc, ws != 0, wc != 0, chunks)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert (S is None) == (ws == 0) and (T is None) == (wc == 0)
    for X, L in ((S, shape[1] * shape[2]), (T, shape[0])):
        assert X is None or (X.shape == (K, L) and X.dtype == acc and not X.requires_grad)
    s = syn.detach().clone().requires_grad_()
    got = _native.attention_loss_from_sums(S, T, counts, s, sl if labels else None, K, ps, pc, ws, wc)
    (g_got,) = torch.autograd.grad(got, s, torch.tensor(upstream, dtype=got.dtype))

    assert got.shape == () and got.dtype == acc and g_got.dtype == dtype
    assert want.item() > 1e-6, "degenerate case: the loss is ~0"
    torch.testing.assert_close(got, want, rtol=tol, atol=0)
    assert g_want.abs().max() > 0
    torch.testing.assert_close(g_got, g_want, rtol=tol, atol=tol * g_want.abs().max().item())


@pytest.mark.parametrize("dtype,tol", ROWS)
@pytest.mark.parametrize("labels", [False, True], ids=["blocks", "labels"])
@pytest.mark.parametrize("shape,K,B,IPC", [((5, 3, 4), 3, 4, 2), ((7, 5, 3), 4, 5, 3),
                                           ((16, 8, 8), 10, 12, 1)])
def test_sums_give_the_full_feature_loss(dtype, tol, labels, shape, K, B, IPC):
    _check(shape, K, B, IPC, dtype, tol, labels)


@pytest.mark.parametrize("dtype,tol", ROWS)
@pytest.mark.parametrize("ps,pc,ws,wc", [(2.5, 8.0, 1.0, 0.3), (1.0, 3.0, 0.0, 1.0),
                                         (4.0, 4.0, 2.0, 0.0), (0.5, 6.0, 1.0, 1.0)])
def test_powers_and_weights(dtype, tol, ps, pc, ws, wc):
    _check((6, 5, 4), 3, 7, 2, dtype, tol, True, ps=ps, pc=pc, ws=ws, wc=wc, chunks=4)


def test_realistic_class_layout_in_float32():
    # 10 classes x 128 real images (chunks of a few hundred split the classes), IPC 10
    _check((32, 16, 16), 10, 128, 10, torch.float32, 1e-5, True, chunks=5)


def test_sums_are_the_normalized_vectors_summed():
    reals, _ = make_layers([(6, 5, 3)], 12, 3, torch.float64, DEVICE)
    F = reals[0]
    F[4] = 0  # an all-zero sample: eps floor, zero vector
    F[7] *= 1e-5  # ||s|| ~ 1e-14: below the eps floor, s_hat = s / eps (not a unit vector)
    labels = torch.tensor([2, 0, 1, 2, 2, 0, 0, 1, 2, 2, 0, 0], device=DEVICE)
    S, T = _native.class_attention_sums(F, labels, 4, 3.0, 2.0, True, True)
    s_hat = torch.nn.functional.normalize(F.abs().pow(3).sum(1).flatten(1), dim=1)
    t_hat = torch.nn.functional.normalize(F.abs().pow(2).flatten(2).sum(2), dim=1)
    want_S = torch.zeros(4, 15, dtype=torch.float64, device=DEVICE).index_add_(0, labels, s_hat)
    want_T = torch.zeros(4, 6, dtype=torch.float64, device=DEVICE).index_add_(0, labels, t_hat)
    torch.testing.assert_close(S, want_S, rtol=1e-12, atol=0)
    torch.testing.assert_close(T, want_T, rtol=1e-12, atol=0)
    assert 0 < s_hat[7].norm() < 0.5
    assert S[3].abs().max() == 0 and T[3].abs().max() == 0  # class 3 has no samples
    blocks = _native.class_attention_sums(F, None, 3, 3.0, 2.0, True, False)
    torch.testing.assert_close(blocks[0], s_hat.view(3, 4, 15).sum(1), rtol=1e-12, atol=0)
    assert blocks[1] is None


def test_sums_of_strided_and_grad_requiring_features():
    reals, _ = make_layers([(6, 5, 4)], 12, 3, torch.float32, DEVICE)
    F = reals[0]
    want = _native.class_attention_sums(F, None, 3, 4.0, 4.0, True, True)
    cl = F.to(memory_format=torch.channels_last).requires_grad_()
    got = _native.class_attention_sums(cl, None, 3, 4.0, 4.0, True, True)
    assert all(not g.requires_grad and g.grad_fn is None for g in got)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    big = torch.cat([F, F.flip(0)])
    torch.testing.assert_close(_native.class_attention_sums(big[:12], None, 3, 4.0, 4.0, True, True),
                               want, rtol=0, atol=0)
    half = torch.stack([F, torch.full_like(F, float("nan"))], 1).flatten(0, 1)[::2]
    torch.testing.assert_close(_native.class_attention_sums(half, None, 3, 4.0, 4.0, True, True),
                               want, rtol=0, atol=0)
    for dtype in (torch.float16, torch.bfloat16):
        S, T = _native.class_attention_sums(F.to(dtype), None, 3, 4.0, 4.0, True, True)
        assert S.dtype == T.dtype == torch.float32


def test_empty_class_contributes_nothing():
    # class 3 has neither real nor synthetic samples: the loss is the 3-class loss
    reals, syns = make_layers([(5, 4, 3)], 9, 6, torch.float64, DEVICE)
    rl = class_labels(3, 3, True).to(DEVICE)
    sl = class_labels(3, 2, True).to(DEVICE)
    s_full = syns[0].clone().requires_grad_()
    want = atom_fast.attention_loss(reals[0], s_full, real_labels=rl, syn_labels=sl, backend="native")
    (g_want,) = torch.autograd.grad(want, s_full)
    S, T, counts = _streamed_sums(reals[0], rl, 4, 4.0, 4.0, True, True, 2)
    assert counts[3] == 0
    s = syns[0].clone().requires_grad_()
    got = _native.attention_loss_from_sums(S, T, counts, s, sl, 4, 4.0, 4.0, 1.0, 1.0)
    (g,) = torch.autograd.grad(got, s)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    torch.testing.assert_close(g, g_want, rtol=1e-12, atol=1e-14)


def test_both_weights_zero_give_a_connected_zero():
    reals, syns = make_layers([(5, 4, 3)], 6, 3, torch.float32, DEVICE)
    counts = torch.full((3,), 2, dtype=torch.int64, device=DEVICE)
    s = syns[0].clone().requires_grad_()
    loss = _native.attention_loss_from_sums(None, None, counts, s, None, 3, 4.0, 4.0, 0.0, 0.0)
    assert loss.item() == 0 and loss.requires_grad
    (g,) = torch.autograd.grad(loss, s)
    assert g.shape == s.shape and g.abs().max() == 0


def test_float_counts_and_torch_compile():
    reals, syns = make_layers([(6, 4, 4)], 12, 3, torch.float32, DEVICE)
    S, T = _native.class_attention_sums(reals[0], None, 3, 4.0, 8.0, True, True)
    counts = torch.full((3,), 4.0, device=DEVICE)

    def step(S, T, s):
        return 100 * _native.attention_loss_from_sums(S, T, counts, s, None, 3, 4.0, 8.0, 1.0, 1.0)

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    results = []
    for fn in (compiled, step):
        s = syns[0].clone().requires_grad_()
        loss = fn(S, T, s)
        results.append((loss, *torch.autograd.grad(loss, s)))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype,ps,pc,spatial,channel", [
    (torch.float32, 4.0, 4.0, True, True), (torch.float64, 2.5, 8.0, True, False),
    (torch.bfloat16, 3.0, 0.5, False, True), (torch.float16, 1.0, 2.0, True, True)])
def test_opcheck_stats(dtype, ps, pc, spatial, channel):
    reals, _ = make_layers([(5, 3, 4)], 6, 3, dtype, DEVICE)
    torch.library.opcheck(ops.attention_stats.default, (reals[0], ps, pc, spatial, channel))
    F = reals[0].double()
    stats = ops.attention_stats(F, ps, pc, spatial, channel)
    assert stats.shape == (6, 12 + 5 + 3)
    m = F.abs().flatten(1).amax(1, keepdim=True)  # the per-sample scale
    s = F.abs().pow(ps).sum(1).flatten(1) if spatial else torch.zeros(6, 12, dtype=torch.float64, device=DEVICE)
    t = F.abs().pow(pc).flatten(2).sum(2) if channel else torch.zeros(6, 5, dtype=torch.float64, device=DEVICE)
    # [s' (12) | t' (5) | m | ||s'|| | ||t'||] with s = m^ps s', t = m^pc t'
    torch.testing.assert_close(stats[:, 17:18], m, rtol=0, atol=0)
    torch.testing.assert_close(stats[:, :12] * m ** ps, s)
    torch.testing.assert_close(stats[:, 12:17] * m ** pc, t)
    torch.testing.assert_close(stats[:, 18], stats[:, :12].norm(dim=1))
    torch.testing.assert_close(stats[:, 19], stats[:, 12:17].norm(dim=1))


def test_stats_op_checks_its_arguments():
    reals, _ = make_layers([(5, 3, 4)], 6, 3, torch.float32, DEVICE)
    with pytest.raises(RuntimeError, match=r"atom_fast::attention_stats: features must be 4-D"):
        ops.attention_stats(reals[0][0], 4.0, 4.0, True, True)
    with pytest.raises(RuntimeError, match=r"spatial_power must be finite and positive"):
        ops.attention_stats(reals[0], float("inf"), 4.0, True, True)
    with pytest.raises(TypeError, match=r"features must be float32, float64, float16 or bfloat16"):
        ops.attention_stats(reals[0].int(), 4.0, 4.0, True, True)


@pytest.mark.parametrize("dtype,ps,pc,spatial,channel,ordered", [
    (torch.float32, 4.0, 4.0, True, True, False), (torch.float64, 2.5, 8.0, True, False, True),
    (torch.bfloat16, 3.0, 0.5, False, True, True), (torch.float16, 1.0, 2.0, True, True, False)])
def test_opcheck_class_sums_and_forward_sums(dtype, ps, pc, spatial, channel, ordered):
    # the two ops of the statistics path: schema, fake (meta) kernel, autograd registration
    reals, syns = make_layers([(5, 3, 4)], 8, 6, dtype, DEVICE)
    labels = torch.tensor([1, 0, 2, 1, 1, 0, 2, 2], device=DEVICE)
    offsets = torch.tensor([0, 2, 5, 8], device=DEVICE)
    order = torch.argsort(labels, stable=True) if ordered else None
    torch.library.opcheck(ops.attention_class_sums.default,
                          (reals[0], offsets, order, ps, pc, spatial, channel))
    S, T = ops.attention_class_sums(reals[0], offsets, order, ps, pc, spatial, channel)
    assert S.shape == (3, 12) and T.shape == (3, 5)
    counts = torch.tensor([2, 3, 3], device=DEVICE)
    syn_offsets = torch.tensor([0, 2, 4, 6], device=DEVICE)
    syn_order = torch.tensor([5, 0, 1, 4, 2, 3], device=DEVICE) if ordered else None
    syn = syns[0].clone().requires_grad_()
    ws, wc = (0.3 if spatial else 0.0), (1 / 3 if channel else 0.0)
    torch.library.opcheck(ops.attention_forward_sums.default,
                          (S if spatial else None, T if channel else None, counts, syn, syn_offsets,
                           syn_order, ps, pc, ws, wc))


def test_forward_sums_matches_the_forward_op_in_float64():
    # the real side's sums in, the same loss, stats and class differences out as attention_forward
    reals, syns = make_layers([(6, 5, 3)], 12, 6, torch.float64, DEVICE)
    real_offsets = torch.tensor([0, 5, 7, 12], device=DEVICE)
    real_order = torch.randperm(12, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    syn_offsets = torch.tensor([0, 1, 3, 6], device=DEVICE)
    syn_order = torch.tensor([4, 2, 0, 5, 1, 3], device=DEVICE)
    args = (2.5, 3.7, 0.3, 1 / 3)
    loss, _, syn_stats, diffs = ops.attention_forward(reals[0], syns[0], real_offsets, syn_offsets,
                                                      real_order, syn_order, *args)
    S, T = ops.attention_class_sums(reals[0], real_offsets, real_order, 2.5, 3.7, True, True)
    counts = real_offsets[1:] - real_offsets[:-1]
    got, got_stats, got_diffs = ops.attention_forward_sums(S, T, counts, syns[0], syn_offsets,
                                                           syn_order, *args)
    torch.testing.assert_close(got, loss, rtol=1e-13, atol=0)
    torch.testing.assert_close(got_stats, syn_stats, rtol=0, atol=0)
    torch.testing.assert_close(got_diffs, diffs, rtol=1e-13, atol=1e-16)


def test_sums_ops_check_their_arguments():
    reals, syns = make_layers([(5, 3, 4)], 6, 3, torch.float32, DEVICE)
    offsets = torch.tensor([0, 2, 4, 6], device=DEVICE)
    syn_offsets = torch.tensor([0, 1, 2, 3], device=DEVICE)
    S, T = ops.attention_class_sums(reals[0], offsets, None, 4.0, 4.0, True, True)
    counts = torch.full((3,), 2, dtype=torch.int64, device=DEVICE)
    syn = syns[0]
    with pytest.raises(RuntimeError, match=r"attention_class_sums: offsets must start at 0 and end "
                                           r"at N = 6"):
        ops.attention_class_sums(reals[0], syn_offsets, None, 4.0, 4.0, True, True)
    with pytest.raises(RuntimeError, match=r"attention_class_sums: order must be a permutation"):
        ops.attention_class_sums(reals[0], offsets, torch.zeros(6, dtype=torch.int64), 4.0, 4.0,
                                 True, True)
    with pytest.raises(RuntimeError, match=r"real_spatial is required when spatial_weight is nonzero"):
        ops.attention_forward_sums(None, T, counts, syn, syn_offsets, None, 4.0, 4.0, 1.0, 1.0)
    with pytest.raises(RuntimeError, match=r"real_channel must have shape \(3, 5\)"):
        ops.attention_forward_sums(S, S, counts, syn, syn_offsets, None, 4.0, 4.0, 1.0, 1.0)
    with pytest.raises(TypeError, match=r"real_spatial must be Float for Float syn, got Double"):
        ops.attention_forward_sums(S.double(), T, counts, syn, syn_offsets, None, 4.0, 4.0, 1.0, 1.0)
    with pytest.raises(TypeError, match=r"real_counts must be int64"):
        ops.attention_forward_sums(S, T, counts.float(), syn, syn_offsets, None, 4.0, 4.0, 1.0, 1.0)
    with pytest.raises(RuntimeError, match=r"real_counts must have shape \(3,\)"):
        ops.attention_forward_sums(S, T, counts[:2], syn, syn_offsets, None, 4.0, 4.0, 1.0, 1.0)
    with pytest.raises(RuntimeError, match=r"channel_weight must be finite and non-negative"):
        ops.attention_forward_sums(S, T, counts, syn, syn_offsets, None, 4.0, 4.0, 1.0, -1.0)


def test_from_sums_gradcheck_in_float64():
    # finite differences, non-dyadic weights, non-integer powers; also an undefined incoming gradient
    reals, syns = make_layers([(3, 2, 3)], 6, 3, torch.float64, DEVICE)
    S, T = _native.class_attention_sums(reals[0], None, 3, 2.5, 3.7, True, True)
    counts = torch.full((3,), 2, dtype=torch.int64, device=DEVICE)
    s = syns[0].clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x: _native.attention_loss_from_sums(S, T, counts, x, None, 3, 2.5, 3.7, 0.3, 1 / 3),
        (s,), check_undefined_grad=True)


def test_from_sums_double_backward_raises():
    reals, syns = make_layers([(3, 2, 3)], 6, 3, torch.float64, DEVICE)
    S, T = _native.class_attention_sums(reals[0], None, 3, 4.0, 4.0, True, True)
    counts = torch.full((3,), 2, dtype=torch.int64, device=DEVICE)
    s = syns[0].clone().requires_grad_()
    loss = _native.attention_loss_from_sums(S, T, counts, s, None, 3, 4.0, 4.0, 1.0, 1.0)
    (g,) = torch.autograd.grad(loss, s, create_graph=True)
    with pytest.raises(RuntimeError, match="does not support double backward"):
        torch.autograd.grad(g.sum(), s)
