"""Feature batches shared by the tests: post-ReLU-like real features, signed synthetic ones."""

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
