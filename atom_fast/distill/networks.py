"""Networks of the distillation driver: the ConvNet family of DC/DM/DataDAM/ATOM (docs/distill.md).

The other evaluation architectures and the registry by name (``build_network``) are in
``architectures.py``.

``ConvNet.features(x)`` returns what the matching losses read, directly from the forward pass (no
hooks, no clones): the post-ReLU, pre-pool feature map of every block and the flattened embedding
after the last block. ``ConvNet(x)`` returns the logits for training and evaluation.
"""

from __future__ import annotations

import os
from typing import List, Sequence, Tuple

import torch
from torch import nn

from atom_fast.distill import block_tail

NORMS = ("instancenorm", "batchnorm", "none")
POOLINGS = ("avgpooling", "maxpooling", "none")


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "instancenorm":
        # DataDAM/DM's "instancenorm": one group per channel, with an affine transform
        return nn.GroupNorm(channels, channels, affine=True)
    if kind == "batchnorm":
        return nn.BatchNorm2d(channels)
    return nn.Identity()


def _pool(kind: str) -> nn.Module:
    if kind == "avgpooling":
        return nn.AvgPool2d(kernel_size=2, stride=2)
    if kind == "maxpooling":
        return nn.MaxPool2d(kernel_size=2, stride=2)
    return nn.Identity()


# Whether ConvBlock may run its norm, ReLU and pooling as one native op on CPU (see
# ConvBlock._fused); ATOM_FAST_FUSED_BLOCK_TAIL=0 switches it off (the benchmark's comparison row).
FUSED_BLOCK_TAIL = os.environ.get("ATOM_FAST_FUSED_BLOCK_TAIL", "1") != "0"


class ConvBlock(nn.Module):
    """conv 3x3 -> norm -> ReLU (the matched feature map) -> 2x2 pooling."""

    def __init__(self, in_channels: int, width: int, norm: str, pooling: str, padding: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, width, kernel_size=3, padding=padding)
        self.norm = _norm(norm, width)
        self.act = nn.ReLU(inplace=True)
        self.pool = _pool(pooling)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        y = self.conv(x)
        tail = self._fused_tail(y)
        if tail is not None:
            f, pooled = block_tail.instance_norm_relu_pool(y, self.norm.weight, self.norm.bias,
                                                       self.norm.eps, tail)
            return f, (f if pooled is None else pooled)
        f = self.act(self.norm(y))
        return f, self.pool(f)

    @property
    def _tail(self):
        """What the block's current modules allow: True/False (pool or not) for the native tail,
        None for the modules (hooks and the input not considered)."""
        return _fusable_tail(self.norm, self.pool)

    def _fused_tail(self, y: torch.Tensor):
        """This call's native-tail pooling flag, or None to run the modules. The one-pass native tail
        (GroupNorm(C, C) + ReLU + 2x2 average pooling; forward and backward) is taken for a float32/float64 CPU tensor when the block still holds exactly those
        modules (checked per call: a swapped module falls back) and no hook, of the modules or
        global, could miss a call (DataDAM's loop hooks the ReLU). The same values to float
        rounding, in 3x fewer passes over the block's largest map."""
        if not (FUSED_BLOCK_TAIL and y.device.type == "cpu" and y.dtype in (torch.float32, torch.float64)
                and type(self.act) is nn.ReLU):
            return None
        tail = self._tail
        if tail is None:
            return None
        hooked = any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                     or m._backward_pre_hooks for m in (self.norm, self.act, self.pool))
        return None if hooked or _global_hooks() else tail


def _global_hooks() -> bool:
    g = nn.modules.module
    return bool(g._global_forward_hooks or g._global_forward_pre_hooks
                or g._global_backward_hooks or g._global_backward_pre_hooks)


def _fusable_tail(norm: nn.Module, pool: nn.Module):
    """True/False (pool or not) when the block's tail has a one-pass native op, else None."""
    if not block_tail.AVAILABLE or type(norm) is not nn.GroupNorm or norm.num_groups != norm.num_channels:
        return None
    if type(pool) is nn.Identity:
        return False
    if (type(pool) is nn.AvgPool2d and pool.kernel_size == 2 and pool.stride == 2 and pool.padding == 0
            and not pool.ceil_mode and pool.divisor_override is None):
        return True
    return None


class ConvNet(nn.Module):
    """ConvNet of width ``width`` and ``depth`` blocks, then a linear head.

    Args:
        channels: input channels (1 for MNIST, 3 for CIFAR).
        num_classes: outputs of the head.
        im_size: ``(H, W)`` of the input. 28x28 inputs get padding 3 in the first convolution, so
            MNIST runs at 32x32 as in the public DC/DM/DataDAM code.
        width, depth, norm (``instancenorm`` | ``batchnorm`` | ``none``), pooling (``avgpooling`` |
            ``maxpooling`` | ``none``): the family's knobs; the defaults are the paper's ConvNet-3.
    """

    def __init__(self, channels: int, num_classes: int, im_size: Sequence[int], width: int = 128,
                 depth: int = 3, norm: str = "instancenorm", pooling: str = "avgpooling"):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if depth < 1 or width < 1:
            raise ValueError(f"depth and width must be >= 1, got depth={depth}, width={width}")
        h, w = int(im_size[0]), int(im_size[1])
        blocks = []
        for d in range(depth):
            padding = 3 if (d == 0 and channels == 1 and (h, w) == (28, 28)) else 1
            blocks.append(ConvBlock(channels if d == 0 else width, width, norm, pooling, padding))
            h, w = h + 2 * padding - 2, w + 2 * padding - 2
            if pooling != "none":
                h, w = h // 2, w // 2
            if h < 1 or w < 1:
                raise ValueError(f"depth={depth} pools a {tuple(im_size)} input to nothing")
        self.blocks = nn.ModuleList(blocks)
        self.embedding_size = width * h * w
        self.classifier = nn.Linear(self.embedding_size, num_classes)

    def features(self, x: torch.Tensor) -> Tuple[List[torch.Tensor], torch.Tensor]:
        """``x (N, channels, H, W)`` -> (``[F_1, ..., F_depth]`` post-ReLU pre-pool maps, ``(N, E)`` embedding)."""
        maps = []
        for block in self.blocks:
            f, x = block(x)
            maps.append(f)
        return maps, x.flatten(1)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)[1]
        return x.flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


def default_depth(im_size: Sequence[int]) -> int:
    """Depth 3 up to 32x32, 4 at 64x64, 5 at 128x128 (the DM/DataDAM convention)."""
    side = max(int(im_size[0]), int(im_size[1]))
    return 3 if side <= 32 else (4 if side <= 64 else 5)
