"""The picture of a synthetic set, the accuracy plot, the image grid, atomic writes and one-line
messages (atom_fast/distill/output.py)."""

import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from atom_fast.distill.output import (grid_layout, image_grid, render_grid, save_accuracy_plot, save_grid,
                                     say, write_atomic)


def _set(classes=10, ipc=1, channels=1, size=28, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(classes * ipc, channels, size, size, generator=g)
    labels = torch.arange(classes).repeat_interleave(ipc)
    return images, labels


def _cell(picture, x0, y0, side):
    return torch.from_numpy(np.array(picture)[y0:y0 + side, x0:x0 + side].copy())


def _upscaled(img, scale):  # (C, H, W) in [0, 1] -> uint8 (H*s, W*s[, C]) as the PNG stores it
    up = img.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    out = (up * 255 + 0.5).to(torch.uint8).permute(1, 2, 0)
    return out[:, :, 0] if img.shape[0] == 1 else out


def test_mnist_ipc1_is_one_row_of_ten_legible_digits():
    images, labels = _set()
    pic = render_grid(images, labels, 10)
    assert pic.mode == "L"
    scale, cell, pad = 3, 84, 2  # 28 px x3: at least 64 px per image
    assert pic.size[0] == pad + 10 * (cell + pad)
    text_h = pic.size[1] - (pad + cell + pad)
    assert 8 <= text_h <= 30  # one row of names above one row of images
    for k in range(10):
        x0 = pad + k * (cell + pad)
        assert torch.equal(_cell(pic, x0, text_h + pad, cell), _upscaled(images[k], scale)), k
        names = np.array(pic)[:text_h, x0:x0 + cell]
        assert (names < 128).any(), k  # the class name is drawn above its column


def test_columns_are_classes_in_order_and_names_are_drawn(tmp_path):
    # labels shuffled: the grid still puts class k's images, in order, in column k
    images, labels = _set(classes=3, ipc=2, channels=3, size=32)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    pic = render_grid(images[perm], labels[perm], 3, class_names=["cat", "dog", "automobile"])
    assert pic.mode == "RGB"
    cell, pad = 64, 2
    text_h = pic.size[1] - (pad + 2 * (cell + pad))
    for k in range(3):
        for j in range(2):  # column k, row j: the j-th image of class k in the given order
            want = images[perm][labels[perm] == k][j]
            got = _cell(pic, pad + k * (cell + pad), text_h + pad + j * (cell + pad), cell)
            assert torch.equal(got, _upscaled(want, 2)), (k, j)
    plain = render_grid(images[perm], labels[perm], 3)
    named = np.array(pic)
    assert not np.array_equal(np.array(plain)[:text_h], named[:text_h])   # names differ from indices
    assert np.array_equal(np.array(plain)[text_h:], named[text_h:])       # the images do not
    # save_grid keeps its positional arguments; class_names is optional
    save_grid(images, labels, 3, tmp_path / "a.png")
    save_grid(images, labels, 3, tmp_path / "b.png", ["cat", "dog", "automobile"])
    with Image.open(tmp_path / "a.png") as a, Image.open(tmp_path / "b.png") as b:
        assert a.size == b.size == pic.size


def test_many_classes_wrap_into_a_near_square_picture():
    assert grid_layout(10, 1) == 10 and grid_layout(20, 50) == 20
    assert grid_layout(100, 1) == 10 and grid_layout(100, 10) == 32 and grid_layout(200, 1) == 15
    images, labels = _set(classes=100, ipc=1, channels=3, size=32)
    pic = render_grid(images, labels, 100)
    w, h = pic.size
    assert w == 2 + 10 * 66 and 0.7 < h / w < 1.5
    # class 57 sits in band 5, column 7
    text_h = (h - 2) // 10 - 66
    got = _cell(pic, 2 + 7 * 66, 5 * (text_h + 66) + text_h + 2, 64)
    assert torch.equal(got, _upscaled(images[57], 2))


def test_large_images_are_not_upscaled_and_big_pictures_are_capped():
    images, labels = _set(classes=2, ipc=1, channels=3, size=64)
    assert render_grid(images, labels, 2).size[0] == 2 + 2 * 66
    images, labels = _set(classes=10, ipc=50, channels=1, size=28)
    pic = render_grid(images, labels, 10)
    assert max(pic.size) <= 4096 and pic.size[0] == 2 + 10 * (56 + 2)  # x2 instead of x3
    # values outside [0, 1] are clamped, a class without images is an empty column
    pic = render_grid(torch.full((1, 1, 8, 8), 7.0), torch.tensor([1]), 3)
    arr = np.array(pic)
    assert arr.max() == 255 and pic.size[0] == 2 + 3 * 66


def test_bad_input_names_the_argument():
    images, labels = _set(classes=3)
    with pytest.raises(ValueError, match="images must be an"):
        render_grid(images[0], labels, 3)
    with pytest.raises(ValueError, match="images must be an"):
        render_grid(torch.rand(3, 2, 8, 8), labels, 3)
    with pytest.raises(ValueError, match="labels must be a 1-d tensor with one entry per image"):
        render_grid(images, labels[:2], 3)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        render_grid(images, labels, 2)
    with pytest.raises(ValueError, match="class_names has 2 names for 3 classes"):
        render_grid(images, labels, 3, class_names=["a", "b"])


ROWS = [
    {"architecture": "convnet", "method": "atom", "accuracy_mean": 91.2, "accuracy_std": 0.5},
    {"architecture": "convnet", "method": "random", "accuracy_mean": 64.9, "accuracy_std": 1.5},
    {"architecture": "alexnet", "method": "atom", "accuracy_mean": 85.0, "accuracy_std": 2.0},
    {"architecture": "alexnet", "method": "random", "accuracy_mean": 60.1, "accuracy_std": 3.0},
    {"architecture": "vit", "method": "atom", "accuracy_mean": 40.0, "accuracy_std": 3.0},
]


def test_accuracy_plot(tmp_path):
    pytest.importorskip("matplotlib")
    path = save_accuracy_plot(ROWS, tmp_path / "accuracy.png")
    assert path == tmp_path / "accuracy.png"
    with Image.open(path) as pic:
        assert pic.format == "PNG" and pic.size[0] > 400 and pic.size[1] > 300
        # something is drawn: many colours, not a blank canvas
        assert len(np.unique(np.array(pic.convert("L")))) > 20
    with pytest.raises(ValueError, match=r"rows\[1\] has no 'accuracy_std'"):
        save_accuracy_plot([ROWS[0], {"architecture": "x", "method": "y", "accuracy_mean": 1.0}],
                           tmp_path / "x.png")
    with pytest.raises(ValueError, match="empty"):
        save_accuracy_plot([], tmp_path / "x.png")


def test_accuracy_plot_without_matplotlib_warns_and_writes_nothing(tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.warns(UserWarning, match="matplotlib is not installed"):
        assert save_accuracy_plot(ROWS, tmp_path / "accuracy.png") is None
    assert not (tmp_path / "accuracy.png").exists()


def test_outputs_grid_and_atomic_write(tmp_path):
    images = torch.rand(6, 3, 4, 5)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    grid = image_grid(images, labels, 3, pad=1)
    assert grid.shape == (3, 3 * 5 + 1, 2 * 6 + 1)
    torch.testing.assert_close(grid[:, 1 + 5:1 + 5 + 4, 1 + 6:1 + 6 + 5], images[3])
    write_atomic(tmp_path / "x.json", {"a": torch.tensor([1.5])}, as_json=True)
    assert json.loads((tmp_path / "x.json").read_text()) == {"a": [1.5]}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


class _WriteThrough:
    """A stderr that, like Python's own, hands every ``write`` call to the pipe at once."""

    def __init__(self):
        self.writes = []

    def write(self, text):
        self.writes.append(text)
        return len(text)

    def flush(self):
        pass


@pytest.mark.parametrize("call", ["say", "cli"])
def test_a_message_is_one_write_with_its_newline(monkeypatch, call):
    # under torchrun every rank says its line into the same pipe: text and newline in two writes let
    # another rank's line in between (seen: two "stopped by SIGTERM" lines run together)
    err = _WriteThrough()
    monkeypatch.setattr(sys, "stderr", err)
    if call == "say":
        say("atom-fast: stopped by SIGTERM at iteration 6 of 300")
        assert err.writes == ["atom-fast: stopped by SIGTERM at iteration 6 of 300\n"]
    else:
        from atom_fast.distill import cli
        assert cli.main(["--ipc", "0"]) == 1
        assert len(err.writes) == 1 and err.writes[0].startswith("atom-fast: error: ")
        assert err.writes[0].endswith("\n") and err.writes[0].count("\n") == 1
