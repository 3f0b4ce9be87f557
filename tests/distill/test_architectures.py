"""Evaluation architectures (atom_fast/distill/architectures.py): shapes at every loader's image size,
published sizes, a few SGD steps that learn, determinism for a seed, names and bad input."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from atom_fast.distill import architectures as arch
from atom_fast.distill.architectures import ARCHITECTURES, build_network, count_parameters

# small widths for speed; each architecture's structure is unchanged
SMALL = {
    "convnet": {"width": 8}, "convnet-bn": {"width": 8}, "convnet-nn": {"width": 16},
    "convnet-d4": {"width": 8}, "lenet": {}, "alexnet": {"width": 16}, "alexnet-bn": {"width": 8},
    "vgg11": {"width": 4}, "vgg11-bn": {"width": 4}, "vgg11-in": {"width": 4}, "resnet18": {"width": 4},
    "resnet18-ap": {"width": 4}, "resnet18-in": {"width": 4},
    "vit": {"dim": 32, "depth": 2, "heads": 2, "dim_head": 16, "mlp_dim": 32}, "mlp": {"width": 16},
}
# what the loaders produce: MNIST 1x28x28, CIFAR 3x32x32, TinyImageNet 3x64x64, and the other mixes
INPUTS = [(c, s) for c in (1, 3) for s in (28, 32, 64)]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # these networks are tiny: on a loaded 2-core machine two OpenMP threads are 10-50x slower than one
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_every_architecture_has_small_settings():
    assert set(SMALL) == set(ARCHITECTURES)
    for name in ("convnet", "convnet-bn", "convnet-nn", "convnet-d4", "lenet", "alexnet", "alexnet-bn",
                 "vgg11", "vgg11-bn", "resnet18", "resnet18-ap", "vit", "mlp"):
        assert name in ARCHITECTURES


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_output_shape_for_every_loader_size(name):
    for channels, size in INPUTS:
        torch.manual_seed(0)
        net = build_network(name, channels, 7, (size, size), **SMALL[name])
        out = net(torch.randn(2, channels, size, size))
        assert out.shape == (2, 7), (name, channels, size)
        assert torch.isfinite(out).all()
    # H != W works too where the architecture allows it (the ViT needs both divisible by its patch)
    net = build_network(name, 3, 5, (32, 40), **SMALL[name])
    assert net(torch.randn(2, 3, 32, 40)).shape == (2, 5)


# trainable parameters at 3x32x32, 10 classes, published sizes, counted by hand from DC's definitions
# (ConvNet-3 width 128; LeNet-5; AlexNet 128-192-256-192-192; VGG-11; CIFAR ResNet-18; DataDAM's ViT)
PUBLISHED_PARAMS = {
    "convnet": 3 * 128 * 9 + 128 + 2 * (128 * 128 * 9 + 128) + 3 * 256 + 128 * 16 * 10 + 10,  # 320010
    "convnet-nn": 3 * 128 * 9 + 128 + 2 * (128 * 128 * 9 + 128) + 128 * 16 * 10 + 10,
    "lenet": 3 * 6 * 25 + 6 + 6 * 16 * 25 + 16 + 400 * 120 + 120 + 120 * 84 + 84 + 84 * 10 + 10,  # 62006
    "alexnet": (3 * 128 * 25 + 128 + 128 * 192 * 25 + 192 + 192 * 256 * 9 + 256 + 256 * 192 * 9 + 192
                + 192 * 192 * 9 + 192 + 192 * 16 * 10 + 10),  # 1872202
    "vgg11": 9231114,     # the CIFAR VGG-11 count; the same with batch or instance norm (2C affine each)
    "resnet18": 11173962,  # the CIFAR ResNet-18 count
    "resnet18-ap": 11173962 - (512 * 10 + 10) + (512 * 16 * 10 + 10),  # the head reads 512x4x4
    "vit": (48 * 512 + 512 + 512 + 65 * 512                                  # patches, cls, positions
            + 6 * (4 * 512 + 512 * 1536 + 512 * 512 + 512 + 2 * (512 * 512 + 512))  # layers
            + 2 * 512 + 512 * 10 + 10),                                      # head: 9523722
    "mlp": 3072 * 128 + 128 + 128 * 128 + 128 + 128 * 10 + 10,
}
PUBLISHED_PARAMS["convnet-bn"] = PUBLISHED_PARAMS["convnet"]
PUBLISHED_PARAMS["alexnet-bn"] = PUBLISHED_PARAMS["alexnet"] + 2 * (128 + 192 + 256 + 192 + 192)
PUBLISHED_PARAMS["vgg11-bn"] = PUBLISHED_PARAMS["vgg11-in"] = PUBLISHED_PARAMS["vgg11"]
PUBLISHED_PARAMS["resnet18-in"] = PUBLISHED_PARAMS["resnet18"]


def test_published_sizes():
    assert PUBLISHED_PARAMS["convnet"] == 320010 and PUBLISHED_PARAMS["lenet"] == 62006
    assert PUBLISHED_PARAMS["vit"] == 9523722
    for name, want in PUBLISHED_PARAMS.items():
        net = build_network(name, 3, 10, (32, 32))
        assert count_parameters(net) == want, name
    # MNIST at the published sizes: the judged architectures run on 1x28x28
    for name in ("convnet", "alexnet", "vgg11", "resnet18", "resnet18-ap", "lenet", "mlp", "vit"):
        torch.manual_seed(0)
        net = build_network(name, 1, 10, (28, 28)).eval()
        assert net(torch.randn(2, 1, 28, 28)).shape == (2, 10), name
    # DC's head sizes: VGG-11 ends at 512x1x1 on MNIST and CIFAR; ResNet18BN_AP reads 512x3x3 / 512x4x4
    assert build_network("vgg11", 1, 10, (28, 28)).classifier.in_features == 512
    assert build_network("resnet18-ap", 1, 10, (28, 28)).classifier.in_features == 512 * 9
    assert build_network("resnet18", 3, 10, (64, 64)).classifier.in_features == 512
    assert build_network("convnet", 3, 200, (64, 64)).embedding_size == 128 * 4 * 4  # ConvNet-4 at 64px
    assert build_network("convnet-d4", 3, 10, (32, 32)).embedding_size == 128 * 2 * 2


def test_norm_layers_are_the_named_ones():
    def kinds(net):
        return {type(m) for m in net.modules() if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm))}

    assert kinds(build_network("alexnet", 3, 10, (32, 32), width=8)) == set()
    assert kinds(build_network("alexnet-bn", 3, 10, (32, 32), width=8)) == {nn.BatchNorm2d}
    assert kinds(build_network("vgg11-bn", 3, 10, (32, 32), width=4)) == {nn.BatchNorm2d}
    assert kinds(build_network("vgg11", 3, 10, (32, 32), width=4)) == {nn.BatchNorm2d}
    assert kinds(build_network("resnet18", 3, 10, (32, 32), width=4)) == {nn.BatchNorm2d}
    assert kinds(build_network("resnet18-ap", 3, 10, (32, 32), width=4)) == {nn.BatchNorm2d}
    for name in ("vgg11-in", "resnet18-in", "convnet"):  # DC's instance norm: one group per channel
        groups = [m for m in build_network(name, 3, 10, (32, 32), **SMALL[name]).modules()
                  if isinstance(m, nn.GroupNorm)]
        assert groups and all(g.num_groups == g.num_channels for g in groups), name
    assert kinds(build_network("convnet-nn", 3, 10, (32, 32), width=4)) == set()
    assert kinds(build_network("convnet-bn", 3, 10, (32, 32), width=4)) == {nn.BatchNorm2d}


def test_resnet_ap_downsamples_by_average_pooling():
    net = build_network("resnet18-ap", 3, 10, (32, 32), width=4)
    strided = [m for m in net.modules() if isinstance(m, nn.Conv2d) and m.stride != (1, 1)]
    pools = [m for m in net.modules() if isinstance(m, nn.AvgPool2d)]
    assert not strided and len(pools) == 6  # stages 2-4: one in the block, one in its shortcut
    net = build_network("resnet18", 3, 10, (32, 32), width=4)
    assert len([m for m in net.modules() if isinstance(m, nn.Conv2d) and m.stride == (2, 2)]) == 6


def test_vit_patches_are_flattened_row_column_channel():
    net = build_network("vit", 3, 10, (8, 12), **SMALL["vit"])
    x = torch.randn(2, 3, 8, 12)
    got = net.patches(x)
    want = torch.stack([x[:, :, 4 * i:4 * i + 4, 4 * j:4 * j + 4].permute(0, 2, 3, 1).reshape(2, -1)
                        for i in range(2) for j in range(3)], dim=1)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def _batch(channels=1, size=28, classes=4, per_class=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(classes).repeat_interleave(per_class)
    x = torch.randn(len(y), channels, size, size, generator=g) + y.view(-1, 1, 1, 1) * 0.5
    return x, y


def _loss(net, x, y):
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(123)  # the same dropout masks before and after training
        return float(F.cross_entropy(net(x), y))


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_a_few_sgd_steps_lower_the_training_loss(name):
    x, y = _batch()
    torch.manual_seed(0)
    net = build_network(name, 1, 4, (28, 28), **SMALL[name]).train()
    before = _loss(net, x, y)
    # the evaluation's optimizer; the ConvNet without norm (default init) needs a larger step to leave
    # its plateau within 20 steps
    opt = torch.optim.SGD(net.parameters(), lr=0.05 if name == "convnet-nn" else 0.03, momentum=0.9)
    for _ in range(20):
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = _loss(net, x, y)
    assert after < 0.9 * before, (name, before, after)


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_same_seed_same_initial_weights_and_outputs(name):
    x = torch.randn(2, 3, 32, 32)

    def make(seed):
        torch.manual_seed(seed)
        net = build_network(name, 3, 10, (32, 32), **SMALL[name]).eval()
        return net, net(x)

    (a, ya), (b, yb), (_, yc) = make(5), make(5), make(6)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    assert torch.equal(ya, yb)
    assert not torch.equal(ya, yc)


def test_names_are_case_insensitive_and_dc_spellings_work():
    assert arch.canonical_name("ConvNet") == "convnet"
    assert arch.canonical_name("ConvNetBN") == "convnet-bn"
    assert arch.canonical_name("ResNet18BN_AP") == "resnet18-ap"
    assert arch.canonical_name("ResNet18BN") == "resnet18"
    assert arch.canonical_name("VGG11BN") == "vgg11-bn"
    assert arch.canonical_name(" AlexNet ") == "alexnet"
    assert arch.canonical_name("ConvNetD4") == "convnet-d4"
    assert isinstance(build_network("LeNet", 1, 10, (28, 28)), arch.LeNet)
    assert arch.architecture_options("vgg11") == ("width",)
    assert arch.architecture_options("convnet-bn") == ("width", "depth", "pooling")
    assert arch.architecture_options("lenet") == ()
    # the registry has one home: networks.py holds the ConvNet family only
    from atom_fast.distill import networks
    assert not hasattr(networks, "build_network") and not hasattr(networks, "ARCHITECTURES")


def test_bad_input_names_the_problem():
    with pytest.raises(ValueError, match=r"unknown architecture 'resnet9000'.*convnet.*vit.*mlp"):
        build_network("resnet9000", 1, 10, (28, 28))
    with pytest.raises(TypeError, match="architecture name"):
        build_network(None, 1, 10, (28, 28))
    with pytest.raises(TypeError, match=r"'vgg11' has no option 'depth'; it takes width"):
        build_network("vgg11", 1, 10, (28, 28), depth=3)
    with pytest.raises(TypeError, match="'lenet' has no option 'width'; it takes no options"):
        build_network("lenet", 1, 10, (28, 28), width=3)
    with pytest.raises(TypeError, match="'convnet-bn' has no option 'norm'"):
        build_network("convnet-bn", 1, 10, (28, 28), norm="none")
    with pytest.raises(ValueError, match="patch_size"):
        build_network("vit", 3, 10, (30, 30))
    with pytest.raises(ValueError, match="im_size"):
        build_network("mlp", 3, 10, (32,))
    with pytest.raises(ValueError, match="channels"):
        build_network("mlp", 0, 10, (32, 32))
    with pytest.raises(ValueError, match="num_classes"):
        build_network("mlp", 3, 0, (32, 32))
    with pytest.raises(ValueError, match="width"):
        build_network("alexnet", 3, 10, (32, 32), width=0)
    with pytest.raises(ValueError, match="too small"):
        build_network("vgg11", 3, 10, (16, 16))
    with pytest.raises(ValueError, match="norm"):
        arch.VGG11(3, 10, (32, 32), norm="layernorm")


def test_resnet_trains_on_channels_last_maps_with_one_thread():
    """One CPU thread, a channels-last batch: torch 2.13's oneDNN corrupted the heap in the weight
    gradient of the 1x1 stride-2 shortcut (an abort, so it runs in a child process)."""
    import subprocess
    import sys

    code = (
        "import torch\n"
        "from atom_fast.distill.architectures import build_network\n"
        "torch.set_num_threads(1)\n"
        "torch.manual_seed(0)\n"
        "net = build_network('resnet18', 3, 3, (16, 16), width=4)\n"
        "for _ in range(20):\n"
        "    x = torch.randn(16, 3, 16, 16).to(memory_format=torch.channels_last)\n"
        "    net(x).sum().backward()\n"
        "    blocks = [m for m in net.modules() if type(m).__name__ == '_BasicBlock']\n"
        "    for b in blocks:\n"
        "        h = torch.randn(16, b.conv1.in_channels, 16, 16).to(memory_format=torch.channels_last)\n"
        "        b(h).sum().backward()\n"
        "print('ok')\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]
