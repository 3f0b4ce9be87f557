"""One fused distillation step with host synchronization forbidden, and its kernel launches.

On a CUDA GPU: a warm-up step, then one ``Distiller.step`` (fused loop, CIFAR-10 shapes: 10 classes,
3x32x32 random images, ConvNet width 128 depth 3, batch_real 128, DSA on) under
``torch.cuda.set_sync_debug_mode("error")`` (any synchronizing call raises) and ``torch.profiler``;
prints and writes (``--out``) the kernel launches per step (CUDA kernel events, and the runtime's
launch calls) beside the ATen ops dispatched. ``--device meta`` runs the same step on the meta device
on any machine (no kernels; a host read of device memory raises there): the check the test suite
runs on CPU, here for one configuration.

    python tools/sync_check.py --device cuda --out sync.json [--method atom --ipc 1 --backend auto]
"""

import argparse
import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench.launch_budget import OpCounter  # noqa: E402  (ATen ops dispatched, by name)

LAUNCH_CALLS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")


def distiller(device, method="atom", ipc=1, classes=10, backend="auto", size=32, width=128,
              batch_real=128):
    from atom_fast.distill.loop import DistillConfig, Distiller

    g = torch.Generator().manual_seed(0)
    per_class = batch_real + 2
    x = torch.randn(classes * per_class, 3, size, size, generator=g)
    y = torch.arange(classes).repeat_interleave(per_class)
    cfg = DistillConfig(method=method, ipc=ipc, batch_real=batch_real, width=width, depth=3,
                        backend=backend, dsa=True, iterations=3)
    return Distiller(x, y, classes, cfg, device, prefetch=False)


def check(device, **settings):
    """Run the warm-up and the checked step; a dict of what was counted."""
    device = torch.device(device)
    d = distiller(device, **settings)
    d.step(0)
    result = {"device": str(device), "settings": settings}
    counter = OpCounter()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=activities) as prof:
            # only the step: the profiler's own start and stop may synchronize
            torch.cuda.set_sync_debug_mode("error")
            try:
                with counter:
                    d.step(1)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        torch.cuda.synchronize(device)
        events = prof.events()
        result["kernels"] = sum(1 for e in events
                                if e.device_type == torch.autograd.DeviceType.CUDA)
        result["launch_calls"] = sum(1 for e in events if e.name in LAUNCH_CALLS)
    else:
        with counter:
            d.step(1)
    d.close()
    result["aten_ops"] = sum(counter.ops.values())
    result["by_op"] = dict(counter.ops.most_common())
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (the check) or meta (any machine)")
    p.add_argument("--method", default="atom")
    p.add_argument("--ipc", type=int, default=1)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--backend", default="auto")
    p.add_argument("--size", type=int, default=32, help="image side (32: CIFAR)")
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--batch-real", type=int, default=128)
    p.add_argument("--out", help="write the counts as JSON here")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("sync_check: no CUDA GPU (or a CPU build of torch); --device meta runs anywhere",
              file=sys.stderr)
        return 2
    result = check(args.device, method=args.method, ipc=args.ipc, classes=args.classes,
                   backend=args.backend, size=args.size, width=args.width,
                   batch_real=args.batch_real)
    summary = {k: v for k, v in result.items() if k != "by_op"}
    print(json.dumps(summary))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
