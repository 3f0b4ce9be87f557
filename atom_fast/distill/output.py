"""Files a run leaves behind: atomic writes (checkpoints, results) and the PNG grid of images."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch


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


def save_grid(images: torch.Tensor, labels: torch.Tensor, num_classes: int, path) -> None:
    """Save :func:`image_grid` as a PNG (grayscale for one channel, RGB for three)."""
    from PIL import Image

    grid = image_grid(images, labels, num_classes)
    pixels = (grid * 255 + 0.5).to(torch.uint8).permute(1, 2, 0).numpy()
    if pixels.shape[2] == 1:
        Image.fromarray(pixels[:, :, 0]).save(path)
    else:
        Image.fromarray(pixels[:, :, :3]).save(path)
