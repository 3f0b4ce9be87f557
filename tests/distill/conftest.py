"""Fixtures of the ``atom-fast evaluate`` tests (test_cli_evaluate.py, test_artifacts.py): a 32x32
folder dataset, a set saved as another program saves it, and the command scored on that dataset."""

import pytest
import torch

from atom_fast.distill import cli

from _data import write_folder_dataset


@pytest.fixture(scope="module")
def folder32(tmp_path_factory):
    # 32x32 so that every architecture (LeNet, AlexNet, VGG, ResNet, ViT) can take the images
    return write_folder_dataset(tmp_path_factory.mktemp("folder32"), train=6, test=3, size=32)


@pytest.fixture(scope="module")
def plain_set(folder32, tmp_path_factory):
    """A set written by 'another program': a plain {images, labels} dict, normalized like the loader."""
    from atom_fast.distill.data import load_dataset

    data = load_dataset("folder", str(folder32))
    idx = torch.tensor([0, 1, 6, 7, 12, 13])  # 2 per class, as the loader orders train/ images
    path = tmp_path_factory.mktemp("set") / "images_best.pt"
    torch.save({"images": data.train_images[idx].clone(), "labels": data.train_labels[idx].clone()},
               path)
    return path


@pytest.fixture
def evaluate_cli(folder32):
    """``atom-fast evaluate PATH`` scored on folder32 with 2 models of 2 epochs:
    ``evaluate_cli(path, out, *extra)`` -> the exit status."""
    def run(path, out, *extra):
        return cli.main(["evaluate", str(path), "--dataset", "folder", "--data-path", str(folder32),
                         "--eval-models", "2", "--eval-epochs", "2", "--out", str(out), *extra])
    return run
