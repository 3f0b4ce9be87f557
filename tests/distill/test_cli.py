"""``atom-fast`` end to end on a tiny folder dataset (atom_fast/distill/cli.py and the distill
pipeline, pipelines.py): every output file, ZCA, every method, resume after an interruption, the
non-finite stops, and one-line errors."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from atom_fast.backends import resolve_backend
from atom_fast.distill import cli
from atom_fast.distill.loop import Distiller, class_pools, random_indices
from atom_fast.distill.output import render_grid



def _cli(folder, out, *extra):
    args = ["--dataset", "folder", "--data-path", str(folder), "--ipc", "2", "--batch-real", "4",
            "--width", "8", "--iterations", "6", "--eval-models", "2", "--eval-epochs", "4",
            "--checkpoint-every", "2", "--log-every", "1", "--no-progress", "--out", str(out), *extra]
    return cli.main(args)


def test_cli_smoke_run_writes_everything(folder, tmp_path, capsys):
    assert _cli(folder, tmp_path / "run") == 0
    table = capsys.readouterr().out
    assert "| atom | folder | 2 | 6 |" in table and "| random | folder | 2 | - |" in table
    r = json.loads((tmp_path / "run" / "results.json").read_text())
    for key in ("dataset", "method", "ipc", "iterations", "accuracy_mean", "accuracy_std",
                "accuracies", "config", "timings", "versions", "baseline"):
        assert key in r, key
    assert (r["dataset"], r["method"], r["ipc"], r["iterations"]) == ("folder", "atom", 2, 6)
    assert len(r["accuracies"]) == 2 and r["accuracy_mean"] == pytest.approx(np.mean(r["accuracies"]))
    assert r["config"]["lr_img"] == 1.0 and r["config"]["task_balance"] == 0.01
    assert r["config"]["zca"] is False  # ZCA is on by default for CIFAR only
    assert r["config"]["backend"] == "auto" and r["loss_backend"] == resolve_backend("auto", torch.device("cpu"))
    assert r["architectures"]["convnet"]["network"] == {"width": 8, "depth": 3, "norm": "instancenorm"}
    assert r["versions"]["torch"] == torch.__version__ and r["timings"]["distill_s"] > 0
    assert [i for i, _ in r["losses"]] == list(range(1, 7))
    syn = torch.load(tmp_path / "run" / "synthetic.pt")
    assert syn["images"].shape == (6, 3, 8, 8) and syn["labels"].tolist() == [0, 0, 1, 1, 2, 2]
    png = Image.open(tmp_path / "run" / "synthetic.png")
    assert png.size == render_grid(syn["images"].clamp(0, 1), syn["labels"], 3,
                                   ["cat", "dog", "fox"]).size and png.mode == "RGB"
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert ckpt["iteration"] == 6


def test_cli_zca_run_saves_the_transform_and_undoes_it_for_the_png(folder, tmp_path):
    assert _cli(folder, tmp_path / "zca", "--zca", "--no-baseline", "--iterations", "0") == 0
    r = json.loads((tmp_path / "zca" / "results.json").read_text())
    assert r["config"]["zca"] is True
    syn = torch.load(tmp_path / "zca" / "synthetic.pt")
    assert set(syn["zca"]) >= {"mean", "transform", "inverse"}
    # at iteration 0 the synthetic set is the whitened initial real images: the PNG shows the originals
    from atom_fast.distill.data import load_dataset
    data = load_dataset("folder", str(folder))
    idx = random_indices(class_pools(data.train_labels, 3), 2, 0)
    want = render_grid(data.denormalize(data.train_images[idx]), data.train_labels[idx], 3,
                       data.class_names)
    want = torch.from_numpy(np.array(want)).permute(2, 0, 1).float() / 255
    png = torch.from_numpy(np.array(Image.open(tmp_path / "zca" / "synthetic.png"))).permute(2, 0, 1)
    assert (png.float() - want * 255).abs().max() <= 1.5
    white = syn["images"]
    assert not torch.allclose(white, data.train_images[idx], atol=0.1)  # it really was whitened


@pytest.mark.parametrize("method", ["random", "dm", "datadam", "atom-channel"])
def test_cli_methods(folder, tmp_path, method):
    extra = ["--method", method, "--no-baseline", "--iterations", "2"]
    if method == "datadam":
        extra += ["--loop", "datadam"]
    assert _cli(folder, tmp_path / method, *extra) == 0
    r = json.loads((tmp_path / method / "results.json").read_text())
    assert r["method"] == method and r["baseline"] is None
    assert (r["loss_backend"] is None) == (method in ("random", "dm"))
    assert r["iterations"] == (0 if method == "random" else 2)


def test_cli_resume_after_interruption_matches_uninterrupted(folder, tmp_path, monkeypatch):
    assert _cli(folder, tmp_path / "straight", "--no-baseline") == 0
    real_step = Distiller.step

    def dying_step(self, iteration):
        if iteration == 5:
            raise KeyboardInterrupt
        return real_step(self, iteration)

    monkeypatch.setattr(Distiller, "step", dying_step)
    assert _cli(folder, tmp_path / "resumed", "--no-baseline") == 130
    ckpt = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=False)
    assert ckpt["iteration"] == 4
    assert not (tmp_path / "resumed" / "results.json").exists()
    monkeypatch.setattr(Distiller, "step", real_step)
    assert _cli(folder, tmp_path / "resumed", "--no-baseline", "--resume") == 0
    a = torch.load(tmp_path / "straight" / "synthetic.pt")["images"]
    b = torch.load(tmp_path / "resumed" / "synthetic.pt")["images"]
    assert torch.equal(a, b)
    ra = json.loads((tmp_path / "straight" / "results.json").read_text())
    rb = json.loads((tmp_path / "resumed" / "results.json").read_text())
    assert ra["losses"] == rb["losses"] and ra["accuracies"] == rb["accuracies"]
    # resuming with different settings is refused; the learning rate may change
    assert _cli(folder, tmp_path / "resumed", "--no-baseline", "--resume", "--ipc", "3") == 1
    assert _cli(folder, tmp_path / "resumed", "--no-baseline", "--resume", "--batch-real", "3") == 1
    assert _cli(folder, tmp_path / "resumed", "--no-baseline", "--resume", "--lr-img", "0.5",
                "--iterations", "7") == 0
    assert torch.load(tmp_path / "resumed" / "checkpoint.pt")["iteration"] == 7
    # a run past the checkpoint's end is refused; a fresh run in the same --out is refused unless
    # it says --overwrite, and then starts afresh
    assert _cli(folder, tmp_path / "resumed", "--no-baseline", "--resume", "--iterations", "5") == 1
    assert _cli(folder, tmp_path / "resumed", "--no-baseline", "--iterations", "1") == 1
    assert torch.load(tmp_path / "resumed" / "checkpoint.pt")["iteration"] == 7
    assert _cli(folder, tmp_path / "resumed", "--no-baseline", "--iterations", "1",
                "--overwrite") == 0
    assert torch.load(tmp_path / "resumed" / "checkpoint.pt")["iteration"] == 1


def test_cli_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(folder, tmp_path, monkeypatch,
                                                                       capsys):
    real_step = Distiller.step

    def nan_step(self, iteration):
        loss = real_step(self, iteration)
        if iteration == 4:  # the 5th iteration: its loss (and its update) are bad
            with torch.no_grad():
                self.syn.fill_(float("nan"))
            return loss * float("nan")
        return loss

    monkeypatch.setattr(Distiller, "step", nan_step)
    assert _cli(folder, tmp_path / "bad", "--no-baseline") == 1
    err = capsys.readouterr().err
    assert "nan at iteration 5" in err and "checkpoint.pt (iteration 4)" in err
    ckpt = torch.load(tmp_path / "bad" / "checkpoint.pt", weights_only=False)
    assert ckpt["iteration"] == 4 and torch.isfinite(ckpt["distiller"]["syn"]).all()
    assert not (tmp_path / "bad" / "results.json").exists()


def test_cli_non_finite_images_with_a_finite_loss_are_caught_at_the_checkpoint(folder, tmp_path,
                                                                               monkeypatch, capsys):
    real_step = Distiller.step

    def blow_up(self, iteration):
        loss = real_step(self, iteration)
        if iteration == 3:  # the 4th update overflows; its loss (measured before it) is finite
            with torch.no_grad():
                self.syn[0, 0, 0, 0] = float("inf")
        return loss

    monkeypatch.setattr(Distiller, "step", blow_up)
    assert _cli(folder, tmp_path / "inf", "--no-baseline", "--log-every", "2") == 1
    err = capsys.readouterr().err
    assert "non-finite values at iteration 4" in err and "checkpoint.pt (iteration 2)" in err
    ckpt = torch.load(tmp_path / "inf" / "checkpoint.pt")
    assert ckpt["iteration"] == 2 and torch.isfinite(ckpt["distiller"]["syn"]).all()


def test_cli_errors(folder, tmp_path, capsys):
    assert _cli(folder, tmp_path / "e1", "--ipc", "0") == 1
    assert "--ipc must be >= 1" in capsys.readouterr().err
    assert cli.main(["--dataset", "cifar10", "--data-path", str(tmp_path / "nothing"),
                     "--out", str(tmp_path / "e2")]) == 1
    assert "cifar-10-python.tar.gz" in capsys.readouterr().err
    assert _cli(folder, tmp_path / "e3", "--batch-real", "9") == 1
    assert "lower --batch-real" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["--method", "dc"])
    help_text = cli.build_parser().format_help()
    for flag in ("--dataset", "--data-path", "--method", "--ipc", "--iterations", "--batch-real",
                 "--lr-img", "--spatial-power", "--channel-power", "--task-balance", "--zca",
                 "--no-zca", "--dsa", "--no-dsa", "--eval-models", "--eval-epochs", "--seed",
                 "--device", "--out", "--resume", "--overwrite", "--loop", "--real-chunk",
                 "--dist-timeout"):
        assert flag in help_text, flag
