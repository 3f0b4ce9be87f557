"""The dataset registry: name -> :class:`Format`, the one place that knows which formats exist.

A format entry says how to read the dataset (``make_source``, the format module's reader), what its
``data_path`` holds and where to get it, its native image size (None: any size, resized on request),
its normalization constants (None: computed from the train pixels) and whether the driver whitens it
(ZCA) by default. Adding a format is one module with a ``make_source`` (see
:class:`~atom_fast.distill.data.common.Source`) and one entry here; :data:`DATASETS`,
:func:`~atom_fast.distill.data.load_dataset` and ``atom-fast prepare`` follow from the entries.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Dict, Optional

from atom_fast.distill.data import cifar, folder, imagenet, mnist, tinyimagenet
from atom_fast.distill.data.common import Normalization, Source


@dataclass(frozen=True)
class Format:
    """One registered dataset format."""

    name: str
    title: str  # what it is, in words
    make_source: Callable[..., Source]  # (path, *, image_size, log, workers, allow_missing_test_classes)
    expects: str  # what data_path holds, and where to get it (for the errors about data_path)
    native_size: Optional[int]  # square size of its images; None: any, resized with image_size
    normalization: Optional[Normalization]  # (mean, std) in [0, 1] units; None: from the train pixels
    zca: bool = False  # the driver ZCA-whitens it unless told otherwise
    requires_data_path: Optional[str] = None  # set: data_path is required; the text says what it holds
    # decoded whole into memory by the driver's default path (small sets); False: meant to be
    # distilled from a prepared store (too large to hold as float32)
    in_memory: bool = True


_FORMATS = (
    Format("mnist", "MNIST", mnist.make_source,
           "the four MNIST idx files (train-images-idx3-ubyte, ...), from " + mnist.MNIST_URL,
           28, (mnist.MNIST_MEAN, mnist.MNIST_STD)),
    Format("cifar10", "CIFAR-10", functools.partial(cifar.make_source, cifar100=False),
           "cifar-10-batches-py/ or its parent, extracted from " + cifar.CIFAR10_URL,
           32, (cifar.CIFAR10_MEAN, cifar.CIFAR10_STD), zca=True),
    Format("cifar100", "CIFAR-100", functools.partial(cifar.make_source, cifar100=True),
           "cifar-100-python/ or its parent, extracted from " + cifar.CIFAR100_URL,
           32, (cifar.CIFAR100_MEAN, cifar.CIFAR100_STD), zca=True),
    Format("tinyimagenet", "TinyImageNet", tinyimagenet.make_source,
           "tiny-imagenet-200/ or its parent, extracted from " + tinyimagenet.TINY_URL,
           64, (tinyimagenet.TINY_MEAN, tinyimagenet.TINY_STD)),
    Format("folder", "image folder", folder.make_source,
           "train/<class>/ and test/<class>/ (or val/<class>/) image folders",
           None, None, requires_data_path="a folder with train/<class>/ and test/<class>/"),
) + tuple(
    Format(f"imagenet{s}", f"downsampled ImageNet {s}x{s}",
           functools.partial(imagenet.make_source, size=s),
           f"train_data_batch_<n>.npz and val_data.npz of downsampled ImageNet {s}x{s}, from "
           + imagenet.IMAGENET_URL,
           s, (imagenet.IMAGENET_MEAN, imagenet.IMAGENET_STD),
           requires_data_path=f"the folder with train_data_batch_<n>.npz and val_data.npz",
           in_memory=False)
    for s in imagenet.IMAGENET_SIZES
)

FORMATS: Dict[str, Format] = {f.name: f for f in _FORMATS}

# every registered name, in registry order
ALL_DATASETS = tuple(FORMATS)
# the names the driver decodes into memory by default (ImageNet-sized sets are read from a store)
DATASETS = tuple(name for name, f in FORMATS.items() if f.in_memory)
