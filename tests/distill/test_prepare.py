"""`atom-fast prepare`: every dataset into a store equal to what load_dataset reads, streaming, atomic
writes, reuse, the store cache, and the command line."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from _data import write_cifar, write_folder_dataset, write_imagenet_npz, write_tinyimagenet
from atom_fast.distill import cli
from atom_fast.distill import data as D
from atom_fast.distill import prepare as P
from atom_fast.distill.data import imagenet as INET
from atom_fast.distill.store import Store, StoreError, StoreWriter

REPO = Path(__file__).resolve().parents[2]


def _silent(*a):
    pass


def _make(kind, tmp_path):
    """(dataset, data_path, image_size) of a tiny copy of ``kind`` under ``tmp_path``."""
    if kind in ("cifar10", "cifar100"):
        root, *_ = write_cifar(tmp_path, cifar100=kind == "cifar100", per_file=3)
        return kind, root.parent, None
    if kind == "tinyimagenet":
        return kind, write_tinyimagenet(tmp_path, n_train=3, n_val=1), None
    if kind == "folder":
        return kind, write_folder_dataset(tmp_path / "f", train=6, test=2, size=8), None
    if kind == "folder-resized":
        root = write_folder_dataset(tmp_path / "f", train=5, test=2, size=9)
        Image.fromarray(np.zeros((5, 7, 3), np.uint8)).save(root / "train" / "cat" / "odd.png")
        return "folder", root, 6
    if kind == "folder-gray":
        root = tmp_path / "g"
        rng = np.random.default_rng(1)
        for split, n in (("train", 4), ("test", 1)):
            for c in ("a", "b"):
                (root / split / c).mkdir(parents=True)
                for i in range(n):
                    Image.fromarray(rng.integers(0, 256, (5, 4), dtype=np.uint8), "L").save(
                        root / split / c / f"{i}.png")
        return "folder", root, None
    size, compress, map_file = {"imagenet64": (64, False, False), "imagenet32-deflated": (32, True, False),
                                "imagenet16-map": (16, False, True)}[kind]
    write_imagenet_npz(tmp_path / "inet", classes=3, per_class=4, size=size, batches=2,
                       compress=compress, map_file=map_file)
    return f"imagenet{size}", tmp_path / "inet", None


KINDS = ["cifar10", "cifar100", "tinyimagenet", "folder", "folder-resized", "folder-gray",
         "imagenet64", "imagenet32-deflated", "imagenet16-map"]


def _check_equal(store_path, ds, data_path_fingerprint=None):
    """The store holds, class by class and in source order, exactly the images of ``ds``."""
    store = Store.open(store_path)
    assert store.dataset == ds.name and store.class_names == ds.class_names
    assert store.image_shape == tuple(ds.train_images.shape[1:])
    assert store.mean == ds.mean and store.std == ds.std
    assert store.missing_test_classes == ds.missing_test_classes
    for split, images, labels in (("train", ds.train_images, ds.train_labels),
                                  ("test", ds.test_images, ds.test_labels)):
        labels = labels.numpy()
        assert store.counts(split) == np.bincount(labels, minlength=ds.num_classes).tolist()
        for k in range(ds.num_classes):
            # the loader's own normalization on the store's uint8: bit for bit the loaded images
            x = D._normalize(np.array(store.array(split, k)), store.mean, store.std)
            want = images[labels == k]
            assert x.shape == want.shape and bool((x == want).all()), (split, k)
    pixels = np.concatenate([np.asarray(store.array("train", k)) for k in range(store.num_classes)])
    f = pixels.astype(np.float64) / 255
    np.testing.assert_allclose(store.manifest["pixel_mean"], f.mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(store.manifest["pixel_std"], f.std(axis=(0, 2, 3)), rtol=1e-10)
    source = store.manifest["source"]
    assert source["path"] == ds.source and len(source["fingerprint"]) == 64
    return store


@pytest.mark.filterwarnings("ignore:folder dataset.*have no images in")
@pytest.mark.parametrize("kind", KINDS)
def test_prepare_equals_load_dataset(tmp_path, kind):
    name, data_path, image_size = _make(kind, tmp_path)
    out = tmp_path / "store"
    lines = []
    got = P.prepare(name, data_path, image_size=image_size, out=out, workers=2, log=lines.append,
                    progress=False)
    assert got == out.absolute()
    ds = D.load_dataset(name, data_path, image_size=image_size, log=_silent)
    store = _check_equal(out, ds)
    with D.open_source(name, data_path, image_size=image_size, log=_silent) as source:
        assert store.fingerprint == source.fingerprint()
        assert store.manifest["source"]["files"] == len(source.files)
        assert store.manifest["source"]["description"] == source.description
    assert store.manifest["source"].get("image_size") == image_size
    assert any(f"{name}: {ds.num_classes} classes" in line and "images/s" in line for line in lines)
    assert sorted(p.name for p in out.parent.glob(".store*")) == []


def test_prepare_mnist_from_the_package(tmp_path):
    out = P.prepare("mnist", out=tmp_path / "mnist", workers=1, log=_silent, progress=False)
    store = _check_equal(out, D.load_dataset("mnist"))
    assert sum(store.counts("train")) == 60000 and sum(store.counts("test")) == 10000
    assert store.manifest["source"]["files"] == 4


_PID_LOG = []  # set by the test below; the forked workers inherit it


def _decode_noting_the_pid(paths, *args):
    """decode_chunk, noting which process ran it (module level, so worker processes can run it)."""
    from atom_fast.distill.data.images import decode_chunk

    with open(_PID_LOG[0], "a") as f:
        f.write(f"{os.getpid()}\n")
    return decode_chunk(paths, *args)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="relies on forked workers")
def test_images_are_decoded_by_worker_processes(tmp_path, monkeypatch):
    from atom_fast.distill.data import folder

    root = write_folder_dataset(tmp_path / "f", train=20, test=2, size=8)
    _PID_LOG[:] = [tmp_path / "pids"]
    monkeypatch.setattr(folder, "decode_chunk", _decode_noting_the_pid)
    try:
        out = P.prepare("folder", root, out=tmp_path / "s", workers=2, log=_silent, progress=False)
    finally:
        _PID_LOG.clear()
        monkeypatch.undo()
    pids = {int(p) for p in (tmp_path / "pids").read_text().split()}
    assert pids and os.getpid() not in pids
    _check_equal(out, D.load_dataset("folder", root))


# ------------------------------------------------------------------------------------------------
# downsampled ImageNet: streamed in chunks, checked


@pytest.mark.parametrize("compress", [False, True])
def test_npz_rows_are_read_in_chunks(tmp_path, monkeypatch, compress):
    written = write_imagenet_npz(tmp_path, classes=3, per_class=7, size=16, batches=2, compress=compress)
    with D.open_source("imagenet16", tmp_path, log=_silent) as source:
        whole = [b.copy() for b in source.batches("train")]
    assert len(whole) == 2  # one batch per file at the default chunk size
    monkeypatch.setattr(INET, "CHUNK_BYTES", 3 * 3 * 16 * 16)  # three rows
    with D.open_source("imagenet16", tmp_path, log=_silent) as source:
        chunks = list(source.batches("train"))
        np.testing.assert_array_equal(source.labels("train"), written["train"][1])
    assert max(len(c) for c in chunks) == 3 and len(chunks) == 8  # 11 + 10 rows
    np.testing.assert_array_equal(np.concatenate(chunks), np.concatenate(whole))
    np.testing.assert_array_equal(np.concatenate(chunks), written["train"][0])
    out = P.prepare("imagenet16", tmp_path, out=tmp_path / "s", log=_silent, progress=False)
    _check_equal(out, D.load_dataset("imagenet16", tmp_path, log=_silent))


def test_prepare_memory_does_not_grow_with_the_data(tmp_path, monkeypatch):
    # 8000 images of 3x16x16: 6 MB of pixels, read in chunks of 64 rows (48 kB)
    write_imagenet_npz(tmp_path / "npz", classes=4, per_class=2000, size=16, batches=1, val_per_class=2,
                       compress=True)
    data_bytes = 8000 * 3 * 16 * 16
    monkeypatch.setattr(INET, "CHUNK_BYTES", 64 * 3 * 16 * 16)
    tracemalloc.start()
    try:
        P.prepare("imagenet16", tmp_path / "npz", out=tmp_path / "s", log=_silent, progress=False)
        _, peak = tracemalloc.get_traced_memory()
        # the check can fail: loading the data member whole is seen by the same measurement
        tracemalloc.reset_peak()
        with np.load(tmp_path / "npz" / "train_data_batch_1.npz") as z:
            z["data"]
        _, whole = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert whole >= data_bytes
    assert peak < data_bytes / 6, f"prepare held {peak / 1e6:.2f} MB for {data_bytes / 1e6:.1f} MB of pixels"
    assert sum(Store.open(tmp_path / "s").counts("train")) == 8000


def _bad_npz(path, **arrays):
    np.savez(path, **arrays)


@pytest.mark.parametrize("case, match", [
    ("label0", r"train_data_batch_2\.npz: class id 0 below 1"),
    ("size", r"train_data_batch_1\.npz holds 8x8 images .*imagenet16 needs 16x16"),
    ("mixed", r"train_data_batch_2\.npz holds 32x32 images .*use dataset imagenet32 for it"),
    ("dtype", r"train_data_batch_1\.npz: data must be \(N, 3\*S\*S\) uint8 rows, got int16"),
    ("count", r"val_data\.npz: 6 images but 5 labels"),
    ("nolabels", r"train_data_batch_1\.npz: no 'labels' array \(it holds \['data'\]\)"),
    ("notzip", r"val_data\.npz is not a readable \.npz file \(BadZipFile"),
    ("truncated", r"train_data_batch_1\.npz: the data array is truncated \(6 of 9 rows read\)"),
    ("absent", r"class ids \[2\] have no image in the train batches"),
    ("map", r"train_data_batch_\d\.npz: class id 3 above the 2 classes of .*map_clsloc\.txt"),
])
def test_npz_problems_are_one_line_naming_the_file(tmp_path, case, match):
    root = tmp_path / "inet"
    write_imagenet_npz(root, classes=3, per_class=2, size=16, batches=2)
    rows = np.zeros((3, 768), np.uint8)
    if case == "label0":
        _bad_npz(root / "train_data_batch_2.npz", data=rows, labels=[0, 1, 2])
    elif case == "size":
        _bad_npz(root / "train_data_batch_1.npz", data=np.zeros((3, 192), np.uint8), labels=[1, 2, 3])
    elif case == "mixed":
        _bad_npz(root / "train_data_batch_2.npz", data=np.zeros((3, 3072), np.uint8), labels=[1, 2, 3])
    elif case == "dtype":
        _bad_npz(root / "train_data_batch_1.npz", data=rows.astype(np.int16), labels=[1, 2, 3])
    elif case == "count":
        _bad_npz(root / "val_data.npz", data=np.zeros((6, 768), np.uint8), labels=[1, 2, 3, 1, 2])
    elif case == "nolabels":
        _bad_npz(root / "train_data_batch_1.npz", data=rows)
    elif case == "notzip":
        (root / "val_data.npz").write_bytes(b"PK\x03\x04 not really")
    elif case == "truncated":
        # a data member whose header promises 9 rows and holds 6
        header = P_npy_header((9, 768))
        with zipfile.ZipFile(root / "train_data_batch_1.npz", "w") as z:
            z.writestr("data.npy", header + bytes(6 * 768))
            z.writestr("labels.npy", _npy_bytes(np.arange(9) % 3 + 1))
    elif case == "absent":
        for i in (1, 2):
            _bad_npz(root / f"train_data_batch_{i}.npz", data=rows, labels=[1, 3, 3])
    elif case == "map":
        (root / "map_clsloc.txt").write_text("n01 1 tench\nn02 2 goldfish\n")
    for load in (lambda: D.load_dataset("imagenet16", root, log=_silent),
                 lambda: P.prepare("imagenet16", root, out=tmp_path / "s", log=_silent, progress=False)):
        with pytest.raises(D.DatasetFileError, match=match) as e:
            load()
        assert "\n" not in str(e.value)
        assert not (tmp_path / "s").exists() and not list(tmp_path.glob(".s.partial-*"))


def P_npy_header(shape):
    from atom_fast.distill.store import _npy_header

    return _npy_header(shape)


def _npy_bytes(a):
    import io

    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def test_npz_files_found_or_not(tmp_path):
    root = tmp_path / "inet"
    root.mkdir()
    with pytest.raises(D.DatasetNotFoundError, match=r"imagenet64: no train_data_batch_<n>\.npz in"):
        D.load_dataset("imagenet64", root)
    write_imagenet_npz(root, classes=2, per_class=3, size=16, batches=3)
    (root / "val_data.npz").unlink()
    with pytest.raises(D.DatasetNotFoundError, match=r"val_data\.npz not found"):
        P.prepare("imagenet16", root, out=tmp_path / "s", log=_silent, progress=False)
    with pytest.raises(ValueError, match="data_path is required for dataset 'imagenet32'"):
        D.load_dataset("imagenet32")
    with pytest.raises(ValueError, match="image_size=32 is not supported for dataset 'imagenet16'"):
        D.load_dataset("imagenet16", root, image_size=32)
    # a subset of the train batches is read, in numeric order, and said so
    write_imagenet_npz(root, classes=2, per_class=3, size=16, batches=3)
    (root / "train_data_batch_2.npz").unlink()
    (root / "train_data_batch_1.npz").rename(root / "train_data_batch_10.npz")
    lines = []
    with D.open_source("imagenet16", root, log=lines.append) as source:
        assert [p.name for p in source.files[:2]] == ["train_data_batch_3.npz", "train_data_batch_10.npz"]
        assert "3, 10" in source.description
        assert not lines  # finding the files reads none; the note comes with reading them
        assert len(source.labels("train")) == 4
    assert any("reading train batches 3, 10 of" in line for line in lines)


# ------------------------------------------------------------------------------------------------
# atomic: a failed or killed prepare leaves nothing that reads as a store


def _no_leftovers(out):
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.*")), list(out.parent.iterdir())


@pytest.mark.parametrize("workers", [1, 2])
def test_a_bad_image_is_the_loaders_error_and_leaves_nothing(tmp_path, workers):
    root = write_folder_dataset(tmp_path / "f", train=20, test=2, size=8)
    bad = root / "train" / "dog" / "7.png"
    good = bad.read_bytes()
    bad.write_bytes(good[: len(good) // 2])
    with pytest.raises(D.DatasetFileError) as loaded:
        D.load_dataset("folder", root)
    out = tmp_path / "s"
    with pytest.raises(D.DatasetFileError) as prepared:
        P.prepare("folder", root, out=out, workers=workers, log=_silent, progress=False)
    assert str(prepared.value) == str(loaded.value)
    assert str(bad) in str(prepared.value) and "\n" not in str(prepared.value)
    _no_leftovers(out)
    # TinyImageNet's 64x64 rule, raised in a worker process
    tiny = write_tinyimagenet(tmp_path / "t", n_train=2, n_val=1)
    odd = tiny / "train" / "n01629819" / "images" / "n01629819_1.JPEG"
    Image.new("RGB", (32, 32)).save(odd, format="JPEG")
    with pytest.raises(D.DatasetFileError, match=r"n01629819_1\.JPEG is 32x32 .*TinyImageNet images are 64x64"):
        P.prepare("tinyimagenet", tiny, out=out, workers=workers, log=_silent, progress=False)
    _no_leftovers(out)


def test_a_writer_error_leaves_nothing_and_keeps_the_old_store(tmp_path, monkeypatch):
    root = write_folder_dataset(tmp_path / "f", train=6, test=2, size=8)
    out = tmp_path / "s"
    calls = []
    real = StoreWriter.write

    def failing(self, *a):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(self, *a)

    monkeypatch.setattr(StoreWriter, "write", failing)
    with pytest.raises(OSError, match="No space left"):
        P.prepare("folder", root, out=out, workers=2, log=_silent, progress=False)
    _no_leftovers(out)
    # over an existing store of another source, with --overwrite: the old one survives the failure
    monkeypatch.setattr(StoreWriter, "write", real)
    inet = tmp_path / "inet"
    write_imagenet_npz(inet, classes=2, per_class=3, size=16, batches=1)
    P.prepare("imagenet16", inet, out=out, log=_silent, progress=False)
    calls.clear()
    monkeypatch.setattr(StoreWriter, "write", failing)
    with pytest.raises(OSError):
        P.prepare("folder", root, out=out, workers=1, overwrite=True, log=_silent, progress=False)
    assert Store.open(out).dataset == "imagenet16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f", "inet", "s"]


KILL_SCRIPT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from atom_fast.distill import prepare as P
    from atom_fast.distill.store import StoreWriter

    real = StoreWriter.write
    def slow(self, *a):
        real(self, *a)
        Path(sys.argv[3]).write_text("written")  # one batch is in the partial folder
        time.sleep(60)
    StoreWriter.write = slow
    P.prepare("folder", sys.argv[1], out=sys.argv[2], workers=2, progress=False)
""")


def test_a_killed_prepare_is_cleaned_and_completed_by_the_next(tmp_path):
    root = write_folder_dataset(tmp_path / "f", train=30, test=2, size=8)
    out, marker = tmp_path / "s", tmp_path / "marker"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(root), str(out), str(marker)],
                            env=env, start_new_session=True, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "the prepare never wrote a batch"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the job and its decoding workers, as a scheduler does
        proc.wait()
        proc.stderr.close()
    partial = list(tmp_path.glob(".s.partial-*"))
    assert len(partial) == 1 and partial[0].name == f".s.partial-{proc.pid}"
    assert not out.exists()
    with pytest.raises(StoreError, match=r"only a half-written one .*\.s\.partial-.*re-run `atom-fast prepare`"):
        Store.open(out)
    lines = []
    P.prepare("folder", root, out=out, workers=2, log=lines.append, progress=False)
    assert any(f"removed {partial[0]}, left by a prepare (pid {proc.pid})" in line for line in lines)
    assert not list(tmp_path.glob(".s.partial-*"))
    _check_equal(out, D.load_dataset("folder", root))


def test_a_running_prepares_partial_folder_is_left_alone(tmp_path):
    root = write_folder_dataset(tmp_path / "f", train=3, test=1, size=8)
    alive = tmp_path / f".s.partial-{os.getppid()}"
    alive.mkdir()
    lines = []
    P.prepare("folder", root, out=tmp_path / "s", workers=1, log=lines.append, progress=False)
    assert alive.is_dir() and any("still running" in line for line in lines)


# ------------------------------------------------------------------------------------------------
# reuse, another source, overwrite


def _mtimes(path):
    return {p: p.stat().st_mtime_ns for p in sorted(path.rglob("*"))}


def test_reuse_and_changed_source(tmp_path):
    root = write_folder_dataset(tmp_path / "f", train=4, test=2, size=8)
    out = tmp_path / "s"
    P.prepare("folder", root, out=out, workers=1, log=_silent, progress=False)
    before = _mtimes(out)
    fingerprint = Store.open(out).fingerprint
    lines = []
    assert P.prepare("folder", root, out=out, workers=1, log=lines.append, progress=False) == out
    assert any("already holds this folder store" in line and "reused, not rebuilt" in line for line in lines)
    assert _mtimes(out) == before
    # the same files resized is another store
    with pytest.raises(ValueError, match=r"another source \(image size None, not 8\).*--overwrite"):
        P.prepare("folder", root, out=out, image_size=8, log=_silent, progress=False)
    # one image's date changes: another fingerprint, so another source
    img = root / "train" / "cat" / "0.png"
    stamp = img.stat().st_mtime + 5
    os.utime(img, (stamp, stamp))
    with pytest.raises(ValueError, match=r"holds a store of another source .*files changed.*--overwrite.*--out"):
        P.prepare("folder", root, out=out, log=_silent, progress=False)
    assert _mtimes(out) == before
    P.prepare("folder", root, out=out, workers=1, overwrite=True, log=_silent, progress=False)
    assert Store.open(out).fingerprint not in ("", fingerprint)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f", "s"]
    # a store of the same source that cannot be used is not silently replaced
    (out / "test" / "00000.npy").unlink()
    with pytest.raises(StoreError, match=r"cannot be used .*00000\.npy is missing.*--overwrite"):
        P.prepare("folder", root, out=out, log=_silent, progress=False)


def test_out_must_be_a_store_or_new(tmp_path):
    root = write_folder_dataset(tmp_path / "f", train=3, test=1, size=8)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"file exists and is a file, not a store folder"):
        P.prepare("folder", root, out=tmp_path / "file", log=_silent, progress=False)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(ValueError, match=r"other exists and is not an atom-fast store"):
            P.prepare("folder", root, out=tmp_path / "other", overwrite=overwrite, log=_silent,
                      progress=False)
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
    (tmp_path / "empty").mkdir()
    P.prepare("folder", root, out=tmp_path / "empty", workers=1, log=_silent, progress=False)
    assert Store.open(tmp_path / "empty").dataset == "folder"
    with pytest.raises(TypeError, match="out"):
        P.prepare("folder", root, out=None)
    with pytest.raises(ValueError, match="workers"):
        P.prepare("folder", root, out=tmp_path / "x", workers=0)


def test_fingerprint_is_a_listing(tmp_path):
    root = write_folder_dataset(tmp_path / "f", train=2, test=1, size=8)
    with D.open_source("folder", root, log=_silent) as a:
        fp = a.fingerprint()
    assert a._info is None  # nothing was read to compute it
    moved = tmp_path / "moved"
    os.rename(root, moved)
    with D.open_source("folder", moved, log=_silent) as b:
        assert b.fingerprint() == fp  # names are relative: a moved copy keeps it
    (moved / "train" / "cat" / "0.png").unlink()
    with D.open_source("folder", moved, log=_silent) as c:
        assert c.fingerprint() != fp


# ------------------------------------------------------------------------------------------------
# the store cache


def test_cached_store(tmp_path, monkeypatch):
    assert "ATOM_FAST_CACHE" in os.environ  # tests never write into the home folder
    monkeypatch.setenv("ATOM_FAST_CACHE", str(tmp_path / "cache"))
    inet = tmp_path / "inet"
    write_imagenet_npz(inet, classes=2, per_class=3, size=16, batches=1)
    lines = []
    path = P.cached_store("imagenet16", inet, log=lines.append, progress=False)
    with D.open_source("imagenet16", inet, log=_silent) as source:
        fp = source.fingerprint()
    assert path == tmp_path / "cache" / "stores" / f"imagenet16-{fp[:16]}"
    assert any("no prepared store" in line and "preparing" in line for line in lines)
    _check_equal(path, D.load_dataset("imagenet16", inet, log=_silent))
    before = _mtimes(path)
    lines.clear()
    assert P.cached_store("imagenet16", inet, log=lines.append) == path
    assert lines == [f"imagenet16: using the prepared store {path}"]
    assert _mtimes(path) == before
    # a damaged cached store is prepared again
    (path / "train" / "00001.npy").unlink()
    lines.clear()
    assert P.cached_store("imagenet16", inet, log=lines.append, progress=False) == path
    assert any("cannot be used" in line for line in lines) and Store.open(path)
    # a resized folder: its size is in the name; a changed file is another store
    root = write_folder_dataset(tmp_path / "f", train=2, test=1, size=9)
    a = P.cached_store("folder", root, image_size=6, log=_silent, workers=1, progress=False)
    assert a.name.startswith("folder-6-") and Store.open(a).image_shape == (3, 6, 6)
    os.utime(root / "test" / "cat" / "0.png", (1, 1))
    b = P.cached_store("folder", root, image_size=6, log=_silent, workers=1, progress=False)
    assert b != a and b.parent == a.parent
    assert P.cache_root() == tmp_path / "cache" / "stores"
    monkeypatch.delenv("ATOM_FAST_CACHE")
    assert P.cache_root() == Path("~/.cache/atom-fast/stores").expanduser()


def test_cached_store_written_meanwhile_by_another_process(tmp_path, monkeypatch):
    monkeypatch.setenv("ATOM_FAST_CACHE", str(tmp_path / "cache"))
    inet = tmp_path / "inet"
    write_imagenet_npz(inet, classes=2, per_class=3, size=16, batches=1)
    ready = P.prepare("imagenet16", inet, out=tmp_path / "ready", log=_silent, progress=False)
    real = StoreWriter.commit

    def other_first(self, *, replace=False):
        # another rank commits the same store between this one's check and its commit
        shutil.copytree(ready, self.out)
        return real(self, replace=replace)

    monkeypatch.setattr(StoreWriter, "commit", other_first)
    lines = []
    path = P.cached_store("imagenet16", inet, log=lines.append, progress=False)
    assert any("written meanwhile by another process" in line for line in lines)
    assert Store.open(path) and not list(path.parent.glob(".*"))


# ------------------------------------------------------------------------------------------------
# the command line


def test_cli(tmp_path, capsys):
    root = write_folder_dataset(tmp_path / "f", train=3, test=1, size=8)
    out = tmp_path / "s"
    args = ["prepare", "--dataset", "folder", "--data-path", str(root), "--out", str(out),
            "--workers", "2", "--no-progress"]
    assert cli.main(args) == 0
    stdout = capsys.readouterr().out.splitlines()
    assert stdout[0] == str(out) and len(stdout) == 2
    assert "folder: 3 classes, 9 train + 3 test images of 3x8x8" in stdout[1]
    assert "images/s, 2 decoding worker processes" in stdout[1]
    assert cli.main(args) == 0
    captured = capsys.readouterr()
    assert "already holds this folder store" in captured.err and captured.out.splitlines()[1].endswith("reused")
    # errors: one line, exit status 1
    for bad, what in ((["--data-path", str(tmp_path / "nowhere")], "does not exist"),
                      (["--image-size", "5"], "holds a store of another source")):
        assert cli.main(args + bad) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("atom-fast: error: ") and what in err[0], err
    assert cli.main(["prepare", "--dataset", "cifar10", "--data-path", str(root), "--out", str(out)]) == 1
    assert "cifar-10-batches-py" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_as_a_command(tmp_path):
    inet = tmp_path / "inet"
    write_imagenet_npz(inet, classes=2, per_class=3, size=32, batches=1)
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "atom_fast.distill", "prepare", "--dataset", "imagenet32",
           "--data-path", str(inet), "--out", str(tmp_path / "s")]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == str(tmp_path / "s")
    assert "img" in r.stderr  # the progress bar
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["dataset"] == "imagenet32" and manifest["class_names"] == ["class_0000", "class_0001"]
    r = subprocess.run(cmd[:-1] + [str(inet / "train_data_batch_1.npz")], env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.startswith("atom-fast: error: ") and r.stderr.count("\n") == 1
