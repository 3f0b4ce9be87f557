"""Differentiable siamese augmentation and ZCA whitening (atom_fast/distill/augment.py)."""

import math

import pytest
import torch

from atom_fast.distill import augment as dsa


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_row_plan_chunks_give_the_whole_batch_bitwise(dtype):
    """A plan applied chunk by chunk (chunks splitting groups, every operation present) gives the
    whole batch's images and gradients bitwise, with the image size given or taken from the batch."""
    h, w = 10, 9
    params = dsa.draw(12, (h, w), generator=torch.Generator().manual_seed(5))
    params.op[:] = torch.arange(12) % 6
    params.flip[:] = True
    params.flip[9] = False  # a flip that did not come up: those rows pass through
    sizes = [3, 1, 4, 2, 5, 1, 2, 3, 1, 2, 4, 2]
    x = torch.randn(sum(sizes), 3, h, w, dtype=dtype, requires_grad=True)
    whole = dsa.apply(x, params, sizes)
    (g_whole,) = torch.autograd.grad(whole.pow(3).sum(), x)
    assert torch.equal(whole[22:24], x[22:24])  # group 9's rows (after 22 rows)
    for image_size in ((h, w), None):
        plan = dsa.RowPlan(params, sizes, "cpu", dtype, image_size=image_size)
        edges = [0, 5, 6, 13, 22, 30]
        parts = [plan.apply(x[a:b], a) for a, b in zip(edges[:-1], edges[1:])]
        got = torch.cat(parts)
        assert torch.equal(got, whole)
        (g,) = torch.autograd.grad(got.pow(3).sum(), x)
        assert torch.equal(g, g_whole)
    # a plan made for another image size is rebuilt for the batch it is given
    plan = dsa.RowPlan(params, sizes, "cpu", dtype, image_size=(16, 16))
    assert torch.equal(plan.apply(x), whole)
    with pytest.raises(ValueError, match="outside the batch"):
        plan.apply(x[:4], 28)
