"""``atom-fast evaluate PATH`` and evaluation on several architectures (issue 15): a set saved by
another program in the plain tensor format, every architecture trains on it, results.json holds
every figure (per architecture, both accuracy conventions, the baseline, the label-robust score),
and bad input is one line."""

import json

import pytest
import torch

from atom_fast.distill import cli

from _data import write_folder_dataset


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    # 32x32 so that every architecture (LeNet, AlexNet, VGG, ResNet, ViT) can take the images
    return write_folder_dataset(tmp_path_factory.mktemp("folder32"), train=6, test=3, size=32)


@pytest.fixture(scope="module")
def plain_set(folder, tmp_path_factory):
    """A set written by 'another program': a plain {images, labels} dict, normalized like the loader."""
    from atom_fast.distill.data import load_dataset

    data = load_dataset("folder", str(folder))
    idx = torch.tensor([0, 1, 6, 7, 12, 13])  # 2 per class, as the loader orders train/ images
    path = tmp_path_factory.mktemp("set") / "images_best.pt"
    torch.save({"images": data.train_images[idx].clone(), "labels": data.train_labels[idx].clone()},
               path)
    return path


def _evaluate(folder, path, out, *extra):
    return cli.main(["evaluate", str(path), "--dataset", "folder", "--data-path", str(folder),
                     "--eval-models", "2", "--eval-epochs", "2", "--out", str(out), *extra])


@pytest.mark.slow
def test_evaluate_a_plain_set_on_four_architectures(folder, plain_set, tmp_path, capsys):
    archs = "convnet,alexnet,vgg11,resnet18"
    assert _evaluate(folder, plain_set, tmp_path / "ev", "--eval-model", archs, "--width", "16",
                     "--score", "--score-cache", str(tmp_path / "cache")) == 0
    table = capsys.readouterr().out
    r = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert list(r["architectures"]) == archs.split(",")
    assert r["format"] == "images-labels" and r["images_per_class"] == [2, 2, 2]
    for arch, summary in r["architectures"].items():
        assert f"| synthetic | folder | 2 | - | {arch} |" in table
        assert len(summary["accuracies"]) == 2 and 0 <= summary["accuracy_mean"] <= 100
        best = summary["best_of_schedule"]
        assert "not the result" in best["note"] and all(
            b >= a for a, b in zip(summary["accuracies"], best["accuracies"]))
        assert [m["index"] for m in summary["models"]] == [0, 1]
        assert r["baseline"]["architectures"][arch]["accuracy_mean"] >= 0
        score = r["label_robust_score"][arch]
        assert 0 <= score["score_mean"] <= 1 and set(score["parts"]) == {"full", "synthetic", "random"}
        assert score["full_data"]["key"]["architecture"] == arch
    # the headline is the first architecture's
    assert r["accuracy_mean"] == r["architectures"]["convnet"]["accuracy_mean"]
    assert (tmp_path / "ev" / "accuracy.png").exists() and (tmp_path / "ev" / "synthetic.png").exists()
    # the full-data accuracies were cached: a second evaluation reuses them
    assert _evaluate(folder, plain_set, tmp_path / "ev2", "--eval-model", "convnet", "--width", "16",
                     "--score", "--score-cache", str(tmp_path / "cache")) == 0
    r2 = json.loads((tmp_path / "ev2" / "results.json").read_text())
    assert r2["label_robust_score"]["convnet"]["full_data"]["cached"] is True


def test_evaluate_reads_dc_format_and_atom_fast_files(folder, plain_set, tmp_path):
    s = torch.load(plain_set)
    dc = tmp_path / "res_DM_folder_ConvNet_2ipc.pt"
    torch.save({"data": [[s["images"], s["labels"]]], "accs_all_exps": {}}, dc)
    assert _evaluate(folder, dc, tmp_path / "dc", "--eval-model", "mlp", "--no-baseline") == 0
    r = json.loads((tmp_path / "dc" / "results.json").read_text())
    assert r["format"] == "dc" and r["baseline"] is None


@pytest.mark.parametrize("content,needle", [
    ({"images": torch.zeros(6, 3, 32, 32)}, "has no 'labels'"),
    ({"labels": torch.zeros(6, dtype=torch.long)}, "has no 'images'"),
    ({"images": torch.zeros(6, 3, 32, 32), "labels": torch.arange(6)}, "out of range"),
    ({"images": torch.zeros(6, 1, 28, 28), "labels": torch.zeros(6, dtype=torch.long)},
     "(1, 28, 28) (C, H, W) but the folder test images are (3, 32, 32)"),
    ({"images": torch.zeros(6, 3, 32, 32), "labels": torch.zeros(5, dtype=torch.long)},
     "labels must be an integer (6,) tensor"),
    ("not a tensor file", "not a readable tensor file"),
])
def test_evaluate_bad_sets_are_one_line(folder, tmp_path, capsys, content, needle):
    path = tmp_path / "bad.pt"
    if isinstance(content, str):
        path.write_text(content)
    else:
        torch.save(content, path)
    assert _evaluate(folder, path, tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and needle in err, err
    assert err.count("atom-fast: error:") == 1


def test_unknown_architecture_fails_before_anything_loads(folder, plain_set, tmp_path, capsys,
                                                          monkeypatch):
    monkeypatch.setattr(cli, "load_data", lambda *a, **k: pytest.fail("data loaded"))
    assert _evaluate(folder, plain_set, tmp_path / "out", "--eval-model", "convnet,resnet99") == 1
    assert "unknown architecture 'resnet99'" in capsys.readouterr().err
    assert cli.main(["--dataset", "mnist", "--eval-model", "vgg", "--out", str(tmp_path / "d")]) == 1
    assert "unknown architecture 'vgg'" in capsys.readouterr().err
