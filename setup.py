"""atom-fast. The top-level ``kernels/`` folder installs as ``atom_fast.kernels`` (never as a
top-level ``kernels`` package)."""

from setuptools import setup

setup(
    name="atom-fast",
    version="0.1.0",
    description="Fused attention-matching losses (ATOM, DataDAM, DM) for dataset distillation",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=["atom_fast", "atom_fast.kernels"],
    package_dir={"atom_fast": "atom_fast", "atom_fast.kernels": "kernels"},
    # torch is pinned by the install script (constraints.txt): a bare range would pull CUDA wheels.
    install_requires=["torch>=2.1", "numpy"],
    extras_require={
        "triton": ["triton>=3.0"],
        "test": ["pytest>=7"],
    },
)
