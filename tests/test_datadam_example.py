"""examples/datadam_style.py: the DataDAM-style loop runs, and the atom_fast change gives the same loop."""

import importlib.util
from pathlib import Path

import pytest
import torch

from atom_fast.distill.data import DatasetNotFoundError, load_dataset

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "datadam_style.py"


@pytest.fixture(scope="module")
def example():
    try:
        load_dataset("mnist", None)
    except DatasetNotFoundError as e:
        pytest.skip(f"MNIST not installed: {e}")
    spec = importlib.util.spec_from_file_location("datadam_style", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield module
    torch.set_num_threads(threads)


def test_two_iterations_with_either_loss_give_the_same_images(example, capsys):
    args = ["--iterations", "2", "--batch-real", "4", "--width", "16", "--eval-epochs", "0"]
    before = example.main([*args, "--iterations", "0"])["images"]
    datadam = example.main([*args, "--loss", "datadam"])
    fast = example.main([*args, "--loss", "atom_fast"])
    assert "iter    1" in capsys.readouterr().out
    assert len(datadam["losses"]) == 2
    assert datadam["losses"] == pytest.approx(fast["losses"], rel=1e-5)
    torch.testing.assert_close(fast["images"], datadam["images"], rtol=1e-4, atol=1e-5)
    assert (datadam["images"] - before).abs().max() > 1e-3  # the pixels moved
    assert datadam["labels"].tolist() == list(range(10))


def test_the_evaluation_at_the_end(example):
    r = example.main(["--iterations", "1", "--batch-real", "2", "--width", "8", "--eval-epochs", "2",
                      "--loss", "atom_fast"])
    assert 0 <= r["accuracy"] <= 100
