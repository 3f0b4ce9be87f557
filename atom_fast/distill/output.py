"""Writing and drawing a run's files: atomic writes (checkpoints, results), the picture of a labelled
image set (the grid of ``synthetic.png``) and the accuracy plot; and its one-line messages to stderr.
Which files a run leaves and what they hold is ``artifacts.py``'s."""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Optional

import torch


def say(line: str) -> None:
    """``line`` and its newline to stderr in one write. Python's stderr writes through, so ``print``
    (the text, then the newline: two writes) lets another process sharing the pipe, as the ranks of a
    torchrun do, put its line in between."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def write_atomic(path, obj, as_json: bool = False) -> None:
    """Write ``obj`` (torch.save, or JSON) to ``path`` so that a crash leaves the old file or the new
    one, never a torn one: write a temporary file in the same directory, fsync, then rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if as_json:
                f.write(json.dumps(obj, indent=2, default=_json_default).encode())
            else:
                torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; results are ordinary files
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, (Path, torch.device, torch.dtype)):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def image_grid(images: torch.Tensor, labels: torch.Tensor, num_classes: int,
               pad: int = 2) -> torch.Tensor:
    """``images (N, C, H, W)`` in [0, 1] units -> one ``(C, rows*(H+pad)+pad, cols*(W+pad)+pad)``
    grid, row ``k`` holding the images of class ``k`` in order (clamped to [0, 1])."""
    images = images.detach().float().cpu().clamp(0, 1)
    labels = labels.cpu()
    per_class = [images[labels == k] for k in range(num_classes)]
    cols = max(1, max(len(p) for p in per_class))
    n, c, h, w = images.shape
    grid = torch.ones(c, num_classes * (h + pad) + pad, cols * (w + pad) + pad)
    for k, p in enumerate(per_class):
        for j in range(len(p)):
            y, x = pad + k * (h + pad), pad + j * (w + pad)
            grid[:, y:y + h, x:x + w] = p[j]
    return grid


def _font(size: int):
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)  # scalable (Pillow >= 10.1 with FreeType)
    except TypeError:
        return ImageFont.load_default()


def _check_images(images: torch.Tensor, labels: torch.Tensor, num_classes: int, class_names) -> None:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be an (N, 1 or 3, H, W) tensor, got "
                         f"{tuple(getattr(images, 'shape', ())) or type(images).__name__}")
    if not isinstance(labels, torch.Tensor) or labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(f"labels must be a 1-d tensor with one entry per image ({images.shape[0]}), got "
                         f"{tuple(getattr(labels, 'shape', ())) or type(labels).__name__}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got values in "
                         f"[{int(labels.min())}, {int(labels.max())}]")
    if class_names is not None and len(class_names) != num_classes:
        raise ValueError(f"class_names has {len(class_names)} names for {num_classes} classes")


def grid_layout(num_classes: int, per_class: int) -> int:
    """Classes per band of the grid: all of them up to 20 classes (one column per class, a class's
    images going down), else about ``sqrt(num_classes * per_class)`` so that the picture is near square."""
    if num_classes <= 20:
        return num_classes
    return max(10, min(num_classes, math.ceil(math.sqrt(num_classes * max(per_class, 1)))))


def render_grid(images: torch.Tensor, labels: torch.Tensor, num_classes: int, class_names=None, *,
                min_side: int = 64, pad: int = 2, max_side: int = 4096):
    """A picture of a labelled image set that reads at a glance, as a PIL image (mode ``L`` for one
    channel, ``RGB`` for three).

    One column per class, headed by its name (``class_names``, else the class index), its images going
    down in order; with more than 20 classes the columns wrap into bands of about
    ``sqrt(classes * images per class)`` columns. Images (``(N, C, H, W)`` in [0, 1] units, clamped) are
    upscaled by an integer factor, nearest neighbour, so that the longer side is at least ``min_side``
    pixels (MNIST's 28 px: x3), unless the picture would pass ``max_side`` pixels.
    """
    from PIL import Image, ImageDraw

    _check_images(images, labels, num_classes, class_names)
    images = images.detach().float().cpu().clamp(0, 1)
    labels = labels.cpu()
    n, c, h, w = images.shape
    per_class = [images[labels == k] for k in range(num_classes)]
    rows = max(1, max(len(p) for p in per_class))
    cols = grid_layout(num_classes, rows)
    bands = math.ceil(num_classes / cols)
    names = [str(k) for k in range(num_classes)] if class_names is None else [str(x) for x in class_names]

    scale = max(1, math.ceil(min_side / max(h, w)))
    font = _font(11 if scale * w < 80 else 13)  # 11 px: "automobile" fits a 64-pixel column
    text_h = font.getbbox("Ag")[3] + 4
    def size(s):  # the canvas at upscaling s
        return (pad + cols * (s * w + pad), bands * (text_h + rows * (s * h + pad)) + pad)
    while scale > 1 and max(size(scale)) > max_side:
        scale -= 1
    cell_w, cell_h = scale * w, scale * h
    width, height = size(scale)

    pixels = torch.ones(c, height, width)
    for k, imgs in enumerate(per_class):
        x0 = pad + (k % cols) * (cell_w + pad)
        y0 = (k // cols) * (text_h + rows * (cell_h + pad)) + text_h
        for j, img in enumerate(imgs):
            y = y0 + pad + j * (cell_h + pad)
            pixels[:, y:y + cell_h, x0:x0 + cell_w] = img.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    array = (pixels * 255 + 0.5).to(torch.uint8).permute(1, 2, 0).numpy()
    picture = Image.fromarray(array[:, :, 0] if c == 1 else array, mode="L" if c == 1 else "RGB")

    draw = ImageDraw.Draw(picture)
    for k, name in enumerate(names):
        x0 = pad + (k % cols) * (cell_w + pad)
        y0 = (k // cols) * (text_h + rows * (cell_h + pad))
        while len(name) > 1 and draw.textlength(name, font=font) > cell_w:
            name = name[:-2] + "~"  # shorten until it fits its column
        x = x0 + (cell_w - draw.textlength(name, font=font)) / 2
        draw.text((x, y0 + 2), name, fill=0 if c == 1 else (0, 0, 0), font=font)
    return picture


def save_grid(images: torch.Tensor, labels: torch.Tensor, num_classes: int, path,
              class_names=None) -> None:
    """Save :func:`render_grid` (one labelled column per class, images upscaled) as a PNG."""
    render_grid(images, labels, num_classes, class_names).save(path)


def save_accuracy_plot(rows, path, title: str = "test accuracy by architecture") -> Optional[Path]:
    """A bar chart of accuracy (mean +- std, in %) per architecture, one bar per method (e.g. the
    distilled set and the ``random`` baseline), saved as a PNG at ``path``.

    ``rows``: mappings with keys ``architecture``, ``method``, ``accuracy_mean``, ``accuracy_std``
    (e.g. one per architecture for the distilled set and one for ``method="random"``). Returns the
    path, or None with a warning (and no file) when matplotlib is not installed.
    """
    rows = list(rows)
    for i, r in enumerate(rows):
        for key in ("architecture", "method", "accuracy_mean", "accuracy_std"):
            if key not in r:
                raise ValueError(f"rows[{i}] has no {key!r}; each row needs architecture, method, "
                                 f"accuracy_mean and accuracy_std")
    if not rows:
        raise ValueError("rows is empty: nothing to plot")
    try:
        from matplotlib.figure import Figure
    except ImportError:
        warnings.warn("matplotlib is not installed: no accuracy plot written "
                      "(pip install matplotlib to get one)")
        return None

    archs = list(dict.fromkeys(r["architecture"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    table = {(r["architecture"], r["method"]): r for r in rows}
    fig = Figure(figsize=(max(4.5, 2.2 + 0.5 * len(archs) * (1 + len(methods))), 3.6), dpi=120)
    ax = fig.subplots()
    bar_w = 0.8 / len(methods)
    for j, method in enumerate(methods):
        xs, means, stds = [], [], []
        for i, arch in enumerate(archs):
            r = table.get((arch, method))
            if r is not None:
                xs.append(i - 0.4 + bar_w * (j + 0.5))
                means.append(float(r["accuracy_mean"]))
                stds.append(float(r["accuracy_std"]))
        style = ({"color": "0.75", "hatch": "//", "edgecolor": "0.4"} if method == "random"
                 else {"color": f"C{j}"})
        bars = ax.bar(xs, means, bar_w * 0.95, yerr=stds, capsize=3, label=method, **style)
        ax.bar_label(bars, labels=[f"{m:.1f}" for m in means], label_type="center", fontsize=7,
                     color="black" if method == "random" else "white")
    ax.set_xticks(range(len(archs)), archs)
    ax.set_ylabel("test accuracy (%), mean +- std")
    top = max(float(r["accuracy_mean"]) + float(r["accuracy_std"]) for r in rows)
    ax.set_ylim(0, min(100.0, top * 1.12 + 2) if top <= 100 else top * 1.12)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)
