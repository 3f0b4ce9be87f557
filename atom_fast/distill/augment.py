"""Differentiable siamese augmentation (DSA) and ZCA whitening (docs/distill.md).

DSA (Zhao & Bilen, 2021) draws one operation per call from ``color, crop, cutout, flip, scale,
rotate`` and applies it differentiably; "siamese" means the real and the synthetic images of a
class get exactly the same transform, so the matching loss compares like with like.

Here the draw is vectorized: :func:`draw` makes one draw per *group* (a class in the distillation
loop, a single image when training evaluation networks), and :func:`apply` transforms a batch whose
rows are laid out group after group. All parameters are drawn for every group whatever operation it
got, so the random stream does not depend on which operations came up (a batched loop and a
class-by-class loop that share a generator see the same transforms).
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import numpy as np
import torch
from torch.nn import functional as F

from atom_fast.layout import on_device

OPERATIONS = ("color", "crop", "cutout", "flip", "scale", "rotate")


@dataclass(frozen=True)
class DSAConfig:
    """DSA's published parameters (``ParamDiffAug`` of the DSA/DM/DataDAM code)."""

    brightness: float = 1.0
    saturation: float = 2.0
    contrast: float = 0.5
    crop_pad: float = 0.125
    cutout: float = 0.5
    flip_p: float = 0.5
    scale: float = 1.2
    rotate_degrees: float = 15.0
    operations: Sequence[str] = OPERATIONS


@dataclass
class DSADraw:
    """One draw per group; every field has the group count as its first dimension (CPU tensors).

    Not changed once applied: :func:`apply` keeps host copies made from it (``host_lists``,
    ``host_array``, ``theta``)."""

    op: torch.Tensor          # (G,) int64 index into config.operations
    brightness: torch.Tensor  # (G,) added value in [-b/2, b/2)
    saturation: torch.Tensor  # (G,) factor in [0, s)
    contrast: torch.Tensor    # (G,) factor in [c, c + 1)
    shift: torch.Tensor       # (G, 2) int64 (dy, dx) translation in pixels
    cutout: torch.Tensor      # (G, 2) int64 (cy, cx) centre of the cut-out square
    flip: torch.Tensor        # (G,) bool
    scale: torch.Tensor       # (G, 2) (sy, sx) factors in [1/r, r)
    angle: torch.Tensor       # (G,) radians in [-d, d)

    @property
    def groups(self) -> int:
        return self.op.shape[0]

    def host_lists(self):
        """``(op, flip)`` as Python lists, made once per draw (the bookkeeping of :func:`apply`)."""
        lists = self.__dict__.get("_lists")
        if lists is None:
            lists = self.__dict__["_lists"] = (self.op.tolist(), self.flip.tolist())
        return lists

    def host_array(self, name: str) -> np.ndarray:
        """A field (or ``theta:scale`` / ``theta:rotate``) as a numpy array, made once per draw."""
        key = "_array_" + name
        array = self.__dict__.get(key)
        if array is None:
            t = self.theta(name[6:]) if name.startswith("theta:") else getattr(self, name)
            array = self.__dict__[key] = t.numpy()
        return array

    def theta(self, name: str) -> torch.Tensor:
        """``(G, 2, 3)`` affine matrices of every group for "scale" or "rotate" (host), made once per
        draw."""
        key = "_theta_" + name
        theta = self.__dict__.get(key)
        if theta is None:
            theta = torch.zeros(self.groups, 2, 3)
            if name == "scale":
                s = self.scale
                theta[:, 0, 0], theta[:, 1, 1] = s[:, 1], s[:, 0]
            else:
                a = self.angle
                theta[:, 0, 0], theta[:, 0, 1] = torch.cos(a), torch.sin(-a)
                theta[:, 1, 0], theta[:, 1, 1] = torch.sin(a), torch.cos(a)
            self.__dict__[key] = theta
        return theta

    def select(self, index: Sequence[int]) -> "DSADraw":
        """The draws of some groups (e.g. one class), as a new DSADraw."""
        idx = torch.as_tensor(list(index), dtype=torch.long)
        return DSADraw(**{k: getattr(self, k)[idx] for k in self.__dataclass_fields__})


def draw(groups: int, im_size: Sequence[int], config: DSAConfig = DSAConfig(),
         generator: Optional[torch.Generator] = None) -> DSADraw:
    """Draw one operation and its parameters for each of ``groups`` groups of ``im_size`` images."""
    for name in config.operations:
        if name not in OPERATIONS:
            raise ValueError(f"DSA operation must be one of {OPERATIONS}, got {name!r}")
    h, w = int(im_size[0]), int(im_size[1])
    g = dict(generator=generator)

    def rand(*shape):
        return torch.rand(*shape, **g)

    op = torch.randint(0, len(config.operations), (groups,), **g)
    brightness = (rand(groups) - 0.5) * config.brightness
    saturation = rand(groups) * config.saturation
    contrast = rand(groups) + config.contrast
    sy, sx = int(h * config.crop_pad + 0.5), int(w * config.crop_pad + 0.5)
    shift = torch.stack([torch.randint(-sy, sy + 1, (groups,), **g),
                         torch.randint(-sx, sx + 1, (groups,), **g)], 1)
    ch, cw = int(h * config.cutout + 0.5), int(w * config.cutout + 0.5)
    cutout = torch.stack([torch.randint(0, h + (1 - ch % 2), (groups,), **g),
                          torch.randint(0, w + (1 - cw % 2), (groups,), **g)], 1)
    flip = rand(groups) < config.flip_p
    scale = rand(groups, 2) * (config.scale - 1.0 / config.scale) + 1.0 / config.scale
    angle = (rand(groups) - 0.5) * 2 * config.rotate_degrees / 180 * math.pi
    return DSADraw(op, brightness, saturation, contrast, shift, cutout, flip, scale, angle)


def _color(x, b, s, c):
    """Brightness, saturation, contrast; ``b, s, c`` are per-row ``(N, 1, 1, 1)``."""
    x = x + b
    m = x.mean(dim=1, keepdim=True)
    x = (x - m) * s + m
    m = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - m) * c + m


def _crop_gather(x, iy, ix):
    """Integer translation with zero fill: row n's output pixel (y, x) is pixel (iy[n, y, 0],
    ix[n, 0, x]) of a 1-pixel zero-padded copy (indices 0 and H + 1 / W + 1 are the zero border)."""
    n = x.shape[0]
    padded = F.pad(x, (1, 1, 1, 1)).permute(0, 2, 3, 1)
    rows = torch.arange(n, device=x.device).view(n, 1, 1)
    return padded[rows, iy, ix].permute(0, 3, 1, 2)


def _affine(x, theta):
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=True)
    return F.grid_sample(x, grid, align_corners=True)


class RowPlan:
    """One draw laid out over the rows of a batch (``group_sizes`` rows per group, group after
    group): for every operation that came up, its rows and what it needs to transform them, made on
    the host and moved to ``device`` in two copies (one float, one int64 buffer) once per batch.
    :meth:`apply` then augments any row range of that batch (a chunk): on the device, only the
    transforms themselves and a gather/scatter of the rows each operation touches.

    What is made on the host (numpy, from the host draw; nothing is read from the device): the rows
    of each operation, each row's group, the colour factors and affine matrices per row, and per
    group the crop's source rows and columns and the cutout's mask (these depend on the image size,
    ``image_size`` (H, W), taken from the first batch applied when not given).

    ``groups``: the groups of ``params`` the row groups are (default: all, in order).
    """

    def __init__(self, params: DSADraw, group_sizes: Sequence[int], device, dtype=torch.float32,
                 config: DSAConfig = DSAConfig(), groups: Optional[Sequence[int]] = None,
                 image_size: Optional[Sequence[int]] = None):
        sizes = [int(v) for v in np.asarray(group_sizes, dtype=np.int64).reshape(-1)]
        groups = list(range(params.groups)) if groups is None else [int(g) for g in groups]
        if len(sizes) != len(groups):
            raise ValueError(f"group_sizes has {len(sizes)} entries but params has "
                             f"{len(groups)} groups")
        self.rows = sum(sizes)
        self.config = config
        self.device, self.dtype = torch.device(device), dtype
        self._params, self._sizes, self._groups = params, sizes, groups
        self._size = None
        self.entries = []
        if image_size is not None:
            self._build(int(image_size[0]), int(image_size[1]))

    def _build(self, h: int, w: int):
        """The per-operation entries for images of h x w: ``(name, rows, device_rows, values)``."""
        params, sizes, groups, config = self._params, self._sizes, self._groups, self.config
        starts = np.concatenate([[0], np.cumsum(sizes[:-1], dtype=np.int64)]).astype(np.int64)
        ops, flips = params.host_lists()
        fl, it = [], []  # float and int64 parts, concatenated into one buffer each

        def put(buffer, array):  # -> (which buffer, offset, shape) of the part
            offset = sum(a.size for a in buffer)
            buffer.append(np.ascontiguousarray(array).reshape(-1))
            return buffer is fl, offset, array.shape

        plans = []
        for k, name in enumerate(config.operations):
            # positions (in ``groups``) of the groups that got operation k
            chosen = [i for i, g in enumerate(groups) if ops[g] == k and (name != "flip" or flips[g])]
            if not chosen:
                continue
            rows = [r for i in chosen for r in range(starts[i], starts[i] + sizes[i])]
            # each row's position among the chosen groups (indexes the per-group parts)
            position = np.repeat(np.arange(len(chosen), dtype=np.int64), [sizes[i] for i in chosen])
            chosen_groups = np.array([groups[i] for i in chosen], dtype=np.int64)
            parts = {"rows": None if len(rows) == self.rows else put(it, np.array(rows, np.int64))}
            if name == "color":
                for field in ("brightness", "saturation", "contrast"):
                    v = params.host_array(field)[chosen_groups][position]
                    parts[field] = put(fl, v.reshape(-1, 1, 1, 1))
            elif name == "crop":
                shift = params.host_array("shift")[chosen_groups]
                iy = np.clip(np.arange(h)[None, :] + shift[:, :1] + 1, 0, h + 1)
                ix = np.clip(np.arange(w)[None, :] + shift[:, 1:] + 1, 0, w + 1)
                parts["position"] = put(it, position)
                parts["iy"] = put(it, iy.reshape(-1, h, 1))
                parts["ix"] = put(it, ix.reshape(-1, 1, w))
            elif name == "cutout":
                ch, cw = int(h * config.cutout + 0.5), int(w * config.cutout + 0.5)
                centre = params.host_array("cutout")[chosen_groups]
                ys = np.arange(h)[None, :] - (centre[:, :1] - ch // 2)
                xs = np.arange(w)[None, :] - (centre[:, 1:] - cw // 2)
                keep = ((ys < 0) | (ys >= ch))[:, :, None] | ((xs < 0) | (xs >= cw))[:, None, :]
                parts["position"] = put(it, position)
                parts["mask"] = put(fl, keep.reshape(-1, 1, h, w))
            elif name in ("scale", "rotate"):
                theta = params.host_array("theta:" + name)[chosen_groups][position]
                parts["theta"] = put(fl, theta)
            plans.append((name, rows, parts))
        # two copies to the device; every part is a view of them
        dtype = self.dtype
        f = torch.from_numpy(np.concatenate(fl) if fl else np.zeros(0, np.float32))
        f = on_device(f, self.device, dtype)
        i = torch.from_numpy(np.concatenate(it) if it else np.zeros(0, np.int64))
        i = on_device(i, self.device)

        def view(part):  # one op per part
            if part is None:
                return None
            is_float, offset, shape = part
            strides = [math.prod(shape[d + 1:]) for d in range(len(shape))]
            return (f if is_float else i).as_strided(shape, strides, offset)

        self.entries = []
        for name, rows, parts in plans:
            values = {key: view(part) for key, part in parts.items() if key != "rows"}
            self.entries.append((name, rows, view(parts["rows"]), values))
        self._size = (h, w)

    def apply(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Augment ``x``, rows ``start:start + len(x)`` of the batch. Differentiable w.r.t. ``x``;
        rows whose group's operation is not used are passed through untouched (bitwise). Returns a
        new tensor (``x`` itself when no row is augmented)."""
        n = x.shape[0]
        stop = start + n
        if start < 0 or stop > self.rows:
            raise ValueError(f"rows {start}:{stop} are outside the batch of {self.rows} rows")
        h, w = x.shape[-2:]
        if self._size != (h, w):
            self._build(h, w)
        for name, rows, device_rows, values in self.entries:
            i0, i1 = bisect.bisect_left(rows, start), bisect.bisect_left(rows, stop)
            if i0 == i1:
                continue
            every = i1 - i0 == n  # e.g. evaluation batches: one operation for all rows
            whole = i1 - i0 == len(rows)  # this chunk holds every row of the operation
            if not every:
                index = device_rows if whole else (
                    device_rows[i0:i1] if device_rows is not None else None)
                if index is None:  # every row of the batch, a part of it here
                    index = torch.arange(rows[i0] - start, rows[i1 - 1] - start + 1, device=x.device)
                elif start:
                    index = index - start
            sub = x if every else x.index_select(0, index)

            def rows_of(key):
                v = values[key]
                return v if whole else v[i0:i1]

            if name == "color":
                sub = _color(sub, rows_of("brightness"), rows_of("saturation"), rows_of("contrast"))
            elif name == "crop":
                position = rows_of("position")
                sub = _crop_gather(sub, values["iy"].index_select(0, position),
                                   values["ix"].index_select(0, position))
            elif name == "cutout":
                sub = sub * values["mask"].index_select(0, rows_of("position"))
            elif name == "flip":
                sub = sub.flip(3)
            else:  # scale, rotate
                sub = _affine(sub, rows_of("theta"))
            x = sub if every else x.index_copy(0, index, sub)
        return x


def apply(x: torch.Tensor, params: DSADraw, group_sizes: Sequence[int],
          config: DSAConfig = DSAConfig(), groups: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Augment ``x (N, C, H, W)``, whose rows are ``params.groups`` groups of ``group_sizes`` rows
    (or, with ``groups``, the groups of ``params`` at those positions, e.g. the classes of one
    chunk: the same as ``apply(x, params.select(groups), group_sizes)``, without the selection).

    Differentiable w.r.t. ``x``; rows of groups whose operation is not used are passed through
    untouched (bitwise). Returns a new tensor. (A :class:`RowPlan` of one batch, applied once.)
    """
    plan = RowPlan(params, group_sizes, x.device, x.dtype, config, groups, x.shape[-2:])
    if plan.rows != x.shape[0]:
        raise ValueError(f"group_sizes sum to {plan.rows} but x has {x.shape[0]} rows")
    return plan.apply(x)


def augment(x: torch.Tensor, config: DSAConfig = DSAConfig(),
            generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Plain (non-siamese) DSA, as when training evaluation networks: one operation for the whole
    batch (DSA draws one per call), its parameters drawn independently for every image."""
    params = draw(x.shape[0], x.shape[-2:], config, generator)
    params.op[:] = params.op[0].clone()
    return apply(x, params, torch.ones(x.shape[0], dtype=torch.long), config)


class ZCA:
    """ZCA whitening with kornia's ``ZCAWhitening`` (eps 0.1, as DataDAM/DM use for CIFAR).

    ``fit`` on the training images, then ``__call__`` whitens and ``inverse`` undoes it (for viewing
    synthetic images). Images are ``(N, C, H, W)``.
    """

    def __init__(self, eps: float = 0.1):
        import kornia  # only needed with --zca

        self.eps = eps
        self._zca = kornia.enhance.ZCAWhitening(eps=eps, compute_inv=True)

    @torch.no_grad()
    def fit(self, images: torch.Tensor) -> "ZCA":
        self._zca.fit(images)
        return self

    @staticmethod
    @torch.no_grad()
    def moments(batches: Iterable[torch.Tensor], device: torch.device | str = "cpu"):
        """``(n, sum, outer)``: the image count, the float64 sum ``(D,)`` and the float64 sum of
        outer products ``(D, D)`` of ``(n, C, H, W)`` batches, ``D = C*H*W``. They add up over
        batches and processes, so the set never needs to be in one place. The images are taken as
        normalized (near zero mean), so the float64 sums lose nothing to cancellation. At 64x64x3 the
        outer sum is a 1.2 GB matrix (CIFAR: 75 MB)."""
        n, total, outer = 0, None, None
        for x in batches:
            x = x.to(device=device, dtype=torch.float64).reshape(x.shape[0], -1)
            if total is None:
                total = torch.zeros(x.shape[1], dtype=torch.float64, device=device)
                outer = torch.zeros((x.shape[1], x.shape[1]), dtype=torch.float64, device=device)
            total += x.sum(dim=0)
            outer.addmm_(x.t(), x)
            n += x.shape[0]
        return n, total, outer

    @torch.no_grad()
    def fit_moments(self, n: int, total: torch.Tensor, outer: torch.Tensor) -> "ZCA":
        """Fit from :meth:`moments` (summed over every batch and process): the transform kornia's
        ``fit`` forms on the whole set (unbiased covariance, SVD, ``U diag(1/sqrt(S + eps)) U^T``
        and its inverse), computed in float64 and kept in float32 like kornia's."""
        if n < 2:
            raise ValueError(f"ZCA needs at least two images to fit, got {n}")
        mean = total / n
        cov = (outer - n * torch.outer(mean, mean)) / (n - 1)
        U, S, _ = torch.linalg.svd(cov)
        S = S.reshape(-1, 1)
        z = self._zca
        z.mean_vector = mean.reshape(1, -1).to(torch.float32)
        z.transform_matrix = U.mm(torch.rsqrt(S + self.eps) * U.t()).to(torch.float32)
        z.transform_inv = U.mm(torch.sqrt(S + self.eps) * U.t()).to(torch.float32)
        z.fitted = True
        return self

    def fit_streamed(self, batches: Iterable[torch.Tensor], device: torch.device | str = "cpu") -> "ZCA":
        """Fit from ``(n, C, H, W)`` batches without holding the whole set (:meth:`moments`, then
        :meth:`fit_moments`)."""
        return self.fit_moments(*self.moments(batches, device))

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, batch: int = 10000) -> torch.Tensor:
        return torch.cat([self._zca(images[i:i + batch], include_fit=False)
                          for i in range(0, images.shape[0], batch)]) if images.shape[0] else images

    @torch.no_grad()
    def inverse(self, images: torch.Tensor) -> torch.Tensor:
        return self._zca.inverse_transform(images)

    def state_dict(self) -> dict:
        return {"eps": self.eps, "mean": self._zca.mean_vector, "transform": self._zca.transform_matrix,
                "inverse": self._zca.transform_inv}
