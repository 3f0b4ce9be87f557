"""The three loss paths of both fused backends on the meta device: shapes only, and no read of
device memory on the host (a GPU run of them never stalls the host). Labels stay on the host, as
the driver keeps them; the op counter (tests/_sync.py) fails on any read of a meta tensor."""

import pytest
import torch

import atom_fast
from atom_fast import attention_loss, class_statistics, mmd_loss

from _sync import OpCounter

META = torch.device("meta")
SHAPES = ((4, 6, 6), (8, 3, 3))  # two layers
K = 3


def features(n, requires_grad=False):
    return [torch.empty((n, *shape), device=META).requires_grad_(requires_grad) for shape in SHAPES]


def host_labels(n):
    return torch.arange(n) % K


@pytest.mark.parametrize("labels", [False, True])
@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.0, 0.0), (0.0, 1.0)])
@pytest.mark.parametrize("backend", ["native", "triton"])
def test_features_path_on_meta(backend, weights, labels):
    real, syn = features(12), features(6, requires_grad=True)
    kw = dict(real_labels=host_labels(12), syn_labels=host_labels(6)) if labels else {}
    counter = OpCounter(META)
    with counter:
        loss = attention_loss(real, syn, K, spatial_weight=weights[0], channel_weight=weights[1],
                              backend=backend, **kw)
        loss.backward()
    assert loss.device == META and loss.shape == () and loss.dtype == torch.float32
    assert all(s.grad is not None and s.grad.shape == s.shape for s in syn)
    assert counter.reads == []


@pytest.mark.parametrize("labels", [False, True])
@pytest.mark.parametrize("backend", ["native", "triton"])
def test_statistics_and_from_sums_paths_on_meta(backend, labels):
    real, syn = features(12), features(6, requires_grad=True)
    emb_real = torch.empty((12, 5), device=META)
    emb_syn = torch.empty((6, 5), device=META, requires_grad=True)
    counter = OpCounter(META)
    with counter:
        stats = class_statistics(real, K, labels=host_labels(12) if labels else None,
                                 embedding=emb_real, backend=backend)
        stats = stats + stats  # chunks add up on the device
        kw = dict(syn_labels=host_labels(6)) if labels else {}
        loss = (attention_loss(stats, syn, backend=backend, **kw)
                + mmd_loss(stats, emb_syn, **kw))
        loss.backward()
    assert [s.shape for s in stats.spatial] == [(K, 36), (K, 9)]
    assert [t.shape for t in stats.channel] == [(K, 4), (K, 8)]
    assert stats.counts.device.type == "cpu" and stats.counts.tolist() == [8, 8, 8]
    assert loss.device == META and all(s.grad.shape == s.shape for s in syn)
    assert emb_syn.grad.shape == emb_syn.shape
    assert counter.reads == []


def test_host_labels_are_checked_on_the_host_for_device_features():
    """Bad labels are refused with the same errors when the features are on a device: the host
    labels are read where they are."""
    real, syn = features(6), features(3)
    bad = torch.tensor([0, 1, 2, 0, 1, 5])
    with pytest.raises(ValueError, match=r"^real_labels holds 5, out of range for num_classes=3"):
        attention_loss(real, syn, K, real_labels=bad, syn_labels=host_labels(3), backend="native")
    with pytest.raises(ValueError, match=r"^labels holds -1: labels must be non-negative"):
        class_statistics(real, K, labels=torch.tensor([0, 1, 2, 0, 1, -1]), backend="native")
    with pytest.raises(ValueError, match=r"^syn_labels has no sample of class 2"):
        attention_loss(real, syn, K, real_labels=host_labels(6), syn_labels=torch.tensor([0, 1, 1]),
                       backend="native")
    stats = class_statistics(real, K, labels=host_labels(6), backend="native")
    with pytest.raises(ValueError, match=r"^syn_labels has no sample of class 2"):
        attention_loss(stats, syn, syn_labels=torch.tensor([0, 1, 1]), backend="native")


def test_host_labels_give_the_reference_loss_and_gradient():
    """Labels given on the host (checked and counted there) give the reference backend's loss and
    gradient on the features path and on the statistics path, in float64, shuffled; the class
    counts are the labels' bincount."""
    torch.manual_seed(0)
    real = [torch.randn(12, *s, dtype=torch.float64).relu() for s in SHAPES]
    syn = [torch.randn(6, *s, dtype=torch.float64, requires_grad=True) for s in SHAPES]
    rl, sl = torch.randperm(12) % K, torch.randperm(6) % K
    kw = dict(spatial_power=4, channel_power=2.5, spatial_weight=0.7, channel_weight=1.3)
    want = attention_loss(real, syn, K, real_labels=rl, syn_labels=sl, backend="reference", **kw)
    want_grads = torch.autograd.grad(want, syn)
    stats = class_statistics(real, K, labels=rl, spatial_power=4, channel_power=2.5, backend="native")
    assert torch.equal(stats.counts.long(), torch.bincount(rl, minlength=K))
    for got in (attention_loss(real, syn, K, real_labels=rl, syn_labels=sl, backend="native", **kw),
                attention_loss(stats, syn, syn_labels=sl, backend="native", **kw)):
        grads = torch.autograd.grad(got, syn)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=0)
        for g, w in zip(grads, want_grads):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-14)
