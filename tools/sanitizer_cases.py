"""Every GPU kernel of atom-fast once, on small shapes: the program compute-sanitizer runs.

Through the public API, so the cases do not depend on the kernels' internals: for each fused
backend on CUDA (``triton``: the four Triton kernels; ``native``: the CUDA kernels of the native op),
forward and backward of ``attention_loss`` with

- equal class blocks and with shuffled labels (the per-class order/permutation paths),
- both attentions, spatial only and channel only (ws = 0 / wc = 0 variants),
- integer and fractional powers,
- an odd shape (C, H, W not powers of two), a layer whose H*W spans several blocks,
- float32, float16, bfloat16 and float64,
- real features that also require a gradient (the backward runs on both sides),
- the real side given as class statistics (``class_statistics``, then ``attention_loss`` of the
  statistics: the statistics kernels and the from-sums loss and backward).

Each result is checked against the reference loosely (the point is memory and race errors, the
accuracy is the test suite's job); a mismatch exits 1.

    python tools/sanitizer_cases.py [--backends triton,native]
    compute-sanitizer --tool memcheck python tools/sanitizer_cases.py
"""

import argparse
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SHAPES = [(7, 5, 3), (16, 8, 8), (4, 48, 40)]  # odd; a CIFAR-like tile; H*W = 1920 spans blocks
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
POWERS = [(4.0, 4.0), (2.5, 1.0)]
WEIGHTS = [(1.0, 1.0), (0.0, 1.0), (1.0, 0.0)]
TOL = {torch.float64: 1e-8, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}


def cases():
    """(name, kwargs) for every case; few enough to run under racecheck in minutes."""
    out = []
    for shape in SHAPES:
        for dtype in DTYPES:
            out.append((f"{'x'.join(map(str, shape))} {str(dtype)[6:]} blocks",
                        dict(shape=shape, dtype=dtype, ps=4.0, pc=4.0, ws=1.0, wc=1.0, labels=False,
                             real_grad=False)))
    base = dict(shape=(7, 5, 3), dtype=torch.float32, labels=False, real_grad=False)
    for ps, pc in POWERS:
        for ws, wc in WEIGHTS:
            out.append((f"7x5x3 float32 ps={ps:g} pc={pc:g} ws={ws:g} wc={wc:g}",
                        dict(base, ps=ps, pc=pc, ws=ws, wc=wc)))
    out.append(("7x5x3 float32 labels", dict(base, ps=4.0, pc=4.0, ws=1.0, wc=1.0, labels=True)))
    out.append(("16x8x8 float32 labels, real requires grad",
                dict(base, shape=(16, 8, 8), ps=2.5, pc=4.0, ws=1.0, wc=0.5, labels=True, real_grad=True)))
    for shape, dtype, labels in [((16, 8, 8), d, False) for d in DTYPES] + [((7, 5, 3), torch.float32, True),
                                                                           ((4, 48, 40), torch.float32, False)]:
        out.append((f"{'x'.join(map(str, shape))} {str(dtype)[6:]} {'labels' if labels else 'blocks'}, "
                    "real side as class statistics",
                    dict(base, shape=shape, dtype=dtype, ps=4.0, pc=2.5, ws=1.0, wc=1.0, labels=labels,
                         stats=True)))
    return out


def run_case(backend, shape, dtype, ps, pc, ws, wc, labels, real_grad, device, stats=False):
    import atom_fast

    K, B, IPC = 3, 4, 2
    g = torch.Generator().manual_seed(0)
    real = torch.randn(K * B, *shape, generator=g).relu_().to(device, dtype).requires_grad_(real_grad)
    syn = torch.randn(K * IPC, *shape, generator=g).relu_().to(device, dtype).requires_grad_()
    kw = dict(spatial_power=ps, channel_power=pc, spatial_weight=ws, channel_weight=wc)
    if labels:
        rl = torch.arange(K).repeat_interleave(B)[torch.randperm(K * B, generator=g)].to(device)
        sl = torch.arange(K).repeat_interleave(IPC)[torch.randperm(K * IPC, generator=g)].to(device)
        where = dict(real_labels=rl, syn_labels=sl)
    else:
        where = dict(num_classes=K)
    if stats:  # the real side reduced to class statistics by the backend first
        sums = atom_fast.class_statistics([real], K, labels=where.get("real_labels"), spatial_power=ps,
                                          channel_power=pc, backend=backend)
        syn_where = {"syn_labels": where["syn_labels"]} if labels else where
        loss = atom_fast.attention_loss(sums, [syn], backend=backend, **syn_where, **kw)
    else:
        loss = atom_fast.attention_loss(real, syn, backend=backend, **where, **kw)
    grad_out = torch.rand((), generator=g).item() + 0.5
    loss.backward(torch.tensor(grad_out, device=device, dtype=loss.dtype))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    # the float64 reference on the same (rounded) inputs
    r64 = real.detach().double().requires_grad_(real_grad)
    s64 = syn.detach().double().requires_grad_()
    ref = atom_fast.attention_loss(r64, s64, backend="reference", **where, **kw)
    (ref * grad_out).backward()
    tol = TOL[dtype]
    ok = torch.allclose(loss.double(), ref, rtol=tol, atol=tol * 1e-3)
    ok &= torch.allclose(syn.grad.double(), s64.grad, rtol=tol, atol=tol * max(s64.grad.abs().max().item(), 1e-30))
    if real_grad:
        ok &= torch.allclose(real.grad.double(), r64.grad, rtol=tol,
                             atol=tol * max(r64.grad.abs().max().item(), 1e-30))
    return bool(ok)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backends", default="triton,native", help="comma-separated: triton, native")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("sanitizer_cases.py: no CUDA GPU (torch.cuda.is_available() is False); these cases run "
              "the GPU kernels and need one", file=sys.stderr)
        return 2
    import atom_fast

    device = torch.device("cuda")
    failed = []
    for backend in args.backends.split(","):
        if backend == "native" and not atom_fast.backends.native_available(device):
            print("native: the CUDA part of the native op is not built (ATOM_FAST_BUILD_CUDA=1 pip install "
                  "--no-build-isolation -e .)", file=sys.stderr)
            failed.append("native: not built")
            continue
        for name, kw in cases():
            ok = run_case(backend, device=device, **kw)
            print(f"{backend:7s} {name}: {'ok' if ok else 'MISMATCH vs reference'}", flush=True)
            if not ok:
                failed.append(f"{backend} {name}")
    print(f"{len(failed)} failed" + (": " + "; ".join(failed) if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
