"""The backends of the attention loss: which exist, which is available, which one runs.

Three modules compute the same loss:

- :mod:`~atom_fast.backends.reference`: plain PyTorch, written like the math; the ground truth.
- :mod:`~atom_fast.backends.triton`: fused Triton kernels (``atom_fast.kernels``; CUDA, or the
  Triton interpreter on CPU for tests).
- :mod:`~atom_fast.backends.native`: the C++/CUDA op of ``csrc/`` (``atom_fast._C``).

The contract
------------
Each backend module defines these three functions, with these names and argument orders. Their
arguments are already validated (``atom_fast.checks``, ``atom_fast.layout``) by the public API in
``atom_fast.loss`` and ``atom_fast.statistics``, which is their only caller; a backend does not
check again, and never reads a device tensor on the host.

``attention_loss(reals, syns, layout, spatial_power, channel_power, spatial_weight, channel_weight)``
    The features path. ``reals``, ``syns``: equal-length tuples of ``(N, C, H, W)`` features, one
    per layer, of one dtype and device; ``layout``: an ``atom_fast.layout.ClassLayout``. Returns the
    0-dim loss summed over layers, differentiable w.r.t. every feature tensor that requires grad.
``class_attention_sums(features, labels, num_classes, spatial_power, channel_power, has_spatial, has_channel, grouped=None)``
    The statistics path. ``features``: ``(N, C, H, W)`` of one layer; ``labels``: int64 ``(N,)``
    in ``[0, num_classes)`` on the features' device, or None (equal contiguous blocks). Returns
    ``(S, T)``: the per-class sums ``(K, H*W)`` and ``(K, C)`` of the L2-normalized spatial and
    channel attention vectors (each None when its flag is False), detached.
``attention_loss_from_sums(real_spatial, real_channel, real_counts, syn, syn_labels, num_classes, spatial_power, channel_power, spatial_weight, channel_weight, grouped=None)``
    The from-sums path: one layer's loss with the real side given as those sums (None where the
    weight is 0) and ``real_counts`` ``(K,)`` int64 samples per class on syn's device. Returns the
    0-dim loss, equal in value and in gradient w.r.t. ``syn`` to the features path on the real
    features behind the sums.

``grouped`` is the ``(offsets, order)`` of the labels (``atom_fast.layout.grouping``) on the
features' device, computed once per call by the caller where the labels are (usually the host)
and shared by the layers; a backend that sums by labels may ignore it.

Rules every backend follows, each defined once: the accumulation dtype and the norm floor
(``atom_fast.constants``: float32 sums for float32/float16/bfloat16 features, float64 for float64;
vectors computed from ``F / max|F|`` and normalized against ``eps / max|F|^p`` in log space), and the
class order and offsets (``atom_fast.layout``: samples sorted stably by class, ``K + 1`` offsets).
A weight of 0 skips its term; both weights 0 give a zero still connected to the inputs.

Per-sample statistics saved for backward: the native op keeps one ``(N, H*W + C + 3)`` row per
sample (``[s' | t' | m | ||s'|| | ||t'||]``, ``csrc/constants.h``): a CPU thread owns a sample and
writes and rereads one contiguous row. The Triton kernels keep the same values and the two norm
floors as seven tensors (``kernels.attention.SideStats``): each kernel addresses its vector with
unit stride from an aligned base, which a packed row of odd width ``H*W + C + 3`` would break for
vectorized GPU loads.
"""

import importlib
import os
import warnings

import torch

BACKENDS = ("auto", "triton", "native", "reference")
BACKEND_ENV = "ATOM_FAST_BACKEND"

from atom_fast.backends import native, reference, triton  # noqa: E402  (after the names above)


@torch.compiler.assume_constant_result  # torch.compile cannot trace an import
def triton_available():
    """Whether the triton package imports (the Triton backend is loaded on first use)."""
    try:
        importlib.import_module("triton")  # the package, not this package's backend module
    except ImportError:
        return False
    return True


def triton_interpreted():
    """Whether Triton runs its interpreter (``TRITON_INTERPRET=1`` before it was imported)."""
    return triton.interpreted()


def native_available(device=None):
    """Whether the native op (csrc/, built as atom_fast._C) is loaded, with kernels for ``device``
    (the meta device: its fake kernels, shapes only)."""
    if not native.AVAILABLE:
        return False
    return (device is None or device.type in ("cpu", "meta")
            or (device.type == "cuda" and native.HAS_CUDA))


_FALLBACK_WARNED = False


def _warn_native_missing():
    """One warning per process when "auto" wanted the native op on CPU but it is not built."""
    global _FALLBACK_WARNED
    if not _FALLBACK_WARNED:
        _FALLBACK_WARNED = True
        warnings.warn("atom_fast: the native C++ op is not built (" + str(native.LOAD_ERROR) +
                      "); backend='auto' falls back to the slower reference on CPU. Reinstall with "
                      "scripts/install.sh (pip install --no-build-isolation -e .) to build it.",
                      RuntimeWarning, stacklevel=5)


def check_backend(backend):
    """A backend name from BACKENDS."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def resolve_backend(backend, device):
    """The concrete backend ("triton", "native" or "reference") for ``backend`` on ``device``.

    "auto" takes ``ATOM_FAST_BACKEND`` when it is set, else Triton on CUDA, the native op where it
    has kernels for the device, and the reference otherwise (with one warning on CPU, where the
    native op should have been built). An explicit backend that cannot run raises.
    """
    backend = check_backend(backend)
    if backend == "auto":
        env = os.environ.get(BACKEND_ENV, "").strip()
        if env:
            if env not in BACKENDS:
                raise ValueError(f"environment variable {BACKEND_ENV} must be one of {BACKENDS}, "
                                 f"got {env!r}")
            backend = env
    if backend == "auto":
        if device.type == "cuda" and triton_available():
            return "triton"
        if native_available(device):
            return "native"
        if device.type == "cpu":
            _warn_native_missing()
        return "reference"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' needs the triton package (pip install triton)")
        if device.type not in ("cuda", "meta") and not triton_interpreted():
            raise RuntimeError(f"backend='triton' runs on CUDA tensors, got {device}; on CPU set "
                               "TRITON_INTERPRET=1 before triton is imported (slow: for tests)")
    if backend == "native" and not native_available(device):
        if not native.AVAILABLE:
            raise RuntimeError("backend='native': the native C++ op (atom_fast._C) is not built ("
                               f"{native.LOAD_ERROR}). Reinstall with scripts/install.sh, i.e. "
                               "pip install --no-build-isolation -e . with torch installed first; "
                               "or use backend='reference'")
        raise RuntimeError(f"backend='native': this build has no kernels for {device.type} tensors "
                           "(the CUDA kernels are built only with a CUDA torch and toolkit; "
                           "ATOM_FAST_BUILD_CUDA=1 forces them)")
    return backend


MODULES = {"reference": reference, "triton": triton, "native": native}


def backend_module(backend, device):
    """The module implementing ``backend`` on ``device`` (see :func:`resolve_backend`)."""
    return MODULES[resolve_backend(backend, device)]
