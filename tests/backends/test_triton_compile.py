"""The Triton backend under ``torch.compile``: its launchers are custom ops with fake kernels, so a
user's compiled step traces through the loss (one graph with equal class blocks) and gives the eager
values and gradients. ``aot_eager`` runs the same functionalization and autograd tracing as
Inductor without generating code (the kernels themselves run interpreted here)."""

import pytest
import torch

import atom_fast
from atom_fast.backends import triton_available

from _data import make_layers
from conftest import DEVICE

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton not installed")


@pytest.mark.parametrize("labels", [False, True], ids=["equal-blocks", "labels"])
def test_compiled_loss_and_gradient_equal_eager(labels):
    K, B, IPC = 3, 3, 2
    reals, syns = make_layers([(5, 3, 4)], K * B, K * IPC, torch.float64, DEVICE)
    real, syn = reals[0], syns[0].requires_grad_()
    kw = dict(spatial_power=4, channel_power=2.5, spatial_weight=0.7, channel_weight=1.3,
              backend="triton")
    if labels:
        g = torch.Generator().manual_seed(1)
        kw.update(real_labels=torch.randperm(K * B, generator=g) % K,
                  syn_labels=torch.randperm(K * IPC, generator=g) % K)
    else:
        kw.update(num_classes=K)

    def step(r, s):
        return atom_fast.attention_loss(r, s, **kw)

    torch._dynamo.reset()
    # labels are checked and grouped by reading them (their range, their class counts): with labels
    # the loss compiles in pieces around those reads, with equal class blocks in one graph
    compiled = torch.compile(step, backend="aot_eager", fullgraph=not labels)
    want = step(real, syn)
    (want_grad,) = torch.autograd.grad(want, syn)
    got = compiled(real, syn)
    (got_grad,) = torch.autograd.grad(got, syn)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-12, atol=0)
