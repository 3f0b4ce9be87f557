"""The real training images a distillation samples from: in memory, or read from a prepared store.

A :class:`Distiller` asks for the images of one iteration in two steps, so the slow one can run ahead
in a background thread:

* ``fetch(classes, positions)``: the sampled images of the owned classes (``positions[i]`` are
  indices *within* class ``classes[i]``), class-major, as raw rows: for a store, a uint8 host tensor
  gathered from the memory-mapped class files (into a pinned buffer when the device is CUDA); in
  memory, only the row indices.
* ``convert(raw, start, stop)``: rows ``start:stop`` of that batch as float32 on the device,
  normalized ``(x / 255 - mean) / std`` per channel and ZCA-whitened when a transform is set.

Both sources give the same floats for the same draws (the store path converts with the same
operations, in the same order, as the in-memory loader; whitening a batch instead of the whole set
can change the last bits of a matrix product): a run does not depend on where its images came from.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from atom_fast.distill.data.common import denormalize
from atom_fast.layout import on_device


def class_rows(labels: torch.Tensor, num_classes: int) -> List[torch.Tensor]:
    """The row indices (CPU int64, in order) of every class's images in a labelled tensor."""
    labels = labels.cpu()
    return [torch.nonzero(labels == k).flatten() for k in range(num_classes)]


class MemoryImages:
    """Normalized float images held whole on the device (``(N, C, H, W)``, already whitened if
    wanted) with their ``(N,)`` labels: class ``k``'s images are the rows whose label is ``k``, in
    their order."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, num_classes: int,
                 device: torch.device):
        self.images = images.to(device)
        self.device = torch.device(device)
        self.num_classes = num_classes
        self.image_shape = tuple(self.images.shape[1:])
        self.rows = class_rows(labels, num_classes)
        self.counts = [len(r) for r in self.rows]

    def fetch(self, classes: Sequence[int], positions: Sequence[torch.Tensor]) -> torch.Tensor:
        """The dataset rows of the sampled images, class-major, on the device."""
        rows = torch.cat([self.rows[k][p] for k, p in zip(classes, positions)])
        return on_device(rows, self.device)

    def convert(self, raw: torch.Tensor, start: int = 0, stop: Optional[int] = None) -> torch.Tensor:
        return self.images.index_select(0, raw[start:stop])

    def nbytes(self) -> int:
        return self.images.numel() * self.images.element_size()


class StoreImages:
    """The training split of a prepared store (:class:`atom_fast.distill.store.Store`), read by
    class from its memory-mapped files; nothing is held but the batch being used.

    ``zca`` (an :class:`atom_fast.distill.augment.ZCA`, or None) whitens every converted batch.
    """

    def __init__(self, store, device: torch.device, zca=None, split: str = "train"):
        self.store = store
        self.split = split
        self.device = torch.device(device)
        self.zca = zca
        self.num_classes = store.num_classes
        self.image_shape = tuple(store.image_shape)
        self.counts = store.counts(split)
        C = self.image_shape[0]
        self._mean = torch.tensor(store.mean, dtype=torch.float32, device=self.device).view(1, C, 1, 1)
        self._std = torch.tensor(store.std, dtype=torch.float32, device=self.device).view(1, C, 1, 1)
        self._pin = self.device.type == "cuda"

    def fetch(self, classes: Sequence[int], positions: Sequence[torch.Tensor]) -> torch.Tensor:
        total = sum(len(p) for p in positions)
        out = torch.empty((total,) + self.image_shape, dtype=torch.uint8, pin_memory=self._pin)
        return self.store.gather(self.split, classes, [p.numpy() for p in positions], out=out)

    def convert(self, raw: torch.Tensor, start: int = 0, stop: Optional[int] = None) -> torch.Tensor:
        x = raw[start:stop].to(self.device, non_blocking=True).to(torch.float32)
        return normalize_(x, self._mean, self._std, self.zca)

    def nbytes(self) -> int:
        return 0


def normalize_(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, zca=None) -> torch.Tensor:
    """``(x / 255 - mean) / std`` in place on float pixels ``x`` (the loaders' exact operations), then
    the ZCA transform if given."""
    x.div_(255.0)
    x.sub_(mean)
    x.div_(std)
    return zca(x) if zca is not None else x


# ------------------------------------------------------------------------------------------------
# a run's data: what the CLI distills and evaluates, in memory or from a store


class TensorTestSet:
    """A test split held as tensors (``images`` normalized, whitened if wanted)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def image_shape(self):
        return tuple(self.images.shape[1:])

    def batches(self, batch_size: int):
        for i in range(0, len(self), batch_size):
            yield self.images[i:i + batch_size], self.labels[i:i + batch_size]


class StoreTestSet:
    """A store's test split, converted batch by batch on ``device`` each time it is read: memory
    holds one batch, whatever the split's size. A split whose float32 copy is at most
    ``keep_bytes`` is converted once and kept (CIFAR's 10000 test images: 123 MB), since a test
    pass then costs no whitening."""

    def __init__(self, store, device, zca=None, keep_bytes: int = 512 * 2 ** 20):
        self.store, self.device = store, torch.device(device)
        self._images = StoreImages(store, device, zca, split="test")  # its convert, for batches
        self._kept = None
        if len(self) * 4 * int(torch.tensor(store.image_shape).prod()) <= keep_bytes:
            self._kept = TensorTestSet(*self._convert_all())

    def __len__(self) -> int:
        return sum(self.store.counts("test"))

    @property
    def image_shape(self):
        return tuple(self.store.image_shape)

    def _convert_all(self):
        xs, ys = zip(*self._stream(4096))
        return torch.cat(xs), torch.cat(ys)

    def _stream(self, batch_size: int):
        for x, y in self.store.batches("test", batch_size):
            yield self._images.convert(x), y.to(self.device)

    def batches(self, batch_size: int):
        if self._kept is not None:
            return self._kept.batches(batch_size)
        return self._stream(batch_size)


class RunData:
    """What a run knows of its dataset, wherever the images are: its name, classes, image shape,
    normalization, where it was read and the training images per class. ``zca`` is the fitted
    transform once :meth:`fit_zca` ran (None before)."""

    in_memory: bool

    def __init__(self, name, class_names, mean, std, source, missing_test_classes, image_shape,
                 train_counts):
        self.name = name
        self.class_names = list(class_names)
        self.mean, self.std = tuple(mean), tuple(std)
        self.source = source
        self.missing_test_classes = list(missing_test_classes)
        self.image_shape = tuple(image_shape)
        self.train_counts = [int(n) for n in train_counts]
        self.zca = None

    num_classes = property(lambda self: len(self.class_names))
    channels = property(lambda self: self.image_shape[0])
    im_size = property(lambda self: tuple(self.image_shape[1:]))

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        return denormalize(x, self.mean, self.std, self.name)


class MemoryData(RunData):
    """A loaded :class:`atom_fast.distill.data.Dataset` (both splits as float tensors) seen through
    the interface the run uses; ZCA whitens both splits once, in place."""

    in_memory = True

    def __init__(self, dataset):
        self.dataset = dataset
        super().__init__(dataset.name, dataset.class_names, dataset.mean, dataset.std, dataset.source,
                         dataset.missing_test_classes, dataset.train_images.shape[1:],
                         torch.bincount(dataset.train_labels, minlength=len(dataset.class_names)))

    def describe(self) -> str:
        d = self.dataset
        return f"{tuple(d.train_images.shape)} train, {tuple(d.test_images.shape)} test, in memory"

    def fit_zca(self, device, ctx=None):
        """Fit ZCA (kornia, on the whole normalized training split) and whiten both splits."""
        from atom_fast.distill.augment import ZCA

        d = self.dataset
        self.zca = ZCA().fit(d.train_images.to(device))
        d.train_images = self.zca(d.train_images.to(device)).cpu()
        d.test_images = self.zca(d.test_images.to(device)).cpu()
        return self.zca

    def train_source(self, device, classes=None) -> MemoryImages:
        return MemoryImages(self.dataset.train_images, self.dataset.train_labels, self.num_classes, device)

    def train_images(self, classes: Sequence[int], positions: Sequence[torch.Tensor]) -> torch.Tensor:
        """Float training images (CPU) at ``positions`` within each of ``classes``, class-major."""
        rows = class_rows(self.dataset.train_labels, self.num_classes)
        return self.dataset.train_images[torch.cat([rows[k][p] for k, p in zip(classes, positions)])]

    def test_set(self, device) -> TensorTestSet:
        return TensorTestSet(self.dataset.test_images.to(device), self.dataset.test_labels.to(device))

    def train_classes_read(self) -> None:
        return None  # everything is in memory

    def full_train(self):
        return self.dataset.train_images, self.dataset.train_labels


class StoreData(RunData):
    """A prepared store (:class:`atom_fast.distill.store.Store`) seen through the same interface:
    nothing is loaded; the Distiller, the baseline and the evaluation read what they use."""

    in_memory = False

    def __init__(self, store):
        self.store = store
        source = f"{store.root.resolve()} (store of {store.manifest['source'].get('path', '?')})"
        super().__init__(store.dataset, store.class_names, store.mean, store.std, source,
                         store.missing_test_classes, store.image_shape, store.counts("train"))

    def describe(self) -> str:
        return (f"{sum(self.train_counts)} train, {sum(self.store.counts('test'))} test images of "
                f"{self.image_shape}, store {self.store.root}")

    def _normalized_train(self, device, classes, batch: int = 4096):
        images = StoreImages(self.store, device)  # no ZCA: these batches fit it
        for x, _ in self.store.batches("train", batch, classes):
            yield images.convert(x)

    def fit_zca(self, device, ctx=None):
        """Fit ZCA from float64 moments of the normalized training split, streamed (the transform
        kornia's fit gives on the whole split, without holding it). Under torchrun each process
        reads its own classes and the moments are summed over the processes. Every batch read
        afterwards is whitened."""
        from atom_fast.distill import distributed as dist
        from atom_fast.distill.augment import ZCA

        ctx = ctx or dist.Context()
        own = list(ctx.classes(self.num_classes))
        n, total, outer = ZCA.moments(self._normalized_train(device, own), device)
        count = torch.tensor([float(n)], dtype=torch.float64, device=device)
        for t in (count, total, outer):
            dist.all_reduce_sum(ctx, t, "summing the ZCA moments")
        self.zca = ZCA().fit_moments(int(count.item()), total, outer)
        return self.zca

    def train_source(self, device, classes=None) -> StoreImages:
        if classes is not None:
            self.store.check_classes("train", classes)
        return StoreImages(self.store, device, self.zca)

    def train_images(self, classes: Sequence[int], positions: Sequence[torch.Tensor]) -> torch.Tensor:
        src = StoreImages(self.store, "cpu", self.zca)
        return src.convert(src.fetch(classes, positions))

    def test_set(self, device) -> StoreTestSet:
        return StoreTestSet(self.store, device, self.zca)

    def train_classes_read(self) -> dict:
        """Which classes' training files this process has mapped: what the store recorded, and
        what the kernel's map of this process shows (``/proc/self/maps``; None where it cannot be
        read)."""
        root = str((self.store.root / "train").resolve()) + os.sep
        mapped = None
        try:
            with open("/proc/self/maps") as f:
                mapped = sorted({int(Path(line.split(None, 5)[5].strip()).stem) for line in f
                                 if len(line.split(None, 5)) == 6
                                 and line.split(None, 5)[5].strip().startswith(root)})
        except (OSError, ValueError):
            mapped = None
        opened = sorted(k for split, k in self.store.opened if split == "train")
        return {"opened": opened, "mapped": mapped}

    def full_train(self):
        """The whole training split as float tensors (only for the full-data accuracy of --score)."""
        xs = [self.train_images([k], [torch.arange(n)]) for k, n in enumerate(self.train_counts)]
        return torch.cat(xs), self.store.labels("train")
