"""Evaluate a QKFormer: accuracy, spike firing rates, theoretical energy, pictures of what the
network does inside, and the memory / time experiment that shows why Q-K attention is linear.

Reference: Zhou et al., "QKFormer: Hierarchical Spiking Transformer using Q-K Attention",
NeurIPS 2024 (arXiv:2403.16552). What this file reproduces:
  * Section 4.3, Table 4: the firing rate of every spiking layer (Q, K, A_t, X', X'', MLP).
  * Appendix 6.6, Eq. (19)-(21): synaptic operations SOP = fr x T x FLOPs and the energy
      E_QKFormer = 0.9 pJ x (SOPs of all layers fed by spikes) + 4.6 pJ x FLOPs(first conv),
      E_ANN      = 4.6 pJ x FLOPs,
    with E_AC = 0.9 pJ and E_MAC = 4.6 pJ of a 45 nm chip (Horowitz, ISSCC 2014).
  * Section 3.2 / Figure 3(a): the token masks A_t of Q-K token attention over the image.
  * Section 4.3 "Memory Consumption", Figure 3(b) / Table 9: memory (and here also time) of one
    QKTA layer against one SSA layer as the number of tokens N grows.
The official code has none of this (its authors computed energy by hand: official issue 7).

Usage:
    python evaluate.py --checkpoint runs/x/checkpoint.pt --dataset cifar10 --data-dir data
    python evaluate.py --checkpoint official.pth --dataset imagenet --data-dir /imagenet --limit 500
    python evaluate.py --complexity --max-side 100

Outputs go to eval/<checkpoint name>/ (or --output): metrics.json, firing_rates.png,
spike_raster.png, token_masks.png, confusion_matrix.png; for --complexity, complexity.json
and complexity.png.

Layout of this file:
  SpikeRecorder, evaluate         accuracy and firing rates over a test set (forward hooks)
  layer_macs, energy_report       FLOPs per layer (FlopCounterMode) -> SOPs -> energy
  plot_*                          the pictures
  ExplicitSSA, PeakMemory, complexity_experiment   the linear-versus-quadratic experiment
  main                            the command line
"""
import argparse
import json
import math
import os
import sys
import time
import weakref

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

import qkformer
from neuron import LIFNode
from qkformer import QKAttention, SpikingSelfAttention

# Energy per operation on a 45 nm chip (Horowitz 2014), as the paper uses them (Appendix 6.6).
E_MAC_PJ = 4.6   # a multiply-accumulate on real numbers (what an ANN, and the first layer, does)
E_AC_PJ = 0.9    # an accumulate, triggered by a spike (what every later layer of an SNN does)

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")


# ----------------------------------------------------------------------------------------
# Accuracy and firing rates

class SpikeRecorder:
    """Forward hooks that count, over every batch the model sees while the recorder is open:

      * for every LIFNode: the number of spikes it emitted and the number of outputs
        (neurons x time steps x images), whose ratio is its firing rate;
      * for every Conv2d and Linear: the sum and the number of elements of its INPUT. The
        mean input is the "firing rate" that Eq. (19) multiplies the layer's FLOPs by. Most
        layers are fed binary spikes; those after a residual sum receive spike counts
        (0, 1, 2, ...) and the head averaged counts: their mean is then the average number
        of spikes per input element, which is exactly how many accumulates they trigger.
      * optionally, the outputs of the modules named in `keep` (for the pictures).

    Usage:  with SpikeRecorder(model) as rec: model(x); rec.firing_rates()
    """

    def __init__(self, model: nn.Module, keep=()):
        self.model = model
        self.keep = set(keep)
        self.spikes, self.outputs = {}, {}       # LIF name -> total spikes, total outputs
        self.in_sum, self.in_count = {}, {}      # conv/linear name -> sum, count of input elements
        self.kept = {}                           # module name -> list of outputs (on the CPU)
        self._handles = []

    def __enter__(self):
        for name, m in self.model.named_modules():
            if isinstance(m, LIFNode):
                self.spikes[name], self.outputs[name] = 0.0, 0
                self._handles.append(m.register_forward_hook(self._lif_hook(name)))
            elif isinstance(m, (nn.Conv2d, nn.Linear)):
                self.in_sum[name], self.in_count[name] = 0.0, 0
                self._handles.append(m.register_forward_hook(self._input_hook(name)))
            if name in self.keep and not isinstance(m, (nn.Conv2d, nn.Linear, LIFNode)):
                self._handles.append(m.register_forward_hook(self._keep_hook(name)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []

    def _lif_hook(self, name):
        def hook(module, inputs, out):
            # float64 sums: a test set has billions of outputs, beyond float32's exact integers
            self.spikes[name] += out.sum(dtype=torch.float64).item()
            self.outputs[name] += out.numel()
            if name in self.keep:
                self.kept.setdefault(name, []).append(out.detach().cpu())
        return hook

    def _input_hook(self, name):
        def hook(module, inputs, out):
            x = inputs[0]
            self.in_sum[name] += x.sum(dtype=torch.float64).item()
            self.in_count[name] += x.numel()
            if name in self.keep:
                self.kept.setdefault(name, []).append(out.detach().cpu())
        return hook

    def _keep_hook(self, name):
        def hook(module, inputs, out):
            self.kept.setdefault(name, []).append(out.detach().cpu())
        return hook

    def firing_rates(self) -> dict:
        """{LIF layer name: spikes / outputs}, in the order of model.named_modules()."""
        return {n: self.spikes[n] / self.outputs[n] for n in self.spikes if self.outputs[n]}

    def input_rates(self) -> dict:
        """{conv/linear name: mean of its input} (the fr of Eq. 19 for that layer)."""
        return {n: self.in_sum[n] / self.in_count[n] for n in self.in_sum if self.in_count[n]}


def stage_of(name: str) -> str:
    """'stages.1.blocks.0.attn.q.lif' -> 'stage 2' (the paper counts stages from 1)."""
    parts = name.split(".")
    if len(parts) > 1 and parts[0] == "stages" and parts[1].isdigit():
        return f"stage {int(parts[1]) + 1}"
    return "other"


def stage_firing_rates(recorder: SpikeRecorder) -> dict:
    """Firing rate of all neurons of each stage together (total spikes / total outputs)."""
    spikes, outputs = {}, {}
    for name in recorder.spikes:
        s = stage_of(name)
        spikes[s] = spikes.get(s, 0.0) + recorder.spikes[name]
        outputs[s] = outputs.get(s, 0) + recorder.outputs[name]
    return {s: spikes[s] / outputs[s] for s in spikes if outputs[s]}


# Table 4 of the paper names the spiking tensors of a QKFormer block. X' = A_t (*) K is not
# the output of a neuron but the input of the attention's output projection.
TABLE4_ROWS = (("QKTA", "Q", "attn.q.lif"), ("QKTA", "K", "attn.k.lif"),
               ("QKTA", "A_t", "attn.attn_lif"), ("QKTA", "X'", "attn.proj.conv:input"),
               ("QKTA", "X''", "attn.proj.lif"), ("SMLP", "Layer1", "mlp.fc1.lif"),
               ("SMLP", "Layer2", "mlp.fc2.lif"))


def table4(model: nn.Module, recorder: SpikeRecorder) -> dict:
    """The paper's Table 4 for this model: per stage with Q-K token attention, the firing rate of
    Q, K, A_t, X', X'' and the two MLP layers, pooled over the stage's blocks."""
    def is_qkta(block):
        return isinstance(block.attn, QKAttention) and block.attn.mode == "token"

    table = {}
    for i, stage in enumerate(getattr(model, "stages", [])):
        if not any(is_qkta(b) for b in stage.blocks):
            continue
        rows = {}
        for block_kind, row, suffix in TABLE4_ROWS:
            total = count = 0.0
            for j, block in enumerate(stage.blocks):
                if not is_qkta(block):
                    continue
                prefix = f"stages.{i}.blocks.{j}."
                if suffix.endswith(":input"):
                    name = prefix + suffix[:-len(":input")]
                    total += recorder.in_sum[name]
                    count += recorder.in_count[name]
                else:
                    total += recorder.spikes[prefix + suffix]
                    count += recorder.outputs[prefix + suffix]
            rows[f"{block_kind} {row}"] = total / count if count else float("nan")
        table[f"stage {i + 1}"] = rows
    return table


@torch.no_grad()
def evaluate(model: nn.Module, batches, num_classes: int, device="cpu", prepare=None,
             limit=None, total=None, desc="evaluate"):
    """Run `model` over an iterable of (images, labels) batches and measure everything.

    prepare: optional function applied to each image batch on the device (e.g. turning
             uint8 pixels into normalised floats).
    limit:   stop after this many images (the last batch is cut).
    Returns (results, recorder): results holds images, top1, top5 (percent) and the
    confusion matrix (rows: true class, columns: predicted class); the recorder holds the
    spike and input counts.
    """
    model.eval().to(device)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    seen = correct1 = correct5 = 0
    k = min(5, num_classes)
    with SpikeRecorder(model) as recorder:
        bar = tqdm(batches, total=total, desc=desc, unit="batch", leave=False)
        for images, labels in bar:
            if limit is not None:
                if seen >= limit:
                    break
                images, labels = images[:limit - seen], labels[:limit - seen]
            images, labels = images.to(device), torch.as_tensor(labels).to(device)
            if prepare is not None:
                images = prepare(images)
            logits = model(images)
            if logits.shape[-1] != num_classes:
                raise ValueError(f"the model predicts {logits.shape[-1]} classes but the data has "
                                 f"{num_classes}")
            top = logits.topk(k, dim=1).indices                   # (B, k), best first
            correct1 += (top[:, 0] == labels).sum().item()
            correct5 += (top == labels[:, None]).any(dim=1).sum().item()
            confusion += torch.bincount((labels * num_classes + top[:, 0]).cpu(),
                                        minlength=num_classes ** 2).reshape(num_classes, num_classes)
            seen += len(labels)
            bar.set_postfix(top1=f"{100 * correct1 / seen:.2f}")
    if seen == 0:
        raise ValueError("no test images to evaluate")
    results = dict(images=seen, top1=100.0 * correct1 / seen, top5=100.0 * correct5 / seen,
                   top5_k=k, confusion=confusion)
    return results, recorder


# ----------------------------------------------------------------------------------------
# Energy (Appendix 6.6)
#
# What we count, and why (this text is also written into metrics.json):
#  * FLOPs: torch's FlopCounterMode, for ONE image at ONE time step. It counts 2 FLOPs per
#    multiply-accumulate; the paper's "FLOPs" are MACs, so we halve its counts.
#  * Batch norm is not counted: at deployment it is folded into the convolution before it.
#    Max-pooling, the residual additions and the neurons' own updates are not counted either
#    (the paper's Eq. 20 has no term for them).
#  * MAC layers: only the first convolution (stages.0.embed.stem.conv), which sees real-valued
#    pixels. As in Eq. (20) it is counted once per image, not T times: the image is the
#    same at every step, so a chip computes it once (our model simply repeats it).
#  * AC layers: every other conv / linear layer, SOP = fr x T x FLOPs (Eq. 19), fr being the
#    mean of the layer's input. The head reads features averaged over time; being linear,
#    head(mean_t x_t) = mean_t head(x_t), so it too counts as T steps of fr x FLOPs.
#  * Spiking self-attention (stage 3, SOP_SSA of Eq. 20): its two matrix products on spikes.
#    K^T V: each spike of K adds a row of V, so SOP = fr_K x T x MACs; (K^T V) Q: each spike
#    of Q adds a column of K^T V, so SOP = fr_Q x T x MACs. Both products have the same MACs
#    (N d^2 per head), so they share the attention's matmul count equally. The scale s is
#    a constant that can be folded into the neuron's threshold: not counted.
#  * Q-K attention (SOP_QKTA of Eq. 20): the token (or channel) sum of Q is an addition per
#    spike of Q, so SOP = fr_Q x T x (N x C) = the number of Q spikes. The mask A (*) K is a
#    logical AND of two spikes (no accumulate): counted as 0.
#  * E_ANN = 4.6 pJ x all MACs of the same network at T = 1 (convs, linears and the SSA
#    products) -- the energy of the network with its spiking neurons replaced by ReLUs.

ENERGY_NOTES = [
    "FLOPs are multiply-accumulates (MACs) of one image at one time step, from "
    "torch.utils.flop_counter.FlopCounterMode (its FLOP counts halved).",
    "Batch norm (folded into the convolutions), max-pooling, residual additions and neuron "
    "updates are not counted, as in the paper's Eq. 20.",
    "MAC layers (real-valued input, 4.6 pJ per MAC): counted once per image.",
    "AC layers (fed by spikes or spike counts, 0.9 pJ per SOP): SOP = fr x T x FLOPs (Eq. 19), "
    "fr = mean of the layer's input over the test set.",
    "SSA: K^T V counts fr_K x T x MACs and (K^T V) Q counts fr_Q x T x MACs; the scale is folded "
    "into the threshold.",
    "QKTA/QKCA: the sum of Q counts one SOP per Q spike (fr_Q x T x N x C); the mask A (*) K is a "
    "logical AND, counted as 0.",
    "E_ANN: 4.6 pJ x all MACs at T = 1 (convs, linears, SSA matrix products).",
]


def _example_input(model: nn.Module):
    """One image at one time step, (T=1, B=1, C, H, W), for a QKFormer."""
    cfg = model.config
    return torch.zeros(1, 1, cfg.in_channels, cfg.img_size, cfg.img_size)


@torch.no_grad()
def layer_macs(model: nn.Module, example=None) -> dict:
    """MACs of each conv / linear layer, and of each SSA's matrix products, for `example`
    (default: one image at one time step). Returns {"layers": {name: MACs},
    "attention": {SSA module name: MACs of its two products}, "total": all MACs}."""
    if example is None:
        example = _example_input(model)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with counter:
        model(example.to(device))
    model.train(was_training)
    # get_flop_counts() maps "<RootClass>.<module name>" to {op: FLOPs}, the module's own ops
    # and those of its children.
    counts = counter.get_flop_counts()
    root = type(model).__name__

    def flops(name):
        return sum(counts.get(f"{root}.{name}" if name else root, {}).values())

    layers = {name: flops(name) // 2 for name, m in model.named_modules()
              if isinstance(m, (nn.Conv2d, nn.Linear))}
    attention = {}
    for name, m in model.named_modules():
        if isinstance(m, SpikingSelfAttention):
            children = sum(flops(f"{name}.{c}") for c, sub in m.named_modules()
                           if c and isinstance(sub, (nn.Conv2d, nn.Linear)))
            attention[name] = (flops(name) - children) // 2    # its own ops: the two products
    return dict(layers=layers, attention=attention, total=counter.get_total_flops() // 2)


def energy_report(model: nn.Module, recorder: SpikeRecorder, images: int, T: int, macs: dict,
                  mac_layers=None) -> dict:
    """Theoretical energy per image, Appendix 6.6 Eq. (19)-(21) (see the notes above).

    recorder: spike and input counts over `images` test images at T time steps.
    macs:     layer_macs(model).
    mac_layers: names of the layers with real-valued input, counted as MACs; default: the
              first conv / linear layer of the model (for QKFormer, the stem convolution).
    Returns a dict with one row per counted operation and the totals (E in mJ per image).
    """
    rates = recorder.input_rates()
    fr = recorder.firing_rates()
    if mac_layers is None:
        mac_layers = [next(iter(macs["layers"]))]
    rows = []

    def attention_row(name, m):
        if isinstance(m, SpikingSelfAttention):
            n = macs["attention"][name]
            rate = (fr[f"{name}.k.lif"] + fr[f"{name}.q.lif"]) / 2           # each product: half the MACs
            sop = rate * T * n
            return dict(name=f"{name} (K^T V, (K^T V) Q)", kind="AC", macs=n, input_rate=rate,
                        ops=sop, energy_pJ=E_AC_PJ * sop)
        q = f"{name}.q.lif"
        n = recorder.outputs[q] // (images * T)                              # N x C per image and step
        sop = recorder.spikes[q] / images                                    # one addition per Q spike
        return dict(name=f"{name} (sum of Q)", kind="AC", macs=n, input_rate=fr[q],
                    ops=sop, energy_pJ=E_AC_PJ * sop)

    modules = dict(model.named_modules())
    for name, n in macs["layers"].items():
        # the attention's own operations are listed where they happen: before its output projection
        owner = name[:-len(".proj.conv")]
        if name.endswith(".proj.conv") and isinstance(modules.get(owner), (SpikingSelfAttention,
                                                                             QKAttention)):
            rows.append(attention_row(owner, modules[owner]))
        if name in mac_layers:
            rows.append(dict(name=name, kind="MAC", macs=n, input_rate=rates.get(name),
                             ops=n, energy_pJ=E_MAC_PJ * n))
        else:
            sop = rates.get(name, 0.0) * T * n                               # Eq. (19)
            rows.append(dict(name=name, kind="AC", macs=n, input_rate=rates.get(name),
                             ops=sop, energy_pJ=E_AC_PJ * sop))
    mac_ops = sum(r["ops"] for r in rows if r["kind"] == "MAC")
    sops = sum(r["ops"] for r in rows if r["kind"] == "AC")
    e_snn = E_AC_PJ * sops + E_MAC_PJ * mac_ops                              # Eq. (20), pJ
    e_ann = E_MAC_PJ * macs["total"]                                         # Eq. (21), pJ
    return dict(E_MAC_pJ=E_MAC_PJ, E_AC_pJ=E_AC_PJ, T=T,
                mac_layers=[r["name"] for r in rows if r["kind"] == "MAC"],
                ac_layers=[r["name"] for r in rows if r["kind"] == "AC"],
                MACs_first_layer=mac_ops, SOPs=sops, ANN_MACs=macs["total"],
                E_snn_mJ=e_snn * 1e-9, E_ann_mJ=e_ann * 1e-9,
                ann_over_snn=e_ann / e_snn if e_snn else float("inf"),
                layers=rows, notes=ENERGY_NOTES)


# ----------------------------------------------------------------------------------------
# Pictures

def _pyplot():
    import matplotlib
    matplotlib.use("Agg")              # files only, no window (works without a display)
    import matplotlib.pyplot as plt
    return plt


def plot_firing_rates(rates: dict, path: str, title="Firing rate of every spiking layer"):
    """Horizontal bars, one per LIF layer in network order, coloured by stage."""
    plt = _pyplot()
    names = list(rates)
    stages = sorted({stage_of(n) for n in names})
    colours = {s: plt.cm.tab10(i) for i, s in enumerate(stages)}
    fig, ax = plt.subplots(figsize=(8, 1.5 + 0.18 * len(names)))
    ax.barh(range(len(names)), [rates[n] for n in names],
            color=[colours[stage_of(n)] for n in names])
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names, fontsize=6)
    ax.invert_yaxis()                  # first layer on top
    ax.set_xlabel("firing rate (spikes per neuron per time step)")
    ax.set_title(title)
    ax.legend(handles=[plt.Rectangle((0, 0), 1, 1, color=colours[s]) for s in stages],
              labels=stages, loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_spike_raster(spikes: torch.Tensor, path: str, layer: str, neurons=50, seed=0):
    """Spike raster of `neurons` neurons of one layer for a few images.

    spikes: the layer's output (T, B, ...). The same randomly chosen neurons (fixed seed)
    are shown for every image, sorted by how often they fire, so the picture is honest
    about how sparse the layer is (most neurons stay silent)."""
    plt = _pyplot()
    T, B = spikes.shape[:2]
    flat = spikes.reshape(T, B, -1)                                          # (T, B, neurons)
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(flat.shape[2], generator=g)[:neurons]
    pick = pick[flat[:, :, pick].sum(dim=(0, 1)).argsort(descending=True)]
    fig, axes = plt.subplots(1, B, figsize=(2.2 * B + 1, 4.5), sharey=True, squeeze=False)
    for b, ax in enumerate(axes[0]):
        sel = flat[:, b, pick]                                               # (T, neurons)
        times = [torch.nonzero(sel[:, i]).flatten().tolist() for i in range(len(pick))]
        ax.eventplot(times, lineoffsets=range(len(pick)), linelengths=0.8, colors="black")
        ax.set_xlim(-0.5, T - 0.5)
        ax.set_xticks(range(T))
        ax.set_xlabel("time step")
        ax.set_title(f"image {b}\nrate {sel.mean().item():.3f}", fontsize=9)
    axes[0][0].set_ylabel(f"{len(pick)} random neurons")
    axes[0][0].set_ylim(len(pick) - 0.5, -0.5)
    fig.suptitle(f"Spikes of {layer}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def show_image(img: torch.Tensor, mean=None, std=None) -> np.ndarray:
    """A normalised image (3, H, W) back to displayable (H, W, 3) values in [0, 1]: undo the
    normalisation when mean and std are known, else stretch to [0, 1]."""
    img = img.detach().float().cpu()
    if mean is not None and std is not None:
        img = img * torch.tensor(std).view(-1, 1, 1) + torch.tensor(mean).view(-1, 1, 1)
    else:
        img = (img - img.min()) / (img.max() - img.min() + 1e-12)
    return img.clamp(0, 1).permute(1, 2, 0).numpy()


def token_masks(kept: torch.Tensor) -> torch.Tensor:
    """The output of a QKTA attention neuron, (T, B, heads, 1, N), as a map per image
    (B, sqrt(N), sqrt(N)): the fraction of time steps and heads in which A_t kept the token."""
    T, B, h, _, N = kept.shape
    side = math.isqrt(N)
    return kept.mean(dim=(0, 2)).reshape(B, side, side)


def plot_token_masks(images: torch.Tensor, masks: dict, path: str, mean=None, std=None):
    """One row per image: the image, then the image seen through each stage's token mask A_t
    (upsampled to the image): bright where A_t kept the token, dark where it masked it out."""
    plt = _pyplot()
    B = images.shape[0]
    cols = 1 + len(masks)
    fig, axes = plt.subplots(B, cols, figsize=(2.2 * cols, 2.2 * B + 0.6), squeeze=False)
    for b in range(B):
        img = show_image(images[b], mean, std)                             # (H, W, 3)
        axes[b][0].imshow(img)
        for c, (name, m) in enumerate(masks.items(), start=1):
            up = F.interpolate(m[b][None, None], size=img.shape[:2], mode="nearest")[0, 0]
            # A_t averaged over steps and heads is in [0, 1]: 1 shows the pixel, 0 darkens it
            axes[b][c].imshow(img * (0.15 + 0.85 * up.numpy()[..., None]))
            axes[b][c].set_title(f"kept {m[b].mean().item():.0%}", fontsize=7)
        if b == 0:
            axes[0][0].set_title("input", fontsize=8)
    for c, (name, m) in enumerate(masks.items(), start=1):
        axes[0][c].set_title(f"{name}\nA_t, {m.shape[1]}x{m.shape[2]} tokens\n"
                             f"kept {m[0].mean().item():.0%}", fontsize=7)
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle("Q-K token attention: bright = token kept by A_t (mean over steps and heads)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_confusion(confusion: torch.Tensor, path: str, class_names=None):
    """Confusion matrix, each row normalised by the number of images of that true class.
    Up to 20 classes it is labelled and annotated; above that it is drawn bare."""
    plt = _pyplot()
    K = confusion.shape[0]
    counts = confusion.double()
    norm = counts / counts.sum(dim=1, keepdim=True).clamp(min=1)
    size = 6 if K <= 20 else 8
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(norm.numpy(), cmap="Blues", vmin=0, vmax=1)
    if K <= 20:
        names = list(class_names) if class_names is not None and len(class_names) == K \
            else [str(i) for i in range(K)]
        ax.set_xticks(range(K))
        ax.set_yticks(range(K))
        ax.set_xticklabels(names, rotation=90, fontsize=8)
        ax.set_yticklabels(names, fontsize=8)
        for i in range(K):
            for j in range(K):
                if confusion[i, j]:
                    ax.text(j, i, int(confusion[i, j]), ha="center", va="center", fontsize=6,
                            color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"Confusion matrix ({int(counts.sum())} images; colour: fraction of the row)")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def raster_layer(model: nn.Module) -> str:
    """The layer shown in the spike raster: the first MLP neuron of stage 1 when there is one."""
    names = [n for n, m in model.named_modules() if isinstance(m, LIFNode)]
    preferred = "stages.0.blocks.0.mlp.fc1.lif"
    return preferred if preferred in names else names[0]


def mask_layers(model: nn.Module) -> list:
    """The attention neurons A_t of every token-mode Q-K attention in stages 1 and 2."""
    return [f"{n}.attn_lif" for n, m in model.named_modules()
            if isinstance(m, QKAttention) and m.mode == "token" and stage_of(n) in ("stage 1", "stage 2")]


@torch.no_grad()
def draw_pictures(model: nn.Module, images: torch.Tensor, results: dict, rates: dict, out_dir: str,
                  mean=None, std=None, class_names=None, raster=None) -> list:
    """Write the four pictures for a few (already prepared) test `images`; returns their paths."""
    model.eval()
    device = next(model.parameters()).device
    raster = raster or raster_layer(model)
    masks = mask_layers(model)
    with SpikeRecorder(model, keep=[raster, *masks]) as rec:
        model(images.to(device))
    paths = []
    path = os.path.join(out_dir, "firing_rates.png")
    plot_firing_rates(rates, path)
    paths.append(path)
    path = os.path.join(out_dir, "spike_raster.png")
    plot_spike_raster(rec.kept[raster][0], path, raster)
    paths.append(path)
    if masks:
        path = os.path.join(out_dir, "token_masks.png")
        plot_token_masks(images.cpu(), {n.replace(".attn.attn_lif", ""): token_masks(rec.kept[n][0])
                                        for n in masks}, path, mean, std)
        paths.append(path)
    path = os.path.join(out_dir, "confusion_matrix.png")
    plot_confusion(results["confusion"], path, class_names)
    paths.append(path)
    return paths


# ----------------------------------------------------------------------------------------
# The complexity experiment (Section 4.3, Figure 3(b), Table 9)
#
# SSA as qkformer.py computes it, Q (K^T V), is right to left: a d x d product per head, so
# its cost is O(N d^2), LINEAR in N. (Nothing in SSA needs the N x N map: without softmax
# the product is associative.) The paper's complexity analysis (Table 1, Appendix 6.3) and
# its memory plot count SSA as Spikformer's code computes it, left to right, (Q K^T) V,
# whose N x N attention map makes it quadratic. We measure both, and say which is which.

class ExplicitSSA(SpikingSelfAttention):
    """SSA computed as Spikformer's official code does: attn = Q K^T (an N x N map per
    head), then attn V. Same weights, same result as SpikingSelfAttention (the products of
    spikes are exact integers in float32 while N d < 2^24), but O(N^2) memory and time."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T, B, C, H, W = x.shape
        heads = (T, B, self.num_heads, C // self.num_heads, H * W)
        q = self.q(x).reshape(heads)                                # (T, B, h, d, N)
        k = self.k(x).reshape(heads)
        v = self.v(x).reshape(heads)
        attn = q.transpose(-2, -1) @ k                              # (T, B, h, N, N)  Q K^T
        x = (attn @ v.transpose(-2, -1)) * self.scale               # (T, B, h, N, d)  (Q K^T) V s
        x = self.attn_lif(x.transpose(-2, -1).reshape(T, B, C, H, W))
        return self.proj(x)


class PeakMemory(TorchDispatchMode):
    """Peak bytes of the tensors created while it is active, on any device.

    Every operation passes through __torch_dispatch__; each output whose storage is new
    (not a view of an input, not written in place) is added to the live total, and a
    weakref finalizer subtracts it when its storage is freed. So `peak` is the largest
    total of live tensors created inside the block: what torch.cuda.max_memory_allocated
    measures on a GPU, without the allocator's rounding, and without scratch memory that
    kernels allocate internally (e.g. convolution workspaces). Tensors that existed before
    (the input, the weights) are not counted."""

    def __init__(self):
        super().__init__()
        self.live, self.current, self.peak = {}, 0, 0

    def _free(self, key):
        self.current -= self.live.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key in inputs or key in self.live or storage.nbytes() == 0:
                continue                                            # a view, in place, or seen
            self.live[key] = storage.nbytes()
            self.current += storage.nbytes()
            weakref.finalize(storage, self._free, key)
            self.peak = max(self.peak, self.current)
        return out


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure_layer(layer: nn.Module, x: torch.Tensor, repeats=3):
    """(peak memory in bytes, best time in seconds) of one forward of `layer` on `x`.

    Inference (eval mode, no autograd): the memory the attention algorithm itself needs.
    Training would also keep the activations for the backward pass, a constant factor more
    with the same growth in N. Memory: PeakMemory on the CPU, the allocator's peak on a GPU.
    Time: the fastest of `repeats` runs after a warm-up run (fewer when one run is slow)."""
    device = x.device
    _sync(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        layer(x)
        _sync(device)
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        with PeakMemory() as pm:
            layer(x)
        peak = pm.peak
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        layer(x)
        _sync(device)
        times.append(time.perf_counter() - start)
        if sum(times) > 5.0 and len(times) >= 2:                   # slow sizes: enough already
            break
    return peak, min(times[1:]) if len(times) > 1 else times[0]


def loglog_slope(n, y) -> float:
    """Least-squares slope of log y against log n: 1 for linear growth, 2 for quadratic."""
    return float(np.polyfit(np.log(n), np.log(y), 1)[0])


# Table 9 of the paper (GPU memory, MiB, C = 256, T = B = 1), from a copy of the paper's
# LaTeX source that could not be checked against the PDF. The values equal one N x C float32
# tensor (QKTA) and that plus one N x N map (SSA): the paper seems to count the attention's
# tensors, where we measure the whole layer's peak, so compare growth, not absolute values.
PAPER_TABLE9 = {10: (0.10, 0.14), 20: (0.40, 1.00), 30: (0.89, 3.97), 40: (1.58, 12.19),
                50: (2.47, 26.44), 60: (3.56, 53.52), 70: (4.84, 97.64), 80: (6.32, 162.50),
                90: (8.18, 258.19), 100: (10.35, 391.77), 110: (12.14, 570.69),
                120: (14.23, 806.06), 130: (16.70, 1107.50), 140: (20.22, 1485.14),
                150: (22.26, 1954.03), 160: (26.29, 2525.00), 170: (28.55, 3214.30),
                180: (32.37, 4036.88), 190: (36.41, 5007.25), 200: (40.46, 6143.06)}

COMPLEXITY_LAYERS = ("QKTA", "SSA (Q K^T) V", "SSA Q (K^T V)")


def complexity_experiment(sides=range(10, 101, 10), dim=256, heads=1, T=1, B=1, devices=None,
                          repeats=3, cpu_threads=1, seed=0) -> dict:
    """Memory and time of one QKTA layer, one SSA layer computed left to right (the paper's
    quadratic form) and one computed right to left (this project's), for N = side^2 tokens.

    heads=1 by default: the paper's SSA numbers (Table 9) are those of a single N x N map.
    cpu_threads=1 by default: on a CPU shared with other programs, several threads wait for
    each other and the times jump by 100x; one thread gives reproducible times (None: leave
    torch's setting).
    Returns {"settings", "devices": {device: {layer: [{side, N, memory_MiB, time_ms}]}},
    "slopes": {device: {layer: {"memory_MiB", "time_ms"}}}, "attention_map_memory": {device:
    {"rows", "slope"}}, "paper_table9_MiB"}; log-log slopes fitted on the larger half of the
    sizes (where the N or N^2 term dominates the constant ones)."""
    if devices is None:
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    sides = [int(s) for s in sides]
    if not sides or min(sides) < 1:
        raise ValueError(f"sides must be positive integers, got {sides}")
    torch.manual_seed(seed)
    builders = {"QKTA": lambda: QKAttention(dim, heads, "token"),
                "SSA (Q K^T) V": lambda: ExplicitSSA(dim, heads),
                "SSA Q (K^T V)": lambda: SpikingSelfAttention(dim, heads)}
    result = dict(settings=dict(C=dim, heads=heads, T=T, B=B, sides=sides, mode="eval, no_grad",
                                cpu_threads=cpu_threads or torch.get_num_threads(),
                                memory="peak bytes of tensors created by one forward (CPU: "
                                       "PeakMemory dispatch mode; GPU: max_memory_allocated)"),
                  devices={}, slopes={})
    bar = tqdm(total=len(devices) * len(sides) * len(builders), desc="complexity", unit="layer",
               leave=False)
    threads = torch.get_num_threads()
    for dev in devices:
        device = torch.device(dev)
        table = {name: [] for name in builders}
        try:
            if dev == "cpu" and cpu_threads:
                torch.set_num_threads(cpu_threads)
            for name, build in builders.items():
                layer = build().to(device).eval()
                for side in sides:
                    bar.set_postfix(device=dev, layer=name, side=side)
                    x = (torch.rand(T, B, dim, side, side, device=device) < 0.5).float()
                    peak, seconds = measure_layer(layer, x, repeats)
                    table[name].append(dict(side=side, N=side * side, memory_MiB=peak / 2 ** 20,
                                            time_ms=seconds * 1e3))
                    bar.update()
        finally:
            torch.set_num_threads(threads)
        result["devices"][dev] = table
        upper = len(sides) // 2
        result["slopes"][dev] = {
            name: {key: loglog_slope([r["N"] for r in rows[upper:]], [r[key] for r in rows[upper:]])
                   if len(rows) - upper >= 2 else float("nan") for key in ("memory_MiB", "time_ms")}
            for name, rows in table.items()}
        # The two SSA forms differ only in the order of the products, so the difference of
        # their memory is what the left-to-right form stores in addition: its N x N map,
        # T * B * heads * N^2 float32 values, less the d x d map of the right-to-left form
        # (larger while N < d: the difference is then negative).
        extra = [dict(side=a["side"], N=a["N"], MiB=a["memory_MiB"] - b["memory_MiB"],
                      N_by_N_map_MiB=T * B * heads * a["N"] ** 2 * 4 / 2 ** 20)
                 for a, b in zip(table["SSA (Q K^T) V"], table["SSA Q (K^T V)"])]
        big = [r for r in extra[upper:] if r["MiB"] > 0]
        result.setdefault("attention_map_memory", {})[dev] = dict(
            rows=extra, slope=loglog_slope([r["N"] for r in big], [r["MiB"] for r in big])
            if len(big) >= 2 else float("nan"))
    bar.close()
    result["paper_table9_MiB"] = {s: dict(QKTA=v[0], SSA=v[1]) for s, v in PAPER_TABLE9.items()
                                  if s in sides}
    return result


def plot_complexity(result: dict, path: str):
    """Memory and time against N on log-log axes (slope 1: linear, slope 2: quadratic)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    styles = {"cpu": "-", "cuda": "--"}
    colours = dict(zip(COMPLEXITY_LAYERS, ("tab:blue", "tab:red", "tab:green")))
    for dev, table in result["devices"].items():
        for name, rows in table.items():
            n = [r["N"] for r in rows]
            for ax, key in zip(axes, ("memory_MiB", "time_ms")):
                slope = result["slopes"][dev][name][key]
                ax.plot(n, [r[key] for r in rows], styles.get(dev, ":"), marker="o", ms=3,
                        color=colours[name], label=f"{name}, {dev} (slope {slope:.2f})")
    paper = result.get("paper_table9_MiB", {})
    if paper:
        n = [int(s) ** 2 for s in paper]
        for key, colour in (("QKTA", "tab:blue"), ("SSA", "tab:red")):
            axes[0].plot(n, [v[key] for v in paper.values()], ":", color=colour, alpha=0.6,
                         label=f"paper Table 9, {key} (GPU)")
    s = result["settings"]
    for ax, label in zip(axes, ("peak memory of one forward (MiB)", "time of one forward (ms)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("number of tokens N")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"One attention layer, C = {s['C']}, heads = {s['heads']}, T = {s['T']}, "
                 f"B = {s['B']}; sqrt(N) = {s['sides'][0]}..{s['sides'][-1]}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_complexity(result: dict):
    for dev, table in result["devices"].items():
        print(f"\nComplexity on {dev}: memory (MiB) and time (ms) of one forward")
        head = "".join(f"{n:>26}" for n in table)
        print(f"{'sqrt(N)':>8}{'N':>8}{head}")
        names = list(table)
        for i, row in enumerate(table[names[0]]):
            cells = "".join(f"{table[n][i]['memory_MiB']:>12.2f} MiB{table[n][i]['time_ms']:>9.1f} ms"
                            for n in names)
            print(f"{row['side']:>8}{row['N']:>8}{cells}")
        slopes = result["slopes"][dev]
        print("log-log slope on the larger half of the sizes (1 = linear in N, 2 = quadratic):")
        for n in names:
            print(f"  {n:<16} memory {slopes[n]['memory_MiB']:.2f}   time {slopes[n]['time_ms']:.2f}")
        extra = result["attention_map_memory"][dev]
        print(f"memory of (Q K^T) V minus Q (K^T V): slope {extra['slope']:.2f}; at "
              f"N = {extra['rows'][-1]['N']} it is {extra['rows'][-1]['MiB']:.2f} MiB, one N x N "
              f"float32 map per head is {extra['rows'][-1]['N_by_N_map_MiB']:.2f} MiB")
    if result.get("paper_table9_MiB"):
        print("\nPaper, Table 9 (GPU, MiB; counts the attention's tensors only, see PAPER_TABLE9):")
        for s, v in result["paper_table9_MiB"].items():
            print(f"{s:>8}   QKTA {v['QKTA']:>8.2f}   SSA {v['SSA']:>9.2f}")


# ----------------------------------------------------------------------------------------
# The command line

def print_report(metrics: dict):
    print(f"\n{metrics['dataset']}: {metrics['images']} test images, T = {metrics['T']}")
    print(f"top-1 {metrics['top1']:.2f} %   top-{metrics['top5_k']} {metrics['top5']:.2f} %")
    if metrics["official_quirks"]:
        print("official_quirks on (an official checkpoint): the stage-3 SSA neuron runs over "
              "time x batch as in the official code, so results depend a little on --batch-size")
    print("\nFiring rate of every spiking layer (spikes per neuron per time step):")
    for name, r in metrics["firing_rates"].items():
        print(f"  {name:<44} {r:.4f}")
    print("per stage: " + ", ".join(f"{s} {r:.4f}" for s, r in metrics["stage_firing_rates"].items()))
    if metrics["table4"]:
        stages = list(metrics["table4"])
        print("\nAs the paper's Table 4:" + "".join(f"{s:>10}" for s in stages))
        for row in metrics["table4"][stages[0]]:
            print(f"  {row:<20}" + "".join(f"{metrics['table4'][s][row]:>10.4f}" for s in stages))
    e = metrics["energy"]
    print(f"\nEnergy per image (Appendix 6.6): E_MAC = {e['E_MAC_pJ']} pJ, E_AC = {e['E_AC_pJ']} pJ")
    print(f"  {'layer':<52}{'kind':>5}{'MACs (T=1)':>14}{'input fr':>10}{'MACs or SOPs':>15}{'uJ':>9}")
    for r in e["layers"]:
        rate = "" if r["input_rate"] is None else f"{r['input_rate']:.4f}"
        print(f"  {r['name']:<52}{r['kind']:>5}{r['macs']:>14,}{rate:>10}{r['ops']:>15,.0f}"
              f"{r['energy_pJ'] * 1e-6:>9.3f}")
    print(f"  MAC layers (real-valued input): {', '.join(e['mac_layers'])}; every other row is AC.")
    print(f"  SNN: {e['SOPs']:,.0f} SOPs + {e['MACs_first_layer']:,} MACs -> E = {e['E_snn_mJ']:.4f} mJ")
    print(f"  ANN of the same shape: {e['ANN_MACs']:,} MACs -> E = {e['E_ann_mJ']:.4f} mJ "
          f"({e['ann_over_snn']:.1f} x the SNN)")


def build_parser():
    p = argparse.ArgumentParser(
        description="Evaluate a QKFormer checkpoint (accuracy, firing rates, energy, pictures), "
                    "or run the Q-K attention versus SSA complexity experiment (--complexity).")
    p.add_argument("--checkpoint", help="a checkpoint written by train.py, or an official QKFormer one")
    p.add_argument("--dataset", choices=("cifar10", "cifar100", "imagenet"), default="cifar10")
    p.add_argument("--data-dir", default="data", help="folder holding the dataset (see data.py)")
    p.add_argument("--output", help="output folder (default: eval/<checkpoint name>, eval/complexity)")
    p.add_argument("--limit", type=int, help="evaluate only N test images (ImageNet: N images "
                                             "spread over the classes, as data.py picks them)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=0, help="data loading processes")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--T", type=int, help="evaluate with this many time steps instead of the "
                                         "checkpoint's (the paper's Table 7 / Table 2 T=1 rows)")
    p.add_argument("--pictures", type=int, default=4, help="test images shown in the token masks "
                                                            "and the spike raster (0: no pictures)")
    p.add_argument("--complexity", action="store_true",
                   help="run the memory/time experiment of one QKTA vs one SSA layer instead")
    p.add_argument("--max-side", type=int, default=100, help="--complexity: largest sqrt(N)")
    p.add_argument("--min-side", type=int, default=10, help="--complexity: smallest sqrt(N)")
    p.add_argument("--step", type=int, default=10, help="--complexity: step of sqrt(N)")
    p.add_argument("--dim", type=int, default=256, help="--complexity: channels C")
    p.add_argument("--heads", type=int, default=1, help="--complexity: attention heads")
    return p


def run_complexity(args) -> dict:
    if args.min_side < 1 or args.step < 1 or args.max_side < args.min_side:
        raise ValueError("--complexity needs 1 <= --min-side <= --max-side and --step >= 1")
    if args.dim < 1 or args.heads < 1 or args.dim % args.heads:
        raise ValueError(f"--dim ({args.dim}) must be a positive multiple of --heads ({args.heads})")
    out = args.output or os.path.join("eval", "complexity")
    os.makedirs(out, exist_ok=True)
    result = complexity_experiment(range(args.min_side, args.max_side + 1, args.step), args.dim,
                                   args.heads)
    print_complexity(result)
    with open(os.path.join(out, "complexity.json"), "w") as f:
        json.dump(result, f, indent=1)
    plot_complexity(result, os.path.join(out, "complexity.png"))
    print(f"\nwrote {out}/complexity.json and {out}/complexity.png")
    return result


def run_evaluation(args) -> dict:
    import data  # only needed here: --complexity runs without the data pipeline

    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be a positive number of images, got {args.limit}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be positive, got {args.batch_size}")
    checkpoint = qkformer.load_checkpoint(args.checkpoint)
    overrides = {} if args.T is None else dict(T=args.T)
    model = qkformer.model_from_checkpoint(checkpoint, **overrides)
    cfg = model.config
    info = data.dataset_info(args.dataset)
    # Check before reading any data that the checkpoint belongs to this dataset.
    if cfg.num_classes != info["num_classes"]:
        raise ValueError(f"the checkpoint predicts {cfg.num_classes} classes but {args.dataset} has "
                         f"{info['num_classes']}: it was trained on another dataset")
    if args.dataset != "imagenet" and cfg.img_size != 32:
        raise ValueError(f"the checkpoint is for {cfg.img_size}x{cfg.img_size} images; "
                         f"{args.dataset} images are 32x32")
    out = args.output or os.path.join("eval", os.path.splitext(os.path.basename(args.checkpoint))[0])
    os.makedirs(out, exist_ok=True)

    _, test_set = data.build_datasets(args.dataset, args.data_dir,
                                      img_size=cfg.img_size if args.dataset == "imagenet" else None,
                                      test_subset=args.limit, download_missing=False)
    loader = data.make_loader(test_set, args.batch_size, train=False, workers=args.workers)
    device = torch.device(args.device)
    model.to(device)

    def prepare(images):                      # uint8 pixels -> normalised floats, on the device
        return data.normalize(images, info["mean"], info["std"])

    results, recorder = evaluate(model, loader, cfg.num_classes, device, prepare,
                                 limit=args.limit, total=len(loader))
    rates = recorder.firing_rates()
    energy = energy_report(model, recorder, results["images"], cfg.T, layer_macs(model))
    class_names = getattr(test_set, "classes", None) or \
        (CIFAR10_CLASSES if args.dataset == "cifar10" else None)
    metrics = dict(checkpoint=os.path.abspath(args.checkpoint), dataset=args.dataset,
                   images=results["images"], T=cfg.T, top1=results["top1"], top5=results["top5"],
                   top5_k=results["top5_k"], config=dict(vars(cfg)),
                   official_quirks=cfg.official_quirks,
                   firing_rates=rates, stage_firing_rates=stage_firing_rates(recorder),
                   table4=table4(model, recorder), input_rates=recorder.input_rates(),
                   energy=energy, confusion=results["confusion"].tolist(), pictures=[])
    if args.pictures > 0:
        first = [test_set[i][0] for i in range(min(args.pictures, len(test_set)))]
        images = prepare(torch.stack(first).to(device))
        metrics["pictures"] = draw_pictures(model, images, results, rates, out, info["mean"],
                                            info["std"], class_names)
    print_report(metrics)
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    print(f"\nwrote {out}/metrics.json" + "".join(f", {os.path.basename(p)}" for p in metrics["pictures"]))
    return metrics


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if not args.complexity and not args.checkpoint:
        print("error: give --checkpoint PATH (to evaluate a model) or --complexity", file=sys.stderr)
        return 2
    try:
        import data
        user_errors = (ValueError, data.DataError, OSError)
    except ImportError:
        user_errors = (ValueError, OSError)
    try:
        if args.complexity:
            run_complexity(args)
        else:
            run_evaluation(args)
    except user_errors as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
