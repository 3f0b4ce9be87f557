"""The distillation loop of DM / DataDAM / ATOM (docs/distill.md), in three structures.

``fused`` (the default, memory-lean): every iteration draws a fresh random ConvNet, samples
``batch_real`` real images per class and one siamese DSA draw per class. The real images go through
the network under ``torch.no_grad`` in chunks of ``real_chunk`` images, each chunk reduced at once to
per-class statistics (:func:`atom_fast.class_statistics`: sums of the normalized attention vectors and
of the embeddings, docs/scale.md) and freed, so the real side's memory does not grow with ``batch_real``.
Then the synthetic images go through in chunks of ``class_chunk`` classes, each chunk's

    loss = 100 * attention_loss(stats, blocks 1..L-1) + 100 * task_balance * mmd_loss(stats, embedding)

backpropagated at once (``dm``: ``mmd_loss`` alone, as DM's code). SGD with momentum 0.5 updates the
pixels.

``datadam``: the structure of DataDAM's published script (``main_DataDAM.py``), kept for an honest
comparison: real images sampled and augmented class by class, then concatenated into *one* forward of
``K * batch_real`` images and one of the whole synthetic set, forward hooks cloning every ReLU output,
the real maps ``.detach()``ed (not under ``no_grad``), the eager reference attention, and the class
means (DataDAM's ``MSE_B`` error) computed after moving them to the CPU.

``class-by-class``: one class at a time (hooks, eager reference loss): the low-memory recipe DM's
README gives for large datasets.

The real images come from a :mod:`atom_fast.distill.real` source: the whole training split in memory,
or a prepared store read class by class (:class:`~atom_fast.distill.real.StoreImages`), whose next
iteration's images a background thread gathers while the current one computes. The draws are
positions within each class, so both sources give the same images.

All three consume the same random draws, so with one seed they produce the same synthetic images (up
to float rounding; with batch norm they differ, since the batch statistics do). All randomness of
iteration ``i`` comes from seeds derived from ``(seed, i)`` and, for the real images of class ``k``,
``(seed, i, k)``: a resumed run continues exactly as an uninterrupted one, and a process that owns
only some classes (``classes``, multi-process runs) draws exactly what a single process draws for them.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch

from atom_fast import (attention_loss, channel_attention, class_statistics, mmd_loss,
                       spatial_attention)
from atom_fast.distill import augment as dsa
from atom_fast.distill.seeds import derive_seed
from atom_fast.distill.networks import ConvNet, NORMS, POOLINGS, default_depth
from atom_fast.distill.real import MemoryImages, class_rows

# method -> (spatial weight, channel weight); None: no attention term (DM)
METHODS: Dict[str, Optional[Tuple[float, float]]] = {
    "dm": None,
    "datadam": (1.0, 0.0),
    "atom": (1.0, 1.0),
    "atom-channel": (0.0, 1.0),
}
LOOPS = ("fused", "datadam", "class-by-class")
ATTENTION_SCALE = 100.0  # DataDAM's code multiplies both terms by 100
# Real images per no_grad forward of the fused loop when real_chunk is not given: the peak of the
# real side is one chunk's feature maps (256 x 128 x 32 x 32 fp32 = 134 MB per map at CIFAR layer 1),
# whatever batch_real is. On the 2-core CPU of bench/results a step took the same time with chunks of
# 128 to 1280 images (the convolutions are compute-bound there).
REAL_CHUNK_IMAGES = 256
# The same on a GPU (or any non-CPU device), where each chunk costs a fixed number of kernel launches
# (bench/launch_budget.py) whatever its size, and 2048 CIFAR images' maps (1 GB per 128 x 32 x 32 map) fit easily: at K = 10, batch_real
# 128 (1280 images) one chunk instead of five.
REAL_CHUNK_IMAGES_DEVICE = 2048
# Synthetic images per forward/backward of the fused loop when class_chunk is not given (whole
# classes; at least one): bounds the autograd graph, which at IPC 50 would otherwise hold every
# activation of 500 images.
SYN_CHUNK_IMAGES = 128


@dataclass
class DistillConfig:
    """Hyperparameters of one distillation; ``None`` fields are resolved from the data (docs/distill.md)."""

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
    class_chunk: Optional[int] = None   # classes per synthetic forward/backward (fused loop); None:
                                        # as many as fit SYN_CHUNK_IMAGES images (at least one)
    real_chunk: Optional[int] = None    # real images per no_grad forward (fused loop); None:
                                        # REAL_CHUNK_IMAGES (CPU), REAL_CHUNK_IMAGES_DEVICE (GPU)

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
        for name in ("class_chunk", "real_chunk"):
            value = getattr(c, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        if METHODS[c.method] is not None and c.depth < 2:
            raise ValueError(f"method {c.method!r} matches attention of blocks 1..depth-1, so depth "
                             f"must be >= 2, got {c.depth}")
        return c


def class_pools(labels: torch.Tensor, num_classes: int) -> List[torch.Tensor]:
    """Indices (CPU int64) of every class's images."""
    return class_rows(labels, num_classes)


def random_positions(counts: Sequence[int], ipc: int, seed: int) -> List[torch.Tensor]:
    """``ipc`` random positions within each class (of ``counts[k]`` images): the initialization of
    the synthetic set and the images of the "random" baseline (the same ones for one seed). One
    generator runs over the classes in order, so every class needs the counts of those before it,
    never their images."""
    for k, n in enumerate(counts):
        if n < ipc:
            raise ValueError(f"ipc={ipc} but class {k} has only {n} training images")
    g = torch.Generator().manual_seed(derive_seed(seed, 0x1A17))
    return [torch.randperm(int(n), generator=g)[:ipc] for n in counts]


def random_indices(pools: Sequence[torch.Tensor], ipc: int, seed: int) -> torch.Tensor:
    """:func:`random_positions` as dataset indices, class-major (``pools`` from :func:`class_pools`)."""
    positions = random_positions([len(p) for p in pools], ipc, seed)
    return torch.cat([p[pos] for p, pos in zip(pools, positions)])


class NonFiniteLossError(RuntimeError):
    """The distillation loss became NaN or infinite."""


class Draw(NamedTuple):
    """The random draws of one iteration for the classes a Distiller owns."""

    real_positions: List[torch.Tensor]  # per owned class: batch_real positions within the class
    augmentation: Optional[dsa.DSADraw]  # one DSA draw per owned class, or None without DSA


class Distiller:
    """Distills the real images of ``train_images``: a ``(N, C, H, W)`` float tensor of normalized
    images (already whitened if wanted) with their ``train_labels``, or a real-image source of
    :mod:`atom_fast.distill.real` (e.g. a store's :class:`~atom_fast.distill.real.StoreImages`;
    ``train_labels`` None).

    ``classes`` (default: all) are the classes this process owns in a multi-process run: it holds
    their synthetic images and optimizer state only, reads only their real images and computes their
    part of the loss (the loss is a sum over classes). ``syn`` (``(len(classes) * ipc, C, H, W)``,
    leaf, class-major) and ``syn_labels`` (global class ids) hold the synthetic set; :meth:`step`
    runs one iteration. With ``prefetch`` a background thread fetches the next iteration's real
    images during a step.
    """

    def __init__(self, train_images, train_labels: Optional[torch.Tensor], num_classes: int,
                 config: DistillConfig, device: torch.device | str = "cpu",
                 classes: Optional[Sequence[int]] = None, prefetch: bool = True):
        self.device = torch.device(device)
        if isinstance(train_images, torch.Tensor):
            if train_labels is None:
                raise ValueError("train_labels is required with a tensor of train_images")
            train_images = MemoryImages(train_images, train_labels, num_classes, self.device)
        self.real = train_images
        image_shape = tuple(self.real.image_shape)
        self.config = config.resolve(image_shape[-2:])
        c = self.config
        self.num_classes = num_classes
        self.classes = list(range(num_classes)) if classes is None else [int(k) for k in classes]
        if not self.classes or min(self.classes) < 0 or max(self.classes) >= num_classes:
            raise ValueError(f"classes must be a non-empty subset of 0..{num_classes - 1}")
        smallest = min(self.real.counts[k] for k in self.classes)
        if smallest < c.batch_real:
            raise ValueError(f"batch_real={c.batch_real} but the smallest class has only {smallest} "
                             f"training images; lower --batch-real")
        self.weights = METHODS[c.method]
        self.net = ConvNet(image_shape[0], num_classes, image_shape[-2:], width=c.width,
                           depth=c.depth, norm=c.norm, pooling=c.pooling).to(self.device)
        self.net.requires_grad_(False)
        own = torch.tensor(self.classes, dtype=torch.long)
        self.syn_labels = own.repeat_interleave(c.ipc).to(self.device)
        self.syn = self.initial_images(self.classes).requires_grad_(True)
        self.optimizer = torch.optim.SGD([self.syn], lr=c.lr_img, momentum=c.momentum)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="atom-fast-prefetch") if prefetch else None
        self._next = None  # (iteration, future of its fetched real batch)

    # -- data -------------------------------------------------------------------------------------
    def initial_images(self, classes: Optional[Sequence[int]] = None) -> torch.Tensor:
        """``ipc`` random real images (or Gaussian noise) of each of ``classes`` (default: every
        class), class-major; a class's draw does not depend on which classes are asked for."""
        c = self.config
        classes = list(range(self.num_classes)) if classes is None else list(classes)
        if c.init == "noise":
            g = torch.Generator().manual_seed(derive_seed(c.seed, 0x1A17))
            noise = torch.randn((self.num_classes * c.ipc,) + tuple(self.real.image_shape), generator=g)
            rows = (torch.tensor(classes, dtype=torch.long)[:, None] * c.ipc + torch.arange(c.ipc)).flatten()
            return noise[rows].to(self.device)
        positions = random_positions(self.real.counts, c.ipc, c.seed)
        raw = self.real.fetch(classes, [positions[k] for k in classes])
        return self.real.convert(raw).clone()

    def draw(self, iteration: int) -> Draw:
        """Iteration ``iteration``'s real samples and DSA draws for the owned classes.

        The DSA draw of every class comes from one generator seeded by ``(seed, iteration)`` (a vector
        draw over all classes, then the owned ones are kept); the real samples of class ``k`` from
        ``(seed, iteration, k)``. So they do not depend on which process owns which class.
        """
        c = self.config
        params = None
        if c.dsa:
            g = torch.Generator().manual_seed(derive_seed(c.seed, iteration))
            params = dsa.draw(self.num_classes, self.real.image_shape[-2:], generator=g)
            if len(self.classes) != self.num_classes:
                params = params.select(self.classes)
        positions = []
        for k in self.classes:
            g = torch.Generator().manual_seed(derive_seed(c.seed, iteration, k, 0x5A3))
            positions.append(torch.randperm(self.real.counts[k], generator=g)[:c.batch_real])
        return Draw(positions, params)

    def _fetch(self, iteration: int):
        return self.real.fetch(self.classes, self.draw(iteration).real_positions)

    def fetch_real(self, iteration: int, draw: Optional[Draw] = None):
        """Iteration ``iteration``'s raw real batch (fetched ahead by the prefetch thread when it
        was asked for; else from ``draw``, that iteration's draws, when given), and the fetch of the
        next iteration's started in the background."""
        raw = None
        if self._next is not None:
            it, future = self._next
            self._next = None
            result = future.result()  # also re-raises a failed fetch here, in the step
            if it == iteration:
                raw = result
        if raw is None:
            raw = (self._fetch(iteration) if draw is None
                   else self.real.fetch(self.classes, draw.real_positions))
        if self._pool is not None and iteration + 1 < self.config.iterations:
            self._next = (iteration + 1, self._pool.submit(self._fetch, iteration + 1))
        return raw

    def real_batch(self, iteration: int) -> torch.Tensor:
        """The real images of iteration ``iteration`` (owned classes, class-major, before DSA)."""
        return self.real.convert(self._fetch(iteration))

    def close(self) -> None:
        """Stop the prefetch thread (a pending fetch is waited for)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool, self._next = None, None

    def _reset_network(self, iteration: int) -> None:
        # a fresh random network: the parameters a new ConvNet would get from this seed (default
        # init). The global RNG is forked so the caller's random stream is left alone.
        cuda = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(derive_seed(self.config.seed, iteration, 0x7E7))
            for m in self.net.blocks.modules():
                if hasattr(m, "reset_parameters"):
                    m.reset_parameters()

    # -- one iteration ----------------------------------------------------------------------------
    def step(self, iteration: int) -> torch.Tensor:
        """Run iteration ``iteration``; returns this process's part of the loss (0-dim, not synced)."""
        c = self.config
        draw = self.draw(iteration)
        raw = self.fetch_real(iteration, draw)
        self._reset_network(iteration)
        self.optimizer.zero_grad(set_to_none=True)
        if c.loop == "fused":
            loss = self._fused_backward(draw, raw)
        else:
            loss = (self._datadam_loss(draw, raw) if c.loop == "datadam"
                    else self._class_by_class_loss(draw, raw))
            loss.backward()
        self.optimizer.step()
        return loss.detach()

    @property
    def chunks(self) -> List[range]:
        """Owned-class positions (0..len(classes)-1) of the synthetic forwards of one fused iteration."""
        c, n = self.config, len(self.classes)
        size = c.class_chunk or max(1, SYN_CHUNK_IMAGES // c.ipc)
        return [range(k, min(k + size, n)) for k in range(0, n, size)]

    @property
    def real_chunk(self) -> int:
        default = REAL_CHUNK_IMAGES if self.device.type == "cpu" else REAL_CHUNK_IMAGES_DEVICE
        return self.config.real_chunk or default

    def _augment(self, x, params, positions, sizes):
        """DSA of rows laid out as the owned-class ``positions`` with ``sizes`` rows each."""
        if params is None:
            return x
        return dsa.apply(x, params, sizes, groups=positions)

    def _chunk_labels(self, start: int, stop: int) -> torch.Tensor:
        """Owned-class positions of real rows ``start:stop``, on the host (class_statistics checks
        and counts them without a device read), made once per run for each chunk."""
        cache = self.__dict__.setdefault("_labels", {})
        if (start, stop) not in cache:
            cache[start, stop] = torch.arange(start, stop) // self.config.batch_real
        return cache[start, stop]

    def _plan(self, draw: Draw, per_class: int) -> Optional[dsa.RowPlan]:
        """The iteration's DSA draw laid out over ``per_class`` rows of every owned class (made once
        per iteration and side; each chunk applies a row range of it), or None without DSA."""
        if draw.augmentation is None:
            return None
        return dsa.RowPlan(draw.augmentation, [per_class] * len(self.classes), self.device,
                           image_size=self.real.image_shape[-2:])

    def _real_statistics(self, draw: Draw, raw):
        """The real side of the loss, streamed: ``real_chunk`` images at a time through the network
        under no_grad, each chunk reduced to class statistics at once."""
        c = self.config
        b, n = c.batch_real, len(self.classes)
        attention = self.weights is not None
        ws, wc = self.weights or (0.0, 0.0)
        total = None
        plan = self._plan(draw, b)
        for start in range(0, n * b, self.real_chunk):
            stop = min(start + self.real_chunk, n * b)
            with torch.no_grad():
                x = self.real.convert(raw, start, stop)
                x = x if plan is None else plan.apply(x, start)
                maps, emb = self.net.features(x)
                del x
                labels = self._chunk_labels(start, stop)
                stats = class_statistics(maps[:-1] if attention else None, n, labels=labels,
                                         embedding=emb, spatial_power=c.spatial_power,
                                         channel_power=c.channel_power, spatial=ws != 0,
                                         channel=wc != 0, backend=c.backend)
                del maps, emb
            total = stats if total is None else total + stats
        return total

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

    def _fused_backward(self, draw: Draw, raw) -> torch.Tensor:
        """Real statistics (streamed), then the synthetic classes chunk by chunk, each chunk's loss
        backpropagated at once (so its graph is freed); returns the total (detached)."""
        c = self.config
        stats = self._real_statistics(draw, raw)
        total = torch.zeros((), device=self.device)
        whole = len(self.chunks) == 1
        plan = self._plan(draw, c.ipc)
        for chunk in self.chunks:
            syn = self.syn[chunk.start * c.ipc:chunk.stop * c.ipc]
            syn = syn if plan is None else plan.apply(syn, chunk.start * c.ipc)
            syn_maps, syn_emb = self.net.features(syn)
            part = stats if whole else stats.select(chunk)
            loss = self._terms(part, part, syn_maps[:-1], syn_emb, len(chunk), c.backend)
            loss.backward()
            total += loss.detach()
        return total

    def _hooked(self):
        """Forward hooks on every block's ReLU that clone its output (as DataDAM's code does)."""
        activations: List[torch.Tensor] = []
        hooks = [block.act.register_forward_hook(lambda m, i, o: activations.append(o.clone()))
                 for block in self.net.blocks]
        return activations, hooks

    def _datadam_loss(self, draw: Draw, raw) -> torch.Tensor:
        """DataDAM's script: per-class sampling and DSA, then one forward of all real images and one
        of the whole synthetic set with hooks, .detach()ed real maps, eager attention, MSE_B on the
        CPU."""
        c, n = self.config, len(self.classes)
        b = c.batch_real
        img_real, img_syn = [], []
        for pos in range(n):
            real = self.real.convert(raw, pos * b, (pos + 1) * b)
            syn = self.syn[pos * c.ipc:(pos + 1) * c.ipc]
            img_real.append(self._augment(real, draw.augmentation, [pos], [b]))
            img_syn.append(self._augment(syn, draw.augmentation, [pos], [c.ipc]))
        img_real, img_syn = torch.cat(img_real), torch.cat(img_syn)
        activations, hooks = self._hooked()
        try:
            output_real = self.net.embed(img_real).detach()
            act_real = [a.detach() for a in activations]
            activations.clear()
            output_syn = self.net.embed(img_syn)
            act_syn = list(activations)
        finally:
            for h in hooks:
                h.remove()
        cpu = torch.device("cpu")

        def mse_b(real_vectors, syn_vectors):
            # DataDAM's error(..., "MSE_B"): class means (moved to the CPU) of (K, B, L) reshapes
            real_mean = real_vectors.reshape(n, b, -1).mean(dim=1).to(cpu)
            syn_mean = syn_vectors.to(cpu).reshape(n, c.ipc, -1).mean(dim=1)
            return ((real_mean - syn_mean) ** 2).sum()

        loss = torch.zeros((), device=cpu)
        if self.weights is not None:
            ws, wc = self.weights
            for fr, fs in zip(act_real[:-1], act_syn[:-1]):
                if ws:
                    loss = loss + ATTENTION_SCALE * ws * mse_b(
                        spatial_attention(fr, c.spatial_power),
                        spatial_attention(fs, c.spatial_power))
                if wc:
                    loss = loss + ATTENTION_SCALE * wc * mse_b(
                        channel_attention(fr, c.channel_power),
                        channel_attention(fs, c.channel_power))
            mmd_scale = ATTENTION_SCALE * c.task_balance
        else:
            mmd_scale = 1.0
        loss = loss + mmd_scale * mse_b(output_real, output_syn)
        return loss.to(self.device)

    def _class_by_class_loss(self, draw: Draw, raw) -> torch.Tensor:
        """One class at a time: hooks clone every ReLU output; eager reference loss."""
        c = self.config
        b = c.batch_real
        activations, hooks = self._hooked()
        try:
            loss = torch.zeros((), device=self.device)
            for pos in range(len(self.classes)):
                img_real = self.real.convert(raw, pos * b, (pos + 1) * b)
                img_syn = self.syn[pos * c.ipc:(pos + 1) * c.ipc]
                img_real = self._augment(img_real, draw.augmentation, [pos], [b])
                img_syn = self._augment(img_syn, draw.augmentation, [pos], [c.ipc])
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
    def momentum(self) -> Optional[torch.Tensor]:
        """The optimizer's momentum buffer of ``syn`` (None before the first step)."""
        state = self.optimizer.state.get(self.syn, {})
        return state.get("momentum_buffer")

    def state_dict(self) -> dict:
        """This process's synthetic images and momentum (its classes' rows), detached, on the CPU."""
        m = self.momentum()
        return {"syn": self.syn.detach().cpu(), "syn_labels": self.syn_labels.cpu(),
                "momentum": None if m is None else m.detach().cpu(),
                "config": asdict(self.config)}

    def load_state_dict(self, state: dict) -> None:
        """Load images (and momentum) of *every* class, as :meth:`full_state` gathers them, or of
        exactly this process's classes; the owned rows are taken."""
        c = self.config
        syn = state["syn"]
        rows = None
        if syn.shape[0] == self.num_classes * c.ipc and len(self.classes) != self.num_classes:
            own = torch.tensor(self.classes, dtype=torch.long)
            rows = (own[:, None] * c.ipc + torch.arange(c.ipc)).flatten()
        pick = (lambda t: t) if rows is None else (lambda t: t.index_select(0, rows))
        if pick(syn).shape != self.syn.shape:
            raise ValueError(f"checkpoint holds synthetic images of shape {tuple(syn.shape)}, "
                             f"this run makes {tuple(self.syn.shape)}")
        with torch.no_grad():
            self.syn.copy_(pick(syn).to(self.device))
        self.optimizer.state.clear()
        if state.get("momentum") is not None:
            self.optimizer.state[self.syn]["momentum_buffer"] = pick(state["momentum"]).to(self.device).clone()
        for group in self.optimizer.param_groups:  # a resumed run may lower --lr-img
            group["lr"] = c.lr_img
