"""The evaluation protocol (atom_fast/distill/evaluate.py): per-model records, model indices that can be
split across processes, the two accuracy conventions, the test schedule, learning and reproducibility."""

import pytest
import torch

from atom_fast.distill import evaluate as ev
from atom_fast.distill.evaluate import EvalConfig, ModelRecord, evaluate, evaluation_schedule, summarize

from _data import toy_images, toy_split


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny networks: one thread is much faster on a loaded 2-core machine
    yield
    torch.set_num_threads(threads)


CFG = EvalConfig(epochs=10, batch_size=16, lr=0.05)
KW = dict(seed=3, network_kwargs={"width": 8})


def _same(a: ModelRecord, b: ModelRecord):
    assert a.index == b.index
    assert a.schedule_accuracies == b.schedule_accuracies
    assert a.final_accuracy == b.final_accuracy and a.final_train_loss == b.final_train_loss


def test_a_model_index_gives_the_same_model_whatever_else_is_evaluated():
    data = toy_split()
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
    data = toy_split()
    torch.manual_seed(11)
    before = torch.get_rng_state()
    evaluate(*data, 3, config=CFG, model_indices=[0], **KW)
    assert torch.equal(torch.get_rng_state(), before)


def test_records_hold_both_conventions_and_best_is_at_least_final():
    data = toy_split(shift=0.6)
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
    data = toy_split()
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
    data = toy_split(size=16, shift=1.5)
    cfg = EvalConfig(epochs=6, batch_size=16, lr=0.05)
    for name, kwargs in (("mlp", {"width": 16}), ("LeNet", {}), ("resnet18", {"width": 4})):
        records = evaluate(*data, 3, config=cfg, architecture=name, model_indices=[0], seed=0,
                           network_kwargs=kwargs)
        assert records[0].architecture == name.lower()
        assert 0 <= records[0].final_accuracy <= 100


def test_summarize_merges_processes_and_keeps_the_conventions_apart():
    data = toy_split()
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
    data = toy_split()
    assert ev.final_accuracies(*data, 3, config=CFG, models=2, **KW) == [
        r.final_accuracy for r in evaluate(*data, 3, config=CFG, models=2, **KW)]


def test_bad_input_names_the_argument():
    x, y, tx, ty = toy_split()
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


def test_evaluation_learns_and_is_reproducible():
    x, y = toy_images(classes=3, per_class=30, size=8, channels=3, shift=2.0)
    cfg = EvalConfig(epochs=30, batch_size=32, lr=0.05, dsa=True)
    kw = dict(models=2, config=cfg, seed=3, network_kwargs={"width": 8})
    accs = ev.final_accuracies(x[:60], y[:60], x[60:], y[60:], 3, **kw)
    assert accs == ev.final_accuracies(x[:60], y[:60], x[60:], y[60:], 3, **kw)
    assert min(accs) > 60  # classes differ by their mean: far above chance (33%)
    assert ev.mean_std([1.0, 3.0]) == (2.0, 1.0)


def test_the_epoch_bar_shows_model_and_epochs_and_changes_nothing(capsys):
    data = toy_split(shift=0.6)
    cfg = EvalConfig(epochs=3, batch_size=16, lr=0.05)
    quiet = evaluate(*data, 3, config=cfg, models=2, **KW)
    assert capsys.readouterr().err == ""
    shown = evaluate(*data, 3, config=cfg, models=2, bar="synthetic on convnet", **KW)
    err = capsys.readouterr().err
    assert "synthetic on convnet" in err and "6/6" in err and "epoch" in err
    assert "convnet model 2" in err
    for a, b in zip(quiet, shown):
        _same(a, b)
