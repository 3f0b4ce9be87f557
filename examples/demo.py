"""Demo: the fused ATOM loss on the features of a random ConvNet, checked against the reference.

One DataDAM/ATOM-style matching step: real and synthetic images of every class go through a freshly
initialized ConvNet (conv 3x3 -> instance norm -> ReLU -> avg-pool, per block); the attention loss
is taken on the pre-pool features of blocks 1..L-1 and the MMD term on the final embedding. The
loss and its gradient w.r.t. the synthetic *images* are computed with every available backend and
compared, then the loss alone (forward + backward over the features) is timed.

On a machine without CUDA, Triton runs under its interpreter (TRITON_INTERPRET=1): correct but
slow, so its time there is no speed figure. Usage: ``python examples/demo.py [--help]``.
"""

import argparse
import os
import statistics
import time

import torch
from torch import nn

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of triton

import atom_fast  # noqa: E402


def convnet(channels, width, depth):
    """ConvNet blocks as in DM/DataDAM (instance norm = GroupNorm(C, C)); returns a ModuleList."""
    blocks = nn.ModuleList()
    for i in range(depth):
        blocks.append(nn.Sequential(nn.Conv2d(channels if i == 0 else width, width, 3, padding=1),
                                    nn.GroupNorm(width, width, affine=True), nn.ReLU()))
    return blocks


def features(blocks, images):
    """Pre-pool features of every block and the flattened embedding after the last pooling."""
    feats, x = [], images
    for block in blocks:
        f = block(x)
        feats.append(f)
        x = nn.functional.avg_pool2d(f, 2)
    return feats, x.flatten(1)


def matching_loss(blocks, real_images, syn_images, K, backend, args):
    with torch.no_grad():
        real_feats, real_emb = features(blocks, real_images)
    syn_feats, syn_emb = features(blocks, syn_images)
    attention = atom_fast.attention_loss(real_feats[:-1], syn_feats[:-1], K,
                                         spatial_power=args.power, channel_power=args.power,
                                         backend=backend)
    return 100 * attention + 100 * 0.01 * atom_fast.mmd_loss(real_emb, syn_emb, K)


def time_loss(real_feats, syn_feats, K, backend, args, device):
    """Median seconds of forward + backward of attention_loss over fixed features."""
    syn_feats = [f.detach().requires_grad_() for f in syn_feats]
    times = []
    for i in range(args.repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = atom_fast.attention_loss(real_feats, syn_feats, K, spatial_power=args.power,
                                        channel_power=args.power, backend=backend)
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:  # the first call compiles / warms up
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", type=int, default=10, help="number of classes K")
    parser.add_argument("--batch-real", type=int, default=128 if cuda else 16,
                        help="real images per class (ATOM: 128)")
    parser.add_argument("--ipc", type=int, default=10, help="synthetic images per class")
    parser.add_argument("--width", type=int, default=128 if cuda else 16, help="ConvNet width")
    parser.add_argument("--depth", type=int, default=3, help="ConvNet depth (3 for 32x32)")
    parser.add_argument("--power", type=float, default=4.0, help="spatial and channel power")
    parser.add_argument("--repeats", type=int, default=20 if cuda else 3, help="timed repeats")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    device = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(args.seed)
    K = args.classes
    blocks = convnet(3, args.width, args.depth).to(device)
    for p in blocks.parameters():
        p.requires_grad_(False)
    real_images = torch.randn(K * args.batch_real, 3, 32, 32, device=device)
    syn_init = torch.randn(K * args.ipc, 3, 32, 32, device=device)
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    print(f"device {device}{' (Triton interpreted)' if interpreted else ''}; {K} classes x "
          f"{args.batch_real} real, IPC {args.ipc}; ConvNet width {args.width}, depth {args.depth}; "
          f"power {args.power}")

    fused = ["triton"] + (["native"] if atom_fast.backends.native_available(device) else [])
    results = {}
    for backend in ["reference"] + fused:
        syn_images = syn_init.clone().requires_grad_()
        loss = matching_loss(blocks, real_images, syn_images, K, backend, args)
        loss.backward()
        results[backend] = (loss.detach(), syn_images.grad)
    ref_loss, ref_grad = results["reference"]
    errors = []
    print()
    for backend in fused:
        loss, grad = results[backend]
        loss_err = (loss - ref_loss).abs().item() / ref_loss.abs().item()
        grad_err = ((grad - ref_grad).norm() / ref_grad.norm()).item()
        errors += [loss_err, grad_err]
        print(f"{backend:>7}: matching loss {loss.item():.6f} (reference {ref_loss.item():.6f}), "
              f"rel. error {loss_err:.1e}; d loss / d synthetic images rel. error (L2) {grad_err:.1e}")

    with torch.no_grad():
        real_feats, _ = features(blocks, real_images)
        syn_feats, _ = features(blocks, syn_init)
    real_feats, syn_feats = real_feats[:-1], syn_feats[:-1]
    feature_mb = sum(f.numel() * f.element_size() for f in real_feats + syn_feats) / 1e6
    print(f"\nattention loss forward+backward over {feature_mb:.0f} MB of features "
          f"(median of {args.repeats}):")
    print("| backend | ms |\n|---|---|")
    for backend in ["reference"] + fused:
        ms = 1e3 * time_loss(real_feats, syn_feats, K, backend, args, device)
        note = " (interpreted: not a speed figure)" if backend == "triton" and interpreted else ""
        print(f"| {backend} | {ms:.1f}{note} |")
    ok = max(errors) < 1e-4
    print("\nfused losses match the reference" if ok else "\nMISMATCH between a fused loss and the reference")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
