"""The evaluation protocol (atom_fast/distill/evaluate.py): per-model records, model indices that can be
split across processes, the two accuracy conventions, the test schedule; and derive_seed."""

import pytest
import torch

from atom_fast.distill import evaluate as ev
from atom_fast.distill.evaluate import EvalConfig, ModelRecord, evaluate, evaluation_schedule, summarize
from atom_fast.distill.seeds import derive_seed


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny networks: one thread is much faster on a loaded 2-core machine
    yield
    torch.set_num_threads(threads)


def _toy(classes=3, per_class=30, size=8, channels=3, shift=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(classes).repeat(per_class)
    x = torch.randn(len(y), channels, size, size, generator=g) + y.view(-1, 1, 1, 1) * shift
    return x[:2 * len(y) // 3], y[:2 * len(y) // 3], x[2 * len(y) // 3:], y[2 * len(y) // 3:]


CFG = EvalConfig(epochs=10, batch_size=16, lr=0.05)
KW = dict(seed=3, network_kwargs={"width": 8})


def _same(a: ModelRecord, b: ModelRecord):
    assert a.index == b.index
    assert a.schedule_accuracies == b.schedule_accuracies
    assert a.final_accuracy == b.final_accuracy and a.final_train_loss == b.final_train_loss


def test_a_model_index_gives_the_same_model_whatever_else_is_evaluated():
    data = _toy()
    together = evaluate(*data, 3, config=CFG, model_indices=[0, 1, 2], **KW)
    assert [r.index for r in together] == [0, 1, 2]
    alone = evaluate(*data, 3, config=CFG, model_indices=[2], **KW)
    reordered = evaluate(*data, 3, config=CFG, model_indices=[1, 0], **KW)
    by_count = evaluate(*data, 3, config=CFG, models=3, **KW)
    _same(together[2], alone[0])
    _same(together[1], reordered[0])
    _same(together[0], reordered[1])
    for a, b in zip(together, by_count):
        _same(a, b)
    assert len({r.final_train_loss for r in together}) == 3  # different models really differ
    # another seed gives other models
    other = evaluate(*data, 3, config=CFG, model_indices=[2], seed=4, network_kwargs={"width": 8})
    assert other[0].final_train_loss != together[2].final_train_loss


def test_the_callers_random_state_is_left_alone():
    data = _toy()
    torch.manual_seed(11)
    before = torch.get_rng_state()
    evaluate(*data, 3, config=CFG, model_indices=[0], **KW)
    assert torch.equal(torch.get_rng_state(), before)


def test_records_hold_both_conventions_and_best_is_at_least_final():
    data = _toy(shift=0.6)
    records = evaluate(*data, 3, config=EvalConfig(epochs=20, batch_size=16, lr=0.05, test_every=2),
                       models=3, **KW)
    for r in records:
        assert r.architecture == "convnet"
        assert r.test_schedule == list(range(2, 21, 2))
        assert len(r.schedule_accuracies) == len(r.test_schedule)
        assert r.final_accuracy == r.schedule_accuracies[-1]
        assert r.best_of_schedule_accuracy == max(r.schedule_accuracies) >= r.final_accuracy
        i = r.test_schedule.index(r.best_of_schedule_epoch)
        assert r.schedule_accuracies[i] == r.best_of_schedule_accuracy
        assert r.schedule_accuracies.index(r.best_of_schedule_accuracy) == i  # the earliest best
        assert r.train_seconds > 0 and r.test_seconds > 0
        assert set(r.as_dict()) >= {"index", "final_accuracy", "best_of_schedule_accuracy", "test_schedule",
                                    "train_seconds"}
    # on this data the test accuracy moves during training, so the two conventions can differ
    assert any(len(set(r.schedule_accuracies)) > 1 for r in records)


def test_the_schedule():
    assert evaluation_schedule(1000) == list(range(100, 1001, 100))
    assert evaluation_schedule(25) == list(range(2, 25, 2)) + [25]
    assert evaluation_schedule(5) == [1, 2, 3, 4, 5]
    assert evaluation_schedule(1) == [1]
    assert evaluation_schedule(7, every=3) == [3, 6, 7]
    assert evaluation_schedule(7, every=10) == [7]
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="epochs"):
            evaluation_schedule(bad)
    with pytest.raises(ValueError, match="test_every"):
        evaluation_schedule(10, every=-1)


def test_the_schedule_is_what_is_measured_and_changes_no_training(monkeypatch):
    """Testing during training must not change the model: batch norm (eval mode while testing) and
    the random streams are untouched, so the final accuracy is the same with any schedule."""
    data = _toy()
    measured = []
    real = ev.test_accuracy

    def counting(net, *args, **kwargs):
        measured.append(1)
        return real(net, *args, **kwargs)

    monkeypatch.setattr(ev, "test_accuracy", counting)
    cfg = EvalConfig(epochs=9, batch_size=16, lr=0.05, test_every=2)
    dense = evaluate(*data, 3, config=cfg, architecture="convnet-bn", models=2, **KW)
    assert len(measured) == 2 * len(evaluation_schedule(9, 2)) == 2 * 5
    sparse = evaluate(*data, 3, config=EvalConfig(epochs=9, batch_size=16, lr=0.05, test_every=9),
                      architecture="convnet-bn", models=2, **KW)
    assert sparse[0].test_schedule == [9]
    for a, b in zip(dense, sparse):
        assert a.final_accuracy == b.final_accuracy and a.final_train_loss == b.final_train_loss


def test_several_architectures_one_call_each():
    data = _toy(size=16, shift=1.5)
    cfg = EvalConfig(epochs=6, batch_size=16, lr=0.05)
    for name, kwargs in (("mlp", {"width": 16}), ("LeNet", {}), ("resnet18", {"width": 4})):
        records = evaluate(*data, 3, config=cfg, architecture=name, model_indices=[0], seed=0,
                           network_kwargs=kwargs)
        assert records[0].architecture == name.lower()
        assert 0 <= records[0].final_accuracy <= 100


def test_summarize_merges_processes_and_keeps_the_conventions_apart():
    data = _toy()
    a = evaluate(*data, 3, config=CFG, model_indices=[0, 2], **KW)
    b = evaluate(*data, 3, config=CFG, model_indices=[1], **KW)
    s = summarize(b + a)
    assert s["model_indices"] == [0, 1, 2] and s["architecture"] == "convnet"
    finals = [r.final_accuracy for r in sorted(a + b, key=lambda r: r.index)]
    assert s["accuracies"] == finals
    assert (s["accuracy_mean"], s["accuracy_std"]) == ev.mean_std(finals)
    best = s["best_of_schedule"]
    assert best["accuracy_mean"] >= s["accuracy_mean"] and "not the result" in best["note"]
    assert best["test_schedule"] == evaluation_schedule(CFG.epochs)
    assert [m["index"] for m in s["models"]] == [0, 1, 2]
    with pytest.raises(ValueError, match="repeat"):
        summarize(a + a)
    with pytest.raises(ValueError, match="architectures"):
        summarize(a + evaluate(*data, 3, config=CFG, architecture="mlp", model_indices=[1], seed=3))


def test_mean_std_and_final_accuracies():
    assert ev.mean_std([1.0, 3.0]) == (2.0, 1.0)
    with pytest.raises(ValueError):
        ev.mean_std([])
    data = _toy()
    assert ev.final_accuracies(*data, 3, config=CFG, models=2, **KW) == [
        r.final_accuracy for r in evaluate(*data, 3, config=CFG, models=2, **KW)]


def test_bad_input_names_the_argument():
    x, y, tx, ty = _toy()
    with pytest.raises(ValueError, match="exactly one of models"):
        evaluate(x, y, tx, ty, 3, config=CFG, models=2, model_indices=[0], **KW)
    with pytest.raises(ValueError, match="exactly one of models"):
        evaluate(x, y, tx, ty, 3, config=CFG, **KW)
    with pytest.raises(ValueError, match="repeated"):
        evaluate(x, y, tx, ty, 3, config=CFG, model_indices=[0, 0], **KW)
    with pytest.raises(ValueError, match="non-negative"):
        evaluate(x, y, tx, ty, 3, config=CFG, model_indices=[-1], **KW)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        evaluate(x, y + 1, tx, ty, 3, config=CFG, models=1, **KW)
    with pytest.raises(ValueError, match="test_labels must lie"):
        evaluate(x, y, tx, ty - 1, 3, config=CFG, models=1, **KW)
    with pytest.raises(ValueError, match=r"images are \(3, 8, 8\).*test_images are \(3, 8, 7\)"):
        evaluate(x, y, tx[..., :7], ty, 3, config=CFG, models=1, **KW)
    with pytest.raises(ValueError, match="labels has 59 entries"):
        evaluate(x, y[:-1], tx, ty, 3, config=CFG, models=1, **KW)
    with pytest.raises(ValueError, match="labels must be a 1-d int64"):
        evaluate(x, y.int(), tx, ty, 3, config=CFG, models=1, **KW)
    with pytest.raises(ValueError, match="unknown architecture 'resnet9000'"):
        evaluate(x, y, tx, ty, 3, config=CFG, models=1, architecture="resnet9000", seed=0)
    with pytest.raises(ValueError, match="epochs"):
        evaluate(x, y, tx, ty, 3, config=EvalConfig(epochs=0), models=1, **KW)


def test_derive_seed_is_the_old_mix():
    def fnv(*parts):  # the formula evaluate.py's _mix used, written out again
        h = 1469598103934665603
        for p in parts:
            h = ((h ^ (p & 0xFFFFFFFFFFFFFFFF)) * 1099511628211) & 0x7FFFFFFFFFFFFFFF
        return h

    for parts in [(), (0,), (0, 7), (3, 1, 1), (2 ** 70, -5), (123456789, 0x1A17), (0, 5, 0x7E7)]:
        assert derive_seed(*parts) == fnv(*parts)
    assert derive_seed(0, 7) == 1903078709129691514  # a value results were produced with
    assert 0 <= derive_seed(2 ** 64 - 1, 2 ** 63) < 2 ** 63
    assert derive_seed(1, 2) != derive_seed(2, 1)
    assert ev._mix is derive_seed
    with pytest.raises(TypeError, match="integers"):
        derive_seed(1.5)


# ------------------------------------------------------------------------------------------------
# DD-Ranking's label-robust score and the full-data cache (atom_fast/distill/score.py)

from atom_fast.distill import score as sc  # noqa: E402


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
    x, y, _, _ = _toy()
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
