"""Distilling from a prepared store gives the images of the in-memory path, and each process reads
only its own classes.

Tiny uint8 datasets are written with ``StoreWriter`` and, beside them, normalized in memory with the
loaders' operations; a Distiller over each must make the same synthetic images for every method,
with and without ZCA and DSA, in one process and with the classes split as two processes split
them. The CLI runs check the same through ``--store`` and under ``torchrun``.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from atom_fast.distill.augment import ZCA
from atom_fast.distill.data import Dataset
from atom_fast.distill.distributed import shard_classes
from atom_fast.distill.loop import DistillConfig, Distiller
from atom_fast.distill.real import MemoryData, StoreData, normalize_
from atom_fast.distill.store import Store, StoreWriter

from _procs import child_env

MEAN, STD = (0.45, 0.5, 0.55), (0.2, 0.25, 0.3)


def _pixels(classes, per_class, size, seed):
    """uint8 images whose class shows in one channel, labels shuffled (a source's order)."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.repeat(np.arange(classes), per_class))
    x = rng.integers(0, 160, (len(labels), 3, size, size)).astype(np.uint8)
    x[np.arange(len(labels)), labels % 3] += 90
    return x, labels


def _normalized(x):
    t = torch.from_numpy(x).to(torch.float32)
    return normalize_(t, torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1))


def make_pair(root, classes=4, per_class=12, test=3, size=8):
    """The same tiny dataset as a store under ``root`` and as an in-memory Dataset."""
    (xtr, ytr), (xte, yte) = _pixels(classes, per_class, size, 0), _pixels(classes, test, size, 1)
    names = [f"c{k}" for k in range(classes)]
    w = StoreWriter(root, dataset="folder", class_names=names, image_shape=(3, size, size),
                    counts={"train": np.bincount(ytr), "test": np.bincount(yte)},
                    normalization=(MEAN, STD), source={"path": "generated", "fingerprint": "test"})
    w.write("train", xtr[:20], ytr[:20])
    w.write("train", xtr[20:], ytr[20:])
    w.write("test", xte, yte)
    w.commit()
    mem = Dataset("folder", _normalized(xtr), torch.from_numpy(ytr).long(), _normalized(xte),
                  torch.from_numpy(yte).long(), names, MEAN, STD)
    return Store.open(root), mem


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return make_pair(tmp_path_factory.mktemp("pair") / "store")


def _distill(data, config, classes=None, steps=3):
    d = Distiller(data.train_source("cpu", classes), None, data.num_classes, config, "cpu",
                  classes=classes)
    try:
        for i in range(steps):
            d.step(i)
    finally:
        d.close()
    return d.syn.detach().clone()


@pytest.mark.parametrize("zca", [False, True], ids=["no-zca", "zca"])
@pytest.mark.parametrize("dsa", [False, True], ids=["no-dsa", "dsa"])
@pytest.mark.parametrize("method", ["dm", "datadam", "atom", "atom-channel"])
def test_a_store_gives_the_images_of_the_in_memory_path(pair, method, dsa, zca):
    store, mem = pair
    config = DistillConfig(method=method, ipc=2, batch_real=5, width=8, depth=2, dsa=dsa,
                           real_chunk=7, iterations=3)
    memory = MemoryData(Dataset(**{f: getattr(mem, f) for f in mem.__dataclass_fields__}))
    stored = StoreData(store)
    if zca:
        # the in-memory path whitens the whole split once; the store path whitens each batch it
        # reads, with the same transform (the streamed fit is checked against kornia's below)
        stored.zca = memory.fit_zca("cpu")
    want = _distill(memory, config)
    got = _distill(stored, config)
    # two processes: each owns half of the classes and reads only those
    halves = [_distill(stored, config, classes=list(shard_classes(4, 2, r))) for r in range(2)]
    # float rounding, relative to the images' scale (whitened pixels reach ~10)
    tol = 1e-5 * float(want.abs().max())
    if zca:  # a matrix product of a batch instead of the whole split: last-bit differences
        torch.testing.assert_close(got, want, rtol=1e-5, atol=tol)
    else:
        assert torch.equal(got, want)
    # the class sums of a split run add up in another order
    torch.testing.assert_close(torch.cat(halves), got, rtol=1e-5, atol=tol)


def test_the_store_path_holds_no_training_split_in_memory(pair):
    store, _ = pair
    d = Distiller(StoreData(store).train_source("cpu"), None, 4,
                  DistillConfig(method="atom", ipc=1, batch_real=4, width=8, depth=2), "cpu")
    d.close()
    assert d.real.nbytes() == 0
    assert not hasattr(d.real, "images")


def test_prefetch_fetches_the_next_iteration_in_the_background(pair):
    store, _ = pair
    config = DistillConfig(method="atom", ipc=1, batch_real=4, width=8, depth=2, iterations=4)
    d = Distiller(StoreData(store).train_source("cpu"), None, 4, config, "cpu")
    calls = []
    fetch = d.real.fetch
    d.real.fetch = lambda classes, positions: calls.append(len(calls)) or fetch(classes, positions)
    try:
        d.step(0)
        assert d._next is not None and d._next[0] == 1  # iteration 1 is on its way
        d.step(1)
        d.step(3)  # out of order (a resumed run): fetched on the spot, the prefetched one dropped
        assert d._next is None  # the last iteration: nothing to fetch ahead
    finally:
        d.close()
    # 0 on the spot, 1 ahead, 2 ahead (dropped), 3 on the spot
    assert len(calls) == 4


def test_streamed_zca_agrees_with_kornia():
    # 3x16x16 keeps the SVDs quick; bench/store_table.py checks CIFAR's 3x32x32
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3000, 3, 16, 16, generator=g)
    x = (torch.nn.functional.avg_pool2d(x, 3, 1, 1) - 0.5) / 0.25  # correlated neighbouring pixels
    whole = ZCA().fit(x).state_dict()
    streamed = ZCA().fit_streamed(x[i:i + 700] for i in range(0, len(x), 700)).state_dict()
    for key in ("mean", "transform", "inverse"):
        a, b = whole[key], streamed[key]
        assert b.dtype == a.dtype and b.shape == a.shape
        rel = float((a - b).norm() / a.norm())
        assert rel <= 1e-4, (key, rel)


def test_streamed_zca_needs_two_images():
    with pytest.raises(ValueError, match="at least two images"):
        ZCA().fit_streamed([torch.zeros(1, 1, 2, 2)])


# -- the CLI ------------------------------------------------------------------------------------------

CLI = ["--ipc", "2", "--batch-real", "5", "--width", "8", "--iterations", "3", "--no-progress",
       "--log-every", "1", "--dist-timeout", "60", "--eval-models", "0", "--zca"]


def _run(*args, nproc=1):
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] if nproc > 1 else []
    return subprocess.run([sys.executable, *launcher, "-m", "atom_fast.distill", *args],
                          capture_output=True, text=True, env=child_env(), timeout=600)


@pytest.mark.slow
def test_cli_from_a_store_in_one_and_two_processes(tmp_path):
    store, _ = make_pair(tmp_path / "store")
    one = _run("--store", str(tmp_path / "store"), *CLI, "--out", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr[-3000:]
    two = _run("--store", str(tmp_path / "store"), *CLI, "--out", str(tmp_path / "two"), nproc=2)
    assert two.returncode == 0, two.stderr[-3000:]
    a = torch.load(tmp_path / "one" / "synthetic.pt")
    b = torch.load(tmp_path / "two" / "synthetic.pt")
    torch.testing.assert_close(b["images"], a["images"], rtol=1e-5, atol=1e-5)
    assert set(a["zca"]) >= {"mean", "transform", "inverse"}
    r1 = json.loads((tmp_path / "one" / "results.json").read_text())
    r2 = json.loads((tmp_path / "two" / "results.json").read_text())
    assert r1["evaluation"] is None and "accuracy_mean" not in r1  # --eval-models 0
    assert r1["dataset"] == "folder" and r1["data_source"].startswith(str((tmp_path / "store").resolve()))
    assert r1["train_classes_read_per_rank"] == [{"opened": [0, 1, 2, 3], "mapped": [0, 1, 2, 3]}]
    # each rank mapped the training files of its own classes and of no other
    assert r2["train_classes_read_per_rank"] == [{"opened": [0, 1], "mapped": [0, 1]},
                                                 {"opened": [2, 3], "mapped": [2, 3]}]
    assert "atom-fast evaluate" in one.stdout


def test_cli_refuses_a_damaged_store_before_distilling(tmp_path):
    make_pair(tmp_path / "store")
    os.truncate(tmp_path / "store" / "train" / "00002.npy", 200)
    res = _run("--store", str(tmp_path / "store"), *CLI, "--out", str(tmp_path / "out"))
    assert res.returncode == 1
    lines = [x for x in res.stderr.splitlines() if x.startswith("atom-fast: error:")]
    assert len(lines) == 1, res.stderr
    assert "00002.npy" in lines[0] and "atom-fast prepare" in lines[0]
    assert not (tmp_path / "out").exists()


def test_evaluate_a_saved_set_against_a_store(tmp_path, capsys):
    from atom_fast.distill import cli

    make_pair(tmp_path / "store")
    assert cli.main(["--store", str(tmp_path / "store"), *CLI, "--out", str(tmp_path / "run")]) == 0
    assert cli.main(["evaluate", str(tmp_path / "run" / "synthetic.pt"), "--store", str(tmp_path / "store"),
                     "--width", "8", "--eval-models", "1", "--eval-epochs", "2",
                     "--out", str(tmp_path / "eval")]) == 0
    r = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert r["dataset"] == "folder" and r["zca"] is True  # the set's file says it was whitened
    assert 0 <= r["accuracy_mean"] <= 100 and r["baseline"] is not None
    # the store holds another dataset than the file names: one line, before anything runs
    syn = torch.load(tmp_path / "run" / "synthetic.pt")
    syn["dataset"] = "cifar10"
    torch.save(syn, tmp_path / "other.pt")
    capsys.readouterr()
    assert cli.main(["evaluate", str(tmp_path / "other.pt"), "--store", str(tmp_path / "store"),
                     "--out", str(tmp_path / "eval2")]) == 1
    err = capsys.readouterr().err
    assert "holds folder, not cifar10" in err and "Traceback" not in err
