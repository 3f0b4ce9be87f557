"""The ConvNet family (atom_fast/distill/networks.py): features() returns the post-ReLU maps and the
embedding the losses match; MNIST runs at 32x32; instance norm is GroupNorm(C, C)."""

import pytest
import torch
from torch.nn import functional as F

from atom_fast.distill.architectures import build_network
from atom_fast.distill.networks import ConvNet


@pytest.mark.parametrize("norm", ["instancenorm", "batchnorm", "none"])
def test_convnet_features_are_the_relu_outputs(norm):
    torch.manual_seed(0)
    net = ConvNet(3, 5, (16, 12), width=6, depth=3, norm=norm).eval()
    x = torch.randn(4, 3, 16, 12)
    hooked = []
    hooks = [b.act.register_forward_hook(lambda m, i, o: hooked.append(o.clone())) for b in net.blocks]
    logits = net(x)
    for h in hooks:
        h.remove()
    maps, emb = net.features(x)
    assert [tuple(f.shape) for f in maps] == [(4, 6, 16, 12), (4, 6, 8, 6), (4, 6, 4, 3)]
    for f, g in zip(maps, hooked):
        # the hooked forward runs the modules, the plain one the native block tail (instancenorm):
        # equal to float rounding
        torch.testing.assert_close(f, g)
        assert (f >= 0).all()
    assert emb.shape == (4, net.embedding_size) == (4, 6 * 2 * 1)
    torch.testing.assert_close(net.classifier(emb), logits)
    torch.testing.assert_close(F.avg_pool2d(maps[-1], 2).flatten(1), emb)


def test_convnet_mnist_runs_at_32x32_and_instancenorm_is_groupnorm():
    net = ConvNet(1, 10, (28, 28))
    maps, emb = net.features(torch.randn(2, 1, 28, 28))
    assert [f.shape[-1] for f in maps] == [32, 16, 8] and emb.shape == (2, 128 * 4 * 4)
    norm = net.blocks[0].norm
    assert isinstance(norm, torch.nn.GroupNorm) and norm.num_groups == norm.num_channels == 128
    with pytest.raises(ValueError, match="norm"):
        ConvNet(1, 10, (28, 28), norm="layernorm")
    with pytest.raises(ValueError, match="depth"):
        ConvNet(1, 10, (4, 4), depth=4)
    with pytest.raises(ValueError, match="model"):
        build_network("resnet9000", 1, 10, (28, 28))
