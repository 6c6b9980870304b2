"""The pictures the scripts draw: what evaluate.py shows of a trained network's spikes, and the
training curves train.py redraws after every epoch. A wing of both: the core files compute,
this file only draws what they computed (and finds, in a model, the few tensors to draw).

Reference: Zhou et al., "QKFormer: Hierarchical Spiking Transformer using Q-K Attention",
NeurIPS 2024 (arXiv:2403.16552). Of the pictures here, one is the paper's kind:
  * Section 4.3, Figure 3(a), "the visualization of Q-K token attention. The white dot means
    value 1, while the black one means value 0": not a map over the image but spike matrices,
    "the longitudinal axis denotes the channel index of one head, while the horizontal axis
    denotes the token index [...] we choose a continuous segment with a length of 100"
    (stages 1 and 2 of an ImageNet model). plot_qk_attention draws that kind of picture (Q,
    A_t, K and X' = A_t (*) K of one image, head and time step; the paper does not say how it
    chose those: here, per stage, the head and step whose A_t keeps closest to half the tokens).
The others are ours: plot_token_masks (A_t averaged over heads
and steps, laid over the image), plot_firing_rates (Table 4's quantity for every layer),
plot_spike_raster, plot_confusion, plot_event_frames (event-camera data).

Layout of this file:
  stage_of, neuron_of, ...      finding the spiking tensors of a QKFormer (evaluate.table4
                                finds its rows with them too); kept_outputs records them
  plot_*                        one picture each, from what was already computed (train.py's
                                curves.png: plot_curves)
  draw_pictures                 evaluate.py's pictures of a few prepared images
  draw_test_images              ... of test images chosen by index (evaluate.py --images)
  add_picture_arguments         --images, --pictures; test_set_shown and picture_note check
                                what those indices pick

Imports qkformer, neuron and data only, never an entry script (evaluate.py, train.py import
this file, so importing them back would be a cycle). Matplotlib is imported on the first
picture (_pyplot), so that importing this file costs nothing to a run that draws none.
"""
import argparse
import hashlib
import math
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import data
from neuron import SpikingNeuron
from checkpoints import write_atomically
from qkformer import QKAttention


# ----------------------------------------------------------------------------------------
# Finding the spiking tensors of a QKFormer
#
# By module objects and classes, not attribute names alone: a model built with another
# neuron type (any neuron.SpikingNeuron) or another attention is still found, and a model
# without Q-K token attention simply has no attention pictures.

def stage_of(name: str) -> str:
    """'stages.1.blocks.0.attn.q.lif' -> 'stage 2' (the paper counts stages from 1)."""
    parts = name.split(".")
    if len(parts) > 1 and parts[0] == "stages" and parts[1].isdigit():
        return f"stage {int(parts[1]) + 1}"
    return "other"


def neuron_of(module: nn.Module) -> nn.Module:
    """The spiking neuron of a conv-BN-neuron unit (qkformer.ConvBNLIF), found by its class."""
    found = [m for m in module.modules() if isinstance(m, SpikingNeuron)]
    if len(found) != 1:
        raise ValueError(f"{type(module).__name__} holds {len(found)} spiking neurons, not one")
    return found[0]


def attention_neuron(attn: nn.Module) -> nn.Module:
    """The neuron an attention applies itself (A_t of QKTA), not one of its Q/K/V/proj units."""
    found = [m for m in attn.children() if isinstance(m, SpikingNeuron)]
    if len(found) != 1:
        raise ValueError(f"{type(attn).__name__} has {len(found)} neurons of its own, not one")
    return found[0]


def is_token_attention(attn: nn.Module) -> bool:
    """Q-K token attention (QKTA, Eq. 6), the attention whose A_t masks tokens; the channel
    mode (QKCA) masks channels, and SSA has no mask at all."""
    return isinstance(attn, QKAttention) and attn.mode == "token"


@torch.no_grad()
def kept_outputs(model: nn.Module, names, images: torch.Tensor) -> dict:
    """{module name: its output, on the CPU} for the modules `names`, over one forward of
    `images`. The pictures need whole spike tensors of a few neurons, where evaluate.py's
    SpikeRecorder sums every neuron over a test set (its `keep` does this too, over batches)."""
    modules = dict(model.named_modules())
    kept = {}

    def hook(name):                       # the first call's output: each neuron runs once
        return lambda module, inputs, out: kept.setdefault(name, out.detach().cpu())

    handles = [modules[n].register_forward_hook(hook(n)) for n in names]
    try:
        model(images)
    finally:                              # a failed forward must not leave hooks behind
        for h in handles:
            h.remove()
    return kept


def qk_attention_blocks(model: nn.Module) -> dict:
    """{"stage 1": (name, attention), "stage 2": ...}: the first Q-K token attention of stages
    1 and 2, the stages the paper's Figure 3(a) shows."""
    found = {}
    for name, m in model.named_modules():
        if is_token_attention(m) and stage_of(name) in ("stage 1", "stage 2"):
            found.setdefault(stage_of(name), (name, m))
    return found


def qk_attention_neurons(model: nn.Module) -> dict:
    """{stage: (name of Q's neuron, of K's neuron, of the attention neuron A_t)} for the
    attentions of qk_attention_blocks, found by module objects."""
    names = {m: n for n, m in model.named_modules()}
    return {stage: (names[neuron_of(attn.q)], names[neuron_of(attn.k)], names[attention_neuron(attn)])
            for stage, (_, attn) in qk_attention_blocks(model).items()}


def token_mask_neurons(model: nn.Module) -> dict:
    """{name of the A_t neuron: name of its attention} for every Q-K token attention in
    stages 1 and 2, found by module objects."""
    names = {m: n for n, m in model.named_modules()}
    return {names[attention_neuron(m)]: n for n, m in model.named_modules()
            if is_token_attention(m) and stage_of(n) in ("stage 1", "stage 2")}


def mask_layers(model: nn.Module) -> list:
    """The attention neurons A_t of every token-mode Q-K attention in stages 1 and 2."""
    return list(token_mask_neurons(model))


def raster_layer(model: nn.Module) -> str:
    """The layer shown in the spike raster: the neuron of stage 1's first MLP layer when there
    is one, else the first neuron of the model."""
    names = {m: n for n, m in model.named_modules()}
    try:
        return names[neuron_of(model.stages[0].blocks[0].mlp.fc1)]
    except (AttributeError, IndexError, TypeError, ValueError):
        return next(n for n, m in model.named_modules() if isinstance(m, SpikingNeuron))


# ----------------------------------------------------------------------------------------
# The pictures
#
# Written at DPI dots per inch, with text of 9 points or more (8 for the dense parts), so that
# they stay readable on a slide.

DPI = 150


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")              # files only, no window (works without a display)
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path: str, **options):
    """fig as a PNG file at `path` (at DPI unless options say otherwise), atomically
    (checkpoints.write_atomically: a kill or a full disk while it is written leaves the
    previous picture, never half a PNG), then closed."""
    try:
        write_atomically(path, lambda f: fig.savefig(f, format="png", **{"dpi": DPI, **options}))
    finally:
        _pyplot().close(fig)


def plot_firing_rates(rates: dict, path: str, title="Firing rate of every spiking layer"):
    """Horizontal bars, one per LIF layer in network order, coloured by stage."""
    plt = _pyplot()
    names = list(rates)
    stages = sorted({stage_of(n) for n in names})
    colours = {s: plt.cm.tab10(i) for i, s in enumerate(stages)}
    fig, ax = plt.subplots(figsize=(9, 1.4 + 0.2 * len(names)))
    ax.barh(range(len(names)), [rates[n] for n in names],
            color=[colours[stage_of(n)] for n in names])
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names, fontsize=9)
    ax.set_ylim(len(names) - 0.5, -0.5)  # first layer on top
    ax.set_xlabel("firing rate (spikes per neuron per time step)", fontsize=10)
    ax.set_title(title, fontsize=11)
    ax.legend(handles=[plt.Rectangle((0, 0), 1, 1, color=colours[s]) for s in stages],
              labels=stages, loc="lower right", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


def plot_spike_raster(spikes: torch.Tensor, path: str, layer: str, neurons=50, seed=0, titles=None):
    """Spike raster of `neurons` neurons of one layer for a few images.

    spikes: the layer's output (T, B, ...). The same randomly chosen neurons (fixed seed)
    are shown for every image, sorted by how often they fire, so the picture is honest
    about how sparse the layer is (most neurons stay silent). titles: one per image
    (default "image 0", "image 1", ...)."""
    plt = _pyplot()
    T, B = spikes.shape[:2]
    flat = spikes.reshape(T, B, -1)                                          # (T, B, neurons)
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(flat.shape[2], generator=g)[:neurons]
    pick = pick[flat[:, :, pick].sum(dim=(0, 1)).argsort(descending=True)]
    fig, axes = plt.subplots(1, B, figsize=(2.4 * B + 1, 4.8), sharey=True, squeeze=False)
    for b, ax in enumerate(axes[0]):
        sel = flat[:, b, pick]                                               # (T, neurons)
        times = [torch.nonzero(sel[:, i]).flatten().tolist() for i in range(len(pick))]
        ax.eventplot(times, lineoffsets=range(len(pick)), linelengths=0.8, colors="black")
        ax.set_xlim(-0.5, T - 0.5)
        ax.set_xticks(range(T))
        ax.set_xticklabels([str(t + 1) for t in range(T)], fontsize=9)
        ax.set_xlabel("time step", fontsize=9)
        name = titles[b] if titles else f"image {b}"
        ax.set_title(f"{name}\nrate {sel.mean().item():.3f}", fontsize=9)
    axes[0][0].set_ylabel(f"{len(pick)} random neurons", fontsize=9)
    axes[0][0].set_ylim(len(pick) - 0.5, -0.5)
    fig.suptitle(f"Spikes of {layer}", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


def plot_confusion(confusion: torch.Tensor, path: str, class_names=None):
    """Confusion matrix, each row normalised by the number of images of that true class.
    Up to 20 classes it is labelled and annotated; above that it is drawn bare."""
    plt = _pyplot()
    K = confusion.shape[0]
    counts = confusion.double()
    norm = counts / counts.sum(dim=1, keepdim=True).clamp(min=1)
    size = 7 if K <= 20 else 8
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(norm.numpy(), cmap="Blues", vmin=0, vmax=1)
    if K <= 20:
        names = list(class_names) if class_names is not None and len(class_names) == K \
            else [str(i) for i in range(K)]
        ax.set_xticks(range(K))
        ax.set_yticks(range(K))
        ax.set_xticklabels(names, rotation=90, fontsize=9)
        ax.set_yticklabels(names, fontsize=9)
        for i in range(K):
            for j in range(K):
                if confusion[i, j]:
                    ax.text(j, i, int(confusion[i, j]), ha="center", va="center",
                            fontsize=9 if K <= 10 else 7,
                            color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted class", fontsize=10)
    ax.set_ylabel("true class", fontsize=10)
    ax.set_title(f"Confusion matrix ({int(counts.sum())} images; colour: fraction of the row)",
                 fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    save_figure(fig, path)


def plot_curves(records, path):
    """train.py's curves.png: loss and accuracy per epoch, redrawn from the run's whole
    log.jsonl after every epoch (train_guards.finish_epoch calls it)."""
    plt = _pyplot()
    trained = [r for r in records if "train_loss" in r]  # (not an epoch an older train.py's resume finished)
    epochs = [r["epoch"] for r in trained]
    evals = [r for r in records if r.get("top1") is not None]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(epochs, [r["train_loss"] for r in trained], label="train loss (augmented)")
    if evals:
        ax1.plot([r["epoch"] for r in evals], [r["test_loss"] for r in evals], "o-", label="test loss")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("cross-entropy")
    ax1.legend()
    ax2.plot(epochs, [r["train_top1"] for r in trained], label="train top-1 (augmented)")
    if evals:
        ax2.plot([r["epoch"] for r in evals], [r["top1"] for r in evals], "o-", label="test top-1")
        ax2.plot([r["epoch"] for r in evals], [r["top5"] for r in evals], "o-", label="test top-5")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("accuracy (%)")
    ax2.legend()
    fig.tight_layout()
    try:
        # atomically: a kill while drawing leaves the previous picture, not half a PNG
        write_atomically(path, lambda f: fig.savefig(f, format="png", dpi=100))
    finally:
        plt.close(fig)


# ----------------------------------------------------------------------------------------
# Inside the attention: token masks (ours) and Q-K token attention (Figure 3(a))

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


def plot_token_masks(images: torch.Tensor, masks: dict, path: str, mean=None, std=None, titles=None):
    """Ours, not a figure of the paper: one row per image, the image, then the image seen
    through each stage's token mask A_t averaged over time steps and heads (upsampled to the
    image): bright where A_t kept the token, dark where it masked it out.
    titles: one per image (default: none)."""
    plt = _pyplot()
    B = images.shape[0]
    cols = 1 + len(masks)
    fig, axes = plt.subplots(B, cols, figsize=(2.4 * cols, 2.4 * B + 1.0), squeeze=False)
    for b in range(B):
        img = show_image(images[b], mean, std)                             # (H, W, 3)
        axes[b][0].imshow(img)
        axes[b][0].set_title(titles[b] if titles else "input", fontsize=9)
        for c, (name, m) in enumerate(masks.items(), start=1):
            up = F.interpolate(m[b][None, None], size=img.shape[:2], mode="nearest")[0, 0]
            # A_t averaged over steps and heads is in [0, 1]: 1 shows the pixel, 0 darkens it
            axes[b][c].imshow(img * (0.15 + 0.85 * up.numpy()[..., None]))
            axes[b][c].set_title(f"kept {m[b].mean().item():.0%}", fontsize=9)
    for c, (name, m) in enumerate(masks.items(), start=1):
        axes[0][c].set_title(f"{name}: A_t\n{m.shape[1]}x{m.shape[2]} tokens, "
                             f"kept {m[0].mean().item():.0%}", fontsize=9)
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle("Token masks A_t over the image (mean over time steps and heads):\n"
                 "bright = token kept", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


def qk_attention_spikes(q: torch.Tensor, k: torch.Tensor, a: torch.Tensor, num_heads: int) -> dict:
    """The spike matrices of one Q-K token attention for every image, per head.

    q, k: the outputs of Q's and K's neurons, (T, B, C, H, W); a: the attention neuron's
    output A_t, (T, B, heads, 1, N). Returns {"Q", "A_t", "K", "X'"} -> (T, B, heads, rows, N),
    X' = A_t (*) K (Eq. 6): K with the columns (tokens) A_t masks out set to 0."""
    T, B, C = q.shape[:3]
    heads = (T, B, num_heads, C // num_heads, -1)
    q, k = q.reshape(heads), k.reshape(heads)                        # (T, B, h, C/h, N)
    return {"Q": q, "A_t": a, "K": k, "X'": a * k}


def token_segment(N: int, length=100, start=None) -> tuple:
    """(first, last + 1) of the tokens shown: `length` consecutive tokens (all N when there
    are fewer), by default in the middle of the token sequence (row-major over the grid)."""
    length = min(length, N)
    if start is None:
        start = (N - length) // 2
    if not 0 <= start <= N - length:
        raise ValueError(f"a segment of {length} tokens cannot start at token {start} of {N}")
    return start, start + length


def busiest_head_and_step(spikes: dict, lo: int, hi: int, head=None, step=None) -> tuple:
    """(head, step) of one stage's spikes (each (T, heads, rows, N)) whose A_t keeps the share
    of tokens lo..hi-1 closest to half (a mask that both keeps and drops tokens), then where Q
    fires the most; on ties the last step and the first head. A head or step given is kept.
    One head at one step can be silent for an image (A_t and X' all black), or keep every
    token (X' = K), while others show the mask at work: the picture shows one of those."""
    a = spikes["A_t"][..., lo:hi].float().mean(dim=(2, 3))    # (T, heads): share of tokens kept
    q = spikes["Q"][..., lo:hi].float().mean(dim=(2, 3))      # (T, heads): Q's firing rate
    T, heads = a.shape
    pairs = [(t, h) for t in range(T) for h in range(heads)
             if (step is None or t == step) and (head is None or h == head)]
    t, h = max(pairs, key=lambda p: (-abs(a[p].item() - 0.5), q[p].item(), p[0], -p[1]))
    return h, t


def plot_qk_attention(image: np.ndarray, stages: dict, path: str, head=None, step=None, length=100,
                      start=None, label=""):
    """The kind of picture of the paper's Figure 3(a), for one image: per stage, the spike
    matrices Q, A_t, K and X' = A_t (*) K of one head at one time step, rows the channels of
    that head, columns a segment of `length` consecutive tokens; white = 1, black = 0.
    Left of each stage, the image with that segment's tokens lit.

    image:  what the model saw, (H, W, 3) in [0, 1] (show_image).
    stages: {stage name: qk_attention_spikes(...) of this one image, each (T, heads, rows, N)}.
    head, step: the head and time step shown, 0-based (default: per stage those where A_t
            keeps closest to half of the tokens: busiest_head_and_step). label: names the image."""
    plt = _pyplot()
    T = next(iter(stages.values()))["Q"].shape[0]
    if step is not None and not 0 <= step < T:
        raise ValueError(f"time step {step} of {T}")
    # Inches per panel: a matrix grows with its rows (the channels of one head, more in later
    # stages) up to 2 in; A_t is one row, a thin strip.
    heights = []
    for spikes in stages.values():
        matrix = min(2.0, 0.3 + 0.1 * spikes["Q"].shape[2])
        heights.append([matrix, 0.3, matrix, matrix])
    fig = plt.figure(figsize=(10, sum(sum(h) + 1.0 for h in heights) + 0.6))
    outer = fig.add_gridspec(len(stages), 2, width_ratios=[1.6, 8.4],
                             height_ratios=[sum(h) + 1.0 for h in heights], wspace=0.15, hspace=0.35)
    for i, (stage, spikes) in enumerate(stages.items()):
        lo, hi = token_segment(spikes["Q"].shape[-1], length, start)
        _segment_over_image(fig.add_subplot(outer[i, 0]), image, stage, spikes["Q"].shape[-1], lo, hi)
        inner = outer[i, 1].subgridspec(4, 1, height_ratios=heights[i], hspace=0.25)
        h, t = busiest_head_and_step(spikes, lo, hi, head, step)
        _spike_matrices(fig, inner, stage, spikes, t, h, lo, hi)
    chosen = ("" if head is not None and step is not None else
              "\nper stage the head and time step whose A_t keeps closest to half of the tokens")
    fig.suptitle(f"Q-K token attention as in the paper's Figure 3(a){': ' + label if label else ''}"
                 f"\nwhite = 1, black = 0;  X' = A_t (*) K (channels of one head x consecutive "
                 f"tokens){chosen}", fontsize=10)
    save_figure(fig, path, bbox_inches="tight")


def _segment_over_image(ax, image: np.ndarray, stage: str, N: int, lo: int, hi: int):
    """The image with tokens lo..hi-1 lit: tokens run row-major over a square grid, so a
    segment of consecutive tokens is a band of grid rows (a reader sees where it lies)."""
    side = math.isqrt(N)
    lit = torch.zeros(N)
    lit[lo:hi] = 1
    up = F.interpolate(lit.reshape(1, 1, side, side), size=image.shape[:2], mode="nearest")[0, 0]
    ax.imshow(image * (0.25 + 0.75 * up.numpy()[..., None]))
    ax.set_title(f"{stage}:\ntokens {lo}-{hi - 1}", fontsize=9)
    ax.axis("off")


def _spike_matrices(fig, inner, stage: str, spikes: dict, step: int, head: int, lo: int, hi: int):
    """One stage's four binary matrices, stacked in `inner` (a gridspec of 4 rows) and
    sharing the token axis, labelled only under the last."""
    panels = ("Q", "A_t", "K", "X'")
    N = spikes["Q"].shape[-1]
    side = math.isqrt(N)
    for r, panel in enumerate(panels):
        m = spikes[panel][step, head, :, lo:hi].float().numpy()  # (rows, tokens)
        ax = fig.add_subplot(inner[r])
        # nearest: each spike a sharp square, as the paper's white and black dots
        ax.imshow(m, cmap="gray", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
        ax.set_ylabel(panel, rotation=0, ha="right", va="center", fontsize=10)
        ax.set_yticks([0, m.shape[0] - 1] if m.shape[0] > 1 else [])
        ax.tick_params(labelsize=8)
        ax.text(1.005, 0.5, f"{m.mean():.0%} ones", transform=ax.transAxes, fontsize=9,
                va="center")
        if r == 0:
            silent = "" if spikes["A_t"][..., lo:hi].any() else "; A_t keeps no token at any head or step"
            ax.set_title(f"{stage}: head {head}, time step {step + 1} of {spikes['Q'].shape[0]}, "
                         f"{m.shape[0]} channels (rows) x tokens {lo}-{hi - 1} of {N} ({side}x{side} "
                         f"grid){silent}", fontsize=9)
        if r < len(panels) - 1:
            ax.set_xticks([])
        else:
            ticks = list(range(0, hi - lo, max(1, (hi - lo) // 5)))
            ax.set_xticks(ticks)
            ax.set_xticklabels([str(lo + t) for t in ticks])
            ax.set_xlabel("token index", fontsize=9)


# ----------------------------------------------------------------------------------------
# Event-camera data: what a sample's frames hold

def event_image(frames: torch.Tensor, top=None) -> torch.Tensor:
    """Event counts (..., 2, H, W) -> colour pictures (..., 3, H, W) in [0, 1]: ON events
    (polarity 1, brighter) red, OFF events (polarity 0, darker) blue, no event black.
    top: the count shown at full colour (default: the 99th percentile of the non-zero counts,
    so that a few busy pixels do not leave the rest dark)."""
    frames = frames.detach().float().cpu()
    if top is None:
        busy = frames[frames > 0]
        top = torch.quantile(busy[:100_000], 0.99).item() if busy.numel() else 1.0
    on, off = (frames[..., 1, :, :] / top).clamp(0, 1), (frames[..., 0, :, :] / top).clamp(0, 1)
    return torch.stack([on, torch.zeros_like(on), off], dim=-3)       # (..., 3, H, W)


def plot_event_frames(samples: list, path: str, titles=None, max_frames=16):
    """One row per sample, its T frames left to right (up to max_frames, evenly chosen): ON
    events red, OFF blue (event_image), the colour scale shared by the row's frames.
    samples: event counts (T, 2, H, W) each."""
    plt = _pyplot()
    T = samples[0].shape[0]
    steps = sorted({round(i * (T - 1) / max(1, min(T, max_frames) - 1)) for i in range(min(T, max_frames))})
    fig, axes = plt.subplots(len(samples), len(steps), squeeze=False,
                             figsize=(max(4.5, 1.5 * len(steps) + 1.0), 1.65 * len(samples) + 1.0))
    for r, frames in enumerate(samples):
        pictures = event_image(frames)                                      # (T, 3, H, W)
        for c, t in enumerate(steps):
            ax = axes[r][c]
            ax.imshow(pictures[t].permute(1, 2, 0).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"t = {t + 1}", fontsize=9)
            if c == 0 and titles:
                ax.set_ylabel(titles[r], fontsize=9)
    fig.suptitle("Event frames (counts per pixel and frame):\nON events red, OFF events blue",
                 fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


# ----------------------------------------------------------------------------------------
# evaluate.py's pictures

@torch.no_grad()
def draw_pictures(model: nn.Module, images: torch.Tensor, results: dict, rates: dict, out_dir: str,
                  mean=None, std=None, class_names=None, raster=None, display=None,
                  titles=None) -> list:
    """Write the pictures for a few (already prepared) test `images`; returns their paths:
    firing rates, spike raster, token masks and (for the first image) Q-K token attention
    as in Figure 3(a), when the model has Q-K token attention in stages 1-2, and the
    confusion matrix.
    display: what the token masks are drawn over, (B, 3, H, W) in [0, 1] (default: `images`,
    un-normalised with mean and std; event data passes event_image of its frames).
    titles: one per image, e.g. "test image 3 (cat)"."""
    model.eval()
    device = next(model.parameters()).device
    raster = raster or raster_layer(model)
    masks = token_mask_neurons(model)
    attention = qk_attention_neurons(model)
    # One forward pass keeps every tensor the pictures show (spikes of a few neurons only).
    kept = kept_outputs(model, {raster, *masks, *(n for names in attention.values() for n in names)},
                        images.to(device))
    shown = images.cpu() if display is None else display.cpu()
    paths = [os.path.join(out_dir, name) for name in ("firing_rates.png", "spike_raster.png")]
    plot_firing_rates(rates, paths[0])
    plot_spike_raster(kept[raster], paths[1], raster, titles=titles)
    if masks:
        paths.append(os.path.join(out_dir, "token_masks.png"))
        plot_token_masks(shown, {attn.replace(".attn", ""): token_masks(kept[n])
                                 for n, attn in masks.items()}, paths[-1], mean, std, titles)
    if attention:
        blocks = qk_attention_blocks(model)
        stages = {}
        for stage, (q, k, a) in attention.items():
            spikes = qk_attention_spikes(kept[q], kept[k], kept[a], blocks[stage][1].num_heads)
            stages[stage] = {panel: s[:, 0] for panel, s in spikes.items()}   # the first image
        paths.append(os.path.join(out_dir, "qk_attention.png"))
        plot_qk_attention(show_image(shown[0], mean, std), stages, paths[-1],
                          label=titles[0] if titles else "")
    paths.append(os.path.join(out_dir, "confusion_matrix.png"))
    plot_confusion(results["confusion"], paths[-1], class_names)
    return paths


def draw_test_images(model: nn.Module, test_set, indices, prepare, spec, results: dict,
                     rates: dict, out_dir: str, class_names, data_dir: str) -> tuple:
    """evaluate.py's pictures of the test images `indices` (into `test_set` in its own order,
    whatever part of it was evaluated); returns ({indices, titles, note}: which images they
    show, the paths written). note: picture_note's warning, or None.

    prepare: uint8 test images -> the model's input, on the model's device (as evaluated).
    spec:    the data.DatasetSpec. Event data (input_kind "event counts") has no picture to
             show under the token masks: they are drawn over the events summed over time, and
             event_frames.png shows each sample's T frames."""
    device = next(model.parameters()).device
    samples = [test_set[i] for i in indices]
    inputs = [x for x, _ in samples]
    events = spec.input_kind == "event counts"
    display = torch.stack([event_image(x.sum(0)) for x in inputs]) if events else None
    titles = [f"test image {i} ({class_names[int(label)]})" for i, (_, label) in zip(indices, samples)]
    paths = draw_pictures(model, prepare(torch.stack(inputs).to(device)), results, rates, out_dir,
                          spec.mean, spec.std, class_names, display=display, titles=titles)
    if events:                          # a row label is narrow: the class goes on a second line
        paths.append(os.path.join(out_dir, "event_frames.png"))
        plot_event_frames(inputs, paths[-1], [t.replace(" (", "\n(") for t in titles])
    return dict(indices=indices, titles=titles, note=picture_note(spec.name, data_dir)), paths


# ----------------------------------------------------------------------------------------
# Which images --images shows
#
# --images counts in the test set's own order. For CIFAR that is the order of the official
# test file, the same on every official copy, so "test image 3" names one image everywhere;
# a copy rebuilt in another order (from image files, say) holds other images at the same
# indices, and evaluate.py says so next to the pictures.

# The test images the pictures show by default: indices into the test set in its own order.
DEFAULT_IMAGES = (0, 1, 3, 6)

# md5 of the official CIFAR test files (the python-format archives' test_batch / test).
OFFICIAL_TEST_MD5 = {"cifar10": "40351d587109b95175f43aff81a1287e",
                     "cifar100": "f0ef6b0ae62326f3e7ffdfab6717acfc"}


def image_indices(text: str) -> tuple:
    """--images "3,10,21" -> (3, 10, 21)."""
    try:
        indices = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected test image indices such as 3,10,21, got {text!r}")
    if any(i < 0 for i in indices):
        raise argparse.ArgumentTypeError(f"image indices start at 0, got {text!r}")
    return indices


def add_picture_arguments(parser):
    """evaluate.py's --images and --pictures: which test images the pictures show."""
    parser.add_argument("--images", type=image_indices, default=DEFAULT_IMAGES,
                        help="the test images the pictures show, by index into the test set in its "
                             "own order (CIFAR: the official test file's, the same on every official "
                             "copy), whatever --limit evaluates; comma-separated (default: "
                             + ",".join(map(str, DEFAULT_IMAGES)) + ")")
    parser.add_argument("--pictures", type=int, help="show only the first N of --images (default: "
                                                     "all; 0: no pictures)")


def test_set_shown(indices, whole, title: str):
    """The test set that --images `indices` count in, None when no picture is drawn; checked
    before the evaluation (a wrong index fails at once, not after an hour of it).
    whole: builds the whole test set (or returns it, when it is the one evaluated).
    title: the dataset's name, for the message."""
    if not indices:
        return None
    full = whole()
    if max(indices) >= len(full):
        raise ValueError(f"--images {max(indices)}: the {title} test set has {len(full)} "
                         f"images (indices 0 to {len(full) - 1})")
    return full


def picture_note(dataset: str, data_dir: str):
    """None when the CIFAR test file is the official one (or the dataset is not CIFAR), else a
    note that the --images indices pick other images than in the official order."""
    if dataset not in OFFICIAL_TEST_MD5:
        return None
    spec = data.CIFAR[dataset]
    path = os.path.join(data.ensure_cifar(dataset, data_dir, False), spec["test_files"][0])
    with open(path, "rb") as f:
        md5 = hashlib.md5(f.read()).hexdigest()
    if md5 == OFFICIAL_TEST_MD5[dataset]:
        return None
    return (f"{path} is not the official test file (md5 {md5}): its images may be in another "
            f"order, and --images then picks other images than on an official copy")
