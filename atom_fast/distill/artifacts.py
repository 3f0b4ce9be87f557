"""The files a run leaves for people and programs to read, and their formats: ``synthetic.pt`` (written
after distilling; read back, with the sets other codebases save, by ``atom-fast evaluate``),
``results.json`` (assembled here for both commands), the picture of the set (``synthetic.png``) and
the accuracy plot (``accuracy.png``).

Where they go and how they are written (atomically, into the locked ``--out``) is
:class:`~atom_fast.distill.session.OutputDir`'s job; how a picture is drawn is ``output.py``'s.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Dict, Optional

import torch

from atom_fast import environment
from atom_fast.distill import report, session
from atom_fast.distill.output import save_accuracy_plot, save_grid

# --------------------------------------------------------------------------------------------------
# synthetic.pt
# --------------------------------------------------------------------------------------------------

# what read_synthetic accepts (the help of `atom-fast evaluate`)
SAVED_SET_FORMATS = """PATH is read with torch.load(weights_only=True) and may hold:
  - atom-fast's synthetic.pt: {"images", "labels", "dataset", "zca", "mean", "std", "run_id"};
  - a plain dict {"images": (N, C, H, W) float, "labels": (N,) int} as other codebases save them;
  - DC/DM/DataDAM's res_*.pt: {"data": [[images, labels], ...]} (the first experiment is used);
  - a pair [images, labels].
The images must be in the space the dataset loader produces: pixels/255 normalized per channel with
the dataset's mean and std (MNIST 0.1307/0.3081; CIFAR-10 (0.4914, 0.4822, 0.4465)/(0.2023, 0.1994,
0.2010), as DC's code) and, for ZCA-whitened sets, whitened with kornia's ZCAWhitening(eps=0.1)
fitted on the normalized training set. atom-fast's files say whether they are whitened; for other
files pass --zca when they are. The test split is then whitened the same way."""


def write_synthetic(out, images: torch.Tensor, labels: torch.Tensor, *, run_id: str, dataset: str,
                    zca, mean, std) -> None:
    """``synthetic.pt``: the images (normalized, and whitened when ``zca`` is set) and their labels,
    with what reading them back needs: the dataset's name, the ZCA transform's state (None when not
    whitened), the normalization's mean and std, and the ``run_id`` that results.json shares."""
    out.write(session.SYNTHETIC, {"images": images, "labels": labels, "run_id": run_id,
                                  "dataset": dataset,
                                  "zca": zca.state_dict() if zca is not None else None,
                                  "mean": mean, "std": std})


def read_synthetic(path) -> dict:
    """``{"images", "labels", "dataset", "zca", "mean", "std", "format"}`` from a saved set (any of
    :data:`SAVED_SET_FORMATS`; ``format`` says which: ``atom-fast``, ``images-labels``, ``dc`` or
    ``pair``); a one-line ValueError naming the file and what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ValueError(f"{path} is not a readable tensor file ({type(exc).__name__}: {first}); "
                         "save the set with torch.save({'images': ..., 'labels': ...}, path)") from None
    meta = {"dataset": None, "zca": None, "mean": None, "std": None}
    if isinstance(obj, dict) and "data" in obj and "images" not in obj:
        data = obj["data"]
        if not (isinstance(data, (list, tuple)) and data and isinstance(data[0], (list, tuple))
                and len(data[0]) == 2):
            raise ValueError(f"{path}: 'data' must be a list of [images, labels] pairs (DC's format)")
        images, labels, fmt = data[0][0], data[0][1], "dc"
    elif isinstance(obj, dict):
        missing = [k for k in ("images", "labels") if k not in obj]
        if missing:
            raise ValueError(f"{path} has no {' or '.join(repr(k) for k in missing)} (it holds "
                             f"{sorted(map(str, obj))[:8]}); expected a dict with 'images' and 'labels'")
        images, labels = obj["images"], obj["labels"]
        fmt = "atom-fast" if "run_id" in obj else "images-labels"
        meta.update({k: obj.get(k) for k in meta})
    elif isinstance(obj, (list, tuple)) and len(obj) == 2:
        images, labels, fmt = obj[0], obj[1], "pair"
    else:
        raise ValueError(f"{path} holds a {type(obj).__name__}; expected a dict with 'images' and "
                         "'labels', DC's {'data': [[images, labels]]}, or a pair [images, labels]")
    if not isinstance(images, torch.Tensor) or not images.is_floating_point() or images.ndim != 4:
        raise ValueError(f"{path}: images must be a float (N, C, H, W) tensor, got "
                         f"{type(images).__name__} {getattr(images, 'dtype', '')} "
                         f"{tuple(getattr(images, 'shape', ()))}")
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.ndim != 1 \
            or labels.shape[0] != images.shape[0]:
        raise ValueError(f"{path}: labels must be an integer ({images.shape[0]},) tensor matching the "
                         f"images, got {type(labels).__name__} {getattr(labels, 'dtype', '')} "
                         f"{tuple(getattr(labels, 'shape', ()))}")
    if images.shape[0] == 0:
        raise ValueError(f"{path} holds no images")
    if not bool(torch.isfinite(images).all()):
        raise ValueError(f"{path}: the images hold NaN or infinite values")
    return {"images": images.float(), "labels": labels.long(), "format": fmt, **meta}


def check_fits(saved: dict, data, path, dataset: str) -> None:
    """A set from :func:`read_synthetic` can be scored on ``data`` (the run data of ``dataset``):
    the images' shape, the labels' range and, when the file records it, the normalization agree
    (a one-line ValueError naming the file otherwise)."""
    images, labels = saved["images"], saved["labels"]
    if tuple(images.shape[1:]) != tuple(data.image_shape):
        raise ValueError(f"{path}: images are {tuple(images.shape[1:])} (C, H, W) but the "
                         f"{dataset} test images are {tuple(data.image_shape)}")
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= data.num_classes:
        raise ValueError(f"{path}: labels span [{lo}, {hi}], out of range for {dataset}'s "
                         f"{data.num_classes} classes")
    if saved["mean"] is not None and tuple(round(float(m), 4) for m in saved["mean"]) != \
            tuple(round(float(m), 4) for m in data.mean):
        raise ValueError(f"{path} was normalized with mean {tuple(saved['mean'])} but {dataset} "
                         f"loads with {tuple(data.mean)}")


# --------------------------------------------------------------------------------------------------
# synthetic.png
# --------------------------------------------------------------------------------------------------


def write_picture(out, data, images: torch.Tensor, labels: torch.Tensor, zca,
                  device: torch.device) -> None:
    """``synthetic.png``: the set as the eye sees it (whitening and normalization undone), one
    labelled column per class (:func:`~atom_fast.distill.output.save_grid`)."""
    view = zca.inverse(images.to(device)).cpu() if zca is not None else images
    out.write_with(session.PICTURE, lambda tmp: save_grid(
        data.denormalize(view), labels, data.num_classes, tmp, class_names=data.class_names))


# --------------------------------------------------------------------------------------------------
# results.json and accuracy.png
# --------------------------------------------------------------------------------------------------


def evaluation_part(per_set: Dict[str, dict], *, architectures, config, models: int, seed: int,
                    scores: Optional[dict]) -> dict:
    """results.json's evaluation keys. ``per_set``: set name -> ``{architecture: summary}``, the
    first set being the result and ``random`` the baseline; ``config`` the protocol's EvalConfig;
    ``scores`` DD-Ranking's label-robust score per architecture, or None."""
    names = list(per_set)
    main_set = per_set[names[0]]
    baseline = per_set.get("random") if names[0] != "random" else None
    return {
        **report.headline(main_set),
        "architecture": architectures[0],
        "architectures": main_set,
        "baseline": ({"method": "random", **report.headline(baseline), "architectures": baseline}
                     if baseline else None),
        "label_robust_score": scores,
        "evaluation": {**asdict(config), "architectures": architectures, "models": models,
                       "seed": seed, "accuracy": "test accuracy after the last epoch",
                       "best_of_schedule": "per architecture under best_of_schedule: the best test "
                                           "accuracy over the test schedule, as DataDAM's code and "
                                           "DD-Ranking report it; not the result"},
    }


def results(dataset: str, data, device: torch.device, timings: dict, run: dict,
            evaluation: Optional[dict] = None) -> dict:
    """The content of results.json: the data, the evaluation (:func:`evaluation_part`, or
    ``"evaluation": null`` for a set not evaluated), the timings, the machine, and what was run
    (``run``: the command's own keys, e.g. the method and its config, or the file evaluated)."""
    return {"dataset": dataset, "data_source": data.source,
            "missing_test_classes": data.missing_test_classes,
            **(evaluation if evaluation is not None else {"evaluation": None}),
            "timings": timings, "device": str(device),
            "device_name": environment.device_name(device), "versions": environment.versions(),
            **run}


def evaluated_sets(results: dict) -> Dict[str, dict]:
    """Set name -> ``{architecture: summary}`` of an evaluated results.json: the result under its
    method, then the ``random`` baseline when there is one."""
    sets = {results["method"]: results["architectures"]}
    if results.get("baseline"):
        sets["random"] = results["baseline"]["architectures"]
    return sets


def write_results(out, results: dict, ipc) -> None:
    """Write results.json; an evaluated one gets the accuracy plot first (``accuracy.png``, its path
    recorded under ``"plot"``, None when matplotlib is missing). ``ipc``: images per class, for the
    plot's title."""
    if results["evaluation"] is not None:
        plot = out.write_with(session.PLOT, lambda tmp: save_accuracy_plot(
            report.plot_rows(evaluated_sets(results)), tmp,
            title=f"{results['dataset']}, IPC {ipc}: test accuracy by architecture"))
        results["plot"] = str(out.file(session.PLOT)) if plot else None
    out.write(session.RESULTS, results, as_json=True)
