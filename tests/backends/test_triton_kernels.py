"""Internals of the Triton backend: block loops that run more than once, no backward work for a side
that needs no gradient. (Values and gradients of both fused backends are in test_fused.py.)"""

import math

import pytest
import torch

import atom_fast
import atom_fast.kernels.attention as kernels
from atom_fast.layout import class_offsets
from _data import make_layers
from conftest import DEVICE
from test_fused import ODD, _check_once


@pytest.fixture
def small_blocks(monkeypatch):
    """Shrink every block so that each kernel's loops run at least twice on a small shape, the last
    block partial: on ODD (C=7, HW=15) tiles of 4 channels x 8 positions (2 x 2 tiles per sample),
    vectors in blocks of 4, classes in blocks of 2 members. Each tile costs the interpreter a few
    milliseconds per sample, so the tiles are no smaller than that."""
    monkeypatch.setattr(kernels, "MAX_BLOCK_HW", 8)
    monkeypatch.setattr(kernels, "TILE_ELEMENTS", 32)
    monkeypatch.setattr(kernels, "MAX_BLOCK_VEC", 4)
    monkeypatch.setattr(kernels, "BLOCK_MEMBERS", 2)


@pytest.mark.parametrize("ps,pc,labels", [(4, 4, False), (2.5, 8, True), (1, 2, False)])
def test_block_loops_run_more_than_once(small_blocks, ps, pc, labels):
    C, H, W = ODD[0]
    block_c, block_hw, _ = kernels.feature_launch_config(C, H * W)
    assert block_hw < H * W and block_c < C  # several spatial and channel blocks per sample
    assert (block_c, block_hw) == (4, 8)  # two of each, the second partial
    assert kernels._vector_block(H * W) < H * W
    _check_once("triton", ODD, K=3, B=5, IPC=3, ps=ps, pc=pc, labels=labels, real_grad=True, upstream=0.5)


def test_no_gradient_work_for_the_real_side(monkeypatch):
    calls = []
    original = kernels.attention_backward
    monkeypatch.setattr(kernels, "attention_backward",
                        lambda F, *a, **k: calls.append(F.shape[0]) or original(F, *a, **k))
    reals, syns = make_layers(ODD, 9, 3, torch.float32, DEVICE)
    syn = syns[0].requires_grad_()
    atom_fast.attention_loss(reals, [syn], 3, backend="triton").backward()
    assert calls == [3]  # only the synthetic batch went through the backward pass
    assert reals[0].grad is None and syn.grad is not None




@pytest.mark.parametrize("labels", [False, True])
def test_class_kernels_of_the_statistics_path_with_block_loops(small_blocks, labels):
    """The class-sums kernel and the from-sums class kernel over several vector and member blocks."""
    from .test_triton_statistics import _check_against_full

    assert kernels._vector_block(15) < 15
    _check_against_full(ODD[0], K=3, B=5, IPC=3, dtype=torch.float64, tol=1e-10, labels=labels,
                        ps=2.5, pc=4.0, ws=0.3, wc=0.7, chunk=4)


def _stats(n, shape, ps, pc, generator, dtype=torch.float64):
    F = torch.randn((n, *shape), generator=generator, dtype=dtype).to(DEVICE)
    return kernels.attention_stats(F, ps, pc, True, True, dtype)


def test_contiguous_class_offsets_equal_the_sorted_order_layout():
    """Offsets without an order (each class contiguous) give what offsets with the order give, on
    classes of unequal size and an empty one."""
    g = torch.Generator().manual_seed(3)
    ps, pc, ws, wc, K = 3.0, 2.5, 0.3, 0.7, 4
    real_counts = torch.tensor([3, 1, 0, 4])
    syn_counts = torch.tensor([2, 2, 0, 1])
    real, syn = _stats(8, (5, 3, 2), ps, pc, g), _stats(5, (5, 3, 2), ps, pc, g)
    results = []
    for with_order in (False, True):
        order = lambda n: torch.arange(n, device=DEVICE) if with_order else None  # noqa: E731
        partials = torch.empty((K, 2), dtype=torch.float64, device=DEVICE)
        DS, DT = kernels.class_differences(real, syn, K, ps, pc, ws, wc, partials,
                                           real_order=order(8), real_offsets=_offsets(real_counts),
                                           syn_order=order(5), syn_offsets=_offsets(syn_counts))
        results.append((DS, DT, partials))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # the real class means against a plain computation
    hat = real.spatial / torch.maximum(real.spatial_norm, real.spatial_floor)[:, None]
    sums = torch.stack([hat[0:3].sum(0), hat[3:4].sum(0), hat[4:4].sum(0), hat[4:8].sum(0)])
    hat_syn = syn.spatial / torch.maximum(syn.spatial_norm, syn.spatial_floor)[:, None]
    syn_sums = torch.stack([hat_syn[0:2].sum(0), hat_syn[2:4].sum(0), hat_syn[4:4].sum(0),
                            hat_syn[4:5].sum(0)])
    expected = (sums / real_counts.clamp_min(1)[:, None].to(DEVICE)
                - syn_sums / syn_counts.clamp_min(1)[:, None].to(DEVICE))
    torch.testing.assert_close(results[0][0], expected, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(results[0][2][:, 0], ws * expected.pow(2).sum(1), rtol=1e-13,
                               atol=1e-15)


def _offsets(counts):
    return class_offsets(counts).to(DEVICE)


def test_class_layouts_of_two_kinds_are_refused():
    g = torch.Generator().manual_seed(0)
    real, syn = _stats(4, (3, 2, 2), 4.0, 4.0, g), _stats(2, (3, 2, 2), 4.0, 4.0, g)
    partials = torch.empty((2, 2), dtype=torch.float64, device=DEVICE)
    with pytest.raises(ValueError, match="one kind"):
        kernels.class_differences(real, syn, 2, 4.0, 4.0, 1.0, 1.0, partials,
                                  real_offsets=_offsets(torch.tensor([2, 2])),
                                  syn_per_class=1)
    with pytest.raises(ValueError, match="needs its offsets"):
        kernels.class_sums(real, 2, True, True, order=torch.arange(4, device=DEVICE))
    with pytest.raises(ValueError, match="labels and offsets"):
        kernels.vector_grad(syn, partials, partials, torch.ones((), dtype=torch.float64), -1,
                            4.0, 4.0, 1.0, 1.0, labels=torch.zeros(2, dtype=torch.int64))


def test_loss_scalars_are_made_once_and_hold_the_values():
    kernels._SCALARS_CACHE.clear()
    a = kernels.loss_scalars(2.5, 4.0, 0.3, 0.7, dtype=torch.float64, device=DEVICE)
    b = kernels.loss_scalars(2.5, 4.0, 0.3, 0.7, dtype=torch.float64, device=DEVICE)
    c = kernels.loss_scalars(2.5, 4.0, 0.3, 0.7, dtype=torch.float32, device=DEVICE)
    d = kernels.loss_scalars(2.5, 4.0, 0.3, 0.75, dtype=torch.float64, device=DEVICE)
    assert a is b and a is not c and a is not d
    assert a.tolist() == [2.5, 4.0, 0.3, 0.7, math.log2(atom_fast.constants.NORM_EPS)]
    assert d.tolist()[3] == 0.75 and c.dtype == torch.float32
    with torch.inference_mode():  # first made under inference mode: still a plain tensor
        kernels._SCALARS_CACHE.clear()
        e = kernels.loss_scalars(1.0, 2.0, dtype=torch.float64, device=DEVICE)
    assert not e.is_inference() and not e.requires_grad
    # bounded
    for i in range(kernels._SCALARS_CACHE_SIZE + 5):
        kernels.loss_scalars(1.0 + i, 2.0, dtype=torch.float64, device=DEVICE)
    assert len(kernels._SCALARS_CACHE) == kernels._SCALARS_CACHE_SIZE


def test_loss_scalars_are_not_cached_under_a_fake_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    kernels._SCALARS_CACHE.clear()
    with FakeTensorMode():
        a = kernels.loss_scalars(2.0, 4.0, dtype=torch.float32, device=DEVICE)
        b = kernels.loss_scalars(2.0, 4.0, dtype=torch.float32, device=DEVICE)
    assert a is not b and not kernels._SCALARS_CACHE
