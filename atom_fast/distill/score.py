"""DD-Ranking's label-robust score of a synthetic set, and a cache for the full-data accuracy it needs.

With the test accuracies, under one architecture and one evaluation protocol, of networks trained on
the full training set (``full``), on the synthetic set (``synthetic``) and on a random real subset of
the same size (``random``):

    HLR   = full - synthetic              (hard-label recovery: how much of the full data is missing)
    IOR   = synthetic - random            (improvement over random)
    alpha = w * IOR - (1 - w) * HLR       (w = 0.5)
    score = (e^alpha - e^-1) / (e - e^-1)

Accuracies enter as **fractions in [0, 1]** (not percent): then alpha lies in [-1, 1] and the score
in [0, 1], the range DD-Ranking's README and paper give (its leaderboard prints the score x 100%).
Note: DD-Ranking's released ``hard_label.py`` (read at commit b8b0966, June 2025) passes accuracies in
percent to the same formula, which leaves that range; compare with its published scores, not with
numbers printed by that code path. The accuracies here are each evaluation's final-epoch accuracy
(DD-Ranking takes the best over epochs); the records say which.

The full-data accuracy costs a full training run per model, so :func:`full_data_accuracy` computes it
once per (dataset, architecture, protocol, seed, models, data) and keeps it in a JSON file.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, Mapping, Sequence

import torch

from atom_fast.distill.evaluate import mean_std
from atom_fast.distill.output import write_atomic

CACHE_VERSION = 1  # bump when the meaning of a cached accuracy changes


def _fraction(name: str, value) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}") from None
    if not (0.0 <= v <= 1.0):
        hint = " (accuracies are fractions: divide percentages by 100)" if 1.0 < v <= 100.0 else ""
        raise ValueError(f"{name} accuracy must be a fraction in [0, 1], got {value!r}{hint}")
    return v


def label_robust_score(full: float, synthetic: float, random: float, *, weight: float = 0.5) -> Dict[str, float]:
    """DD-Ranking's label-robust score from three accuracies, each a fraction in [0, 1].

    Returns ``{"hlr", "ior", "alpha", "score"}`` (``score`` in [0, 1]). ``weight`` is DD-Ranking's
    ``lrs_lambda`` (0.5 on its leaderboard): the weight of IOR, ``1 - weight`` that of HLR.
    """
    full, synthetic, random = (_fraction(n, v) for n, v in
                               (("full", full), ("synthetic", synthetic), ("random", random)))
    weight = float(weight)
    if not (0.0 <= weight <= 1.0):
        raise ValueError(f"weight must lie in [0, 1], got {weight!r}")
    hlr = full - synthetic
    ior = synthetic - random
    alpha = weight * ior - (1.0 - weight) * hlr
    score = (math.exp(alpha) - math.exp(-1.0)) / (math.e - math.exp(-1.0))
    return {"hlr": hlr, "ior": ior, "alpha": alpha, "score": score}


def label_robust_scores(full: float, synthetic: Sequence[float], random: Sequence[float], *,
                        weight: float = 0.5) -> Dict:
    """The score model by model, as DD-Ranking averages it over evaluation runs: ``synthetic[i]`` and
    ``random[i]`` are the fractions of model ``i`` (the same model index, so the same seeds) and
    ``full`` the full-data fraction. Returns the per-model scores and the mean and std of the score,
    HLR and IOR."""
    synthetic, random = list(synthetic), list(random)
    if not synthetic or len(synthetic) != len(random):
        raise ValueError(f"synthetic and random need the same, non-zero number of models, got "
                         f"{len(synthetic)} and {len(random)}")
    runs = [label_robust_score(full, s, r, weight=weight) for s, r in zip(synthetic, random)]
    out: Dict = {"weight": weight, "scores": [r["score"] for r in runs]}
    for key in ("score", "hlr", "ior"):
        out[f"{key}_mean"], out[f"{key}_std"] = mean_std([r[key] for r in runs])
    return out


# ------------------------------------------------------------------------------------------------
# the full-data accuracy, computed once


def data_fingerprint(images: torch.Tensor, labels: torch.Tensor) -> str:
    """A short hash of a training set's values, shapes and dtypes (BLAKE2b, 16 hex digits): a cached
    full-data accuracy is reused only for the same data, normalization (and ZCA) included."""
    h = hashlib.blake2b(digest_size=8)
    for t in (images, labels):
        t = t.detach().cpu().contiguous()
        h.update(f"{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def full_data_key(*, dataset: str, architecture: str, protocol: Mapping, seed: int, models: int,
                  fingerprint: str) -> Dict:
    """The settings that decide a full-data accuracy, as one JSON-able dict (the cache key).
    ``protocol``: the evaluation settings (e.g. ``asdict(EvalConfig)`` plus the network options)."""
    if not isinstance(protocol, Mapping):
        raise TypeError(f"protocol must be a mapping of evaluation settings, got {type(protocol).__name__}")
    key = {"version": CACHE_VERSION, "dataset": str(dataset), "architecture": str(architecture),
           "protocol": dict(protocol), "seed": int(seed), "models": int(models),
           "data_fingerprint": str(fingerprint)}
    try:
        json.dumps(key, sort_keys=True)
    except TypeError as e:
        raise TypeError(f"protocol must hold JSON values only: {e}") from None
    return key


def _cache_path(cache_dir: Path, key: Dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    slug = "-".join(re.sub(r"[^A-Za-z0-9_.]+", "_", key[k]) for k in ("dataset", "architecture"))
    return cache_dir / f"full-data-{slug}-{digest}.json"


def full_data_accuracy(*, dataset: str, architecture: str, protocol: Mapping, seed: int, models: int,
                       fingerprint: str, compute: Callable[[], Sequence[float]], cache_dir) -> Dict:
    """The full-data test accuracy of ``architecture`` under ``protocol``, from the cache in
    ``cache_dir`` or, the first time, from ``compute()`` (which trains ``models`` networks on the full
    training set and returns their accuracies in %), then cached.

    Returns ``{"accuracies", "accuracy_mean", "accuracy_std", "fraction", "key", "cached", "path"}``;
    ``fraction`` is the mean as a fraction, what :func:`label_robust_score` takes. An entry whose
    stored key differs (or an unreadable file) is recomputed and replaced.
    """
    key = full_data_key(dataset=dataset, architecture=architecture, protocol=protocol, seed=seed,
                        models=models, fingerprint=fingerprint)
    cache_dir = Path(cache_dir)
    path = _cache_path(cache_dir, key)
    if path.exists():
        try:
            entry = json.loads(path.read_text())
            if entry.get("key") == key:
                return _result(entry, key, path, cached=True)
            warnings.warn(f"{path} holds another key; recomputing the full-data accuracy")
        except (OSError, ValueError) as e:
            warnings.warn(f"unreadable full-data cache {path} ({e}); recomputing")
    t = time.perf_counter()
    accuracies = [float(a) for a in compute()]
    if len(accuracies) != key["models"]:
        raise ValueError(f"compute() returned {len(accuracies)} accuracies for models={key['models']}")
    for a in accuracies:
        if not (0.0 <= a <= 100.0):
            raise ValueError(f"compute() must return accuracies in %, got {a!r}")
    entry = {"key": key, "accuracies": accuracies, "seconds": time.perf_counter() - t,
             "torch": torch.__version__, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    cache_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(path, entry, as_json=True)
    return _result(entry, key, path, cached=False)


def _result(entry: Dict, key: Dict, path: Path, cached: bool) -> Dict:
    mean, std = mean_std(entry["accuracies"])
    return {"accuracies": list(entry["accuracies"]), "accuracy_mean": mean, "accuracy_std": std,
            "fraction": mean / 100.0, "key": key, "cached": cached, "path": str(path),
            "seconds": entry.get("seconds")}
