"""How far from float64 each backend's float64 loss is: the relative error of the loss and of the
gradient against an independent float64 implementation (NumPy, explicit loops:
``tests/backends/test_float64.py``), with weights and powers that are not exact in float32.

    python bench/float64_errors.py --out bench/results/float64-errors-DATE.md

One row per backend, path (features: ``attention_loss(real, syn)``; statistics: ``class_statistics``
in two chunks then ``attention_loss(stats, syn)``) and (powers, weights) row of the test; the
columns are the largest relative error over the loss and every gradient. A float scalar rounded to
float32 on its way into a kernel shows as ~1e-8; float64 throughout gives ~1e-15. Triton runs
interpreted where there is no GPU (set before it is imported, as the tests do).
"""

import argparse
import datetime
import os
import platform
import sys
from pathlib import Path

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "backends")]

import atom_fast  # noqa: E402
from atom_fast.backends import native_available, triton_available  # noqa: E402
import test_float64 as f64  # noqa: E402


def _errors(backend, path, ps, pc, ws, wc, use_labels):
    K, B, IPC = 3, 3, 2
    reals, syns, rl, sl = f64._inputs(K, B, IPC, use_labels)
    want_loss, want_real, want_syn = f64._expected(reals, syns, rl, sl, ps, pc, ws, wc)
    device = reals[0].device
    up = torch.tensor(f64.UPSTREAM, dtype=torch.float64, device=device)
    kw = dict(spatial_power=ps, channel_power=pc, spatial_weight=ws, channel_weight=wc, backend=backend)
    syns = [s.clone().requires_grad_() for s in syns]
    if path == "features":
        reals = [r.clone().requires_grad_() for r in reals]
        if use_labels:
            loss = atom_fast.attention_loss(reals, syns, real_labels=rl.to(device),
                                            syn_labels=sl.to(device), **kw)
        else:
            loss = atom_fast.attention_loss(reals, syns, K, **kw)
        grads = torch.autograd.grad(loss, reals + syns, up)
        wants = want_real + want_syn
    else:
        chunks = (slice(0, 4), slice(4, K * B))
        stats = sum(atom_fast.class_statistics([r[c] for r in reals], K, labels=rl[c].to(device),
                                               spatial_power=ps, channel_power=pc, spatial=ws != 0,
                                               channel=wc != 0, backend=backend) for c in chunks)
        loss = atom_fast.attention_loss(stats, syns, syn_labels=sl.to(device) if use_labels else None,
                                        **kw)
        grads = torch.autograd.grad(loss, syns, up)
        wants = want_syn
    loss_err = f64.relative_error(loss.item(), want_loss)
    grad_err = max(f64.relative_error(g.cpu().numpy(), w) for g, w in zip(grads, wants))
    return loss_err, grad_err


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write the table here (Markdown); default: print it")
    args = parser.parse_args(argv)
    backends = ["reference"] + (["native"] if native_available(torch.device("cpu")) else []) \
        + (["triton"] if triton_available() else [])
    rows = []
    for backend in backends:
        for path in ("features", "statistics"):
            for name, (ps, pc, ws, wc) in f64.TERMS.items():
                loss_err, grad_err = _errors(backend, path, ps, pc, ws, wc, use_labels=True)
                rows.append(f"| {backend} | {path} | {name} | {loss_err:.2e} | {grad_err:.2e} |")
                print(rows[-1], flush=True)
    import triton  # noqa: F401  (versions below)
    lines = [
        "# float64 loss and gradient against independent float64 loops",
        "",
        f"- Command: `python bench/float64_errors.py{' --out ' + args.out if args.out else ''}`",
        f"- Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; machine: "
        f"{platform.machine()}, {os.cpu_count()} cores, {platform.processor() or 'cpu'}; "
        f"torch {torch.__version__}, triton {sys.modules['triton'].__version__}"
        f"{' (interpreted)' if os.environ.get('TRITON_INTERPRET') == '1' else ''}",
        "- Shapes: two layers (5x3x4, 3x2x2), 3 classes x 3 real, IPC 2, labels shuffled; upstream "
        "gradient 0.7. Columns: relative error of the loss; largest relative error over the gradients "
        "(max |got - want| / max |want| per tensor).",
        "",
        "| backend | path | powers, weights (spatial, channel) | loss | gradient |",
        "|---|---|---|---|---|",
        *rows,
        "",
    ]
    text = "\n".join(lines)
    if args.out:
        Path(args.out).write_text(text)
    else:
        print(text)


if __name__ == "__main__":
    main()
