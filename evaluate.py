"""Evaluate a QKFormer: accuracy, spike firing rates, theoretical energy, and pictures of what
the network does inside.

Reference: Zhou et al., "QKFormer: Hierarchical Spiking Transformer using Q-K Attention",
NeurIPS 2024 (arXiv:2403.16552). What this file reproduces:
  * Section 4.3, Table 4: the firing rate of every spiking layer (Q, K, A_t, X', X'', MLP).
  * Appendix 6.6, Eq. (19)-(21), in the paper's words: "SOP^l = fr x T x FLOPs^l where l is a
    block/layer in QKFormer, fr is the firing rate of the block/layer and T is the simulation
    time step"; "E_MAC = 4.6pJ and E_AC = 0.9pJ" (45 nm hardware, Horowitz, ISSCC 2014);
      E_QKFormer = E_AC x (sum of the SOPs of the conv layers 2..N, the QKTA and the SSA
                   layers) + E_MAC x FLOP^1_Conv   ("the first layer encoding the non-spike
                   input into spike-form"),
      E_ANN      = E_MAC x FLOPs.
    What the paper leaves open (which firing rate, how often the first layer counts, what the
    attention costs) is decided here and labelled as ours: see "Energy" below.
  * Section 4.3, Figure 3(a), "the visualization of Q-K token attention. The white dot means
    value 1, while the black one means value 0": not a map over the image but spike matrices,
    "the longitudinal axis denotes the channel index of one head, while the horizontal axis
    denotes the token index [...] we choose a continuous segment with a length of 100"
    (stages 1 and 2 of an ImageNet model). plot_qk_attention draws that kind of picture (Q,
    A_t, K and X' = A_t (*) K of one image, head and time step). plot_token_masks is ours: A_t
    averaged over heads and steps, laid over the image.
The official code has none of this (its authors computed energy by hand: official issue 7).
The memory / time experiment of Section 4.3 (Figure 3(b), Table 9) lives in complexity.py.

Usage:
    python evaluate.py --checkpoint runs/x/best.pt --dataset cifar10 --data-dir data
    python evaluate.py --checkpoint runs/x/best.pt --dataset cifar10 --images 0,1,3,6
    python evaluate.py --checkpoint official.pth --dataset imagenet --data-dir /imagenet --limit 500

Outputs go to eval/<checkpoint name>/ (or --output): metrics.json, firing_rates.png,
spike_raster.png, token_masks.png, qk_attention.png, confusion_matrix.png, and for event-camera
data (CIFAR10-DVS, DVS128 Gesture) event_frames.png. The pictures show the test images chosen
with --images: indices into the test set in its own order (CIFAR: the order of the official
test file), whatever --limit evaluates.

Layout of this file:
  SpikeRecorder, evaluate         accuracy and firing rates over a test set (forward hooks)
  layer_macs, energy_report       FLOPs per layer (FlopCounterMode) -> SOPs -> energy
  plot_*                          the pictures
  main                            the command line
"""
import argparse
import contextlib
import json
import math
import os
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

import data
import qkformer
from neuron import (AMP_CHOICES, SpikingNeuron, apply_device_settings, apply_memory_policy,
                    autocast_dtype)
from qkformer import QKAttention, SpikeAttention

# Energy per operation on a 45 nm chip (Horowitz 2014), as the paper uses them (Appendix 6.6).
E_MAC_PJ = 4.6   # a multiply-accumulate on real numbers (what an ANN, and the first layer, does)
E_AC_PJ = 0.9    # an accumulate, triggered by a spike (what every later layer of an SNN does)

LAYERS = (nn.Conv2d, nn.Linear)  # the layers with weights whose MACs Eq. (19) turns into SOPs


# ----------------------------------------------------------------------------------------
# Accuracy and firing rates

class SpikeRecorder:
    """Forward hooks that count, over every batch the model sees while the recorder is open:

      * for every spiking neuron (any neuron.SpikingNeuron, whatever its type): the number
        of spikes it emitted and the number of outputs (neurons x time steps x images),
        whose ratio is its firing rate;
      * for every Conv2d and Linear: the sum and the number of elements of its INPUT. The
        mean input is the "firing rate" that Eq. (19) multiplies the layer's FLOPs by. Most
        layers are fed binary spikes; those after a residual sum receive spike counts
        (0, 1, 2, ...) and the head averaged counts: their mean is then the average number
        of spikes per input element, which is exactly how many accumulates they trigger.
      * optionally, the outputs of the modules named in `keep` (for the pictures).

    The sums stay on the model's device (float64: a test set has billions of outputs, beyond
    float32's exact integers) and are read once, when a result is first asked for: a hook
    that read each sum (.item()) would wait for the device about 70 times per batch.

    Usage:  with SpikeRecorder(model) as rec: model(x); rec.firing_rates()
    """

    def __init__(self, model: nn.Module, keep=()):
        self.model = model
        self.keep = set(keep)
        self.names = {}                          # module -> its name in the model
        self._sums, self.counts = {}, {}         # name -> sum on the device, number of elements
        self.neurons, self.layers = [], []       # names of the neurons, of the conv/linear layers
        self.kept = {}                           # module name -> list of outputs (on the CPU)
        self._read = None                        # {name: sum as a float}, once read
        self._handles = []

    def __enter__(self):
        for name, m in self.model.named_modules():
            self.names[m] = name
            if isinstance(m, SpikingNeuron):
                self.neurons.append(name)
                self._handles.append(m.register_forward_hook(self._hook(name, output=True)))
            elif isinstance(m, LAYERS):
                self.layers.append(name)
                self._handles.append(m.register_forward_hook(self._hook(name, output=False)))
            elif name in self.keep:
                self._handles.append(m.register_forward_hook(self._keep_hook(name)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []

    def _hook(self, name, output: bool):
        def hook(module, inputs, out):
            x = out if output else inputs[0]     # a neuron's spikes, a layer's input
            total = x.detach().sum(dtype=torch.float64)
            self._sums[name] = self._sums[name] + total if name in self._sums else total
            self.counts[name] = self.counts.get(name, 0) + x.numel()
            self._read = None
            if name in self.keep:
                self.kept.setdefault(name, []).append(out.detach().cpu())
        return hook

    def _keep_hook(self, name):
        def hook(module, inputs, out):
            self.kept.setdefault(name, []).append(out.detach().cpu())
        return hook

    def sums(self) -> dict:
        """{name: sum of a neuron's spikes or of a layer's input}, read from the device once."""
        if self._read is None:
            names = list(self._sums)
            values = torch.stack([self._sums[n] for n in names]).tolist() if names else []
            self._read = dict(zip(names, values))
        return self._read

    @property
    def spikes(self) -> dict:
        """{neuron name: total spikes}."""
        return {n: self.sums()[n] for n in self.neurons if n in self._sums}

    @property
    def outputs(self) -> dict:
        """{neuron name: total outputs (neurons x steps x images)}."""
        return {n: self.counts[n] for n in self.neurons if n in self.counts}

    def firing_rates(self) -> dict:
        """{neuron name: spikes / outputs}, in the order of model.named_modules()."""
        sums = self.sums()
        return {n: sums[n] / self.counts[n] for n in self.neurons if self.counts.get(n)}

    def input_rates(self) -> dict:
        """{conv/linear name: mean of its input} (the fr of Eq. 19 for that layer)."""
        sums = self.sums()
        return {n: sums[n] / self.counts[n] for n in self.layers if self.counts.get(n)}

    def total(self, module: nn.Module):
        """(sum, count) recorded for a module object: a neuron's spikes and outputs, a
        conv/linear layer's input sum and input elements."""
        name = self.names.get(module)
        if name is None or name not in self.counts:
            raise KeyError(f"no spikes or inputs were recorded for {type(module).__name__} "
                           f"{name or '(not in the model)'}: is it a SpikingNeuron or a "
                           f"Conv2d / Linear that the model called?")
        return self.sums()[name], self.counts[name]

    def firing_function(self, images: int, T: int):
        """The `firing(neuron)` that SpikeAttention.synaptic_ops takes: for a neuron module,
        (its firing rate, its neurons per image and time step), over `images` images at T
        time steps."""
        def firing(neuron: nn.Module):
            spikes, outputs = self.total(neuron)
            return spikes / outputs, outputs / (images * T)
        return firing


def stage_of(name: str) -> str:
    """'stages.1.blocks.0.attn.q.lif' -> 'stage 2' (the paper counts stages from 1)."""
    parts = name.split(".")
    if len(parts) > 1 and parts[0] == "stages" and parts[1].isdigit():
        return f"stage {int(parts[1]) + 1}"
    return "other"


def stage_firing_rates(recorder: SpikeRecorder) -> dict:
    """Firing rate of all neurons of each stage together (total spikes / total outputs)."""
    spikes, outputs = {}, {}
    for name, s_n in recorder.spikes.items():
        s = stage_of(name)
        spikes[s] = spikes.get(s, 0.0) + s_n
        outputs[s] = outputs.get(s, 0) + recorder.counts[name]
    return {s: spikes[s] / outputs[s] for s in spikes if outputs[s]}


def neuron_of(module: nn.Module) -> nn.Module:
    """The spiking neuron of a conv-BN-neuron unit (qkformer.ConvBNLIF), found by its class."""
    found = [m for m in module.modules() if isinstance(m, SpikingNeuron)]
    if len(found) != 1:
        raise ValueError(f"{type(module).__name__} holds {len(found)} spiking neurons, not one")
    return found[0]


def layer_of(module: nn.Module) -> nn.Module:
    """The convolution (or linear layer) of a conv-BN-neuron unit."""
    return next(m for m in module.modules() if isinstance(m, LAYERS))


def attention_neuron(attn: nn.Module) -> nn.Module:
    """The neuron an attention applies itself (A_t of QKTA), not one of its Q/K/V/proj units."""
    found = [m for m in attn.children() if isinstance(m, SpikingNeuron)]
    if len(found) != 1:
        raise ValueError(f"{type(attn).__name__} has {len(found)} neurons of its own, not one")
    return found[0]


def is_token_attention(attn: nn.Module) -> bool:
    return isinstance(attn, QKAttention) and attn.mode == "token"


# Table 4 of the paper names the spiking tensors of a QKFormer block. X' = A_t (*) K is not
# the output of a neuron but the input of the attention's output projection.
TABLE4_ROWS = {
    "QKTA Q": lambda b: neuron_of(b.attn.q), "QKTA K": lambda b: neuron_of(b.attn.k),
    "QKTA A_t": lambda b: attention_neuron(b.attn), "QKTA X'": lambda b: layer_of(b.attn.proj),
    "QKTA X''": lambda b: neuron_of(b.attn.proj), "SMLP Layer1": lambda b: neuron_of(b.mlp.fc1),
    "SMLP Layer2": lambda b: neuron_of(b.mlp.fc2)}


def table4(model: nn.Module, recorder: SpikeRecorder) -> dict:
    """The paper's Table 4 for this model: per stage with Q-K token attention, the firing rate of
    Q, K, A_t, X', X'' and the two MLP layers, pooled over the stage's blocks. The tensors are
    found by module objects (the neuron of each unit), not by attribute names."""
    table = {}
    for i, stage in enumerate(getattr(model, "stages", [])):
        blocks = [b for b in stage.blocks if is_token_attention(b.attn)]
        if not blocks:
            continue
        rows = {}
        for row, find in TABLE4_ROWS.items():
            totals = [recorder.total(find(b)) for b in blocks]     # (sum, count) per block
            count = sum(c for _, c in totals)
            rows[row] = sum(s for s, _ in totals) / count if count else float("nan")
        table[f"stage {i + 1}"] = rows
    return table


@torch.no_grad()
def evaluate(model: nn.Module, batches, num_classes: int, device="cpu", prepare=None,
             limit=None, total=None, desc="evaluate", amp_dtype=None, flip=False):
    """Run `model` over an iterable of (images, labels) batches and measure everything.

    prepare: optional function applied to each image batch on the device (e.g. turning
             uint8 pixels into normalised floats).
    limit:   stop after this many images (the last batch is cut).
    amp_dtype: run the model under autocast with this dtype (neuron.autocast_dtype), or
             None for float32.
    flip:    test-time flips: the logits averaged with those of the mirrored images
             (qkformer.predict). The recorder then sees two forward passes per image.
    Returns (results, recorder): results holds images, top1, top5 (percent), loss (mean
    cross-entropy) and the confusion matrix (rows: true class, columns: predicted class); the
    recorder holds the spike and input counts. Counts stay on the device until the end.
    """
    model.eval().to(device)
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=device)
    correct1 = torch.zeros((), dtype=torch.int64, device=device)
    correct5 = torch.zeros((), dtype=torch.int64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    seen = 0
    k = min(5, num_classes)
    with SpikeRecorder(model) as recorder:
        for images, labels in tqdm(batches, total=total, desc=desc, unit="batch", leave=False):
            if limit is not None:
                if seen >= limit:
                    break
                images, labels = images[:limit - seen], labels[:limit - seen]
            images, labels = images.to(device), torch.as_tensor(labels).to(device)
            if prepare is not None:
                images = prepare(images)
            with torch.autocast(torch.device(device).type, dtype=amp_dtype,
                                enabled=amp_dtype is not None):
                logits = qkformer.predict(model, images, flip)
            if logits.shape[-1] != num_classes:
                raise ValueError(f"the model predicts {logits.shape[-1]} classes but the data has "
                                 f"{num_classes}")
            top = logits.topk(k, dim=1).indices                   # (B, k), best first
            correct1 += (top[:, 0] == labels).sum()
            correct5 += (top == labels[:, None]).any(dim=1).sum()
            loss_sum += F.cross_entropy(logits.float(), labels, reduction="sum").double()
            confusion += torch.bincount(labels * num_classes + top[:, 0], minlength=num_classes ** 2)
            seen += len(labels)
    if seen == 0:
        raise ValueError("no test images to evaluate")
    correct1, correct5, loss = torch.stack([correct1.double(), correct5.double(), loss_sum]).tolist()
    results = dict(images=seen, top1=100.0 * correct1 / seen, top5=100.0 * correct5 / seen,
                   top5_k=k, loss=loss / seen,
                   confusion=confusion.cpu().reshape(num_classes, num_classes))
    return results, recorder


# ----------------------------------------------------------------------------------------
# Energy (Appendix 6.6)
#
# The paper's part: SOP^l = fr x T x FLOPs^l (Eq. 19), "FLOPs^l [...] is the number of
# multiply-and-accumulate (MAC) operations"; E_AC = 0.9 pJ per SOP, E_MAC = 4.6 pJ per MAC;
# E_QKFormer = E_AC x (SOPs of the later conv layers, the QKTA and the SSA layers)
# + E_MAC x FLOP^1_Conv (Eq. 20), with no T in the first layer's term; E_ANN = E_MAC x FLOPs
# (Eq. 21); batch norm "could be ignored", as it folds into the convolution before it.
#
# Ours (the paper does not say; this text is also written into metrics.json):
#  * FLOPs: torch's FlopCounterMode, for ONE image at ONE time step, halved (it counts 2
#    FLOPs per multiply-accumulate).
#  * fr of a conv / linear layer = the mean of that layer's INPUT over the test set (the
#    paper: "the firing rate of the block/layer"). Most layers are fed binary spikes; after
#    a residual sum the input is a spike count (0, 1, 2, ...), and the mean then counts each
#    spike once: one accumulate per spike.
#  * Max-pooling, the residual additions and the neurons' own updates are not counted (Eq.
#    20 has no term for them).
#  * MAC layers: only the first convolution (stages.0.embed.stem.conv), which sees real-valued
#    pixels, counted ONCE per image as Eq. (20) writes it (no T): the image is the same at
#    every step, so a chip computes it once (our model simply repeats it).
#  * AC layers: every other conv / linear layer, SOP = fr x T x FLOPs. The head reads
#    features averaged over time; being linear, head(mean_t x_t) = mean_t head(x_t), so it
#    too counts as T steps of fr x FLOPs.
#  * The attentions' own operations on spikes (SOP_QKTA, SOP_SSA of Eq. 20): every
#    qkformer.SpikeAttention lists them itself (synaptic_ops), each with its MACs per image
#    and step and the firing rate of the spikes that drive it; SOP = fr x T x MACs.
#    SSA: K^T V (each spike of K adds a row of V, fr_K) and Q (K^T V) (each spike of Q adds
#    a row of K^T V, fr_Q); its scale is a constant that can be folded into the neuron's
#    threshold. QKTA/QKCA: the sum of Q is one addition per spike of Q; the mask A (*) K is a
#    logical AND of two spikes, no accumulate: 0 (the paper: mask operations have
#    "negligible power consumption").
#  * Nothing slips through: any module other than a conv / linear layer that does FLOPs of
#    its own (a matrix product on spikes) must report at least as many MACs in
#    synaptic_ops, or energy_report raises an error naming it.
#  * E_ANN = 4.6 pJ x all MACs of the same network at T = 1 (convs, linears and the
#    attention products FlopCounterMode counts): the network with its spiking neurons
#    replaced by ReLUs.

# How the first layer is counted for images (for event data: EVENT_INPUT_NOTE below).
FIRST_LAYER_NOTE = (
    "MAC layers (real-valued input, 4.6 pJ per MAC): the first conv, counted once per image "
    "(no T, as Eq. 20 writes it: the image is the same at every step; ours).")

ENERGY_NOTES = [
    "Energy per operation (the paper's, Appendix 6.6): E_MAC = 4.6 pJ, E_AC = 0.9 pJ; "
    "SOP = fr x T x FLOPs (Eq. 19); E_SNN = E_AC x SOPs + E_MAC x FLOPs of the first conv "
    "(Eq. 20); E_ANN = E_MAC x FLOPs (Eq. 21).",
    "FLOPs are multiply-accumulates (MACs) of one image at one time step, from "
    "torch.utils.flop_counter.FlopCounterMode (its FLOP counts halved; ours).",
    "Batch norm is not counted (the paper's: folded into the convolutions); max-pooling, "
    "residual additions and neuron updates are not counted either (ours: Eq. 20 has no term "
    "for them).",
    FIRST_LAYER_NOTE,
    "AC layers (fed by spikes or spike counts, 0.9 pJ per SOP): SOP = fr x T x FLOPs (Eq. 19), "
    "fr = mean of the layer's input over the test set (ours; the paper: 'the firing rate of the "
    "block/layer'. After a residual sum the input is a spike count, and each spike costs one "
    "accumulate).",
    "Attention: each qkformer.SpikeAttention reports its own operations on spikes "
    "(synaptic_ops: MACs per image and step, and the firing rate of the driving spikes); "
    "SOP = fr x T x MACs (ours).",
    "SSA: K^T V counts fr_K x T x MACs and Q (K^T V) counts fr_Q x T x MACs; the scale is folded "
    "into the threshold (ours).",
    "QKTA/QKCA: the sum of Q counts one SOP per Q spike (fr_Q x T x N x C); the mask A (*) K is a "
    "logical AND, counted as 0 (ours).",
    "Any other module doing FLOPs of its own that its synaptic_ops do not report is an error.",
    "E_ANN: 4.6 pJ x all MACs at T = 1 (convs, linears, attention matrix products; ours).",
]


# Event-camera data (DatasetSpec.input_kind "event counts"): what changes, and why.
EVENT_INPUT_NOTE = (
    "Event data: the first conv's input is event counts per pixel, polarity and frame, not "
    "real-valued pixels. A count n is n events, each adding the kernel's weights to its "
    "outputs: accumulates, no multiplication. So the first conv is an AC layer like the others, "
    "SOP = fr x T x FLOPs with fr = the mean event count per input element (over the test set), "
    "and no layer is counted as MAC. The frames differ from step to step, so the first conv "
    "runs at every step (T times), unlike a static image (ours).")


def _example_input(model: nn.Module):
    """One image at one time step, (T=1, B=1, C, H, W), for a QKFormer."""
    cfg = model.config
    return torch.zeros(1, 1, cfg.in_channels, cfg.img_size, cfg.img_size)


@contextlib.contextmanager
def reference_neurons(model: nn.Module):
    """Run every neuron that has a plain autograd loop (`reference`) on it for the block.

    FLOPs are counted under FlopCounterMode, a dispatch mode that sees every operation:
    the reference loops show it the neuron's arithmetic as plain tensor operations, and the
    compiled kernels stay out of it (neuron.CompiledOrEager never compiles under a dispatch
    mode, and runs such calls eagerly)."""
    switched = [m for m in model.modules()
                if isinstance(m, SpikingNeuron) and getattr(m, "reference", True) is False]
    for m in switched:
        m.reference = True
    try:
        yield model
    finally:
        for m in switched:
            m.reference = False


@torch.no_grad()
def layer_macs(model: nn.Module, example=None) -> dict:
    """MACs of one forward on `example` (default: one image at one time step), counted by
    FlopCounterMode with the neurons on their reference loops (see reference_neurons).
    Returns {"layers": {conv/linear name: MACs}, "own": {name of any other module doing FLOPs
    of its own, i.e. not in its children: those MACs}, "total": all MACs}."""
    if example is None:
        example = _example_input(model)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with reference_neurons(model), counter:
        model(example.to(device))
    model.train(was_training)
    # get_flop_counts() maps "<RootClass>.<module name>" to {op: FLOPs}, the module's own ops
    # and those of its children.
    counts = counter.get_flop_counts()
    root = type(model).__name__

    def flops(name):
        return sum(counts.get(f"{root}.{name}" if name else root, {}).values())

    # A module's own FLOPs: its count less those of the called modules nearest below it
    # (containers such as nn.ModuleList are never called and have no count).
    modules = dict(model.named_modules())
    called = [n for n in modules if f"{root}.{n}" in counts or (not n and root in counts)]
    own = {n: flops(n) for n in called}
    for name in called:
        if name:
            parts = name.split(".")
            parent = next((p for p in (".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1))
                           if p in own), "")
            own[parent] -= flops(name)
    layers = {n: flops(n) // 2 for n, m in modules.items() if isinstance(m, LAYERS)}
    own = {n: f // 2 for n, f in own.items() if f > 0 and not isinstance(modules[n], LAYERS)}
    return dict(layers=layers, own=own, total=counter.get_total_flops() // 2)


def energy_report(model: nn.Module, recorder: SpikeRecorder, images: int, T: int, macs: dict,
                  mac_layers=None) -> dict:
    """Theoretical energy per image, Appendix 6.6 Eq. (19)-(21) (see the notes above).

    recorder: spike and input counts over `images` test images at T time steps.
    macs:     layer_macs(model).
    mac_layers: names of the layers with real-valued input, counted as MACs; default: the
              first conv / linear layer of the model (for QKFormer, the stem convolution).
    Returns a dict with one row per counted operation and the totals (E in mJ per image).
    Raises ValueError naming a module that does FLOPs of its own which its synaptic_ops do
    not report (or that is no SpikeAttention and cannot report them).
    """
    rates = recorder.input_rates()
    if mac_layers is None:
        mac_layers = [next(iter(macs["layers"]))]
    firing = recorder.firing_function(images, T)
    modules = dict(model.named_modules())

    # The attentions' own operations, each listed before the attention's last conv/linear
    # layer (its output projection), where they happen.
    attention_rows, before = {}, {}
    for name, m in modules.items():
        if not isinstance(m, SpikeAttention):
            continue
        rows = [dict(name=f"{name} ({label})", kind="AC", macs=n, input_rate=rate,
                     ops=rate * T * n, energy_pJ=E_AC_PJ * rate * T * n)
                for label, n, rate in m.synaptic_ops(firing)]
        attention_rows[name] = rows
        inner = [f"{name}.{c}" for c, sub in m.named_modules() if c and isinstance(sub, LAYERS)]
        before.setdefault(inner[-1] if inner else None, []).extend(rows)
    for name, n in macs["own"].items():
        reported = sum(r["macs"] for r in attention_rows.get(name, []))
        if reported < n * (1 - 1e-9):                 # (float MACs from spike counts)
            kind = type(modules[name]).__name__
            raise ValueError(
                f"{name or 'the model'} ({kind}) does {n:,} MACs per image and step of its own "
                f"(not in a conv/linear layer) but reports {reported:,.0f} in synaptic_ops: an "
                f"operation on spikes would be left out of the energy. Make it a "
                f"qkformer.SpikeAttention whose synaptic_ops lists every product it computes.")

    rows = []
    for name, n in macs["layers"].items():
        rows += before.pop(name, [])
        if name in mac_layers:
            rows.append(dict(name=name, kind="MAC", macs=n, input_rate=rates.get(name),
                             ops=n, energy_pJ=E_MAC_PJ * n))
        else:
            sop = rates.get(name, 0.0) * T * n                               # Eq. (19)
            rows.append(dict(name=name, kind="AC", macs=n, input_rate=rates.get(name),
                             ops=sop, energy_pJ=E_AC_PJ * sop))
    rows += [r for rest in before.values() for r in rest]                    # attentions without layers
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
#
# Written at DPI dots per inch, with text of 9 points or more (8 for the dense parts), so that
# they stay readable on a slide.

DPI = 150


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
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


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
    fig.savefig(path, dpi=DPI)
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
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


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


def plot_qk_attention(image: np.ndarray, stages: dict, path: str, head=0, step=None, length=100,
                      start=None, label=""):
    """The kind of picture of the paper's Figure 3(a), for one image: per stage, the spike
    matrices Q, A_t, K and X' = A_t (*) K of one head at one time step, rows the channels of
    that head, columns a segment of `length` consecutive tokens; white = 1, black = 0.
    Left of each stage, the image with that segment's tokens lit.

    image:  what the model saw, (H, W, 3) in [0, 1] (show_image).
    stages: {stage name: qk_attention_spikes(...) of this one image, each (T, heads, rows, N)}.
    step:   the time step shown, 0-based (default: the last, when the membranes have
            integrated the most). label: names the image in the title."""
    plt = _pyplot()
    panels = ("Q", "A_t", "K", "X'")
    first = next(iter(stages.values()))["Q"]
    T = first.shape[0]
    step = T - 1 if step is None else step
    if not 0 <= step < T:
        raise ValueError(f"time step {step} of {T}")
    heights = []                                             # inches of each stage's panels
    for spikes in stages.values():
        rows = spikes["Q"].shape[2]
        matrix = min(2.0, 0.3 + 0.1 * rows)
        heights.append([matrix, 0.3, matrix, matrix])
    total = sum(sum(h) + 1.0 for h in heights)
    fig = plt.figure(figsize=(10, total + 0.6))
    outer = fig.add_gridspec(len(stages), 2, width_ratios=[1.6, 8.4],
                             height_ratios=[sum(h) + 1.0 for h in heights], wspace=0.15, hspace=0.35)
    for i, (stage, spikes) in enumerate(stages.items()):
        N = spikes["Q"].shape[-1]
        lo, hi = token_segment(N, length, start)
        side = math.isqrt(N)
        lit = torch.zeros(N)
        lit[lo:hi] = 1
        up = F.interpolate(lit.reshape(1, 1, side, side), size=image.shape[:2], mode="nearest")[0, 0]
        ax = fig.add_subplot(outer[i, 0])
        ax.imshow(image * (0.25 + 0.75 * up.numpy()[..., None]))
        ax.set_title(f"{stage}:\ntokens {lo}-{hi - 1}", fontsize=9)
        ax.axis("off")
        inner = outer[i, 1].subgridspec(4, 1, height_ratios=heights[i], hspace=0.25)
        for r, panel in enumerate(panels):
            m = spikes[panel][step, head, :, lo:hi].float().numpy()  # (rows, tokens)
            ax = fig.add_subplot(inner[r])
            ax.imshow(m, cmap="gray", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
            ax.set_ylabel(panel, rotation=0, ha="right", va="center", fontsize=10)
            ax.set_yticks([0, m.shape[0] - 1] if m.shape[0] > 1 else [])
            ax.tick_params(labelsize=8)
            ax.text(1.005, 0.5, f"{m.mean():.0%} ones", transform=ax.transAxes, fontsize=9,
                    va="center")
            if r == 0:
                ax.set_title(f"{stage}: head {head}, {m.shape[0]} channels (rows) x "
                             f"tokens {lo}-{hi - 1} of {N} ({side}x{side} grid)", fontsize=9)
            if r < len(panels) - 1:
                ax.set_xticks([])
            else:
                ticks = list(range(0, hi - lo, max(1, (hi - lo) // 5)))
                ax.set_xticks(ticks)
                ax.set_xticklabels([str(lo + t) for t in ticks])
                ax.set_xlabel("token index", fontsize=9)
    fig.suptitle(f"Q-K token attention as in the paper's Figure 3(a){': ' + label if label else ''}"
                 f", time step {step + 1} of {T}\nwhite = 1, black = 0;  X' = A_t (*) K "
                 f"(channels of one head x consecutive tokens)", fontsize=10)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)


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
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


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
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def raster_layer(model: nn.Module) -> str:
    """The layer shown in the spike raster: the neuron of stage 1's first MLP layer when there
    is one, else the first neuron of the model."""
    names = {m: n for n, m in model.named_modules()}
    try:
        return names[neuron_of(model.stages[0].blocks[0].mlp.fc1)]
    except (AttributeError, IndexError, TypeError, ValueError):
        return next(n for n, m in model.named_modules() if isinstance(m, SpikingNeuron))


def token_mask_neurons(model: nn.Module) -> dict:
    """{name of the A_t neuron: name of its attention} for every Q-K token attention in
    stages 1 and 2, found by module objects."""
    names = {m: n for n, m in model.named_modules()}
    return {names[attention_neuron(m)]: n for n, m in model.named_modules()
            if is_token_attention(m) and stage_of(n) in ("stage 1", "stage 2")}


def mask_layers(model: nn.Module) -> list:
    """The attention neurons A_t of every token-mode Q-K attention in stages 1 and 2."""
    return list(token_mask_neurons(model))


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
    keep = {raster, *masks, *(n for names in attention.values() for n in names)}
    with SpikeRecorder(model, keep=keep) as rec:
        model(images.to(device))
    shown = images.cpu() if display is None else display.cpu()
    paths = []
    path = os.path.join(out_dir, "firing_rates.png")
    plot_firing_rates(rates, path)
    paths.append(path)
    path = os.path.join(out_dir, "spike_raster.png")
    plot_spike_raster(rec.kept[raster][0], path, raster, titles=titles)
    paths.append(path)
    if masks:
        path = os.path.join(out_dir, "token_masks.png")
        plot_token_masks(shown, {attn.replace(".attn", ""): token_masks(rec.kept[n][0])
                                 for n, attn in masks.items()}, path, mean, std, titles)
        paths.append(path)
    if attention:
        blocks = qk_attention_blocks(model)
        stages = {}
        for stage, (q, k, a) in attention.items():
            spikes = qk_attention_spikes(rec.kept[q][0], rec.kept[k][0], rec.kept[a][0],
                                         blocks[stage][1].num_heads)
            stages[stage] = {panel: s[:, 0] for panel, s in spikes.items()}   # the first image
        path = os.path.join(out_dir, "qk_attention.png")
        plot_qk_attention(show_image(shown[0], mean, std), stages, path,
                          label=titles[0] if titles else "")
        paths.append(path)
    path = os.path.join(out_dir, "confusion_matrix.png")
    plot_confusion(results["confusion"], path, class_names)
    paths.append(path)
    return paths


# ----------------------------------------------------------------------------------------
# The command line

def print_report(metrics: dict):
    flips = ", each also mirrored (--flip-test)" if metrics.get("flip_test") else ""
    print(f"\n{metrics['dataset']}: {metrics['images']} test images{flips}, T = {metrics['T']}")
    print(f"top-1 {metrics['top1']:.2f} %   top-{metrics['top5_k']} {metrics['top5']:.2f} %   "
          f"loss {metrics['loss']:.4f}")
    if metrics["official_quirks"]:
        print("official_quirks on (an official checkpoint): the stage-3 SSA neuron runs over "
              "time x batch as in the official code, so results depend on --batch-size and on "
              "the order of the test images (the official repository's issue 14: HST-10-384 "
              "78.73 % at batch 32, 74.20 % at batch 1)")
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
        print(f"  {r['name']:<52}{r['kind']:>5}{r['macs']:>14,.0f}{rate:>10}{r['ops']:>15,.0f}"
              f"{r['energy_pJ'] * 1e-6:>9.3f}")
    print(f"  MAC layers (real-valued input): {', '.join(e['mac_layers']) or 'none (event counts)'}; "
          f"every other row is AC.")
    print(f"  SNN: {e['SOPs']:,.0f} SOPs + {e['MACs_first_layer']:,} MACs -> E = {e['E_snn_mJ']:.4f} mJ")
    print(f"  ANN of the same shape: {e['ANN_MACs']:,} MACs -> E = {e['E_ann_mJ']:.4f} mJ "
          f"({e['ann_over_snn']:.1f} x the SNN)")


# The test images the pictures show by default: indices into the test set in its own order.
DEFAULT_IMAGES = (0, 1, 3, 6)

# md5 of the official CIFAR test files: a copy in another order (rebuilt from image files,
# say) holds other images at the same indices (picture_note).
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


def picture_note(dataset: str, data_dir: str):
    """None when the CIFAR test file is the official one (or the dataset is not CIFAR), else a
    note that the --images indices pick other images than in the official order."""
    if dataset not in OFFICIAL_TEST_MD5:
        return None
    import hashlib
    spec = data.CIFAR[dataset]
    path = os.path.join(data.ensure_cifar(dataset, data_dir, False), spec["test_files"][0])
    with open(path, "rb") as f:
        md5 = hashlib.md5(f.read()).hexdigest()
    if md5 == OFFICIAL_TEST_MD5[dataset]:
        return None
    return (f"{path} is not the official test file (md5 {md5}): its images may be in another "
            f"order, and --images then picks other images than on an official copy")


def build_parser():
    p = argparse.ArgumentParser(
        description="Evaluate a QKFormer checkpoint: accuracy, firing rates, energy, pictures. "
                    "(The Q-K attention versus SSA experiment is complexity.py.)")
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by train.py, or an official QKFormer one")
    p.add_argument("--dataset", choices=tuple(data.DATASETS), default="cifar10")
    p.add_argument("--data-dir", default="data", help="folder holding the dataset (see data.py)")
    p.add_argument("--output", help="output folder (default: eval/<checkpoint name>)")
    p.add_argument("--limit", type=int, help="evaluate only N test images (spread evenly over the "
                                             "test set, as data.py picks them)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, help="data loading processes (default: 0 on the CPU, "
                                               "where the model needs every core; on a GPU one per "
                                               "CPU this process may use, at most 8)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda, cuda:1, ... (default: cuda when there is a GPU)")
    p.add_argument("--amp", nargs="?", const="auto", default="off", choices=AMP_CHOICES,
                   help="mixed precision on GPU, as train.py: --amp alone picks bf16 where the GPU "
                        "computes it natively (Ampere and newer), else fp16")
    p.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True,
                   help="GPU: cuDNN autotuning and TF32 matrix products, as train.py (--no-tf32: "
                        "bit-stable float32)")
    p.add_argument("--flip-test", action="store_true", help="test-time flips: average the logits of "
                   "each image and its mirror image (as train.py --flip-test); firing rates and "
                   "energy are then those of one forward pass, of which each image takes two")
    p.add_argument("--T", type=int, help="evaluate with this many time steps instead of the "
                                         "checkpoint's (the paper's Table 7 / Table 2 T=1 rows)")
    p.add_argument("--dvs-split", choices=data.DVS_SPLITS, help="CIFAR10-DVS: the train/test split "
                   "whose test part is evaluated (default: the checkpoint's run's, else official: per "
                   "class the last 10%% of the recordings in sorted file order)")
    p.add_argument("--images", type=image_indices, default=DEFAULT_IMAGES,
                   help="the test images the pictures show, by index into the test set in its "
                        "own order (CIFAR: the official test file's, the same on every official "
                        "copy), whatever --limit evaluates; comma-separated (default: "
                        + ",".join(map(str, DEFAULT_IMAGES)) + ")")
    p.add_argument("--pictures", type=int, help="show only the first N of --images (default: all; "
                                                "0: no pictures)")
    return p


def check_device(name: str) -> torch.device:
    """The --device as a torch.device, or ValueError saying why it cannot be used here."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device name: use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name} asked for, but PyTorch sees no GPU here; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: there are only {torch.cuda.device_count()} GPUs")
    return device


def run_evaluation(args) -> dict:
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be a positive number of images, got {args.limit}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be positive, got {args.batch_size}")
    if args.pictures is not None and args.pictures < 0:
        raise ValueError(f"--pictures must be >= 0, got {args.pictures}")
    if args.workers is not None and args.workers < 0:
        raise ValueError(f"--workers must be >= 0, got {args.workers}")
    device = check_device(args.device)
    amp_dtype = autocast_dtype(device, args.amp)
    if args.amp != "off" and amp_dtype is None:
        print(f"note: --amp {args.amp} ignored: mixed precision is used on GPUs only")
    apply_device_settings(device, fast=args.tf32)
    if args.workers is None:
        args.workers = data.default_workers(device.type)
    spec = data.get_dataset(args.dataset)
    checkpoint = qkformer.load_checkpoint(args.checkpoint)
    overrides = {} if args.T is None else dict(T=args.T)
    model = qkformer.model_from_checkpoint(checkpoint, **overrides)
    cfg = model.config
    # Check before reading any data that the checkpoint belongs to this dataset.
    if cfg.num_classes != spec.num_classes:
        raise ValueError(f"the checkpoint predicts {cfg.num_classes} classes but {spec.title} has "
                         f"{spec.num_classes}: it was trained on another dataset")
    if cfg.in_channels != spec.in_channels:
        raise ValueError(f"the checkpoint takes images of {cfg.in_channels} channels but "
                         f"{spec.title} images have {spec.in_channels}")
    out = args.output or os.path.join("eval", os.path.splitext(os.path.basename(args.checkpoint))[0])
    os.makedirs(out, exist_ok=True)

    # The test split at the model's image size (a dataset of fixed-size images refuses
    # another size with a DataError, before reading any file).
    # Event data: frames for the model's T, and the test part of the training run's split.
    saved = checkpoint.get("args") if isinstance(checkpoint.get("args"), dict) else {}
    options = dict(T=cfg.T, dvs_split=args.dvs_split or saved.get("dvs_split") or "official")
    test_set = data.build_test_set(args.dataset, args.data_dir, img_size=cfg.img_size,
                                   test_subset=args.limit, download_missing=False, **options)
    loader = data.make_loader(test_set, args.batch_size, train=False, workers=args.workers)
    # The pictures' images, by index into the whole test set in its own order (--limit takes
    # an evenly spaced selection: its i-th image is not the test set's i-th).
    chosen = list(args.images[:args.pictures])
    if chosen:
        full = test_set if args.limit is None else data.build_test_set(
            args.dataset, args.data_dir, img_size=cfg.img_size, download_missing=False, **options)
        if max(chosen) >= len(full):
            raise ValueError(f"--images {max(chosen)}: the {spec.title} test set has {len(full)} "
                             f"images (indices 0 to {len(full) - 1})")
    model.to(device)

    def prepare(images):                      # uint8 pixels -> normalised floats, on the device
        return spec.model_input(data.normalize(images, spec.mean, spec.std))  # (events: (T, B, 2, H, W))

    results, recorder = evaluate(model, loader, cfg.num_classes, device, prepare, limit=args.limit,
                                 total=len(loader), amp_dtype=amp_dtype, flip=args.flip_test)
    rates = recorder.firing_rates()
    # After the evaluation: the FLOP count runs the neurons' reference loops (layer_macs).
    events = spec.input_kind == "event counts"
    # Energy per forward pass: --flip-test makes two per image (the recorder counted both).
    passes = 2 if args.flip_test else 1
    energy = energy_report(model, recorder, results["images"] * passes, cfg.T, layer_macs(model),
                           mac_layers=[] if events else None)       # events: no MAC layer
    if events:
        energy["notes"] = energy["notes"] + [EVENT_INPUT_NOTE]
    class_names = list(spec.class_names_from(args.data_dir))
    metrics = dict(checkpoint=os.path.abspath(args.checkpoint), dataset=spec.name,
                   class_names=class_names,
                   images=results["images"], T=cfg.T, flip_test=args.flip_test,
                   top1=results["top1"], top5=results["top5"],
                   top5_k=results["top5_k"], loss=results["loss"], config=dict(vars(cfg)),
                   official_quirks=cfg.official_quirks, input_kind=spec.input_kind,
                   data_options={k: options[k] for k in spec.options},   # event data: T and split
                   input_counting=EVENT_INPUT_NOTE if events else FIRST_LAYER_NOTE,
                   firing_rates=rates, stage_firing_rates=stage_firing_rates(recorder),
                   table4=table4(model, recorder), input_rates=recorder.input_rates(),
                   energy=energy, confusion=results["confusion"].tolist(), pictures=[])
    if chosen:
        shown = [full[i] for i in chosen]
        first = [x for x, _ in shown]
        images = prepare(torch.stack(first).to(device))
        display = torch.stack([event_image(x.sum(0)) for x in first]) if events else None
        titles = [f"test image {i} ({class_names[int(label)]})" for i, (_, label) in zip(chosen, shown)]
        metrics["picture_images"] = dict(indices=chosen, titles=titles,
                                         note=picture_note(args.dataset, args.data_dir))
        metrics["pictures"] = draw_pictures(model, images, results, rates, out, spec.mean,
                                            spec.std, class_names, display=display, titles=titles)
        if events:                                  # a sample's T frames, ON and OFF events
            path = os.path.join(out, "event_frames.png")
            plot_event_frames(first, path, [t.replace(" (", "\n(") for t in titles])
            metrics["pictures"].append(path)
    print_report(metrics)
    if chosen:
        print(f"\npictures of {', '.join(metrics['picture_images']['titles'])}")
        if metrics["picture_images"]["note"]:
            print(f"note: {metrics['picture_images']['note']}")
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    print(f"\nwrote {out}/metrics.json" + "".join(f", {os.path.basename(p)}" for p in metrics["pictures"]))
    return metrics


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_device(args.device)                            # before anything is loaded
        apply_memory_policy(return_freed_memory=False)       # inference keeps little alive
        run_evaluation(args)
    except (ValueError, OSError, data.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
