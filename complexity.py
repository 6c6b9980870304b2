"""The memory / time experiment that shows why Q-K attention is linear in the number of tokens.

Reference: Zhou et al., "QKFormer: Hierarchical Spiking Transformer using Q-K Attention",
NeurIPS 2024 (arXiv:2403.16552), Section 4.3 "Memory Consumption", Figure 3(b) and Appendix
Table 9 (which the paper introduces as "the detailed values of Figure 4"): the memory of one
QKTA layer against one SSA layer as the number of tokens N grows (here also the time).
Table 1 gives the complexities, D being the channels of the layer (C here): QKTA time O(D),
space O(N); QKCA time O(N), space O(D); SSA time O(N^2 D), space O(N^2 + N D), counted with
its N x N attention map. Section 3.2 adds that with a broadcast multiplication instead of
the mask "the time complexity can reach up to O(N * D)", the work our timing measures.

Usage:
    python complexity.py --max-side 100                 # sqrt(N) = 10, 20, ..., 100
    python complexity.py --max-side 30 --output complexity-small
(`python evaluate.py --complexity ...` with the same options runs the same experiment.)

Writes complexity.json and complexity.png to --output (default eval/complexity).

Layout of this file:
  ExplicitSSA                 SSA computed left to right, (Q K^T) V, as Spikformer's code does
  PeakMemory                  peak bytes of the tensors created inside a block (CPU)
  measure_layer, complexity_experiment, plot_complexity, print_complexity
  build_parser, main          the command line
"""
import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn as nn
from torch.profiler import ProfilerActivity, profile
from tqdm import tqdm

from qkformer import ATTENTIONS, QKFormerConfig, SpikingSelfAttention


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")              # files only, no window (works without a display)
    import matplotlib.pyplot as plt
    return plt


# ----------------------------------------------------------------------------------------
# The two forms of SSA
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

    def synaptic_ops(self, firing):
        """Q K^T: each spike of K adds a row of Q^T (N*N*d MACs per head, image and step);
        (Q K^T) V: each spike of V adds a column of the N x N map (N*N*d MACs per head)."""
        rate_k, neurons_k = firing(self.k.lif)                      # N*C
        rate_v, neurons_v = firing(self.v.lif)                      # N*C
        n = neurons_k / self.q.conv.out_channels                    # N
        return [("Q K^T", neurons_k * n, rate_k), ("(Q K^T) V", neurons_v * n, rate_v)]


class PeakMemory:
    """Peak bytes of the CPU tensors allocated while the block runs, and those still alive at
    its end:  with PeakMemory() as pm: ...;  pm.peak, pm.current.

    It reads the allocator's own events through the public profiler
    (torch.profiler.profile(profile_memory=True)): every allocation and every free of the
    CPU allocator, with its address and size, in order. A running sum over them, counting a
    free only when its memory was allocated inside the block, gives the largest total of live
    memory the block created: what torch.cuda.max_memory_allocated measures on a GPU. Views
    and in-place writes allocate nothing and are not counted; memory that existed before (the
    input, the weights) is not counted; scratch memory a kernel allocates and frees is
    counted, as on a GPU. The events with their addresses come out of the profiler only
    through its trace export (export_chrome_trace): the aggregated views (prof.events(),
    key_averages()) attribute memory to operators without addresses, from which frees cannot
    be matched to allocations. The profiler slows the block down: time it separately."""

    def __init__(self):
        self.peak = self.current = 0
        self._profiler = None

    def __enter__(self):
        self._profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self._profiler.__enter__()
        return self

    def __exit__(self, *exc):
        self._profiler.__exit__(*exc)
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "trace.json")
            self._profiler.export_chrome_trace(path)
            with open(path) as f:
                events = json.load(f)["traceEvents"]
        self._profiler = None
        # The allocator's events: {"name": "[memory]", "ts", "args": {"Bytes" (negative for
        # a free), "Addr", "Device Type" (0: CPU), ...}}, in the order they happened.
        memory = [e for e in events if e.get("name") == "[memory]" and
                  e.get("args", {}).get("Device Type", 0) == 0]
        memory.sort(key=lambda e: (e["ts"], e["args"].get("Ev Idx", 0)))
        live, current, peak = {}, 0, 0
        for e in memory:
            size, address = e["args"]["Bytes"], e["args"]["Addr"]
            if size > 0:
                live[address] = size
                current += size
                peak = max(peak, current)
            elif address in live:                                   # allocated inside the block
                current -= live.pop(address)
        self.peak, self.current = peak, current
        return False

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
    config = QKFormerConfig()                       # the paper's neurons and thresholds
    builders = {"QKTA": lambda: ATTENTIONS["token"](dim, heads, config),
                "SSA (Q K^T) V": lambda: ExplicitSSA(dim, heads, config=config),
                "SSA Q (K^T V)": lambda: ATTENTIONS["ssa"](dim, heads, config)}
    result = dict(settings=dict(C=dim, heads=heads, T=T, B=B, sides=sides, mode="eval, no_grad",
                                cpu_threads=cpu_threads or torch.get_num_threads(),
                                memory="peak bytes of tensors created by one forward (CPU: "
                                       "PeakMemory, the profiler's allocator events; GPU: "
                                       "max_memory_allocated)"),
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

def add_arguments(p: argparse.ArgumentParser):
    """The experiment's options but --output (also offered by `evaluate.py --complexity`)."""
    p.add_argument("--max-side", type=int, default=100, help="largest sqrt(N)")
    p.add_argument("--min-side", type=int, default=10, help="smallest sqrt(N)")
    p.add_argument("--step", type=int, default=10, help="step of sqrt(N)")
    p.add_argument("--dim", type=int, default=256, help="channels C")
    p.add_argument("--heads", type=int, default=1, help="attention heads")


def build_parser():
    p = argparse.ArgumentParser(
        description="Memory and time of one Q-K token attention layer against one spiking "
                    "self-attention layer (both orders of its products) as the tokens grow.")
    add_arguments(p)
    p.add_argument("--output", help="output folder (default: eval/complexity)")
    return p


def run(args) -> dict:
    """Run the experiment with parsed options; print, write complexity.json and .png."""
    if args.min_side < 1 or args.step < 1 or args.max_side < args.min_side:
        raise ValueError("the complexity experiment needs 1 <= --min-side <= --max-side and "
                         "--step >= 1")
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


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
