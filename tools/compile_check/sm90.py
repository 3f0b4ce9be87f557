"""Compile every Triton kernel variant the launchers produce for an H100 (sm_90), with no GPU.

The launchers in ``atom_fast.kernels.attention`` are driven on small CPU tensors with the channel and
spatial sizes of the real workloads; each kernel launch is intercepted, specialized exactly as
Triton's JIT would specialize it (argument types, divisibility by 16, constexprs), and compiled
ahead of time to PTX and a cubin with the ptxas that ships in the triton wheel. Nothing runs.

This catches what the interpreter cannot: code that does not lower for the GPU, register spills,
and loads that did not vectorize. It prints one row per variant (registers, spilled bytes,
stack frame, shared memory, widest global load) and exits 1 if any variant failed to compile,
spilled more than SPILL_LIMIT bytes, takes a float scalar argument (the kernels read powers,
weights and eps from a tensor, ``loss_scalars``: the interpreter would round a float argument to
float32), or, for float64 features, converts any value to or from float32 (``through_float32``).

    python tools/compile_check/sm90.py [--quick] [--out FILE.md]

TRITON_INTERPRET must be unset: the interpreter replaces the kernels by Python functions.
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("tools/compile_check/sm90.py: unset TRITON_INTERPRET (the interpreter does not compile)")

import torch  # noqa: E402
import triton  # noqa: E402
import triton.runtime.jit as triton_jit  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402

from atom_fast.kernels import attention as K  # noqa: E402
from atom_fast.layout import class_offsets  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
BIN = os.path.join(os.path.dirname(triton.backends.nvidia.__file__), "bin")
# Triton 3.9 emits PTX 9.x, which only the newer of its two bundled assemblers reads.
PTXAS = next(p for p in (os.path.join(BIN, "ptxas-blackwell"), os.path.join(BIN, "ptxas"))
             if os.path.exists(p))

# (C, H, W): ConvNet layers for CIFAR (32x32, depth 3) and TinyImageNet (64x64, depth 4) at width 128,
# a 128x128 layer (more than one spatial block) and an odd shape.
SHAPES = [(128, 32, 32), (128, 16, 16), (128, 8, 8), (128, 64, 64), (64, 128, 128), (7, 5, 3)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
POWERS = [(4.0, 4.0), (1.0, 8.0), (2.5, 4.0)]
WEIGHTS = [(1.0, 1.0), (0.0, 1.0), (1.0, 0.0)]
# ptxas spills a few bytes on its own in some variants even at 40 registers, far below the limit:
# a handful of local-memory accesses per loop iteration of a program, beside 16 to 64 loaded elements
# per thread. More than this many bytes is treated as a failure.
SPILL_LIMIT = 64
# --quick (the test suite's check): one CIFAR layer and the multi-block layer, fewer combinations.
QUICK = dict(SHAPES=[(128, 32, 32), (64, 128, 128)], DTYPES=[torch.float32, torch.bfloat16, torch.float64],
             POWERS=[(4.0, 4.0), (2.5, 8.0)], WEIGHTS=[(1.0, 1.0), (0.0, 1.0)])


class Recorder:
    """Stands in for ``JITFunction.run``: keeps the specialization of each launch, runs nothing."""

    def __init__(self, fn, backend):
        self.fn, self.backend = fn, backend
        self.binder = triton_jit.create_function_from_signature(fn.signature, fn.params, backend)
        self.variants = {}

    def __call__(self, *args, grid, warmup, **kwargs):
        bound, specialization, options = self.binder(*args, **kwargs)
        options, signature, constexprs, attrs = self.fn._pack_args(
            self.backend, kwargs, bound, specialization, options)
        key = (repr(sorted(signature.items())), repr(sorted(constexprs.items())),
               repr(sorted(attrs.items())), options.num_warps)
        self.variants.setdefault(key, (signature, constexprs, attrs, options))


def drive_launchers():
    """Call every launcher for every shape, dtype, power, weight and class layout above."""
    K_CLASSES, B, IPC = 2, 3, 2
    rl = torch.tensor([1, 0, 1, 0, 0, 1])
    sl = torch.tensor([0, 1, 1, 0])
    rc, sc = torch.bincount(rl), torch.bincount(sl)
    layouts = [  # (class_differences keywords, vector_grad keywords of the synthetic side)
        (dict(real_per_class=B, syn_per_class=IPC), dict(per_class=IPC)),
        (dict(real_order=torch.argsort(rl, stable=True), real_offsets=class_offsets(rc),
              syn_order=torch.argsort(sl, stable=True), syn_offsets=class_offsets(sc)),
         dict(labels=sl, offsets=class_offsets(sc))),
        (dict(real_offsets=class_offsets(rc), syn_offsets=class_offsets(sc)),  # contiguous classes
         dict(labels=torch.sort(sl).values, offsets=class_offsets(sc))),
    ]
    for C, H, W in SHAPES:
        for dtype in DTYPES:
            acc = torch.float64 if dtype == torch.float64 else torch.float32
            real = torch.rand(K_CLASSES * B, C, H, W).to(dtype)
            syn = torch.rand(K_CLASSES * IPC, C, H, W).to(dtype)
            for ps, pc in POWERS:
                for ws, wc in WEIGHTS:
                    hs, hc = ws != 0, wc != 0
                    # one scalars tensor for every launch of a loss call, as the backend does
                    scalars = K.loss_scalars(ps, pc, ws, wc, dtype=acc, device="cpu")
                    rstats = K.attention_stats(real, ps, pc, hs, hc, acc, scalars)
                    sstats = K.attention_stats(syn, ps, pc, hs, hc, acc, scalars)
                    for class_args, side_args in layouts:
                        partials = torch.zeros((K_CLASSES, 2), dtype=acc)
                        DS, DT = K.class_differences(rstats, sstats, K_CLASSES, ps, pc, ws, wc,
                                                     partials, scalars=scalars, **class_args)
                        # the real side as class sums (a distillation step's streamed statistics)
                        real_layout = {name[5:]: value for name, value in class_args.items()
                                       if name.startswith("real_")}
                        syn_layout = {name: value for name, value in class_args.items()
                                      if name.startswith("syn_")}
                        RS, RT = K.class_sums(rstats, K_CLASSES, hs, hc, **real_layout)
                        K.class_differences_from_sums(RS if hs else None, RT if hc else None, rc,
                                                      sstats, K_CLASSES, ps, pc, ws, wc, partials,
                                                      scalars=scalars, **syn_layout)
                        go = torch.ones(1, dtype=acc)
                        GS, GT = K.vector_grad(sstats, DS, DT, go, -1.0, ps, pc, ws, wc,
                                               scalars=scalars, **side_args)
                        K.attention_backward(syn, sstats.scale, GS, GT, ps, pc, hs, hc, scalars)


def resource_usage(ptx):
    """Registers, spilled bytes (stores + loads) and stack frame bytes that ptxas reports for sm_90."""
    arch = re.search(r"^\.target (\w+)", ptx, re.M).group(1)  # sm_90a
    with tempfile.NamedTemporaryFile(suffix=".ptx", mode="w") as f:
        f.write(ptx)
        f.flush()
        out = subprocess.run([PTXAS, f"-arch={arch}", "-v", f.name, "-o", os.devnull],
                             capture_output=True, text=True, check=True).stderr
    regs = int(re.search(r"Used (\d+) registers", out).group(1))
    spills = sum(int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", out))
    stack = int(re.search(r"(\d+) bytes stack frame", out).group(1))
    return regs, spills, stack


def widest_load(ptx):
    """The widest global load in the PTX, e.g. 'v4.b32' (16 bytes per thread) or 'b32'."""
    kinds = re.findall(r"ld\.global(?:\.[a-z]+)*\.((?:v\d\.)?[bfsu]\d+)", ptx)
    def width(k):
        vec = int(k[1]) if k.startswith("v") else 1
        return vec * int(re.search(r"(\d+)$", k).group(1))
    return max(kinds, key=width) if kinds else "-"


def through_float32(ptx):
    """The PTX conversions to or from f32 (``cvt.rn.f32.f64``, ``cvt.f64.f32``, ...): a float64
    variant has none, so no value of a float64 loss passes through float32. (libdevice's float64
    exp2/log2 test the high word of their argument with a few f32 instructions; those are no
    conversions of a value.)"""
    return re.findall(r"^\s*(cvt\.\S*f32\S*)", ptx, re.M)


def describe(constexprs, fn):
    names = fn.arg_names
    parts = []
    for (idx,), value in sorted(constexprs.items()):
        name = names[idx]
        if name.endswith("_ptr") or value is None:
            continue
        parts.append(f"{name}={value}")
    return " ".join(parts)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="also write the table to this markdown file")
    parser.add_argument("--quick", action="store_true", help="fewer shapes and combinations")
    args = parser.parse_args()
    if args.quick:
        globals().update(QUICK)

    backend = make_backend(TARGET)
    kernels = [K._attention_stats_kernel, K._class_diff_kernel, K._class_sums_kernel,
               K._vector_grad_kernel, K._attention_bwd_kernel]
    recorders = {}
    for fn in kernels:
        recorders[fn] = Recorder(fn, backend)
        fn.run = recorders[fn]
    try:
        drive_launchers()
    finally:
        for fn in kernels:
            del fn.run

    rows, failures = [], 0
    for fn, rec in recorders.items():
        for signature, constexprs, attrs, options in rec.variants.values():
            dtypes = sorted({v for k, v in signature.items() if v.startswith("*")})
            label = f"{fn.__name__} | {','.join(dtypes)} | {describe(constexprs, fn)} | {options.num_warps}"
            try:
                # A float argument is rounded to float32 by the interpreter whatever its declared
                # type (compiled code keeps a tl.float64 one), so float64 tests would not see what
                # runs on the GPU: the kernels read their float scalars from a tensor instead.
                float_scalars = [k for k, v in signature.items() if v in ("fp16", "bf16", "fp32", "fp64")]
                if float_scalars:
                    raise TypeError(f"float scalar arguments {float_scalars}: pass them in the "
                                    "loss_scalars tensor")
                compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=TARGET,
                                          options=options.__dict__)
                float_pointers = {v for v in signature.values() if v.startswith(("*fp", "*bf"))}
                if float_pointers == {"*fp64"} and through_float32(compiled.asm["ptx"]):
                    raise TypeError("float64 variant converts through float32: "
                                    f"{sorted(set(through_float32(compiled.asm['ptx'])))}")
                regs, spills, stack = resource_usage(compiled.asm["ptx"])
                shared = compiled.metadata.shared
                load = widest_load(compiled.asm["ptx"])
                status = "ok" if spills == 0 else ("small spill" if spills <= SPILL_LIMIT else "SPILLS")
                failures += spills > SPILL_LIMIT
            except Exception as exc:  # report every failing variant, not just the first
                regs = spills = stack = shared = "-"
                load, status = "-", f"FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
                failures += 1
            rows.append(f"| {label} | {regs} | {spills} | {stack} | {shared} | {load} | {status} |")

    table = ["| kernel | pointer types | constexprs | warps | registers | spill bytes | stack bytes "
             "| shared bytes | widest load | status |", "|---|---|---|---|---|---|---|---|---|---|", *rows]
    header = (f"sm_90 ahead-of-time compile of {len(rows)} kernel variants "
              f"(triton {triton.__version__}, torch {torch.__version__}): {failures} failed or spilled "
              f"more than {SPILL_LIMIT} bytes\n")
    print(header)
    print("\n".join(table))
    if args.out:
        with open(args.out, "w") as f:
            f.write(header + "\n" + "\n".join(table) + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
