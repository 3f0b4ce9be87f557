"""Data shared by the tests: feature batches (post-ReLU-like real features, signed synthetic ones),
tiny datasets written in each on-disk format, and tiny in-memory image sets for the driver."""

import torch


def class_labels(num_classes, per_class, shuffle, generator=None):
    """Labels of ``num_classes * per_class`` samples: sorted blocks, or a random permutation of them."""
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    if shuffle:
        labels = labels[torch.randperm(labels.numel(), generator=generator)]
    return labels


def make_layers(shapes, num_real, num_syn, dtype, device, real_relu=True):
    """Real and synthetic features for each (C, H, W) in ``shapes``.

    Real features are ReLU'd (exact zeros, as in a ConvNet); synthetic ones keep their sign so the
    sgn(F) factor of the backward is exercised. Values are rounded to ``dtype`` once.
    """
    reals, syns = [], []
    for C, H, W in shapes:
        r = torch.randn(num_real, C, H, W, dtype=torch.float64) * 1.5
        s = torch.randn(num_syn, C, H, W, dtype=torch.float64) * 1.5
        reals.append((r.relu() if real_relu else r).to(dtype=dtype, device=device))
        syns.append(s.to(dtype=dtype, device=device))
    return reals, syns


def write_folder_dataset(root, classes=("cat", "dog", "fox"), train=8, test=3, size=8):
    """A tiny ImageFolder-style dataset (train/<class>/*.png, test/<class>/*.png) under ``root``:
    random 8x8 RGB images, one colour channel brightened per class so the classes are learnable."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("test", test)):
        for k, name in enumerate(classes):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(n):
                pix = rng.integers(0, 120, (size, size, 3)).astype(np.uint8)
                pix[..., k % 3] += 120
                Image.fromarray(pix).save(d / f"{i}.png")
    return root


def write_imagenet_npz(root, classes=3, per_class=4, size=8, batches=2, val_per_class=2,
                       compress=False, seed=0, map_file=False):
    """Tiny downsampled-ImageNet files in ``root``: ``train_data_batch_1..batches.npz`` and
    ``val_data.npz``, each with ``data`` (N, 3*size*size) uint8 channel-major rows and ``labels``
    (N,) class ids from 1, shuffled across classes as in the real files; the train files also carry
    ``mean``. ``compress`` writes deflated members (np.savez_compressed), else stored ones.
    ``map_file`` also writes a ``map_clsloc.txt``. Returns ``{"train": (images, labels), "test": ...}``
    with images ``(N, 3, size, size)`` uint8 in file order and 0-based labels."""
    import numpy as np

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    save = np.savez_compressed if compress else np.savez

    def draw(n_per_class):
        labels = np.repeat(np.arange(1, classes + 1), n_per_class)
        labels = labels[rng.permutation(labels.size)]
        data = rng.integers(0, 256, (labels.size, 3 * size * size), dtype=np.uint8)
        return data, labels

    data, labels = draw(per_class)
    parts = np.array_split(np.arange(labels.size), batches)
    for i, idx in enumerate(parts, 1):
        save(root / f"train_data_batch_{i}.npz", data=data[idx], labels=labels[idx].tolist(),
             mean=data.mean(axis=0))
    val_data, val_labels = draw(val_per_class)
    save(root / "val_data.npz", data=val_data, labels=val_labels.tolist())
    if map_file:
        (root / "map_clsloc.txt").write_text(
            "".join(f"n{k:08d} {k} name_{k}\n" for k in range(1, classes + 1)))
    return {"train": (data.reshape(-1, 3, size, size), labels - 1),
            "test": (val_data.reshape(-1, 3, size, size), val_labels - 1)}


def write_cifar(parent, cifar100=False, per_file=4, seed=0):
    """A tiny CIFAR copy (the python pickles) under ``parent``: ``cifar-10-batches-py/`` with five
    train batches of ``per_file`` images, or ``cifar-100-python/`` with one train file; 10 or 100
    classes, random rows and labels. Returns ``(root, train_rows, train_labels, test_rows,
    test_labels)``, rows ``(n, 3072)`` uint8 in file order."""
    import pickle

    import numpy as np

    rng = np.random.default_rng(seed)
    K, label_key = (100, b"fine_labels") if cifar100 else (10, b"labels")
    root = parent / ("cifar-100-python" if cifar100 else "cifar-10-batches-py")
    root.mkdir(parents=True)

    def dump(name, obj):
        with open(root / name, "wb") as f:
            pickle.dump(obj, f, protocol=2)

    train_names = ["train"] if cifar100 else [f"data_batch_{i}" for i in range(1, 6)]
    rows, labels = [], []
    for name in train_names:
        n = per_file * (5 if cifar100 else 1)
        r, y = rng.integers(0, 256, (n, 3072), dtype=np.uint8), rng.integers(0, K, n).tolist()
        dump(name, {b"data": r, label_key: y})
        rows.append(r)
        labels += y
    test_rows, test_labels = rng.integers(0, 256, (3, 3072), dtype=np.uint8), [1, 0, K - 1]
    dump("test" if cifar100 else "test_batch", {b"data": test_rows, label_key: test_labels})
    names = [f"c{i}".encode() for i in range(K)]
    dump("meta" if cifar100 else "batches.meta",
         {(b"fine_label_names" if cifar100 else b"label_names"): names})
    return root, np.concatenate(rows), np.array(labels), test_rows, np.array(test_labels)


def write_tinyimagenet(parent, wnids=("n01443537", "n01629819", "n01641577"), n_train=3, n_val=2, seed=0):
    """A tiny ``tiny-imagenet-200/`` under ``parent``: 64x64 JPEGs (one grayscale), ``wnids.txt``,
    ``words.txt`` naming the first class only, ``val/val_annotations.txt``. Returns its root."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    root = parent / "tiny-imagenet-200"
    (root / "val" / "images").mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (root / "words.txt").write_text(f"{wnids[0]}\tgoldfish\n")
    for i, w in enumerate(wnids):
        d = root / "train" / w / "images"
        d.mkdir(parents=True)
        for j in range(n_train):
            gray = (i, j) == (1, 0)
            pix = rng.integers(0, 256, (64, 64) if gray else (64, 64, 3), dtype=np.uint8)
            Image.fromarray(pix).save(d / f"{w}_{j}.JPEG", format="JPEG")
    lines = []
    for k in range(n_val * len(wnids)):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(
            root / "val" / "images" / f"val_{k}.JPEG", format="JPEG")
        lines.append(f"val_{k}.JPEG\t{wnids[k % len(wnids)]}\t0\t1\t62\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return root


def toy_images(classes=3, per_class=20, size=12, channels=1, seed=0, shift=0.5):
    """A tiny in-memory training set for the driver: ``classes * per_class`` Gaussian images whose
    mean grows by ``shift`` per class index, shuffled. Returns ``(images, labels)``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(classes * per_class, channels, size, size, generator=g)
    x += torch.arange(classes).repeat_interleave(per_class).view(-1, 1, 1, 1) * shift
    y = torch.arange(classes).repeat_interleave(per_class)
    perm = torch.randperm(len(y), generator=g)
    return x[perm], y[perm]


def toy_split(classes=3, per_class=30, size=8, channels=3, shift=1.0, seed=0):
    """Gaussian images whose mean grows by ``shift`` per class index, classes interleaved, split two
    thirds / one third. Returns ``(train_images, train_labels, test_images, test_labels)``."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(classes).repeat(per_class)
    x = torch.randn(len(y), channels, size, size, generator=g) + y.view(-1, 1, 1, 1) * shift
    return x[:2 * len(y) // 3], y[:2 * len(y) // 3], x[2 * len(y) // 3:], y[2 * len(y) // 3:]
