"""The real side as class statistics (docs/scale.md): the public API on every backend.

Passing ``class_statistics`` of the real features (computed in chunks, added up) in place of the
features must give the same loss and the same gradient w.r.t. the synthetic features, on every
backend; the sums are checked against a float64 computation written out here.
"""

import dataclasses
import math
import os
import socket

import pytest
import torch
import torch.nn.functional as F

import atom_fast
from atom_fast import ClassStatistics, attention_loss, class_statistics, mmd_loss
from atom_fast.backends import native_available, triton_available

BACKENDS = ["reference",
            pytest.param("native", marks=[pytest.mark.skipif(not native_available(),
                                                              reason="native op not built"),
                                          pytest.mark.default_threads]),
            pytest.param("triton", marks=pytest.mark.skipif(not triton_available(),
                                                            reason="triton not installed"))]
# (dtype, rtol): float64 to 1e-10, float32 to 1e-5 relative (the bar every fast path is held to)
DTYPES = [(torch.float64, 1e-10), (torch.float32, 1e-5)]


def _by_hand(F_, labels, K, p, dim):
    """Per-class sums of normalized |F|^p summed over ``dim`` (1: spatial, 2: channel), float64."""
    x = F_.double().abs().pow(p).flatten(2).sum(dim=dim)
    x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return torch.zeros(K, x.shape[1], dtype=torch.float64).index_add_(0, labels, x)


def _features(n, shapes, dtype, seed, grad=False):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn((n,) + s, generator=g, dtype=torch.float64).relu().to(dtype)
            .requires_grad_(grad) for s in shapes]


def _chunks(n, sizes):
    """Consecutive slices of 0..n of the given sizes (cycled): they split classes."""
    out, start, i = [], 0, 0
    while start < n:
        stop = min(n, start + sizes[i % len(sizes)])
        out.append(slice(start, stop))
        start, i = stop, i + 1
    return out


def _check_once(backend, dtype, rtol, *, shapes, K, per_class, ipc, use_labels, ps=4.0, pc=4.0,
                ws=1.0, wc=1.0, chunk_sizes=(5, 3), seed=0):
    real = _features(K * per_class, shapes, dtype, seed)
    syn = _features(K * ipc, shapes, dtype, seed + 1, grad=True)
    kw = dict(spatial_power=ps, channel_power=pc, spatial_weight=ws, channel_weight=wc,
              backend=backend)
    # the value to match: in float64 the reference's (the ground truth, to 1e-10), in float32 the
    # same backend's full-feature loss
    want_kw = dict(kw, backend="reference") if dtype == torch.float64 else kw
    if use_labels:
        g = torch.Generator().manual_seed(seed + 2)
        real_labels = torch.arange(K).repeat_interleave(per_class)[torch.randperm(K * per_class,
                                                                                  generator=g)]
        syn_labels = torch.arange(K).repeat_interleave(ipc)[torch.randperm(K * ipc, generator=g)]
        full = attention_loss(real, syn, K, real_labels=real_labels, syn_labels=syn_labels,
                              **want_kw)
    else:
        real_labels = torch.arange(K).repeat_interleave(per_class)
        syn_labels = None
        full = attention_loss(real, syn, K, **want_kw)
    want_grads = torch.autograd.grad(full, syn)
    stats = sum(class_statistics([r[sl] for r in real], K, labels=real_labels[sl],
                                 spatial_power=ps, channel_power=pc, spatial=ws != 0,
                                 channel=wc != 0, backend=backend)
                for sl in _chunks(K * per_class, chunk_sizes))
    assert isinstance(stats, ClassStatistics)
    assert stats.counts.tolist() == [per_class] * K
    for i, r in enumerate(real):  # the sums themselves, against float64 by hand
        if ws:
            torch.testing.assert_close(stats.spatial[i].double(),
                                       _by_hand(r, real_labels, K, ps, 1),
                                       rtol=max(rtol, 1e-12) * 10, atol=1e-12 if dtype == torch.float64 else 1e-5)
        if wc:
            torch.testing.assert_close(stats.channel[i].double(),
                                       _by_hand(r, real_labels, K, pc, 2),
                                       rtol=max(rtol, 1e-12) * 10, atol=1e-12 if dtype == torch.float64 else 1e-5)
    got = attention_loss(stats, syn, syn_labels=syn_labels, **kw)
    grads = torch.autograd.grad(got, syn)
    assert got.dtype == full.dtype
    torch.testing.assert_close(got, full, rtol=rtol, atol=0)
    for a, b in zip(grads, want_grads):
        scale = b.abs().max().item() or 1.0
        assert (a - b).abs().max().item() <= rtol * scale, (a - b).abs().max().item() / scale
    return full


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,rtol", DTYPES)
@pytest.mark.parametrize("use_labels", [False, True])
def test_statistics_give_the_full_loss_and_gradient(backend, dtype, rtol, use_labels):
    _check_once(backend, dtype, rtol, shapes=[(5, 3, 7), (6, 2, 2)], K=3, per_class=4, ipc=2,
                use_labels=use_labels, ps=3.0, pc=2.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ws,wc", [(1.0, 0.0), (0.0, 1.0), (0.7, 1.3)])
def test_statistics_each_term_and_odd_powers(backend, ws, wc):
    _check_once(backend, torch.float64, 1e-10, shapes=[(3, 5, 4)], K=4, per_class=3, ipc=1,
                use_labels=True, ps=2.5, pc=4.0, ws=ws, wc=wc, chunk_sizes=(7,))


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_statistics_realistic_shape(backend):
    """A ConvNet block-2 shape (C = 16 stands in for 128 under the interpreter), 10 classes."""
    C = 16 if backend == "triton" else 128
    _check_once(backend, torch.float32, 1e-5, shapes=[(C, 16, 16)], K=10, per_class=6, ipc=2,
                use_labels=False, chunk_sizes=(16, 9))


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_sums_and_counts_give_what_contiguous_ones_give(backend):
    """Statistics assembled by hand may hold strided sums and counts (a transposed copy, a column
    of a wider tensor); the loss and gradient are those of the contiguous statistics, by the
    reference backend's loss from the contiguous statistics."""
    K, labels = 3, torch.tensor([0, 0, 0, 1, 2, 2])
    real = _features(6, [(4, 3, 5)], torch.float64, 0)
    stats = class_statistics(real, K, labels=labels, spatial_power=2.5, channel_power=4.0,
                             backend=backend)
    strided = dataclasses.replace(
        stats, spatial=tuple(x.t().contiguous().t() for x in stats.spatial),
        channel=tuple(x.t().contiguous().t() for x in stats.channel),
        counts=torch.stack([stats.counts, stats.counts + 5], 1)[:, 0])
    assert not strided.spatial[0].is_contiguous() and not strided.counts.is_contiguous()
    kw = dict(spatial_power=2.5, channel_power=4.0, spatial_weight=0.3, channel_weight=0.7)
    results = []
    for which, b in ((stats, "reference"), (strided, backend)):
        syn = _features(3, [(4, 3, 5)], torch.float64, 1, grad=True)
        loss = attention_loss(which, syn, backend=b, **kw)
        (grad,) = torch.autograd.grad(loss, syn)
        results.append((loss, grad))
    (want, want_grad), (got, got_grad) = results
    assert want.item() > 1e-3
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-12, atol=1e-12 * want_grad.abs().max().item())


def test_statistics_with_both_weights_zero_give_zero_gradients():
    real = _features(4, [(3, 2, 2)], torch.float64, 0)
    syn = _features(2, [(3, 2, 2)], torch.float64, 1, grad=True)
    stats = class_statistics(real, 2, backend="reference")
    loss = attention_loss(stats, syn, spatial_weight=0, channel_weight=0, backend="reference")
    assert loss.item() == 0
    (g,) = torch.autograd.grad(loss, syn)
    assert (g == 0).all()


@pytest.mark.parametrize("use_labels", [False, True])
def test_mmd_from_statistics_equals_mmd_from_embeddings(use_labels):
    g = torch.Generator().manual_seed(3)
    real = torch.randn(12, 4, 2, 2, generator=g, dtype=torch.float64)
    syn = torch.randn(6, 4, 2, 2, generator=g, dtype=torch.float64, requires_grad=True)
    real_labels = torch.arange(3).repeat_interleave(4)
    syn_labels = torch.tensor([2, 0, 1, 1, 0, 2]) if use_labels else None
    if use_labels:
        want = mmd_loss(real, syn, 3, real_labels=real_labels, syn_labels=syn_labels)
    else:
        want = mmd_loss(real, syn, 3)
    stats = sum(class_statistics(None, 3, labels=real_labels[sl], embedding=real[sl])
                for sl in _chunks(12, (5,)))
    got = mmd_loss(stats, syn, syn_labels=syn_labels)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    torch.testing.assert_close(torch.autograd.grad(got, syn)[0], torch.autograd.grad(want, syn)[0],
                               rtol=1e-12, atol=1e-15)


def test_statistics_are_detached_and_select_keeps_classes():
    real = _features(6, [(2, 2, 2)], torch.float64, 0, grad=True)
    emb = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    stats = class_statistics(real, 3, embedding=emb, backend="reference")
    assert not stats.spatial[0].requires_grad and not stats.embedding.requires_grad
    sub = stats.select([2, 0])
    assert sub.num_classes == 2 and sub.counts.tolist() == [2, 2]
    torch.testing.assert_close(sub.spatial[0], stats.spatial[0][[2, 0]])
    torch.testing.assert_close(sub.embedding, stats.embedding[[2, 0]])
    assert stats.numel == 3 + 3 * (4 + 2) + 3 * 3  # counts, spatial + channel, embedding
    assert "num_classes=3" in repr(stats)


def _base():
    real = _features(4, [(3, 2, 2)], torch.float64, 0)
    syn = _features(2, [(3, 2, 2)], torch.float64, 1, grad=True)
    return real, syn, class_statistics(real, 2, backend="reference")


@pytest.mark.parametrize("call,match", [
    (lambda r, s, st: attention_loss(st, s, spatial_power=2.0), "spatial_power is 2.0"),
    (lambda r, s, st: attention_loss(st, s, 3), "num_classes=3 but the statistics hold 2"),
    (lambda r, s, st: attention_loss(st, [s[0], s[0]]), "hold 1 layers but syn has 2"),
    (lambda r, s, st: attention_loss(st, s[0][:, :2]), r"\(C, H, W\) = \(2, 2, 2\)"),
    (lambda r, s, st: attention_loss(st, s, real_labels=torch.zeros(4, dtype=torch.long)),
     "real_labels cannot be given"),
    (lambda r, s, st: attention_loss(st, s, syn_labels=torch.tensor([0, 0])),
     "syn_labels has no sample of class 1"),
    (lambda r, s, st: attention_loss(st, s, syn_labels=torch.tensor([0, 2])), "out of range"),
    (lambda r, s, st: attention_loss(st, torch.cat([s[0], s[0][:1]])),
     "not divisible by num_classes=2"),
    (lambda r, s, st: attention_loss(class_statistics(r, 2, spatial=False), s),
     "hold no spatial sums"),
    (lambda r, s, st: mmd_loss(st, torch.zeros(2, 5, dtype=torch.float64)), "no embedding sums"),
    (lambda r, s, st: st + class_statistics(r, 2, channel_power=3.0), "different kinds"),
    (lambda r, s, st: st.select([2]), r"classes must lie in \[0, 2\)"),
    (lambda r, s, st: class_statistics(r, 3), "not divisible by num_classes=3"),
    (lambda r, s, st: class_statistics(r, None), "num_classes is required"),
    (lambda r, s, st: class_statistics(r, 2, labels=torch.tensor([0, 1, 2, 0])), "out of range"),
    (lambda r, s, st: class_statistics(r, 10 ** 9, labels=torch.zeros(4, dtype=torch.long)),
     "num_classes=1000000000 would need"),
    (lambda r, s, st: class_statistics(None, 2), "nothing to reduce"),
    (lambda r, s, st: class_statistics(r, 2, spatial=False, channel=False), "both False"),
    (lambda r, s, st: class_statistics(r, 2, embedding=torch.zeros(3, 2)), "embedding has 3 samples"),
    (lambda r, s, st: st.all_reduce(), "initialized torch.distributed"),
])
def test_statistics_bad_input_names_the_problem(call, match):
    real, syn, stats = _base()
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        call(real, syn, stats)


def test_statistics_dtype_mismatch_is_a_type_error():
    real, syn, stats = _base()
    with pytest.raises(TypeError, match="float32"):
        attention_loss(stats, syn[0].float().detach())


def test_half_precision_features_accumulate_in_float32():
    real = [f.to(torch.bfloat16) for f in _features(4, [(3, 2, 2)], torch.float32, 0)]
    syn = [f.to(torch.bfloat16).requires_grad_() for f in _features(2, [(3, 2, 2)], torch.float32, 1)]
    stats = class_statistics(real, 2, backend="reference")
    assert stats.dtype == torch.float32
    full = attention_loss(real, syn, 2, backend="reference")
    torch.testing.assert_close(attention_loss(stats, syn, backend="reference"), full)


# -- across processes: all_reduce under torch.distributed (gloo) ------------------------------------


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _all_reduce_worker(rank, world, port, result_path):
    import datetime

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        K, per = 3, 4
        real = _features(K * per, [(4, 3, 3)], torch.float64, 0)
        emb = torch.randn(K * per, 5, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
        labels = torch.arange(K).repeat_interleave(per)
        mine = slice(rank * K * per // world, (rank + 1) * K * per // world)  # splits class 1
        local = class_statistics([r[mine] for r in real], K, labels=labels[mine],
                                 embedding=emb[mine], backend="reference")
        total = local.all_reduce()
        whole = class_statistics(real, K, embedding=emb, backend="reference")
        ok = (total.counts.tolist() == whole.counts.tolist()
              and torch.allclose(total.spatial[0], whole.spatial[0], rtol=1e-12, atol=0)
              and torch.allclose(total.channel[0], whole.channel[0], rtol=1e-12, atol=0)
              and torch.allclose(total.embedding, whole.embedding, rtol=1e-12, atol=0)
              and local.counts.sum().item() == K * per // world)
        with open(f"{result_path}.{rank}", "w") as f:
            f.write("ok" if ok else "mismatch")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_all_reduce_over_two_processes_equals_the_whole_batch(tmp_path):
    import torch.multiprocessing as mp

    path = str(tmp_path / "result")
    mp.start_processes(_all_reduce_worker, args=(2, _free_port(), path), nprocs=2, join=True,
                       start_method="spawn")
    assert [open(f"{path}.{r}").read() for r in range(2)] == ["ok", "ok"]
