"""Evaluation architectures by name: the networks of DC's ``networks.py`` (reused by DM, DataDAM and
DC-BENCH) and DataDAM's ViT, written from their published definitions.

``build_network(name, channels, num_classes, im_size, **kwargs)`` builds one; ``ARCHITECTURES`` maps
each name to its builder ``(channels, num_classes, im_size, **kwargs) -> nn.Module``. Every network
maps ``(N, channels, H, W)`` to logits ``(N, num_classes)``, with default PyTorch initialization.

============  ===================  ==========================================================
name          DC / DataDAM name    what it is
============  ===================  ==========================================================
convnet       ConvNet              ConvNet, instance norm (``networks.ConvNet``)
convnet-bn    ConvNetBN            ... with batch norm
convnet-nn    ConvNetNN            ... with no normalization
convnet-d4    ConvNetD4            ... depth 4 (TinyImageNet's ConvNet)
lenet         LeNet                conv5(6)-pool-conv5(16)-pool, fc 120-84
alexnet       AlexNet              conv widths 128-192-256-192-192, max pooling, one fc
alexnet-bn    AlexNetBN            ... with batch norm after every conv
vgg11         VGG11BN              VGG-11 with batch norm
vgg11-bn      VGG11BN              the same network, named explicitly
vgg11-in      VGG11                ... with instance norm (DC's plain ``VGG11``)
resnet18      ResNet18BN           ResNet-18, batch norm, global average pooling
resnet18-ap   ResNet18BN_AP        ... downsampling by 2x2 average pooling instead of stride 2
resnet18-in   ResNet18             ... with instance norm (DC's plain ``ResNet18``)
vit           ViT (DataDAM)        patch 4, dim 512, depth 6, heads 8 (dim 64), MLP 512, dropout 0.1
mlp           MLP                  fc 128-128 on the flattened image
============  ===================  ==========================================================

Names are matched case-insensitively, and DC's spellings are accepted (``ConvNetBN``,
``ResNet18BN_AP``, ...). Two differences: ``vgg11`` and ``resnet18`` (and so the spellings ``VGG11``
and ``ResNet18``) are the batch-norm networks, VGG-11 with batch norm and ResNet-18 with batch norm,
as in DM's evaluation pool; DC's instance-norm ``VGG11`` and ``ResNet18`` are ``vgg11-in`` and
``resnet18-in``. (On MNIST at a short budget, 120 SGD steps with DSA at lr 0.01, the
instance-norm VGG-11 was still near chance where the batch-norm one reached 74%.)

Image sizes: MNIST's 1x28x28 is treated as DC treats it (the first convolution pads so that the
network runs at 32x32 where DC's does), and every flattened size is computed from the input size,
so 32x32 and 64x64 inputs work with any channel count. Where DC's code only works at 32x32 (its
VGG and ResNet heads), the choice made here is stated on the class. Widths can be scaled down
(``width=``) for quick tests; the defaults are the published sizes.
"""

from __future__ import annotations

import inspect
from typing import Callable, Dict, List, Sequence, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from atom_fast.distill.networks import ConvNet, default_depth

__all__ = ["ARCHITECTURES", "ALIASES", "build_network", "canonical_name", "architecture_options",
           "default_depth", "count_parameters", "LeNet", "AlexNet", "VGG11", "ResNet18", "ViT", "MLP"]


def _is_28px(im_size: Tuple[int, int]) -> bool:
    """A 28x28 input (MNIST), which DC's networks pad in the first convolution so that the rest of
    the network sees the sizes it has at 32x32. DC keys this on ``channel == 1``; keying it on the
    size gives the same networks on MNIST and also lets a 3-channel 28x28 input through VGG-11."""
    return tuple(im_size) == (28, 28)


def _conv_size(size: int, kernel: int, padding: int, stride: int = 1) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def _check_size(name: str, h: int, w: int, im_size) -> None:
    if h < 1 or w < 1:
        raise ValueError(f"{name} reduces a {tuple(im_size)} input to nothing; im_size is too small")


def _norm2d(kind: str, channels: int) -> nn.Module:
    if kind == "instancenorm":  # DC's "instancenorm": one group per channel, affine
        return nn.GroupNorm(channels, channels, affine=True)
    if kind == "batchnorm":
        return nn.BatchNorm2d(channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"norm must be 'instancenorm', 'batchnorm' or 'none', got {kind!r}")


# ------------------------------------------------------------------------------------------------
# LeNet, AlexNet, VGG-11


class LeNet(nn.Module):
    """LeNet-5 as DC defines it: conv 5x5 (6) -> ReLU -> max-pool -> conv 5x5 (16) -> ReLU ->
    max-pool -> fc 120 -> fc 84 -> fc ``num_classes``. At 28x28 the first conv pads 2 (28 -> 28)."""

    def __init__(self, channels: int, num_classes: int, im_size: Sequence[int]):
        super().__init__()
        pad = 2 if _is_28px(im_size) else 0
        self.features = nn.Sequential(
            nn.Conv2d(channels, 6, kernel_size=5, padding=pad), nn.ReLU(inplace=True),
            nn.MaxPool2d(2, 2),
            nn.Conv2d(6, 16, kernel_size=5), nn.ReLU(inplace=True),
            nn.MaxPool2d(2, 2),
        )
        h, w = (int(s) for s in im_size)
        h, w = _conv_size(h, 5, pad) // 2, _conv_size(w, 5, pad) // 2
        h, w = _conv_size(h, 5, 0) // 2, _conv_size(w, 5, 0) // 2
        _check_size("LeNet", h, w, im_size)
        self.classifier = nn.Sequential(
            nn.Linear(16 * h * w, 120), nn.ReLU(inplace=True),
            nn.Linear(120, 84), nn.ReLU(inplace=True),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


class AlexNet(nn.Module):
    """DC's AlexNet: conv 5x5 (w) -> pool -> conv 5x5 (1.5w) -> pool -> conv 3x3 (2w, 1.5w, 1.5w) ->
    pool -> one linear layer; ReLU after every conv, 2x2 max pooling, ``w = width = 128``.
    ``norm="batchnorm"`` puts batch norm between every conv and its ReLU (DC's AlexNetBN).
    The first conv pads 4 at 28x28 (28 -> 32), 2 otherwise."""

    def __init__(self, channels: int, num_classes: int, im_size: Sequence[int], width: int = 128,
                 norm: str = "none"):
        super().__init__()
        _positive("width", width)
        w1, w2, w3 = width, width * 3 // 2, width * 2  # 128, 192, 256 at the published width
        pad = 4 if _is_28px(im_size) else 2
        # (in, out, kernel, padding, pool after)
        convs = [(channels, w1, 5, pad, True), (w1, w2, 5, 2, True), (w2, w3, 3, 1, False),
                 (w3, w2, 3, 1, False), (w2, w2, 3, 1, True)]
        layers: List[nn.Module] = []
        h, w = (int(s) for s in im_size)
        for cin, cout, k, p, pool in convs:
            layers += [nn.Conv2d(cin, cout, kernel_size=k, padding=p), _norm2d(norm, cout),
                       nn.ReLU(inplace=True)]
            h, w = _conv_size(h, k, p), _conv_size(w, k, p)
            if pool:
                layers.append(nn.MaxPool2d(2, 2))
                h, w = h // 2, w // 2
        _check_size("AlexNet", h, w, im_size)
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(w2 * h * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).flatten(1))


_VGG11 = (1, "M", 2, "M", 4, 4, "M", 8, 8, "M", 8, 8, "M")  # widths in units of width (64)


class VGG11(nn.Module):
    """VGG-11 as DC defines it: 3x3 convs of 64-M-128-M-256-256-M-512-512-M-512-512-M, each
    conv -> norm -> ReLU, 'M' a 2x2 max pool, then one linear layer on the flattened map. The first
    conv pads 3 at 28x28 (28 -> 32). At 32x32 the map is 512x1x1 (DC's ``Linear(512, K)``); at
    64x64 it is 512x2x2 and the linear layer takes all 2048 values (DC's code stops there)."""

    def __init__(self, channels: int, num_classes: int, im_size: Sequence[int], width: int = 64,
                 norm: str = "instancenorm"):
        super().__init__()
        _positive("width", width)
        layers: List[nn.Module] = []
        h, w = (int(s) for s in im_size)
        cin = channels
        for i, v in enumerate(_VGG11):
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
                h, w = h // 2, w // 2
                continue
            pad = 3 if (i == 0 and _is_28px(im_size)) else 1
            layers += [nn.Conv2d(cin, v * width, kernel_size=3, padding=pad), _norm2d(norm, v * width),
                       nn.ReLU(inplace=True)]
            h, w = _conv_size(h, 3, pad), _conv_size(w, 3, pad)
            cin = v * width
        _check_size("VGG11", h, w, im_size)
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(cin * h * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


# ------------------------------------------------------------------------------------------------
# ResNet-18


class _BasicBlock(nn.Module):
    """Two 3x3 convs with a residual connection. ``avg_pool``: downsample by 2x2 average pooling
    after the first conv (and after the 1x1 shortcut conv) instead of a stride-2 conv (DC's _AP)."""

    def __init__(self, cin: int, cout: int, stride: int, norm: str, avg_pool: bool):
        super().__init__()
        conv_stride = 1 if avg_pool else stride
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=conv_stride, padding=1, bias=False)
        self.norm1 = _norm2d(norm, cout)
        self.pool = nn.AvgPool2d(2, 2) if (avg_pool and stride != 1) else nn.Identity()
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.norm2 = _norm2d(norm, cout)
        if stride != 1 or cin != cout:
            shortcut = [nn.Conv2d(cin, cout, 1, stride=conv_stride, bias=False)]
            if avg_pool and stride != 1:
                shortcut.append(nn.AvgPool2d(2, 2))
            self.shortcut = nn.Sequential(*shortcut, _norm2d(norm, cout))
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A map can arrive channels-last (from the test pass's layout choices). With one CPU thread,
        # torch 2.13's oneDNN (jit_1x1:avx2) corrupts the heap in the weight gradient of the 1x1
        # stride-2 shortcut conv on a channels-last input (seen on an AVX2 AMD EPYC; reproduced with
        # that conv alone). The block reads its input in the default layout (a no-op when it is).
        x = x.contiguous()
        out = self.pool(F.relu(self.norm1(self.conv1(x))))
        out = self.norm2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for small images (DC's, the CIFAR variant): conv 3x3 (64) -> norm -> ReLU, four
    stages of two basic blocks (64, 128, 256, 512 channels; stages 2-4 halve the size), then a
    linear layer.

    - ``avg_pool=False``: stride-2 convs downsample; the last map is averaged to 1x1 (DC's
      ``avg_pool2d(out, 4)``, the same at 28x28 and 32x32, where that map is 4x4; at 64x64 DC's head
      does not fit, here the global average keeps 512 features).
    - ``avg_pool=True`` (ResNet18BN_AP): 2x2 average pooling downsamples, and the linear layer reads
      the whole last map (512x4x4 at 32x32, 512x3x3 on MNIST, as DC's).
    """

    def __init__(self, channels: int, num_classes: int, im_size: Sequence[int], width: int = 64,
                 norm: str = "batchnorm", avg_pool: bool = False):
        super().__init__()
        _positive("width", width)
        self.avg_pool = bool(avg_pool)
        self.conv1 = nn.Conv2d(channels, width, 3, padding=1, bias=False)
        self.norm1 = _norm2d(norm, width)
        stages, cin = [], width
        h, w = (int(s) for s in im_size)
        for i, mult in enumerate((1, 2, 4, 8)):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(_BasicBlock(cin, width * mult, stride, norm, self.avg_pool),
                                        _BasicBlock(width * mult, width * mult, 1, norm, self.avg_pool)))
            cin = width * mult
            if stride == 2:  # a 3x3 stride-2 conv with padding 1 gives ceil(h/2); a 2x2 pool floor(h/2)
                h, w = (h // 2, w // 2) if self.avg_pool else ((h + 1) // 2, (w + 1) // 2)
        _check_size("ResNet18", h, w, im_size)
        self.stages = nn.Sequential(*stages)
        self.classifier = nn.Linear(cin * h * w if self.avg_pool else cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.stages(F.relu(self.norm1(self.conv1(x))))
        out = out.flatten(1) if self.avg_pool else out.mean((2, 3))
        return self.classifier(out)


# ------------------------------------------------------------------------------------------------
# ViT


class _SelfAttention(nn.Module):
    """Multi-head self-attention: one bias-free qkv projection, softmax(q k^T / sqrt(d)) v, an output
    projection with dropout (vit-pytorch's layout, which DataDAM copies)."""

    def __init__(self, dim: int, heads: int, dim_head: int, dropout: float):
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        inner = heads * dim_head
        self.qkv = nn.Linear(dim, 3 * inner, bias=False)
        self.out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, _ = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.heads, self.dim_head).permute(2, 0, 3, 1, 4)
        attn = torch.softmax(q @ k.transpose(-1, -2) * self.dim_head ** -0.5, dim=-1)
        return self.out((attn @ v).transpose(1, 2).reshape(n, t, self.heads * self.dim_head))


class _TransformerLayer(nn.Module):
    """Pre-norm residual attention, then a pre-norm residual GELU MLP (with dropout)."""

    def __init__(self, dim: int, heads: int, dim_head: int, mlp_dim: int, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _SelfAttention(dim, heads, dim_head, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(mlp_dim, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """The ViT DataDAM and DC-BENCH evaluate with: non-overlapping ``patch_size`` patches, each
    flattened and projected linearly to ``dim``; a learned class token and position embedding
    (both initialized N(0, 1)); embedding dropout; ``depth`` pre-norm transformer layers; the class
    token's final state -> LayerNorm -> linear head. Defaults: patch 4, dim 512, depth 6, 8 heads of
    64, MLP 512, dropout 0.1 (attention/MLP and embedding). ``im_size`` must be divisible by the patch
    size (28, 32 and 64 are). Unlike DataDAM's ``ViTModel``, which always assumes 3 channels, this one
    takes ``channels``."""

    def __init__(self, channels: int, num_classes: int, im_size: Sequence[int], patch_size: int = 4,
                 dim: int = 512, depth: int = 6, heads: int = 8, dim_head: int = 64,
                 mlp_dim: int = 512, dropout: float = 0.1, emb_dropout: float = 0.1):
        super().__init__()
        for name, value in (("patch_size", patch_size), ("dim", dim), ("depth", depth),
                            ("heads", heads), ("dim_head", dim_head), ("mlp_dim", mlp_dim)):
            _positive(name, value)
        h, w = (int(s) for s in im_size)
        if h % patch_size or w % patch_size:
            raise ValueError(f"ViT: im_size {tuple(im_size)} is not divisible by patch_size={patch_size}")
        self.patch_size = patch_size
        num_patches = (h // patch_size) * (w // patch_size)
        self.patch_embedding = nn.Linear(channels * patch_size * patch_size, dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.pos_embedding = nn.Parameter(torch.randn(1, num_patches + 1, dim))
        self.dropout = nn.Dropout(emb_dropout)
        self.layers = nn.Sequential(*[_TransformerLayer(dim, heads, dim_head, mlp_dim, dropout)
                                      for _ in range(depth)])
        self.head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, num_classes))

    def patches(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W)`` -> ``(N, H/p * W/p, p * p * C)``, patches in row-major order, each
        flattened as (row, column, channel), the order of vit-pytorch's rearrange."""
        n, c, h, w = x.shape
        p = self.patch_size
        x = x.view(n, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(n, (h // p) * (w // p), p * p * c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embedding(self.patches(x))
        tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        tokens = self.layers(self.dropout(tokens + self.pos_embedding))
        return self.head(tokens[:, 0])


# ------------------------------------------------------------------------------------------------
# MLP


class MLP(nn.Module):
    """DC's MLP: the flattened image -> fc ``width`` -> ReLU -> fc ``width`` -> ReLU -> fc ``num_classes``
    (``width`` 128). DC sizes the input for 1x28x28 or 3x32x32; here it is ``channels * H * W``."""

    def __init__(self, channels: int, num_classes: int, im_size: Sequence[int], width: int = 128):
        super().__init__()
        _positive("width", width)
        h, w = (int(s) for s in im_size)
        self.layers = nn.Sequential(nn.Linear(channels * h * w, width), nn.ReLU(inplace=True),
                                    nn.Linear(width, width), nn.ReLU(inplace=True),
                                    nn.Linear(width, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x.flatten(1))


# ------------------------------------------------------------------------------------------------
# the registry


def _positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _convnet(**fixed):
    def convnet(channels, num_classes, im_size, *, width: int = 128, depth: int = None,
                norm: str = "instancenorm", pooling: str = "avgpooling"):
        # depth follows the image size (3 up to 32x32, 4 at 64x64) unless the name fixes it
        kwargs = dict(width=width, depth=depth if depth is not None else default_depth(im_size),
                      norm=norm, pooling=pooling)
        kwargs.update(fixed)
        return ConvNet(channels, num_classes, im_size, **kwargs)
    # the fixed settings are not options of this name
    params = [p for n, p in inspect.signature(convnet).parameters.items() if n not in fixed]
    convnet.__signature__ = inspect.Signature(params)
    return convnet


def _lenet(channels, num_classes, im_size):
    return LeNet(channels, num_classes, im_size)


def _alexnet(norm: str):
    def alexnet(channels, num_classes, im_size, *, width: int = 128):
        return AlexNet(channels, num_classes, im_size, width=width, norm=norm)
    return alexnet


def _vgg11(norm: str):
    def vgg11(channels, num_classes, im_size, *, width: int = 64):
        return VGG11(channels, num_classes, im_size, width=width, norm=norm)
    return vgg11


def _resnet18(norm: str, avg_pool: bool):
    def resnet18(channels, num_classes, im_size, *, width: int = 64):
        return ResNet18(channels, num_classes, im_size, width=width, norm=norm, avg_pool=avg_pool)
    return resnet18


def _vit(channels, num_classes, im_size, *, patch_size: int = 4, dim: int = 512, depth: int = 6,
         heads: int = 8, dim_head: int = 64, mlp_dim: int = 512, dropout: float = 0.1,
         emb_dropout: float = 0.1):
    return ViT(channels, num_classes, im_size, patch_size=patch_size, dim=dim, depth=depth, heads=heads,
               dim_head=dim_head, mlp_dim=mlp_dim, dropout=dropout, emb_dropout=emb_dropout)


def _mlp(channels, num_classes, im_size, *, width: int = 128):
    return MLP(channels, num_classes, im_size, width=width)


ARCHITECTURES: Dict[str, Callable[..., nn.Module]] = {
    "convnet": _convnet(),
    "convnet-bn": _convnet(norm="batchnorm"),
    "convnet-nn": _convnet(norm="none"),
    "convnet-d4": _convnet(depth=4),
    "lenet": _lenet,
    "alexnet": _alexnet("none"),
    "alexnet-bn": _alexnet("batchnorm"),
    "vgg11": _vgg11("batchnorm"),
    "vgg11-bn": _vgg11("batchnorm"),
    "vgg11-in": _vgg11("instancenorm"),
    "resnet18": _resnet18("batchnorm", avg_pool=False),
    "resnet18-ap": _resnet18("batchnorm", avg_pool=True),
    "resnet18-in": _resnet18("instancenorm", avg_pool=False),
    "vit": _vit,
    "mlp": _mlp,
}

# DC / DataDAM spellings (compared lower-case) that differ from a name above
ALIASES: Dict[str, str] = {
    "convnetbn": "convnet-bn",
    "convnetnn": "convnet-nn",
    "convnetin": "convnet",
    "convnetd4": "convnet-d4",
    "alexnetbn": "alexnet-bn",
    "vgg11bn": "vgg11-bn",
    "resnet18bn": "resnet18",
    "resnet18bn_ap": "resnet18-ap",
    "resnet18_ap": "resnet18-ap",
    "vitmodel": "vit",
}


def canonical_name(name: str) -> str:
    """The registry name for ``name`` (case-insensitive; DC's spellings accepted), or ValueError
    listing the valid names."""
    if not isinstance(name, str):
        raise TypeError(f"architecture name must be a string, got {type(name).__name__}")
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; model must be one of {', '.join(ARCHITECTURES)} "
                         f"(DC spellings such as ConvNetBN or ResNet18BN_AP are accepted)")
    return key


def architecture_options(name: str) -> Tuple[str, ...]:
    """The keyword arguments ``build_network(name, ...)`` accepts (e.g. ``('width',)`` for vgg11)."""
    params = inspect.signature(ARCHITECTURES[canonical_name(name)]).parameters.values()
    return tuple(p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY)


def build_network(name: str, channels: int, num_classes: int, im_size: Sequence[int],
                  **kwargs) -> nn.Module:
    """A freshly initialized network ``name`` for ``(N, channels, *im_size)`` inputs and
    ``num_classes`` outputs. ``kwargs``: the options of that architecture (see
    :func:`architecture_options`); an option it does not have is a TypeError naming it."""
    key = canonical_name(name)
    _positive("channels", channels)
    _positive("num_classes", num_classes)
    if len(im_size) != 2 or any(isinstance(s, bool) or int(s) != s or s < 1 for s in im_size):
        raise ValueError(f"im_size must be two positive integers (H, W), got {tuple(im_size)!r}")
    im_size = (int(im_size[0]), int(im_size[1]))
    options = architecture_options(key)
    unknown = sorted(set(kwargs) - set(options))
    if unknown:
        raise TypeError(f"architecture {key!r} has no option {', '.join(map(repr, unknown))}; "
                        f"it takes {', '.join(options) if options else 'no options'}")
    return ARCHITECTURES[key](channels, num_classes, im_size, **kwargs)


def count_parameters(net: nn.Module) -> int:
    """Number of trainable parameters (buffers such as batch-norm statistics excluded)."""
    return sum(p.numel() for p in net.parameters() if p.requires_grad)
