"""Internals of the Triton backend: block loops that run more than once, no backward work for a side
that needs no gradient. (Values and gradients of both fused backends are in test_fused.py.)"""

import pytest
import torch

import atom_fast
import atom_fast.kernels.attention as kernels
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


