"""What the spiking neurons cost when they run eagerly (no C++ compiler) instead of compiled.

    python scripts/eager_cost.py --model small --batch-size 64 --T 2      # the CPU recipe's model
    python scripts/eager_cost.py --model cifar10 --batch-size 16 --T 4    # README's benchmark

A laptop without a C++ compiler runs the neurons' kernels as plain PyTorch
(neuron_fast.BUILD_NOTE says so). This script measures what that costs per training and
per inference step on the CPU: the same model and batch, its neurons compiled and eager,
alternating in one process (rounds of --steps steps each), on one thread. It times the
process's CPU time, not the wall clock, so that other programs on a shared machine change
the ratio little. Needs a working C++ compiler (it compiles first).
"""
import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import neuron_fast                                                       # noqa: E402
from qkformer import PRESETS, create_model, fold_batchnorm               # noqa: E402


def use(backend):
    """Switch the kernels' backend and keep what was compiled (set_backend would drop it)."""
    neuron_fast._BACKEND = backend


def cpu_seconds_per_step(step, rounds, steps):
    """Median CPU seconds of one step, compiled ("auto") and eager, in alternating rounds."""
    times = {"auto": [], "eager": []}
    for _ in range(rounds):
        for backend in times:
            use(backend)
            for _ in range(steps):
                start = time.process_time()
                step()
                times[backend].append(time.process_time() - start)
    return {backend: statistics.median(t) for backend, t in times.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="small", choices=sorted(PRESETS))
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--T", type=int, default=2)
    p.add_argument("--steps", type=int, default=3, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=4, help="rounds of compiled, then eager")
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = create_model(args.model, T=args.T)
    size = model.config.img_size
    x = torch.randn(args.batch_size, model.config.in_channels, size, size)
    y = torch.randint(0, model.config.num_classes, (args.batch_size,))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn = nn.CrossEntropyLoss()

    def train_step():
        loss = loss_fn(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def inference_step():
        with torch.inference_mode():
            folded(x)
    folded = None
    for phase, step in (("training", train_step), ("inference", inference_step)):
        if phase == "inference":
            folded = fold_batchnorm(model.eval())
        use("auto")
        for _ in range(2):
            step()                                                       # compile, warm up
        kernel = neuron_fast.lif_forward_kernel if phase == "training" else neuron_fast.lif_spikes_kernel
        if kernel.used != "compiled":
            sys.exit("the neurons did not compile here (no C++ compiler?): nothing to compare")
        use("eager")
        step()                                                           # warm up
        t = cpu_seconds_per_step(step, args.rounds, args.steps)
        print(f"{args.model}, batch {args.batch_size}, T={args.T}, {phase}: compiled {t['auto']:.3f} s, "
              f"eager {t['eager']:.3f} s of CPU time per step: eager takes {t['eager'] / t['auto']:.2f}x")


if __name__ == "__main__":
    main()
