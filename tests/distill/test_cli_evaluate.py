"""``atom-fast evaluate PATH`` and evaluation on several architectures (the evaluate pipeline,
pipelines.py): a set saved by another program in the plain tensor format, every architecture trains
on it, results.json holds every figure (per architecture, both accuracy conventions, the baseline,
the label-robust score), and an unknown architecture is one line before anything loads. Reading the
saved-set formats: test_artifacts.py. The fixtures: conftest.py."""

import json

import pytest

from atom_fast.distill import cli, pipelines


@pytest.mark.slow
def test_evaluate_a_plain_set_on_four_architectures(evaluate_cli, plain_set, tmp_path, capsys):
    archs = "convnet,alexnet,vgg11,resnet18"
    assert evaluate_cli(plain_set, tmp_path / "ev", "--eval-model", archs, "--width", "16",
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
    assert evaluate_cli(plain_set, tmp_path / "ev2", "--eval-model", "convnet", "--width", "16",
                        "--score", "--score-cache", str(tmp_path / "cache")) == 0
    r2 = json.loads((tmp_path / "ev2" / "results.json").read_text())
    assert r2["label_robust_score"]["convnet"]["full_data"]["cached"] is True


def test_unknown_architecture_fails_before_anything_loads(evaluate_cli, plain_set, tmp_path, capsys,
                                                          monkeypatch):
    monkeypatch.setattr(pipelines, "load_data", lambda *a, **k: pytest.fail("data loaded"))
    assert evaluate_cli(plain_set, tmp_path / "out", "--eval-model", "convnet,resnet99") == 1
    assert "unknown architecture 'resnet99'" in capsys.readouterr().err
    assert cli.main(["--dataset", "mnist", "--eval-model", "vgg", "--out", str(tmp_path / "d")]) == 1
    assert "unknown architecture 'vgg'" in capsys.readouterr().err
