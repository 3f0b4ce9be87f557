"""One fused distillation step on the meta device: the proof that a GPU step never reads device
memory on the host. Data, labels and random draws stay on the host as in a GPU run; the network,
the real and synthetic images and the loss live on ``meta``, where a host read (``.item()``,
``int(t)``, ``bool(t)``, ``nonzero``) raises. The op counter (tests/_sync.py) also fails the test on
any such op that reaches a meta tensor."""

import numpy as np
import pytest
import torch

from atom_fast.distill import augment
from atom_fast.distill.loop import DistillConfig, Distiller
from atom_fast.distill.real import StoreImages

from _data import toy_images
from _sync import OpCounter

META = torch.device("meta")


class ToyStore:
    """The part of a prepared store that StoreImages reads: uint8 images by class, in memory."""

    def __init__(self, classes=3, per_class=20, size=12, channels=1, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.images = [torch.randint(0, 256, (per_class, channels, size, size), generator=g,
                                     dtype=torch.uint8) for _ in range(classes)]
        self.num_classes = classes
        self.image_shape = (channels, size, size)
        self.mean = [0.5] * channels
        self.std = [0.25] * channels

    def counts(self, split):
        return [len(x) for x in self.images]

    def gather(self, split, classes, positions, out):
        torch.cat([self.images[k][torch.as_tensor(p)] for k, p in zip(classes, positions)], out=out)
        return out


def meta_zca(store):
    """A ZCA fitted on the host on the store's normalized images, its matrices moved to meta."""
    x = torch.cat(store.images).float() / 255
    zca = augment.ZCA().fit((x - 0.5) / 0.25)
    z = zca._zca
    z.mean_vector, z.transform_matrix, z.transform_inv = (
        t.to(META) for t in (z.mean_vector, z.transform_matrix, z.transform_inv))
    return zca


def step_on_meta(method, dsa, zca, class_chunk, backend="native"):
    cfg = DistillConfig(method=method, ipc=1, batch_real=6, width=8, depth=3, dsa=dsa,
                        class_chunk=class_chunk, real_chunk=5, backend=backend, iterations=2)
    if zca:
        store = ToyStore()
        source = StoreImages(store, META, zca=meta_zca(store))
        d = Distiller(source, None, 3, cfg, META, prefetch=False)
    else:
        x, y = toy_images()
        d = Distiller(x, y, 3, cfg, META, prefetch=False)
    assert d.syn.device == META
    counter = OpCounter(META)
    with counter:
        loss = d.step(0)
    return d, loss, counter


@pytest.mark.parametrize("class_chunk", [None, 1])
@pytest.mark.parametrize("zca", [False, True])
@pytest.mark.parametrize("dsa", [False, True])
@pytest.mark.parametrize("method", ["dm", "datadam", "atom", "atom-channel"])
def test_a_fused_step_on_meta_reads_no_device_memory(method, dsa, zca, class_chunk):
    d, loss, counter = step_on_meta(method, dsa, zca, class_chunk)
    assert len(d.chunks) == (3 if class_chunk == 1 else 1)
    assert loss.device == META and loss.shape == ()
    assert counter.reads == []
    # the step did run: the network's convolutions and the optimizer's update were dispatched
    assert counter.ops["convolution"] > 0 and counter.ops["add_"] > 0


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_a_fused_step_on_meta_with_the_other_backends(backend):
    _, loss, counter = step_on_meta("atom", True, False, 1, backend=backend)
    assert loss.device == META and counter.reads == []


def test_the_detector_fails_on_a_device_read():
    """A step that reads its loss on the host is caught: meta raises, and the counter records it."""
    x, y = toy_images()
    d = Distiller(x, y, 3, DistillConfig(method="atom", ipc=1, batch_real=6, width=8, depth=3),
                  META, prefetch=False)
    counter = OpCounter(META)
    with counter, pytest.raises((RuntimeError, NotImplementedError)):
        d.step(0).item()
    assert counter.reads == ["_local_scalar_dense"]
    counter = OpCounter("cpu")
    with counter:
        np.asarray(torch.ones(2).nonzero())
    assert counter.reads == ["nonzero"]
