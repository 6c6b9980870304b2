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
  * Section 4.3, Figure 3(a), the Q-K token attention as spike matrices: drawn by pictures.py
    (the wing that draws every picture, the paper's kind and ours) from the model's spikes.
The official code has none of this (its authors computed energy by hand: official issue 7).
The memory / time experiment of Section 4.3 (Figure 3(b), Table 9) lives in complexity.py.

Usage:
    python evaluate.py --checkpoint runs/x/best.pt --dataset cifar10 --data-dir data
    python evaluate.py --checkpoint runs/x/best.pt --dataset cifar10 --images 0,1,3,6
    python evaluate.py --checkpoint official.pth --dataset imagenet --data-dir /imagenet --limit 500

Outputs go to eval/<run>-<name>/ (runs/<run>/best.pt -> eval/<run>-best/; or --output), a
folder locked while an evaluation writes there: metrics.json, firing_rates.png,
spike_raster.png, token_masks.png, qk_attention.png, confusion_matrix.png, and for event-camera
data (CIFAR10-DVS, DVS128 Gesture) event_frames.png. The pictures show the test images chosen
with --images: indices into the test set in its own order (CIFAR: the order of the official
test file), whatever --limit evaluates.

Layout of this file:
  SpikeRecorder, evaluate, table4   accuracy and firing rates over a test set (forward hooks)
  layer_macs, energy_report         FLOPs per layer (FlopCounterMode) -> SOPs -> energy
  run_evaluation, main              the command line, in steps; its wings: pictures.py draws,
                                    evaluate_report.py prints the report and writes the files
"""
import argparse
import contextlib
import functools
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

import checkpoints
import data
import data_events                         # registers the event-camera datasets in data.DATASETS
import pictures
import qkformer
from data_files import error_line
from evaluate_report import output_folder, print_report, write_metrics
from neuron import SpikingNeuron
from neuron_fast import add_device_arguments, apply_device_settings, apply_memory_policy, autocast_dtype
from pictures import attention_neuron, is_token_attention, neuron_of, stage_of
from qkformer import SpikeAttention

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
      * optionally, the outputs of the modules named in `keep`, to look at (the tutorial does).

    The sums stay on the model's device (float64: a test set has billions of outputs, beyond
    float32's exact integers) and are read once, when a result is first asked for: a hook
    that read each sum (.item()) would wait for the device about 70 times per batch.

    Usage:  with SpikeRecorder(model) as rec: model(x); rec.firing_rates()
    """

    def __init__(self, model: nn.Module, keep=()):
        self.model = model
        self.keep = set(keep)
        self.names = {}                          # module -> its name (total() looks up by object)
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
            elif isinstance(m, LAYERS):
                self.layers.append(name)
            if isinstance(m, (SpikingNeuron, *LAYERS)) or name in self.keep:
                self._handles.append(m.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc):                    # hooks removed: the model runs as before
        for h in self._handles:
            h.remove()
        self._handles = []

    def _hook(self, name):
        def hook(module, inputs, out):
            if isinstance(module, (SpikingNeuron, *LAYERS)):
                x = out if isinstance(module, SpikingNeuron) else inputs[0]   # spikes; a layer's input
                total = x.detach().sum(dtype=torch.float64)       # stays on the device
                # Added up over every call: the batches, and both passes of --flip-test.
                self._sums[name] = self._sums[name] + total if name in self._sums else total
                self.counts[name] = self.counts.get(name, 0) + x.numel()   # an int: no device read
                self._read = None                                 # new sums: read them again
            if name in self.keep:                                 # on the CPU: off the GPU's memory
                self.kept.setdefault(name, []).append(out.detach().cpu())
        return hook

    def sums(self) -> dict:
        """{name: sum of a neuron's spikes or of a layer's input}, read from the device once."""
        if self._read is None:
            names = list(self._sums)                              # one transfer for all sums:
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
        # A neuron the model never called (0 outputs) has no rate, rather than a division by 0.
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
            return spikes / outputs, outputs / (images * T)      # fr, neurons per image and step
        return firing


def stage_firing_rates(recorder: SpikeRecorder) -> dict:
    """Firing rate of all neurons of each stage together (total spikes / total outputs)."""
    spikes, outputs = {}, {}
    for name, s_n in recorder.spikes.items():
        s = stage_of(name)
        spikes[s] = spikes.get(s, 0.0) + s_n     # pooled, not a mean of rates: a big layer weighs more
        outputs[s] = outputs.get(s, 0) + recorder.counts[name]
    return {s: spikes[s] / outputs[s] for s in spikes if outputs[s]}


def layer_of(module: nn.Module) -> nn.Module:
    """The convolution (or linear layer) of a conv-BN-neuron unit."""
    return next(m for m in module.modules() if isinstance(m, LAYERS))


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
    for i, stage in enumerate(getattr(model, "stages", [])):    # not a QKFormer: no table
        blocks = [b for b in stage.blocks if is_token_attention(b.attn)]   # SSA has no A_t
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
    amp_dtype: autocast with this dtype (neuron.autocast_dtype); None: float32.
    flip:    test-time flips: the logits averaged with those of the mirrored images
             (qkformer.predict). The recorder then sees two forward passes per image.
    Returns (results, recorder): results holds images, top1, top5 (percent), loss (mean
    cross-entropy) and the confusion matrix (rows: true class, columns: predicted class); the
    recorder holds the spike and input counts. Counts stay on the device until the end.
    """
    model.eval().to(device)                     # eval: batch norm uses its running statistics
    # Every count is a tensor on the device, read once at the end: reading one per batch
    # (.item()) would make the CPU wait for the GPU at every batch.
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=device)
    correct1, correct5 = torch.zeros(2, dtype=torch.int64, device=device)   # (views, added in place)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)   # float64: a long sum stays exact
    seen = 0
    k = min(5, num_classes)                     # top-5 of fewer than 5 classes: top-all
    with SpikeRecorder(model) as recorder:
        for images, labels in tqdm(batches, total=total, desc=desc, unit="batch", leave=False):
            if limit is not None and seen >= limit:
                break
            n = len(labels) if limit is None else limit - seen       # the last batch is cut
            images, labels = (t[:n].to(device, non_blocking=True) for t in (images, torch.as_tensor(labels)))
            if prepare is not None:
                images = prepare(images)                # after the move: uint8 crosses the bus
            with torch.autocast(torch.device(device).type, dtype=amp_dtype,
                                enabled=amp_dtype is not None):
                logits = qkformer.predict(model, images, flip)   # (B, classes)
            if logits.shape[-1] != num_classes:
                raise ValueError(f"the model predicts {logits.shape[-1]} classes but the data has "
                                 f"{num_classes}")
            top = logits.topk(k, dim=1).indices                   # (B, k), best first
            correct1 += (top[:, 0] == labels).sum()
            correct5 += (top == labels[:, None]).any(dim=1).sum()    # the label among the k best
            # float(): under --amp the logits are fp16/bf16, too coarse for a loss summed over a test set
            loss_sum += F.cross_entropy(logits.float(), labels, reduction="sum").double()
            pairs = labels * num_classes + top[:, 0]                # (true, predicted) as one index
            confusion.index_add_(0, pairs, torch.ones_like(pairs))  # (bincount waits for a GPU: its size)
            seen += len(labels)
    if seen == 0:
        raise ValueError("no test images to evaluate")
    correct1, correct5, loss = torch.stack([correct1.double(), correct5.double(), loss_sum]).tolist()
    results = dict(images=seen, top1=100.0 * correct1 / seen, top5=100.0 * correct5 / seen, top5_k=k,
                   loss=loss / seen, confusion=confusion.cpu().reshape(num_classes, num_classes))
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
    "SOP = fr x T x FLOPs (Eq. 19); E_SNN = E_AC x SOPs + E_MAC x FLOPs of the first conv (Eq. 20); "
    "E_ANN = E_MAC x FLOPs (Eq. 21).",
    "FLOPs are multiply-accumulates (MACs) of one image at one time step, from "
    "torch.utils.flop_counter.FlopCounterMode (its FLOP counts halved; ours).",
    "Batch norm is not counted (the paper's: folded into the convolutions); max-pooling, residual "
    "additions and neuron updates are not counted either (ours: Eq. 20 has no term for them).",
    FIRST_LAYER_NOTE,
    "AC layers (fed by spikes or spike counts, 0.9 pJ per SOP): SOP = fr x T x FLOPs (Eq. 19), fr = mean "
    "of the layer's input over the test set (ours; the paper: 'the firing rate of the block/layer'. "
    "After a residual sum the input is a spike count, and each spike costs one accumulate).",
    "Attention: each qkformer.SpikeAttention reports its own operations on spikes (synaptic_ops: MACs "
    "per image and step, and the firing rate of the driving spikes); SOP = fr x T x MACs (ours).",
    "SSA: K^T V counts fr_K x T x MACs and Q (K^T V) counts fr_Q x T x MACs; the scale is folded into "
    "the threshold (ours).",
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
    if example is None:                         # (T=1, B=1, C, H, W): SOPs scale it by fr x T
        size = model.config.img_size
        example = torch.zeros(1, 1, model.config.in_channels, size, size)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()                                # counted as evaluated (BN: running statistics)
    counter = FlopCounterMode(display=False)
    with reference_neurons(model), counter:
        model(example.to(device))
    model.train(was_training)                   # the caller's mode back
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
        if name:                                # the root has no parent
            parts = name.split(".")             # the nearest called ancestor, else the root:
            parent = next((p for p in (".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1))
                           if p in own), "")
            own[parent] -= flops(name)
    # Halved: FlopCounterMode counts 2 FLOPs (a multiply and an add) per MAC. A conv/linear
    # layer's FLOPs are all its own (it calls no module), so "own" lists the other modules.
    layers = {n: flops(n) // 2 for n, m in modules.items() if isinstance(m, LAYERS)}
    own = {n: f // 2 for n, f in own.items() if f > 0 and not isinstance(modules[n], LAYERS)}
    return dict(layers=layers, own=own, total=counter.get_total_flops() // 2)


def attention_operations(model: nn.Module, firing, T: int, macs: dict) -> dict:
    """The attentions' own operations on spikes (SOP_QKTA, SOP_SSA of Eq. 20), as energy rows
    {name of the conv/linear layer they come before: [rows]}: each attention's rows go before
    its last conv/linear layer (its output projection), where they happen; key None for an
    attention without such a layer.

    firing: SpikeRecorder.firing_function. Raises ValueError naming a module that does FLOPs
    of its own which its synaptic_ops do not report (or that is no SpikeAttention)."""
    modules = dict(model.named_modules())
    reported, before = {}, {}
    for name, m in modules.items():
        if not isinstance(m, SpikeAttention):
            continue
        rows = [dict(name=f"{name} ({label})", kind="AC", macs=n, input_rate=rate,
                     ops=rate * T * n, energy_pJ=E_AC_PJ * rate * T * n)     # Eq. (19)
                for label, n, rate in m.synaptic_ops(firing)]
        reported[name] = sum(r["macs"] for r in rows)     # checked against its FLOPs below
        # Its conv/linear layers in registration order: the output projection comes last.
        inner = [f"{name}.{c}" for c, sub in m.named_modules() if c and isinstance(sub, LAYERS)]
        before.setdefault(inner[-1] if inner else None, []).extend(rows)
    # Nothing slips through: FLOPs outside conv/linear layers that no synaptic_ops report
    # would be operations on spikes missing from the energy.
    for name, n in macs["own"].items():
        if reported.get(name, 0) < n * (1 - 1e-9):      # (float MACs from spike counts)
            raise ValueError(
                f"{name or 'the model'} ({type(modules[name]).__name__}) does {n:,} MACs per image "
                f"and step of its own (not in a conv/linear layer) but reports "
                f"{reported.get(name, 0):,.0f} in synaptic_ops: an operation on spikes would be "
                f"left out of the energy. Make it a qkformer.SpikeAttention whose synaptic_ops "
                f"lists every product it computes.")
    return before


def energy_report(model: nn.Module, recorder: SpikeRecorder, images: int, T: int, macs: dict,
                  mac_layers=None) -> dict:
    """Theoretical energy per image, Appendix 6.6 Eq. (19)-(21) (see the notes above).

    recorder: spike and input counts over `images` test images at T time steps.
    macs:     layer_macs(model).
    mac_layers: names of the layers with real-valued input, counted as MACs; default: the
              first conv / linear layer of the model (for QKFormer, the stem convolution).
    Returns a dict with one row per counted operation, in the order the network runs them,
    and the totals (E in mJ per image). Raises ValueError as attention_operations does.
    """
    rates = recorder.input_rates()
    if mac_layers is None:
        mac_layers = [next(iter(macs["layers"]))]     # the stem conv: it sees the pixels
    before = attention_operations(model, recorder.firing_function(images, T), T, macs)
    rows = []
    for name, n in macs["layers"].items():
        rows += before.pop(name, [])                  # an attention's products, before its proj
        mac = name in mac_layers
        ops = n if mac else rates.get(name, 0.0) * T * n    # MAC: once, no T (Eq. 20); SOP: Eq. 19
        rows.append(dict(name=name, kind="MAC" if mac else "AC", macs=n, input_rate=rates.get(name),
                         ops=ops, energy_pJ=(E_MAC_PJ if mac else E_AC_PJ) * ops))
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
                ann_over_snn=e_ann / e_snn if e_snn else float("inf"),   # inf: no spike, no MAC
                layers=rows, notes=ENERGY_NOTES)


# ----------------------------------------------------------------------------------------
# The command line

def build_parser():
    p = argparse.ArgumentParser(
        description="Evaluate a QKFormer checkpoint: accuracy, firing rates, energy, pictures. "
                    "(The Q-K attention versus SSA experiment is complexity.py.)")
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by train.py, or an official QKFormer one")
    p.add_argument("--dataset", choices=tuple(data.DATASETS), default="cifar10")
    p.add_argument("--data-dir", default="data", help="folder holding the dataset (see data.py)")
    p.add_argument("--output", help="output folder (default: eval/<folder>-<name>, after the checkpoint's "
                   "folder and file name: runs/<run>/best.pt -> eval/<run>-best)")
    p.add_argument("--limit", type=int, help="evaluate only N test images (spread evenly over the "
                                             "test set, as data.py picks them)")
    p.add_argument("--batch-size", type=int, default=64)   # no effect on results, but with official_quirks
    p.add_argument("--workers", type=int, help="data loading processes (default: 0 on the CPU, "
                                               "where the model needs every core; on a GPU one per "
                                               "CPU this process may use, at most 8)")
    add_device_arguments(p)                    # --device, --amp, --tf32, as train.py's
    p.add_argument("--flip-test", action="store_true", help="test-time flips: average the logits of "
                   "each image and its mirror image (as train.py --flip-test); firing rates and "
                   "energy are then those of one forward pass, of which each image takes two")
    p.add_argument("--T", type=int, help="evaluate with this many time steps instead of the "
                                         "checkpoint's (the paper's Table 7 / Table 2 T=1 rows)")
    p.add_argument("--dvs-split", choices=data_events.DVS_SPLITS, help="CIFAR10-DVS: the train/test split "
                   "whose test part is evaluated (default: the checkpoint's run's, else official: per "
                   "class the last 10%% of the recordings in sorted file order)")
    p.add_argument("--cache-dir", help="event data: where the frame cache is, or goes (as train.py's; "
                   "default: beside the recordings in --data-dir)")
    pictures.add_picture_arguments(p)          # --images, --pictures
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


def check_options(args):
    """Refuse impossible options before anything is loaded; returns (device, autocast dtype or
    None) with the device's settings applied, and fills in the default --workers."""
    for option, value, least, rule in (("--limit", args.limit, 1, "a positive number of images"),
                                       ("--batch-size", args.batch_size, 1, "positive"),
                                       ("--pictures", args.pictures, 0, ">= 0"),
                                       ("--workers", args.workers, 0, ">= 0")):
        if value is not None and value < least:          # None: the default
            raise ValueError(f"{option} must be {rule}, got {value}")
    device = check_device(args.device)
    amp_dtype = autocast_dtype(device, args.amp)         # None: float32 (always on a CPU)
    # Said, not refused: one command line (the tutorial's, say) then runs on a CPU and a GPU.
    if args.amp != "off" and amp_dtype is None:
        print(f"note: --amp {args.amp} ignored: mixed precision is used on GPUs only")
    apply_device_settings(device, fast=args.tf32)        # TF32, cuDNN autotuning: as train.py
    if args.workers is None:
        args.workers = data.default_workers(device.type)     # 0 on a CPU: the model needs every core
    return device, amp_dtype


def load_model(args, spec):
    """(the checkpoint, its model at --T or its own T), refused when the checkpoint was
    trained for other data: checked before any data is read, so a wrong pairing fails fast."""
    checkpoint = checkpoints.load_checkpoint(args.checkpoint)
    overrides = {} if args.T is None else dict(T=args.T)     # another T: Table 7, T = 1 rows
    model = checkpoints.model_from_checkpoint(checkpoint, **overrides)
    checkpoints.check_finite(model, args.checkpoint)         # inf/NaN weights: no accuracy to report
    cfg = model.config
    if cfg.num_classes != spec.num_classes:
        raise ValueError(f"the checkpoint predicts {cfg.num_classes} classes but {spec.title} has "
                         f"{spec.num_classes}: it was trained on another dataset")
    if cfg.in_channels != spec.in_channels:
        raise ValueError(f"the checkpoint takes images of {cfg.in_channels} channels but "
                         f"{spec.title} images have {spec.in_channels}")
    return checkpoint, model


def test_sets(args, spec, checkpoint, cfg):
    """(the test images evaluated, the test set that the pictures pick from or None when none
    are drawn, the dataset's options), at the model's image size."""
    # Event data: frames for the model's T, and the test part of the split the model was
    # trained on (train.py stores it in the checkpoint's args; other checkpoints: official).
    saved = checkpoint.get("args") if isinstance(checkpoint.get("args"), dict) else {}
    options = dict(T=cfg.T, dvs_split=args.dvs_split or saved.get("dvs_split") or "official",
                   cache_dir=args.cache_dir)
    # A dataset of fixed-size images refuses another size (data.DataError) before reading a file.
    build = functools.partial(data.build_test_set, args.dataset, args.data_dir,
                              img_size=cfg.img_size, download_missing=False, **options)
    test_set = build(test_subset=args.limit)
    # --images counts in the whole test set: --limit takes an evenly spaced selection, whose
    # i-th image is not the test set's i-th.
    whole = (lambda: test_set) if args.limit is None else build
    return test_set, pictures.test_set_shown(args.images[:args.pictures], whole, spec.title), options


def measurements(args, spec, model, results: dict, recorder: SpikeRecorder, options: dict) -> dict:
    """What metrics.json holds: accuracy, firing rates, Table 4, energy (pictures: added later)."""
    cfg = model.config
    events = spec.input_kind == "event counts"
    # After the evaluation: the FLOP count runs the neurons' reference loops (layer_macs).
    # Energy per forward pass: --flip-test makes two per image (the recorder counted both).
    passes = 2 if args.flip_test else 1
    energy = energy_report(model, recorder, results["images"] * passes, cfg.T, layer_macs(model),
                           mac_layers=[] if events else None)       # events: no MAC layer
    if events:
        energy["notes"] = energy["notes"] + [EVENT_INPUT_NOTE]   # a new list: ENERGY_NOTES unchanged
    return dict(checkpoint=os.path.abspath(args.checkpoint), dataset=spec.name,
                class_names=list(spec.class_names_from(args.data_dir)), images=results["images"],
                T=cfg.T, flip_test=args.flip_test, top1=results["top1"], top5=results["top5"],
                top5_k=results["top5_k"], loss=results["loss"], config=dict(vars(cfg)),
                official_quirks=cfg.official_quirks, input_kind=spec.input_kind,
                data_options={k: options[k] for k in spec.options if options[k] is not None},  # T, split, cache
                input_counting=EVENT_INPUT_NOTE if events else FIRST_LAYER_NOTE,
                firing_rates=recorder.firing_rates(), stage_firing_rates=stage_firing_rates(recorder),
                table4=table4(model, recorder), input_rates=recorder.input_rates(),
                energy=energy, confusion=results["confusion"].tolist(), pictures=[])


def run_evaluation(args) -> dict:
    """The command line's work: check, load, evaluate, measure, draw, report; returns the
    metrics that it writes into metrics.json."""
    device, amp_dtype = check_options(args)
    spec = data.get_dataset(args.dataset)
    checkpoint, model = load_model(args, spec)
    with output_folder(args.output, args.checkpoint) as out:    # locked until the end
        test_set, full, options = test_sets(args, spec, checkpoint, model.config)
        loader = data.make_loader(test_set, args.batch_size, train=False, workers=args.workers,
                                  pin_memory=device.type == "cuda")  # page-locked: copies overlap the GPU's work

        def prepare(images):                      # uint8 pixels -> normalised floats, on the device
            return spec.model_input(data.normalize(images, spec.mean, spec.std))  # (events: (T, B, 2, H, W))

        results, recorder = evaluate(model, loader, model.config.num_classes, device, prepare, limit=args.limit,
                                     total=len(loader), amp_dtype=amp_dtype, flip=args.flip_test)
        metrics = measurements(args, spec, model, results, recorder, options)
        if full is not None:
            metrics["picture_images"], metrics["pictures"] = pictures.draw_test_images(
                model, full, list(args.images[:args.pictures]), prepare, spec, results,
                metrics["firing_rates"], out, metrics["class_names"], args.data_dir)
        print_report(metrics)
        write_metrics(out, metrics)                # last, atomically: it marks a finished evaluation
        return metrics


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_device(args.device)                            # before anything is loaded
        apply_memory_policy(return_freed_memory=False)       # inference keeps little alive
        run_evaluation(args)
    except (ValueError, OSError, data.DataError) as e:       # the user's to fix: a message, no traceback
        print(f"error: {error_line(e)}", file=sys.stderr)      # one line, also from a loader worker
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
