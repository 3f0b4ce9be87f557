"""The distillation loop (atom_fast/distill/loop.py): the fused, DataDAM-script and class-by-class
structures give the same images, the objective is the documented formula, a resumed distiller
continues exactly, and bad settings are refused."""

import numpy as np
import pytest
import torch

from atom_fast import attention_loss, mmd_loss
from atom_fast.distill.loop import DistillConfig, Distiller, class_pools, random_indices

from _data import toy_images


@pytest.mark.parametrize("method", ["dm", "datadam", "atom", "atom-channel"])
def test_fused_datadam_and_class_by_class_loops_give_the_same_images(method):
    x, y = toy_images()
    out = {}
    # fused with chunks: 2 synthetic class chunks, real chunks of 5 images that split classes
    for loop, chunk, real_chunk in (("fused", None, None), ("fused", 2, 5), ("datadam", None, None),
                                    ("class-by-class", None, None)):
        d = Distiller(x, y, 3, DistillConfig(method=method, ipc=2, batch_real=6, width=8, depth=3,
                                             loop=loop, class_chunk=chunk, real_chunk=real_chunk),
                      "cpu")
        assert len(d.chunks) == (2 if chunk == 2 else 1)
        losses = [d.step(i).item() for i in range(3)]
        out[loop, chunk] = d.syn.detach().clone(), losses
    for key in (("fused", 2), ("datadam", None), ("class-by-class", None)):
        torch.testing.assert_close(out["fused", None][0], out[key][0], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(out["fused", None][1], out[key][1], rtol=1e-4)
    assert (out["fused", None][0] - d.initial_images()).abs().max() > 1e-2  # the images moved


def test_loop_objective_is_the_documented_formula():
    """One fused step's loss equals 100 * attention + 100 * lambda * mmd computed by hand."""
    x, y = toy_images(size=8)
    cfg = DistillConfig(method="atom", ipc=2, batch_real=4, width=4, depth=3, dsa=False,
                        spatial_power=2.0, channel_power=3.0)
    d = Distiller(x, y, 3, cfg, "cpu")
    syn0 = d.syn.detach().clone()
    loss = d.step(7)
    real = d.real_batch(7)
    d._reset_network(7)
    rm, re_ = d.net.features(real)
    sm, se = d.net.features(syn0)
    want = (100 * attention_loss(rm[:-1], sm[:-1], 3, spatial_power=2.0, channel_power=3.0,
                                 backend="reference")
            + 100 * 0.01 * mmd_loss(re_, se, 3))
    torch.testing.assert_close(loss, want.detach(), rtol=1e-5, atol=1e-5)
    dm = Distiller(x, y, 3, DistillConfig(method="dm", ipc=2, batch_real=4, width=4, dsa=False), "cpu")
    torch.testing.assert_close(dm.step(7), mmd_loss(re_, se, 3).detach(), rtol=1e-5, atol=1e-5)


def test_a_resumed_distiller_matches_an_uninterrupted_one():
    x, y = toy_images()
    cfg = DistillConfig(method="atom", ipc=2, batch_real=6, width=8)
    a = Distiller(x, y, 3, cfg, "cpu")
    for i in range(4):
        a.step(i)
    b = Distiller(x, y, 3, cfg, "cpu")
    for i in range(2):
        b.step(i)
    state = b.state_dict()
    c = Distiller(x, y, 3, cfg, "cpu")
    c.load_state_dict(state)
    for i in range(2, 4):
        c.step(i)
    assert torch.equal(a.syn, c.syn)


def test_config_validation():
    x, y = toy_images()
    with pytest.raises(ValueError, match="method"):
        DistillConfig(method="dc").resolve((8, 8))
    with pytest.raises(ValueError, match="lr_img"):
        DistillConfig(lr_img=float("nan")).resolve((8, 8))
    with pytest.raises(ValueError, match="depth"):
        DistillConfig(depth=1).resolve((8, 8))
    with pytest.raises(ValueError, match="batch_real"):
        Distiller(x, y, 3, DistillConfig(batch_real=50, width=4), "cpu")
    with pytest.raises(ValueError, match="ipc"):
        random_indices(class_pools(y, 3), 21, 0)
    c = DistillConfig(ipc=51).resolve((64, 64))
    assert (c.lr_img, c.task_balance, c.depth) == (10.0, 0.02, 4)
    c = DistillConfig(ipc=50).resolve((32, 32))
    assert (c.lr_img, c.task_balance, c.depth) == (1.0, 0.01, 3)
