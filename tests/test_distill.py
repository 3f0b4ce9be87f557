"""The distillation driver: networks, DSA, ZCA, the two loops, resume, non-finite stop, CLI."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch.nn import functional as F

from atom_fast import attention_loss, mmd_loss
from atom_fast.distill import augment as dsa
from atom_fast.distill import cli
from atom_fast.distill.evaluate import EvalConfig, final_accuracies as evaluate, mean_std
from atom_fast.distill.loop import DistillConfig, Distiller, NonFiniteLossError, random_indices, class_pools
from atom_fast.distill.networks import ConvNet, build_network
from atom_fast.distill.output import image_grid, render_grid, write_atomic

from _data import write_folder_dataset


# ------------------------------------------------------------------------------------------------
# networks


@pytest.mark.parametrize("norm", ["instancenorm", "batchnorm", "none"])
def test_convnet_features_are_the_relu_outputs(norm):
    torch.manual_seed(0)
    net = ConvNet(3, 5, (16, 12), width=6, depth=3, norm=norm).eval()
    x = torch.randn(4, 3, 16, 12)
    hooked = []
    hooks = [b.act.register_forward_hook(lambda m, i, o: hooked.append(o.clone())) for b in net.blocks]
    logits = net(x)
    for h in hooks:
        h.remove()
    maps, emb = net.features(x)
    assert [tuple(f.shape) for f in maps] == [(4, 6, 16, 12), (4, 6, 8, 6), (4, 6, 4, 3)]
    for f, g in zip(maps, hooked):
        # the hooked forward runs the modules, the plain one the native block tail (instancenorm):
        # equal to float rounding
        torch.testing.assert_close(f, g)
        assert (f >= 0).all()
    assert emb.shape == (4, net.embedding_size) == (4, 6 * 2 * 1)
    torch.testing.assert_close(net.classifier(emb), logits)
    torch.testing.assert_close(F.avg_pool2d(maps[-1], 2).flatten(1), emb)


def test_convnet_mnist_runs_at_32x32_and_instancenorm_is_groupnorm():
    net = ConvNet(1, 10, (28, 28))
    maps, emb = net.features(torch.randn(2, 1, 28, 28))
    assert [f.shape[-1] for f in maps] == [32, 16, 8] and emb.shape == (2, 128 * 4 * 4)
    norm = net.blocks[0].norm
    assert isinstance(norm, torch.nn.GroupNorm) and norm.num_groups == norm.num_channels == 128
    with pytest.raises(ValueError, match="norm"):
        ConvNet(1, 10, (28, 28), norm="layernorm")
    with pytest.raises(ValueError, match="depth"):
        ConvNet(1, 10, (4, 4), depth=4)
    with pytest.raises(ValueError, match="model"):
        build_network("resnet9000", 1, 10, (28, 28))


# ------------------------------------------------------------------------------------------------
# DSA


def _draw(groups, op, seed=0, size=(10, 9)):
    params = dsa.draw(groups, size, generator=torch.Generator().manual_seed(seed))
    params.op[:] = dsa.OPERATIONS.index(op)
    params.flip[:] = True
    return params


@pytest.mark.parametrize("op", dsa.OPERATIONS)
def test_dsa_is_siamese_per_class_and_differs_between_classes(op):
    """Real and synthetic images of one class get the same transform, whatever their counts."""
    torch.manual_seed(1)
    base = torch.randn(3, 2, 10, 9)            # one image per class
    params = _draw(3, op)
    real = dsa.apply(base.repeat_interleave(4, 0), params, [4, 4, 4])
    syn = dsa.apply(base.repeat_interleave(2, 0), params, [2, 2, 2])
    for k in range(3):
        for r in real[4 * k:4 * k + 4]:
            torch.testing.assert_close(r, syn[2 * k], rtol=0, atol=0)
        assert not torch.equal(real[4 * k], base[k])  # it did something
    # classes drew different parameters: the same image transformed as class 0 and as class 1 differs
    same = dsa.apply(base[:1].repeat(2, 1, 1, 1), params.select([0, 1]), [1, 1])
    if op != "flip":
        assert not torch.equal(same[0], same[1])


def test_dsa_untouched_groups_pass_through_bitwise():
    torch.manual_seed(2)
    x = torch.randn(5, 3, 8, 8)
    params = _draw(5, "rotate")
    params.op[1] = dsa.OPERATIONS.index("color")
    params.op[3] = dsa.OPERATIONS.index("flip")
    params.flip[3] = False                     # a flip that did not come up
    out = dsa.apply(x, params, [1] * 5)
    assert torch.equal(out[3], x[3])
    assert not torch.equal(out[1], x[1]) and not torch.equal(out[0], x[0])


def test_dsa_operations_match_their_definitions():
    torch.manual_seed(3)
    x = torch.randn(2, 3, 10, 9)
    p = _draw(2, "crop")
    p.shift[0] = torch.tensor([1, 0])
    p.shift[1] = torch.tensor([0, -2])
    out = dsa.apply(x, p, [1, 1])
    want0 = torch.zeros_like(x[0]); want0[:, :-1] = x[0, :, 1:]
    want1 = torch.zeros_like(x[1]); want1[:, :, 2:] = x[1, :, :, :-2]
    torch.testing.assert_close(out[0], want0, rtol=0, atol=0)
    torch.testing.assert_close(out[1], want1, rtol=0, atol=0)
    # cutout: a square of side round(0.5 * size) zeroed around the centre, the rest untouched
    p = _draw(1, "cutout")
    p.cutout[0] = torch.tensor([5, 4])
    out = dsa.apply(x[:1], p, [1])
    zero = (out[0] == 0).all(0)
    assert zero.sum() == 5 * 5 and zero[3:8, 2:7].all()
    assert torch.equal(out[0][:, ~zero], x[0][:, ~zero])
    # flip, and scale 1 / rotate 0 are the identity
    p = _draw(1, "flip")
    torch.testing.assert_close(dsa.apply(x[:1], p, [1]), x[:1].flip(3), rtol=0, atol=0)
    p = _draw(1, "scale"); p.scale[:] = 1.0
    torch.testing.assert_close(dsa.apply(x[:1], p, [1]), x[:1], rtol=0, atol=1e-5)
    p = _draw(1, "rotate"); p.angle[:] = math.pi / 2
    square = torch.randn(1, 1, 7, 7)
    torch.testing.assert_close(dsa.apply(square, p, [1]).abs().sum(), square.abs().sum(), atol=1e-4, rtol=0)
    rotated = dsa.apply(square, p, [1])[0, 0]
    assert any(torch.allclose(rotated, torch.rot90(square[0, 0], k), atol=1e-5) for k in (1, 3))
    # color: brightness b, saturation s, contrast c in that order
    p = _draw(1, "color")
    b, s, c = float(p.brightness[0]), float(p.saturation[0]), float(p.contrast[0])
    y = x[:1] + b
    m = y.mean(1, keepdim=True); y = (y - m) * s + m
    m = y.mean((1, 2, 3), keepdim=True); y = (y - m) * c + m
    torch.testing.assert_close(dsa.apply(x[:1], p, [1]), y)


def test_dsa_draw_ranges_and_gradients():
    p = dsa.draw(4000, (32, 32), generator=torch.Generator().manual_seed(0))
    assert set(p.op.tolist()) == set(range(6))
    assert p.shift.abs().max() == 4 and p.brightness.abs().max() <= 0.5
    assert 0 <= p.saturation.min() and p.saturation.max() < 2
    assert 0.5 <= p.contrast.min() and p.contrast.max() < 1.5
    assert 1 / 1.2 <= p.scale.min() and p.scale.max() < 1.2
    assert p.angle.abs().max() <= 15 / 180 * math.pi
    x = torch.randn(6, 2, 6, 6, dtype=torch.float64, requires_grad=True)
    params = dsa.draw(6, (6, 6), generator=torch.Generator().manual_seed(4))
    params.op[:] = torch.arange(6)
    params.flip[:] = True
    torch.autograd.gradcheck(lambda t: dsa.apply(t, params, [1] * 6), (x,))
    with pytest.raises(ValueError, match="group_sizes"):
        dsa.apply(x, params, [2] * 6)


def test_evaluation_augment_draws_one_operation_per_batch():
    x = torch.randn(16, 3, 8, 8)
    out = dsa.augment(x, generator=torch.Generator().manual_seed(9))
    params = dsa.draw(16, (8, 8), generator=torch.Generator().manual_seed(9))
    op = int(params.op[0])
    params.op[:] = op
    torch.testing.assert_close(out, dsa.apply(x, params, [1] * 16), rtol=0, atol=0)
    if dsa.OPERATIONS[op] != "flip":  # every image transformed, each with its own parameters
        assert all(not torch.equal(out[i], x[i]) for i in range(16))


def test_zca_round_trip_and_whitening():
    torch.manual_seed(5)
    mix = torch.randn(48, 48) / 6
    x = (torch.randn(2000, 48) @ mix + 0.3).view(2000, 3, 4, 4)
    z = dsa.ZCA(eps=1e-4).fit(x)
    w = z(x)
    torch.testing.assert_close(z.inverse(w), x, atol=2e-4, rtol=1e-4)
    cov = torch.cov(w.flatten(1).T)
    torch.testing.assert_close(cov, torch.eye(48), atol=0.05, rtol=0)
    # with the driver's eps 0.1 it is a regularized whitening: the round trip still holds
    z = dsa.ZCA().fit(x)
    torch.testing.assert_close(z.inverse(z(x)), x, atol=2e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------------
# the loop


def _toy(classes=3, per_class=20, size=12, channels=1, seed=0, shift=0.5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(classes * per_class, channels, size, size, generator=g)
    x += torch.arange(classes).repeat_interleave(per_class).view(-1, 1, 1, 1) * shift
    y = torch.arange(classes).repeat_interleave(per_class)
    perm = torch.randperm(len(y), generator=g)
    return x[perm], y[perm]


@pytest.mark.parametrize("method", ["dm", "datadam", "atom", "atom-channel"])
def test_fused_datadam_and_class_by_class_loops_give_the_same_images(method):
    x, y = _toy()
    out = {}
    # fused with chunks: 2 synthetic class chunks, real chunks of 5 images that split classes
    for loop, chunk, real_chunk in (("fused", None, None), ("fused", 2, 5), ("datadam", None, None),
                                    ("class-by-class", None, None)):
        d = Distiller(x, y, 3, DistillConfig(method=method, ipc=2, batch_real=6, width=8, depth=3,
                                             loop=loop, class_chunk=chunk, real_chunk=real_chunk),
                      "cpu")
        assert len(d.chunks) == (2 if chunk == 2 else 1)
        losses = [d.step(i).item() for i in range(3)]
        out[loop, chunk] = d.syn.detach().clone(), losses
    for key in (("fused", 2), ("datadam", None), ("class-by-class", None)):
        torch.testing.assert_close(out["fused", None][0], out[key][0], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(out["fused", None][1], out[key][1], rtol=1e-4)
    assert (out["fused", None][0] - d.initial_images()).abs().max() > 1e-2  # the images moved


def test_loop_objective_is_the_spec_formula():
    """One fused step's loss equals 100 * attention + 100 * lambda * mmd computed by hand."""
    x, y = _toy(size=8)
    cfg = DistillConfig(method="atom", ipc=2, batch_real=4, width=4, depth=3, dsa=False,
                        spatial_power=2.0, channel_power=3.0)
    d = Distiller(x, y, 3, cfg, "cpu")
    syn0 = d.syn.detach().clone()
    loss = d.step(7)
    real = d.real_batch(7)
    d._reset_network(7)
    rm, re_ = d.net.features(real)
    sm, se = d.net.features(syn0)
    want = (100 * attention_loss(rm[:-1], sm[:-1], 3, spatial_power=2.0, channel_power=3.0,
                                 backend="reference")
            + 100 * 0.01 * mmd_loss(re_, se, 3))
    torch.testing.assert_close(loss, want.detach(), rtol=1e-5, atol=1e-5)
    dm = Distiller(x, y, 3, DistillConfig(method="dm", ipc=2, batch_real=4, width=4, dsa=False), "cpu")
    torch.testing.assert_close(dm.step(7), mmd_loss(re_, se, 3).detach(), rtol=1e-5, atol=1e-5)


def test_a_resumed_distiller_matches_an_uninterrupted_one():
    x, y = _toy()
    cfg = DistillConfig(method="atom", ipc=2, batch_real=6, width=8)
    a = Distiller(x, y, 3, cfg, "cpu")
    for i in range(4):
        a.step(i)
    b = Distiller(x, y, 3, cfg, "cpu")
    for i in range(2):
        b.step(i)
    state = b.state_dict()
    c = Distiller(x, y, 3, cfg, "cpu")
    c.load_state_dict(state)
    for i in range(2, 4):
        c.step(i)
    assert torch.equal(a.syn, c.syn)


def test_config_validation():
    x, y = _toy()
    with pytest.raises(ValueError, match="method"):
        DistillConfig(method="dc").resolve((8, 8))
    with pytest.raises(ValueError, match="lr_img"):
        DistillConfig(lr_img=float("nan")).resolve((8, 8))
    with pytest.raises(ValueError, match="depth"):
        DistillConfig(depth=1).resolve((8, 8))
    with pytest.raises(ValueError, match="batch_real"):
        Distiller(x, y, 3, DistillConfig(batch_real=50, width=4), "cpu")
    with pytest.raises(ValueError, match="ipc"):
        random_indices(class_pools(y, 3), 21, 0)
    c = DistillConfig(ipc=51).resolve((64, 64))
    assert (c.lr_img, c.task_balance, c.depth) == (10.0, 0.02, 4)
    c = DistillConfig(ipc=50).resolve((32, 32))
    assert (c.lr_img, c.task_balance, c.depth) == (1.0, 0.01, 3)


def test_evaluation_learns_and_is_reproducible():
    x, y = _toy(classes=3, per_class=30, size=8, channels=3, shift=2.0)
    cfg = EvalConfig(epochs=30, batch_size=32, lr=0.05, dsa=True)
    kw = dict(models=2, config=cfg, seed=3, network_kwargs={"width": 8})
    accs = evaluate(x[:60], y[:60], x[60:], y[60:], 3, **kw)
    assert accs == evaluate(x[:60], y[:60], x[60:], y[60:], 3, **kw)
    assert min(accs) > 60  # classes differ by their mean: far above chance (33%)
    assert mean_std([1.0, 3.0]) == (2.0, 1.0)


def test_outputs_grid_and_atomic_write(tmp_path):
    images = torch.rand(6, 3, 4, 5)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    grid = image_grid(images, labels, 3, pad=1)
    assert grid.shape == (3, 3 * 5 + 1, 2 * 6 + 1)
    torch.testing.assert_close(grid[:, 1 + 5:1 + 5 + 4, 1 + 6:1 + 6 + 5], images[3])
    write_atomic(tmp_path / "x.json", {"a": torch.tensor([1.5])}, as_json=True)
    assert json.loads((tmp_path / "x.json").read_text()) == {"a": [1.5]}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


# ------------------------------------------------------------------------------------------------
# CLI, end to end on a tiny folder dataset


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
