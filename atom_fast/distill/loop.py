"""The distillation loop of DM / DataDAM / ATOM (SPEC 3), in two structures.

``fused`` (the default): every iteration draws a fresh random ConvNet, samples ``batch_real`` real
images per class, applies one siamese DSA draw per class, runs *one* batched forward for all classes'
real images (under ``torch.no_grad``) and one for the synthetic set, and takes

    loss = 100 * attention_loss(blocks 1..L-1) + 100 * task_balance * mmd_loss(embedding)

(``dm``: ``mmd_loss`` alone, as DM's code). SGD with momentum 0.5 updates the pixels.

``reference``: the structure of DataDAM's published loop, kept so the two can be compared end to
end: forward hooks that clone each ReLU output, one class at a time, the eager reference loss.

Both consume the random streams identically, so with one seed they produce the same synthetic
images (up to float rounding; with batch norm they differ, since the batch statistics do).
All randomness of iteration ``i`` comes from seeds derived from ``(seed, i)``: a resumed run
continues exactly as an uninterrupted one.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from atom_fast import attention_loss, mmd_loss
from atom_fast.distill import augment as dsa
from atom_fast.distill.evaluate import _mix
from atom_fast.distill.networks import ConvNet, NORMS, POOLINGS, default_depth

# method -> (spatial weight, channel weight); None: no attention term (DM)
METHODS: Dict[str, Optional[Tuple[float, float]]] = {
    "dm": None,
    "datadam": (1.0, 0.0),
    "atom": (1.0, 1.0),
    "atom-channel": (0.0, 1.0),
}
LOOPS = ("fused", "reference")
ATTENTION_SCALE = 100.0  # DataDAM's code multiplies both terms by 100
# Real images per batched forward when class_chunk is not given: 10 classes x 128 (one CIFAR-10 step)
# keeps the layer-1 maps of a 128-wide ConvNet at 32x32 to 0.7 GB; CIFAR-100 or TinyImageNet at
# batch 128 would need 7-55 GB in one forward, so their classes go in chunks (gradients accumulate).
CLASS_CHUNK_IMAGES = 1280


@dataclass
class DistillConfig:
    """Hyperparameters of one distillation; ``None`` fields are resolved from the data (SPEC 3)."""

    method: str = "atom"
    ipc: int = 10
    iterations: int = 8000              # the ATOM paper
    batch_real: int = 128               # ATOM (DataDAM's code: 64, DM: 256)
    lr_img: Optional[float] = None      # 1.0, or 10 above IPC 50
    momentum: float = 0.5
    spatial_power: float = 4.0
    channel_power: float = 4.0
    task_balance: Optional[float] = None  # lambda: 0.01 up to 32x32, 0.02 above
    dsa: bool = True
    init: str = "real"                  # "real": random real images of the class; "noise"
    loop: str = "fused"
    seed: int = 0
    width: int = 128
    depth: Optional[int] = None         # 3 up to 32x32, 4 at 64x64
    norm: str = "instancenorm"
    pooling: str = "avgpooling"
    backend: str = "auto"               # attention_loss backend of the fused loop
    class_chunk: Optional[int] = None   # classes per batched forward (fused loop); None: all, up to
                                        # CLASS_CHUNK_IMAGES real images per chunk

    def resolve(self, im_size: Sequence[int]) -> "DistillConfig":
        """A copy with the ``None`` defaults filled in for images of ``im_size``; validates."""
        c = DistillConfig(**asdict(self))
        if c.method not in METHODS:
            raise ValueError(f"method must be one of {sorted(METHODS)} (or 'random'), got {c.method!r}")
        if c.loop not in LOOPS:
            raise ValueError(f"loop must be one of {LOOPS}, got {c.loop!r}")
        if c.init not in ("real", "noise"):
            raise ValueError(f"init must be 'real' or 'noise', got {c.init!r}")
        if c.norm not in NORMS or c.pooling not in POOLINGS:
            raise ValueError(f"norm must be one of {NORMS} and pooling one of {POOLINGS}")
        for name in ("ipc", "iterations", "batch_real", "width"):
            value = getattr(c, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "iterations" else 1):
                raise ValueError(f"{name} must be a {'non-negative' if name == 'iterations' else 'positive'} "
                                 f"integer, got {value!r}")
        side = max(int(im_size[0]), int(im_size[1]))
        if c.lr_img is None:
            c.lr_img = 1.0 if c.ipc <= 50 else 10.0
        if c.task_balance is None:
            c.task_balance = 0.01 if side <= 32 else 0.02
        if c.depth is None:
            c.depth = default_depth(im_size)
        for name in ("lr_img", "spatial_power", "channel_power"):
            value = getattr(c, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be finite and > 0, got {value!r}")
        if not (math.isfinite(c.task_balance) and c.task_balance >= 0):
            raise ValueError(f"task_balance must be finite and >= 0, got {c.task_balance!r}")
        if c.class_chunk is not None and (not isinstance(c.class_chunk, int) or c.class_chunk < 1):
            raise ValueError(f"class_chunk must be a positive integer or None, got {c.class_chunk!r}")
        if METHODS[c.method] is not None and c.depth < 2:
            raise ValueError(f"method {c.method!r} matches attention of blocks 1..depth-1, so depth "
                             f"must be >= 2, got {c.depth}")
        return c


def class_pools(labels: torch.Tensor, num_classes: int) -> List[torch.Tensor]:
    """Indices (CPU int64) of every class's images."""
    labels = labels.cpu()
    return [torch.nonzero(labels == k).flatten() for k in range(num_classes)]


def random_indices(pools: Sequence[torch.Tensor], ipc: int, seed: int) -> torch.Tensor:
    """``ipc`` random indices per class, class-major: the initialization of the synthetic set and
    the images of the "random" baseline (the same ones for one seed)."""
    for k, p in enumerate(pools):
        if len(p) < ipc:
            raise ValueError(f"ipc={ipc} but class {k} has only {len(p)} training images")
    g = torch.Generator().manual_seed(_mix(seed, 0x1A17))
    return torch.cat([p[torch.randperm(len(p), generator=g)[:ipc]] for p in pools])


class NonFiniteLossError(RuntimeError):
    """The distillation loss became NaN or infinite."""


class Distiller:
    """Distills ``data`` (an :class:`atom_fast.distill.data.Dataset`, already whitened if wanted).

    ``syn`` (``(K * ipc, C, H, W)``, leaf, class-major) and ``syn_labels`` hold the synthetic set;
    :meth:`step` runs one iteration.
    """

    def __init__(self, train_images: torch.Tensor, train_labels: torch.Tensor, num_classes: int,
                 config: DistillConfig, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.config = config.resolve(train_images.shape[-2:])
        c = self.config
        self.num_classes = num_classes
        self.images = train_images.to(self.device)
        self.pools = class_pools(train_labels, num_classes)
        smallest = min(len(p) for p in self.pools)
        if smallest < c.batch_real:
            raise ValueError(f"batch_real={c.batch_real} but the smallest class has only {smallest} "
                             f"training images; lower --batch-real")
        self.weights = METHODS[c.method]
        self.net = ConvNet(self.images.shape[1], num_classes, self.images.shape[-2:], width=c.width,
                           depth=c.depth, norm=c.norm, pooling=c.pooling).to(self.device)
        self.net.requires_grad_(False)
        self.syn_labels = torch.arange(num_classes, device=self.device).repeat_interleave(c.ipc)
        self.syn = self.initial_images().requires_grad_(True)
        self.optimizer = torch.optim.SGD([self.syn], lr=c.lr_img, momentum=c.momentum)

    # -- data -------------------------------------------------------------------------------------
    def initial_images(self) -> torch.Tensor:
        """``ipc`` random real images per class (or Gaussian noise), class-major."""
        c = self.config
        if c.init == "noise":
            g = torch.Generator().manual_seed(_mix(c.seed, 0x1A17))
            return torch.randn((self.num_classes * c.ipc,) + tuple(self.images.shape[1:]),
                               generator=g).to(self.device)
        idx = random_indices(self.pools, c.ipc, c.seed)
        return self.images[idx.to(self.device)].clone()

    def sample_real(self, generator: torch.Generator) -> torch.Tensor:
        """``batch_real`` random real images of every class, class-major: ``(K * batch_real, C, H, W)``."""
        b = self.config.batch_real
        idx = torch.cat([p[torch.randperm(len(p), generator=generator)[:b]] for p in self.pools])
        return self.images.index_select(0, idx.to(self.device, non_blocking=True))

    def _reset_network(self, iteration: int) -> None:
        # a fresh random network: the parameters a new ConvNet would get from this seed (default
        # init). The global RNG is forked so the caller's random stream is left alone.
        cuda = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(_mix(self.config.seed, iteration, 0x7E7))
            for m in self.net.blocks.modules():
                if hasattr(m, "reset_parameters"):
                    m.reset_parameters()

    # -- one iteration ----------------------------------------------------------------------------
    def step(self, iteration: int) -> torch.Tensor:
        """Run iteration ``iteration``; returns the loss (0-dim tensor, not synced)."""
        c = self.config
        generator = torch.Generator().manual_seed(_mix(c.seed, iteration))
        real = self.sample_real(generator)
        params = dsa.draw(self.num_classes, real.shape[-2:], generator=generator) if c.dsa else None
        self._reset_network(iteration)
        self.optimizer.zero_grad(set_to_none=True)
        if c.loop == "fused":
            loss = self._fused_backward(real, params)
        else:
            loss = self._reference_loss(real, params)
            loss.backward()
        self.optimizer.step()
        return loss.detach()

    @property
    def chunks(self) -> List[range]:
        """Class ranges of the batched forwards of one fused iteration."""
        c, K = self.config, self.num_classes
        size = c.class_chunk or max(1, CLASS_CHUNK_IMAGES // c.batch_real)
        return [range(k, min(k + size, K)) for k in range(0, K, size)]

    def _terms(self, real_maps, real_emb, syn_maps, syn_emb, num_classes, backend):
        c = self.config
        mmd = mmd_loss(real_emb, syn_emb, num_classes)
        if self.weights is None:  # DM
            return mmd
        ws, wc = self.weights
        att = attention_loss(real_maps, syn_maps, num_classes, spatial_power=c.spatial_power,
                             channel_power=c.channel_power, spatial_weight=ws, channel_weight=wc,
                             backend=backend)
        return ATTENTION_SCALE * att + ATTENTION_SCALE * c.task_balance * mmd

    def _fused_backward(self, real: torch.Tensor, params) -> torch.Tensor:
        """Loss of all classes, one batched forward per chunk of classes; backpropagates each
        chunk's loss at once (so its graph is freed) and returns the total (detached)."""
        c = self.config
        total = torch.zeros((), device=self.device)
        for chunk in self.chunks:
            n = len(chunk)
            r = real[chunk.start * c.batch_real:chunk.stop * c.batch_real]
            syn = self.syn[chunk.start * c.ipc:chunk.stop * c.ipc]
            if params is not None:
                p = params if n == params.groups else params.select(chunk)
                with torch.no_grad():
                    r = dsa.apply(r, p, [c.batch_real] * n)
                syn = dsa.apply(syn, p, [c.ipc] * n)
            with torch.no_grad():
                real_maps, real_emb = self.net.features(r)
                del r
                real_maps = real_maps[:-1]  # the last block is matched through the embedding only
            syn_maps, syn_emb = self.net.features(syn)
            loss = self._terms(real_maps, real_emb, syn_maps[:-1], syn_emb, n, c.backend)
            del real_maps, real_emb
            loss.backward()
            total += loss.detach()
        return total

    def _reference_loss(self, real: torch.Tensor, params) -> torch.Tensor:
        """DataDAM's structure: hooks clone every ReLU output; one class at a time; eager loss."""
        c, K = self.config, self.num_classes
        activations: List[torch.Tensor] = []
        hooks = [block.act.register_forward_hook(lambda m, i, o: activations.append(o.clone()))
                 for block in self.net.blocks]
        try:
            loss = torch.zeros((), device=self.device)
            for k in range(K):
                img_real = real[k * c.batch_real:(k + 1) * c.batch_real]
                img_syn = self.syn[k * c.ipc:(k + 1) * c.ipc]
                if params is not None:
                    one = params.select([k])
                    img_real = dsa.apply(img_real, one, [c.batch_real])
                    img_syn = dsa.apply(img_syn, one, [c.ipc])
                activations.clear()
                out_real = self.net.embed(img_real)
                act_real = list(activations)
                activations.clear()
                out_syn = self.net.embed(img_syn)
                act_syn = list(activations)
                loss = loss + self._terms(act_real[:-1], out_real, act_syn[:-1], out_syn, 1,
                                          "reference")
        finally:
            for h in hooks:
                h.remove()
        return loss

    # -- state ------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"syn": self.syn.detach().cpu(), "syn_labels": self.syn_labels.cpu(),
                "optimizer": self.optimizer.state_dict(), "config": asdict(self.config)}

    def load_state_dict(self, state: dict) -> None:
        if state["syn"].shape != self.syn.shape:
            raise ValueError(f"checkpoint holds synthetic images of shape {tuple(state['syn'].shape)}, "
                             f"this run makes {tuple(self.syn.shape)}")
        with torch.no_grad():
            self.syn.copy_(state["syn"].to(self.device))
        self.optimizer.load_state_dict(state["optimizer"])
        for group in self.optimizer.param_groups:  # a resumed run may lower --lr-img
            group["lr"] = self.config.lr_img
