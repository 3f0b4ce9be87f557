"""DD-Ranking's label-robust score and the full-data accuracy cache (atom_fast/distill/score.py)."""

import pytest

from atom_fast.distill import score as sc

from _data import toy_split


def test_label_robust_score_by_hand():
    # full 90%, synthetic 60%, random 50%: HLR 0.3, IOR 0.1, alpha 0.5*0.1 - 0.5*0.3 = -0.1,
    # score = (e^-0.1 - e^-1) / (e - e^-1) = (0.904837418 - 0.367879441) / (2.718281828 - 0.367879441)
    r = sc.label_robust_score(0.9, 0.6, 0.5)
    assert r["hlr"] == pytest.approx(0.3) and r["ior"] == pytest.approx(0.1)
    assert r["alpha"] == pytest.approx(-0.1)
    assert r["score"] == pytest.approx(0.536957977 / 2.350402387, abs=1e-9)  # 0.228454...
    # the ends of the range: alpha = -1 gives 0, alpha = 1 gives 1
    assert sc.label_robust_score(1.0, 0.0, 1.0)["score"] == pytest.approx(0.0, abs=1e-12)
    assert sc.label_robust_score(0.0, 1.0, 0.0)["score"] == pytest.approx(1.0)
    # weight 1: IOR alone
    assert sc.label_robust_score(0.9, 0.6, 0.5, weight=1.0)["alpha"] == pytest.approx(0.1)
    with pytest.raises(ValueError, match=r"full accuracy must be a fraction in \[0, 1\], got 90.0 .*divide"):
        sc.label_robust_score(90.0, 0.6, 0.5)
    with pytest.raises(ValueError, match="random accuracy"):
        sc.label_robust_score(0.9, 0.6, -0.1)
    with pytest.raises(ValueError, match="weight"):
        sc.label_robust_score(0.9, 0.6, 0.5, weight=2)
    with pytest.raises(TypeError, match="synthetic"):
        sc.label_robust_score(0.9, "x", 0.5)


def test_label_robust_scores_pair_models_by_index():
    r = sc.label_robust_scores(0.9, [0.6, 0.7], [0.5, 0.5])
    assert r["scores"] == [sc.label_robust_score(0.9, 0.6, 0.5)["score"],
                           sc.label_robust_score(0.9, 0.7, 0.5)["score"]]
    assert r["score_mean"] == pytest.approx(sum(r["scores"]) / 2)
    assert r["ior_mean"] == pytest.approx(0.15) and r["hlr_std"] == pytest.approx(0.05)
    with pytest.raises(ValueError, match="same, non-zero number"):
        sc.label_robust_scores(0.9, [0.6], [0.5, 0.4])


def test_full_data_accuracy_is_computed_once_per_key(tmp_path):
    x, y, _, _ = toy_split()
    fp = sc.data_fingerprint(x, y)
    assert fp == sc.data_fingerprint(x.clone(), y.clone()) and len(fp) == 16
    x2 = x.clone()
    x2[0, 0, 0, 0] += 1e-3
    assert sc.data_fingerprint(x2, y) != fp
    assert sc.data_fingerprint(x.double(), y) != fp
    calls = []

    def compute():
        calls.append(1)
        return [80.0, 90.0]

    key = dict(dataset="mnist", architecture="convnet", protocol={"epochs": 300, "lr": 0.01}, seed=0,
               models=2, fingerprint=fp)
    a = sc.full_data_accuracy(**key, compute=compute, cache_dir=tmp_path / "cache")
    assert (a["accuracy_mean"], a["accuracy_std"], a["fraction"], a["cached"]) == (85.0, 5.0, 0.85, False)
    b = sc.full_data_accuracy(**key, compute=compute, cache_dir=tmp_path / "cache")
    assert b["cached"] and b["accuracies"] == [80.0, 90.0] and len(calls) == 1
    assert b["key"]["protocol"] == {"epochs": 300, "lr": 0.01} and b["path"] == a["path"]
    # any setting that changes the number is a different entry
    for change in ({"architecture": "alexnet"}, {"protocol": {"epochs": 301, "lr": 0.01}}, {"seed": 1},
                   {"dataset": "cifar10"}, {"fingerprint": "0" * 16}):
        c = sc.full_data_accuracy(**{**key, **change, "models": 1}, compute=lambda: [50.0],
                                  cache_dir=tmp_path / "cache")
        assert not c["cached"] and c["path"] != a["path"]
    assert len(list((tmp_path / "cache").iterdir())) == 6
    # a damaged entry is recomputed, with a warning
    with open(a["path"], "w") as f:
        f.write("{not json")
    with pytest.warns(UserWarning, match="unreadable"):
        d = sc.full_data_accuracy(**key, compute=compute, cache_dir=tmp_path / "cache")
    assert not d["cached"] and len(calls) == 2
    with pytest.raises(ValueError, match="2 accuracies for models=3"):
        sc.full_data_accuracy(**{**key, "models": 3}, compute=compute, cache_dir=tmp_path / "cache")
    with pytest.raises(ValueError, match="in %"):
        sc.full_data_accuracy(**{**key, "models": 1, "seed": 9}, compute=lambda: [0.5 * 300],
                              cache_dir=tmp_path / "cache")
    with pytest.raises(TypeError, match="protocol"):
        sc.full_data_accuracy(**{**key, "protocol": {"x": object()}}, compute=compute, cache_dir=tmp_path)
