"""The prepared store: writer and reader round trip, exact statistics, and every bad store as one
line naming the file and saying to re-run `atom-fast prepare`."""

import json
import os

import numpy as np
import pytest
import torch

from atom_fast.distill import store as S
from atom_fast.distill.store import Store, StoreError, StoreWriter, channel_histogram, stats_from_histogram

SHAPE = (3, 4, 5)


def _data(rng, n, K, shape=SHAPE):
    labels = rng.integers(0, K, n)
    return rng.integers(0, 256, (n,) + shape, dtype=np.uint8), labels


def _write(out, rng, K=4, n_train=37, n_test=9, normalization=((0.5, 0.4, 0.3), (0.2, 0.25, 0.3)),
           batch=5, missing=()):
    """A store of random images written in shuffled batches; returns the written data."""
    data = {"train": _data(rng, n_train, K), "test": _data(rng, n_test, K)}
    counts = {s: np.bincount(data[s][1], minlength=K).tolist() for s in S.SPLITS}
    w = StoreWriter(out, dataset="folder", class_names=[f"c{k}" for k in range(K)], image_shape=SHAPE,
                    counts=counts, normalization=normalization,
                    source={"path": "/x", "description": "test", "fingerprint": "f" * 64, "files": 3},
                    missing_test_classes=missing)
    for s in S.SPLITS:
        images, labels = data[s]
        for i in range(0, len(labels), batch):
            w.write(s, images[i:i + batch], labels[i:i + batch])
    w.commit()
    return data


def _float64_stats(pixels):
    f = pixels.astype(np.float64) / 255
    return f.mean(axis=(0, 2, 3)), f.std(axis=(0, 2, 3))


def test_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    out = tmp_path / "store"
    data = _write(out, rng)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]  # no partial folder left
    store = Store.open(out)
    assert store.dataset == "folder" and store.class_names == ["c0", "c1", "c2", "c3"]
    assert store.image_shape == SHAPE and store.num_classes == 4
    assert store.mean == (0.5, 0.4, 0.3) and store.std == (0.2, 0.25, 0.3)
    assert store.fingerprint == "f" * 64
    for s in S.SPLITS:
        images, labels = data[s]
        assert store.counts(s) == np.bincount(labels, minlength=4).tolist()
        for k in range(4):
            a = store.array(s, k)
            assert a.dtype == np.uint8 and not a.flags.writeable
            np.testing.assert_array_equal(a, images[labels == k])  # source order within the class
        order = np.argsort(labels, kind="stable")
        x, y = store.read_split(s)
        np.testing.assert_array_equal(x, images[order])
        np.testing.assert_array_equal(y, labels[order])
        assert torch.equal(store.labels(s), torch.from_numpy(labels[order]))
        got = [(b.numpy(), l.numpy()) for b, l in store.batches(s, batch=2)]
        assert max(len(b) for b, _ in got) <= 2
        np.testing.assert_array_equal(np.concatenate([b for b, _ in got]), images[order])
    # gather: chosen positions within chosen classes, class-major, into a given buffer
    images, labels = data["train"]
    out_buf = torch.empty((3,) + SHAPE, dtype=torch.uint8)
    g = store.gather("train", [2, 0], [[1, 0], [0]], out=out_buf)
    assert g is out_buf
    np.testing.assert_array_equal(g.numpy(), np.stack([images[labels == 2][1], images[labels == 2][0],
                                                       images[labels == 0][0]]))
    # the training split's statistics, exact against float64
    mean, std = _float64_stats(images)
    np.testing.assert_allclose(store.manifest["pixel_mean"], mean, rtol=1e-12)
    np.testing.assert_allclose(store.manifest["pixel_std"], std, rtol=1e-10)


def test_classes_are_mapped_lazily(tmp_path):
    _write(tmp_path / "s", np.random.default_rng(1))
    store = Store.open(tmp_path / "s", classes=[1])
    assert store.opened == set()
    store.array("train", 1)
    store.array("test", 3)
    assert store.opened == {("train", 1), ("test", 3)}


def test_normalization_from_the_pixels(tmp_path):
    data = _write(tmp_path / "s", np.random.default_rng(2), normalization=None, missing=["c3"])
    store = Store.open(tmp_path / "s")
    mean, std = _float64_stats(data["train"][0])
    np.testing.assert_allclose(store.mean, mean, rtol=1e-12)
    np.testing.assert_allclose(store.std, std, rtol=1e-10)
    assert store.mean == tuple(store.manifest["pixel_mean"])
    assert store.missing_test_classes == ["c3"]


def test_histogram_statistics():
    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, (50, 2, 7, 3), dtype=np.uint8)
    x[:, 1] = 77  # a constant channel is left unscaled
    hist = channel_histogram(x)
    assert hist.dtype == np.int64 and hist.shape == (2, 256) and hist.sum() == x.size
    # batching does not change the counts (exact integers)
    assert np.array_equal(channel_histogram(x[:13]) + channel_histogram(x[13:]), hist)
    mean, std = stats_from_histogram(hist)
    m, s = _float64_stats(x)
    np.testing.assert_allclose(mean, m, rtol=1e-12)
    assert abs(std[0] - s[0]) < 1e-12 and std[1] == 1.0
    with pytest.raises(TypeError, match="uint8"):
        channel_histogram(x.astype(np.int16))


def test_writer_checks_and_abort(tmp_path):
    out = tmp_path / "s"
    w = StoreWriter(out, dataset="folder", class_names=["a", "b"], image_shape=SHAPE,
                    counts={"train": [1, 1], "test": [0, 1]}, normalization=None, source={})
    x = np.zeros((2,) + SHAPE, np.uint8)
    with pytest.raises(ValueError, match="more images than the 1 counted"):
        w.write("train", x, [0, 0])
    with pytest.raises(ValueError, match="uint8"):
        w.write("train", x.astype(np.float32), [0, 1])
    with pytest.raises(ValueError, match="label 5"):
        w.write("test", x[:1], [5])
    w.write("train", x[:1], [1])
    with pytest.raises(ValueError, match="fewer images than counted"):
        w.commit()
    assert w.tmp.is_dir() and not out.exists()
    w.abort()
    assert list(tmp_path.iterdir()) == []


def test_commit_replaces_only_when_asked(tmp_path):
    rng = np.random.default_rng(4)
    out = tmp_path / "s"
    _write(out, rng)
    with pytest.raises(FileExistsError):
        _write(out, rng)
    # the failed commit leaves its partial folder to the caller (prepare aborts it); the store stays
    assert Store.open(out)
    for p in tmp_path.glob(".s.partial-*"):
        import shutil

        shutil.rmtree(p)
    w = StoreWriter(out, dataset="mnist", class_names=["a"], image_shape=SHAPE,
                    counts={"train": [1], "test": [0]}, normalization=None, source={})
    w.write("train", np.full((1,) + SHAPE, 9, np.uint8), [0])
    w.commit(replace=True)
    assert Store.open(out).dataset == "mnist"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


# ------------------------------------------------------------------------------------------------
# bad stores: one line naming the file, saying to re-run `atom-fast prepare`


def _manifest(out):
    return json.loads((out / "manifest.json").read_text())


def _set_manifest(out, **changes):
    m = _manifest(out)
    m.update(changes)
    (out / "manifest.json").write_text(json.dumps(m))


def _expect(out, names, **kw):
    with pytest.raises(StoreError) as e:
        Store.open(out, **kw)
    msg = str(e.value)
    assert "\n" not in msg and "atom-fast prepare" in msg, msg
    assert str(names) in msg, msg
    return msg


@pytest.fixture
def good(tmp_path):
    out = tmp_path / "s"
    _write(out, np.random.default_rng(5))
    return out


def test_truncated_class_file(good):
    p = S.class_file(good, "train", 1)
    size = p.stat().st_size
    os.truncate(p, size - 7)  # a few bytes short: the header check says so
    assert "truncated" in _expect(good, p)
    os.truncate(p, size // 2)  # half: the size check says so, before any header is read
    assert "is truncated" in _expect(good, p, classes=[])


def test_class_file_one_byte_long(good):
    p = S.class_file(good, "test", 2)
    with open(p, "ab") as f:
        f.write(b"\0")
    assert "truncated or overwritten" in _expect(good, p)


def test_missing_class_file(good):
    p = S.class_file(good, "test", 3)
    p.unlink()
    assert "is missing (class 3 of 4, test split)" in _expect(good, p)


def test_manifest_counts_disagree_with_the_files(good):
    m = _manifest(good)
    counts = m["splits"]["train"]["counts"]
    more = dict(m["splits"], train={"counts": [counts[0] + 1] + counts[1:]})
    _set_manifest(good, splits=more)
    _expect(good, S.class_file(good, "train", 0))
    fewer = dict(m["splits"], train={"counts": [counts[0] - 1] + counts[1:]})
    _set_manifest(good, splits=fewer)
    assert "the manifest says uint8" in _expect(good, S.class_file(good, "train", 0))
    _set_manifest(good, splits=dict(m["splits"], test={"counts": [1, 2]}))
    _expect(good, good / "manifest.json")


def test_manifest_shape_and_dtype_disagree(good):
    _set_manifest(good, image_shape=[3, 5, 4])  # same bytes per image, another shape
    assert "the manifest says uint8" in _expect(good, S.class_file(good, "train", 0))
    _set_manifest(good, image_shape=list(SHAPE), dtype="float32")
    assert "uint8" in _expect(good, good / "manifest.json")


def test_class_file_of_another_dtype(good):
    m = _manifest(good)
    n = m["splits"]["train"]["counts"][2]
    p = S.class_file(good, "train", 2)
    np.save(p, np.zeros((n,) + SHAPE, np.float32))
    assert "holds float32" in _expect(good, p)
    # a store opened for other classes maps this one only when asked, and then says so
    store = Store.open(good, classes=[0])
    with pytest.raises(StoreError, match="holds float32"):
        store.array("train", 2)


def test_another_format_version(good):
    _set_manifest(good, format_version=2)
    assert "store format version 2, this atom-fast reads version 1" in _expect(good, good / "manifest.json")


def test_half_written_store(tmp_path):
    (tmp_path / ".s.partial-12345" / "train").mkdir(parents=True)
    msg = _expect(tmp_path / "s", tmp_path / "s")
    assert "half-written" in msg and ".s.partial-12345" in msg


def test_folder_without_manifest(good, tmp_path):
    (good / "manifest.json").unlink()
    assert "not a complete store" in _expect(good, good / "manifest.json")
    assert "not found" in _expect(tmp_path / "nowhere", tmp_path / "nowhere")


def test_garbled_manifest(good):
    (good / "manifest.json").write_text("{not json")
    assert "not readable JSON" in _expect(good, good / "manifest.json")
    (good / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    assert "not an atom-fast store manifest" in _expect(good, good / "manifest.json")
    m = {"format": "atom-fast-store", "format_version": 1, "dtype": "uint8"}
    (good / "manifest.json").write_text(json.dumps(m))
    assert "lacks or garbles" in _expect(good, good / "manifest.json")


def test_a_bad_class_file_is_named_once(good):
    p = S.class_file(good, "train", 0)
    os.truncate(p, 10)
    msg = _expect(good, p)
    assert msg.count(str(p)) == 1
