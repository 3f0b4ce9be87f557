"""What a results file records about the machine: the device's name and the library versions.

One home for these, so the driver's ``results.json`` and the benchmarks' JSON describe a run the same
way. Reading versions imports nothing (package metadata only): asking for Triton's version must not
import Triton, which has to see ``TRITON_INTERPRET`` first.
"""

import importlib.metadata
import os
import platform
import re

import torch

# packages whose versions a result depends on, by distribution name
_PACKAGES = ("torch", "triton", "kornia", "numpy")


def cpu_name() -> str:
    """The CPU's model name and the cores this process sees, e.g. 'AMD EPYC 7763 (2 cores visible)'."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} cores visible)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine() or 'cpu'} ({os.cpu_count()} cores visible)"


def device_name(device) -> str:
    """A human-readable name of ``device`` (a torch.device or a string): the GPU's name for CUDA
    (e.g. 'NVIDIA H100 80GB HBM3'), the CPU's model name otherwise."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


def device_slug(device) -> str:
    """A short name for file names: 'cpu', 'h100', 'a100', 'l40s', ... ('cuda' for an unknown GPU)."""
    device = torch.device(device)
    if device.type != "cuda":
        return "cpu"
    return gpu_slug(torch.cuda.get_device_name(device))


def gpu_slug(name: str) -> str:
    """The file-name slug of a GPU name: 'NVIDIA H100 80GB HBM3' -> 'h100'."""
    m = re.search(r"\b(gh200|h200|h100|h800|b200|a100|a800|a10g?|l40s?|l4|v100|t4|rtx ?\w+)\b", name.lower())
    return re.sub(r"[^a-z0-9]+", "", m.group(1)) if m else "cuda"


def _version(distribution):
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions() -> dict:
    """Python, the platform, atom_fast, torch (and the CUDA/cuDNN it was built with), triton, kornia,
    numpy; ``None`` for a package that is not installed."""
    from atom_fast import __version__

    out = {"python": platform.python_version(), "platform": platform.platform(), "atom_fast": __version__}
    out.update({name: _version(name) for name in _PACKAGES})
    out["torch"] = torch.__version__  # the running one (an editable or source build has no metadata)
    out["cuda"] = torch.version.cuda
    out["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return out
