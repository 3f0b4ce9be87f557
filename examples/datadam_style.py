"""A DataDAM-style distillation loop on MNIST, and the two-line change that puts atom_fast in it.

The loop below is written the way DataDAM's ``main_DataDAM.py`` writes it: real images sampled per
class with ``np.random.permutation``, all classes concatenated into one forward pass, forward hooks on
the ReLUs that collect (clone) the feature maps, the real maps ``.detach()``ed, DataDAM's
``get_attention`` + ``error(..., "MSE_B")`` on the maps of every layer but the last, and the output
(embedding) term on the last. ``--loss atom_fast`` runs the same loop with the change a user of such a
codebase makes::

    # before (DataDAM)
    loss = torch.tensor(0.0)
    ...
        real_attention = get_attention(real_maps[layer].detach(), param=1, exp=4, norm='l2')
        syn_attention = get_attention(syn_maps[layer], param=1, exp=4, norm='l2')
        tl = 100 * error(real_attention, syn_attention, err_type="MSE_B")

    # after (atom_fast)
    loss = torch.tensor(0.0, device=args.device)                                        # 1
    ...
        tl = 100 * atom_fast.attention_loss(real_maps[layer].detach(), syn_maps[layer],
                                            num_classes, spatial_power=4, channel_weight=0)  # 2

``num_classes`` tells ``attention_loss`` that the batch is laid out in equal, contiguous blocks per
class, the reshape ``MSE_B`` does. ``channel_weight=0`` keeps DataDAM's spatial-only loss (the two give
the same value); drop it (and set ``channel_power``) for ATOM's spatial + channel loss.

Mind the accumulator (line 1). DataDAM sums the layer terms in place into ``loss = torch.tensor(0.0)``,
a CPU tensor. That works in DataDAM only because its ``error`` moves the attention maps to the CPU
and returns a CPU value. ``atom_fast.attention_loss`` returns its value on the features' device (the
fused kernels never leave the GPU), and an in-place ``+=`` of a CUDA tensor into a CPU tensor fails,
so the accumulator must be created on the device.

DataDAM's released code calls ``get_attention(..., exp=1)`` while its paper reports p = 4; ``--power``
sets it. DSA augmentation (which DataDAM applies per class with a shared seed) is left out to keep the
loop short; ``atom_fast.distill.augment`` has a siamese one. The defaults are small (width 32, 16 real
images per class, 40 iterations, one evaluation model of 50 epochs) so that it runs in well under a
minute on an idle CPU core. Usage::

    python examples/datadam_style.py                     # DataDAM's get_attention + error
    python examples/datadam_style.py --loss atom_fast    # the same loop with atom_fast
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

import atom_fast
from atom_fast.distill.data import load_dataset
from atom_fast.distill.evaluate import EvalConfig, evaluate
from atom_fast.distill.networks import ConvNet


def get_attention(feature_set, param=1, exp=4, norm="l2"):
    """DataDAM's spatial attention (its ``param=1``, ``norm='l2'`` branch): sum over channels of
    ``|F|^exp``, flattened per sample and L2-normalized."""
    attention_map = torch.sum(torch.abs(feature_set) ** exp, dim=1)
    return F.normalize(attention_map.view(feature_set.size(0), -1), p=2.0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--loss", choices=("datadam", "atom_fast"), default="datadam")
    p.add_argument("--iterations", type=int, default=40)
    p.add_argument("--ipc", type=int, default=1)
    p.add_argument("--batch-real", type=int, default=16, help="real images per class (DataDAM: 64)")
    p.add_argument("--width", type=int, default=32, help="ConvNet width (DataDAM: 128)")
    p.add_argument("--power", type=float, default=4.0, help="attention power (DataDAM's exp)")
    p.add_argument("--lr-img", type=float, default=1.0)
    p.add_argument("--task-balance", type=float, default=0.01)
    p.add_argument("--eval-epochs", type=int, default=50, help="0: skip the evaluation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)

    data = load_dataset("mnist", None)
    num_classes, channel, im_size = data.num_classes, data.channels, data.im_size

    ''' organize the real dataset '''
    images_all = data.train_images.to(args.device)
    labels_all = data.train_labels
    indices_class = [torch.nonzero(labels_all == c).flatten().tolist() for c in range(num_classes)]

    def get_images(c, n):  # get random n images from class c
        idx_shuffle = np.random.permutation(indices_class[c])[:n]
        return images_all[idx_shuffle]

    ''' initialize the synthetic data from real images '''
    image_syn = torch.randn(size=(num_classes * args.ipc, channel, im_size[0], im_size[1]),
                            dtype=torch.float, requires_grad=True, device=args.device)
    label_syn = torch.arange(num_classes, device=args.device).repeat_interleave(args.ipc)
    for c in range(num_classes):
        image_syn.data[c * args.ipc:(c + 1) * args.ipc] = get_images(c, args.ipc).detach().data
    optimizer_img = torch.optim.SGD([image_syn], lr=args.lr_img, momentum=0.5)

    ''' hooks that collect the ReLU outputs '''
    activations = {}

    def get_activation(name):
        def hook_func(m, inp, op):
            activations[name] = op.clone()
        return hook_func

    def refresh_activations():
        maps = list(activations.values())
        activations.clear()
        return maps

    def attach_hooks(net):
        relus = [m for m in net.modules() if isinstance(m, nn.ReLU)]
        return [m.register_forward_hook(get_activation(f"ReLU_{i}")) for i, m in enumerate(relus)]

    def error(real, syn, err_type="MSE_B"):  # DataDAM's "MSE_B": class means, then squared differences
        n_real, n_syn = real.shape[0] // num_classes, syn.shape[0] // num_classes
        return torch.sum((torch.mean(real.reshape(num_classes, n_real, -1), dim=1).cpu()
                          - torch.mean(syn.cpu().reshape(num_classes, n_syn, -1), dim=1)) ** 2)

    losses = []
    start = time.perf_counter()
    for it in range(args.iterations):
        ''' a fresh random network, parameters frozen '''
        net = ConvNet(channel, num_classes, im_size, width=args.width).to(args.device)
        net.train()
        for param in list(net.parameters()):
            param.requires_grad = False

        ''' update synthetic data '''
        if args.loss == "datadam":
            loss = torch.tensor(0.0)  # DataDAM: on the CPU, like the value error() returns
        else:
            loss = torch.tensor(0.0, device=args.device)  # atom_fast's value lives on the device

        images_real_all = torch.cat([get_images(c, args.batch_real) for c in range(num_classes)], dim=0)
        images_syn_all = image_syn.reshape(num_classes * args.ipc, channel, im_size[0], im_size[1])

        hooks = attach_hooks(net)
        output_real = net.embed(images_real_all).detach()
        real_maps = refresh_activations()
        output_syn = net.embed(images_syn_all)
        syn_maps = refresh_activations()
        for h in hooks:
            h.remove()

        for layer in range(len(real_maps) - 1):
            if args.loss == "datadam":
                real_attention = get_attention(real_maps[layer].detach(), param=1, exp=args.power, norm="l2")
                syn_attention = get_attention(syn_maps[layer], param=1, exp=args.power, norm="l2")
                tl = 100 * error(real_attention, syn_attention, err_type="MSE_B")
            else:
                tl = 100 * atom_fast.attention_loss(real_maps[layer].detach(), syn_maps[layer], num_classes,
                                                    spatial_power=args.power, channel_weight=0)
            loss += tl

        output_loss = 100 * args.task_balance * error(output_real, output_syn, err_type="MSE_B")
        loss += output_loss

        optimizer_img.zero_grad()
        loss.backward()
        optimizer_img.step()
        losses.append(loss.item())
        if it % 10 == 0 or it == args.iterations - 1:
            print(f"iter {it:4d}  loss {losses[-1]:.4f}  ({time.perf_counter() - start:.1f} s)")

    result = {"losses": losses, "images": image_syn.detach().cpu(), "labels": label_syn.cpu(),
              "seconds": time.perf_counter() - start}
    if args.eval_epochs > 0:
        record, = evaluate(image_syn.detach(), label_syn, data.test_images.to(args.device),
                           data.test_labels.to(args.device), num_classes, architecture="convnet",
                           config=EvalConfig(epochs=args.eval_epochs, test_every=args.eval_epochs),
                           model_indices=[0], seed=args.seed, network_kwargs={"width": args.width})
        result["accuracy"] = record.final_accuracy
        print(f"ConvNet (width {args.width}) trained on the {len(label_syn)} synthetic images for "
              f"{args.eval_epochs} epochs: "
              f"{record.final_accuracy:.2f}% test accuracy")
    return result


if __name__ == "__main__":
    main()
