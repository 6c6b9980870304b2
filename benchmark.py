"""Speed and memory of QKFormer: training and inference images per second, peak memory;
and how fast the training data loader delivers images.

    python benchmark.py --model cifar10 --batch-size 16 --T 4 --device cpu
    python benchmark.py --model imagenet_10_384 --batch-size 128 --device cuda --amp
    python benchmark.py --phases data --dataset cifar10 --data-dir data --batch-size 64

Measures, for one preset, batch size and T on one device:
  * training: train.py's own step (train.train_one_epoch: forward, cross-entropy, backward
    and its fused AdamW update, the weights channels-last on a GPU as train.py keeps them);
  * inference: forward in eval mode under torch.inference_mode(), with the batch norms
    folded into their convolutions (`qkformer.fold_batchnorm`, exact in eval mode);
each as the median over several timed steps after warm-up steps, in images per second;
and the peak memory: on the CPU the peak resident memory of a fresh process per phase
(what `top` shows, so it includes PyTorch itself; on Linux, macOS and Windows alike:
peak_resident_bytes), on a GPU the allocator's peak.
Results are printed and written as JSON (`--output`). Inputs are random images, kept on
the device (the loader is the data phase's to time): the cost of a step does not depend
on the pixel values, only on how many neurons spike, which random inputs exercise at
rates close to trained networks (printed alongside).
The device is set up as train.py sets it up: mixed precision by the same rule
(`--amp`: neuron_fast.autocast_dtype), cuDNN autotuning and TF32 on a GPU unless --no-tf32
(neuron_fast.apply_device_settings).

The data phase (`--phases data`, or add it to train,inference) reads the training split
of --dataset with its official recipe's per-image augmentations (RandAugment included)
through train.py's DataLoader (data.make_loader), for each worker count of
--data-workers, and reports images per second: a GPU that trains faster than its
loader delivers waits for data.

Reference: Zhou et al., "QKFormer: Hierarchical Spiking Transformer using Q-K Attention",
NeurIPS 2024. The FLOP count uses torch.utils.flop_counter (2 FLOPs per multiply-add).
"""
import argparse
import contextlib
import ctypes
import dataclasses
import json
import multiprocessing as mp
import statistics
import sys
import time

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

import data
import data_events                         # registers the event-camera datasets in data.DATASETS
from neuron import SpikingNeuron
from neuron_fast import (add_device_arguments, apply_device_settings, apply_memory_policy,
                         autocast_dtype)
from qkformer import PRESETS, create_model, fold_batchnorm

PHASES = ("train", "inference", "data")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="cifar10", choices=sorted(PRESETS))
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--T", type=int, default=None, help="time steps (default: the preset's)")
    p.add_argument("--img-size", type=int, default=None, help="input size (default: the preset's)")
    add_device_arguments(p)                         # --device, --amp, --tf32: as train.py's
    p.add_argument("--steps", type=int, default=5, help="timed steps per phase")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before timing")
    p.add_argument("--phases", default="train,inference",
                   help=f"comma-separated, of {', '.join(PHASES)}")
    p.add_argument("--dataset", default="cifar10", choices=sorted(data.DATASETS),
                   help="data phase: the dataset whose training loader is timed")
    p.add_argument("--data-dir", default="data", help="data phase: the folder holding it")
    p.add_argument("--data-workers", default=None,
                   help="data phase: comma-separated worker counts (default: 0, 1, 2, 4, ... up "
                        "to the CPUs this process may use)")
    p.add_argument("--data-batches", type=int, default=10,
                   help="data phase: batches timed per worker count (after the first)")
    p.add_argument("--low-memory", action=argparse.BooleanOptionalAction, default=True,
                   help="training on the CPU: return freed activation memory to the system, as "
                        "train.py does by default (neuron_fast.apply_memory_policy)")
    p.add_argument("--reference-neuron", action="store_true",
                   help="use the plain autograd loop of neuron.py instead of the fused LIF")
    p.add_argument("--output", default="benchmark.json", help="JSON file to write")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda asked for, but PyTorch sees no GPU here; use --device cpu")
    if args.batch_size < 1 or args.steps < 1 or args.warmup < 0 or args.data_batches < 1:
        p.error("--batch-size, --steps and --data-batches must be >= 1, --warmup >= 0")
    args.phases = args.phases.split(",")
    unknown = [ph for ph in args.phases if ph not in PHASES]
    if unknown:
        p.error(f"unknown phase {unknown[0]!r}: use {', '.join(PHASES)}")
    try:
        args.data_workers = (default_worker_counts() if args.data_workers is None
                             else [int(w) for w in args.data_workers.split(",")])
    except ValueError:
        p.error(f"--data-workers must be comma-separated numbers, got {args.data_workers!r}")
    if any(w < 0 for w in args.data_workers):
        p.error("--data-workers must be >= 0")
    return args


def default_worker_counts() -> list:
    """0 (the main process loads), then 1, 2, 4, ... up to the usable CPUs."""
    counts, w = [0], 1
    while w < data.usable_cpus():
        counts.append(w)
        w *= 2
    return counts + [data.usable_cpus()]


def build(args):
    overrides = {k: v for k, v in (("T", args.T), ("img_size", args.img_size)) if v is not None}
    model = create_model(args.model, **overrides)
    if args.reference_neuron:
        use_reference_loops(model)
    return model


def use_reference_loops(model: nn.Module):
    """Run every neuron that has one on its plain autograd loop (neuron.py's `reference`)."""
    for m in model.modules():
        if isinstance(m, SpikingNeuron) and hasattr(m, "reference"):
            m.reference = True


def synchronize(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_resident_bytes():
    """The peak resident memory of this process in bytes (what `top` or the Task Manager
    shows at its highest), None where it cannot be read. getrusage's ru_maxrss is in KiB on
    Linux but in bytes on macOS; Windows has no getrusage (nor the `resource` module): its
    figure is the peak working set, from GetProcessMemoryInfo."""
    if sys.platform == "win32":
        return _windows_peak_working_set()
    try:
        import resource                                   # Unix only
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


class _ProcessMemoryCounters(ctypes.Structure):
    """Windows' PROCESS_MEMORY_COUNTERS (psapi.h), field for field."""
    _fields_ = [("cb", ctypes.c_uint32), ("PageFaultCount", ctypes.c_uint32)] + [
        (name, ctypes.c_size_t) for name in (
            "PeakWorkingSetSize", "WorkingSetSize", "QuotaPeakPagedPoolUsage", "QuotaPagedPoolUsage",
            "QuotaPeakNonPagedPoolUsage", "QuotaNonPagedPoolUsage", "PagefileUsage", "PeakPagefileUsage")]


def _windows_peak_working_set():
    """PeakWorkingSetSize of this process (kernel32's K32GetProcessMemoryInfo), None on failure."""
    try:
        kernel32 = ctypes.WinDLL("kernel32")
        kernel32.GetCurrentProcess.restype = ctypes.c_void_p     # a HANDLE: pointer-sized
        info = kernel32.K32GetProcessMemoryInfo
        info.argtypes = [ctypes.c_void_p, ctypes.POINTER(_ProcessMemoryCounters), ctypes.c_uint32]
        counters = _ProcessMemoryCounters(cb=ctypes.sizeof(_ProcessMemoryCounters))
        if not info(kernel32.GetCurrentProcess(), ctypes.pointer(counters), counters.cb):
            return None
    except (AttributeError, OSError):
        return None
    return counters.PeakWorkingSetSize


def run_phase(args, phase: str) -> dict:
    """Time one phase ("train" or "inference") in this process."""
    # As train.py does: huge pages, and in training (unless --no-low-memory) freed memory
    # returned to the system, without which the resident memory grows well above what a
    # step needs (see neuron_fast.apply_memory_policy). Inference keeps little alive. On
    # the CPU this runs first in a fresh process, before its first tensor.
    device = args.device
    apply_memory_policy(return_freed_memory=phase == "train" and args.low_memory
                        and not device.startswith("cuda"))  # the CPU's allocator: CPU runs only, as train.py
    torch.manual_seed(0)
    amp_dtype = autocast_dtype(torch.device(device), args.amp)
    apply_device_settings(torch.device(device), fast=args.tf32)
    model = build(args).to(device)
    cfg = model.config
    x = torch.randn(args.batch_size, cfg.in_channels, cfg.img_size, cfg.img_size, device=device)
    y = torch.randint(0, cfg.num_classes, (args.batch_size,), device=device)
    autocast = torch.autocast(torch.device(device).type, dtype=amp_dtype, enabled=amp_dtype is not None)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)

    if phase == "train":
        times = time_training_steps(args, model, torch.device(device), amp_dtype)
    else:
        model = fold_batchnorm(model.eval())
        times = []
        for i in range(args.warmup + args.steps):
            synchronize(device)
            start = time.perf_counter()
            with torch.inference_mode(), autocast:
                model(x)
            synchronize(device)
            if i >= args.warmup:
                times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = peak_resident_bytes()
    return {"images_per_s": args.batch_size / seconds, "step_s": seconds,
            "step_s_all": times, "peak_memory_GB": None if peak is None else peak / 1e9}


class TimedBatches:
    """A loader for train.train_one_epoch that hands out one batch `n` times and notes the
    time at each hand-out, after synchronising the device: the time between two hand-outs is
    one whole training step of train.py, host reads included (those train.py makes every
    train_guards.LOG_EVERY steps too)."""

    def __init__(self, batch, n, device):
        self.batch, self.n, self.device, self.stamps = batch, n, device, []

    def __len__(self):
        return self.n

    def __iter__(self):
        for _ in range(self.n + 1):          # the last stamp: after the last step
            synchronize(self.device.type)
            self.stamps.append(time.perf_counter())
            if len(self.stamps) <= self.n:
                yield self.batch


def time_training_steps(args, model, device, amp_dtype) -> list:
    """The seconds of each timed training step: train.py's own step (train.train_one_epoch:
    uint8 images normalised on the device, its fused AdamW with train.py's parameter groups,
    the update skipped on the device when not finite, the grad scaler for fp16), the weights
    in train.py's layout (channels-last on a GPU), on one random batch kept on the device:
    the loader is not timed (the data phase is). No erasing, no mixup, no clipping: the
    model's step."""
    import train                             # its step itself, not a copy of it
    if device.type == "cuda":                # as train.setup_optimization
        model = model.to(memory_format=torch.channels_last)
    cfg, n = model.config, args.warmup + args.steps
    settings = argparse.Namespace(lr=1e-3, weight_decay=0.06, warmup_epochs=0.0, warmup_lr=1e-5,
                                  min_lr=1e-5, epochs=1, warmup_prefix=False, accum_iter=1,
                                  clip_grad=None, reprob=0.0, remode="const")
    optimizer = train.build_optimizer(model, settings)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)  # fp16, as train.py
    autocast = ((lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype is not None
                else contextlib.nullcontext)
    ctx = train.StepContext(model, optimizer, train.build_scheduler(optimizer, settings, n),
                            nn.CrossEntropyLoss(label_smoothing=0.1), settings, device,
                            (0.5,) * cfg.in_channels, (0.25,) * cfg.in_channels, scaler, autocast, show=False)
    images = torch.randint(0, 256, (args.batch_size, cfg.in_channels, cfg.img_size, cfg.img_size),
                           dtype=torch.uint8, device=device)   # (B, C, H, W), as a loader gives them
    labels = torch.randint(0, cfg.num_classes, (args.batch_size,), device=device)
    batches = TimedBatches((images, labels), n, device)
    train.train_one_epoch(ctx, batches, 0)
    return [b - a for a, b in zip(batches.stamps, batches.stamps[1:])][args.warmup:]


def _phase_in_child(args, phase, queue):
    try:
        queue.put(run_phase(args, phase))
    except Exception as e:  # report, don't hang the parent
        queue.put({"error": f"{type(e).__name__}: {e}"})


def measure(args, phase: str) -> dict:
    """On the CPU each phase runs in a fresh process, so its peak resident memory is its own."""
    if args.device.startswith("cuda"):
        return run_phase(args, phase)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_phase_in_child, args=(args, phase, queue))
    child.start()
    result = queue.get()
    child.join()
    if "error" in result:
        raise RuntimeError(f"{phase} phase failed: {result['error']}")
    return result


def data_phase(args) -> dict:
    """Images per second of the training loader of --dataset, per worker count: its
    official recipe's per-image augmentations (data.DATASETS[...].recipe), batches of
    --batch-size through data.make_loader, as train.py builds them. The first batch of
    each count is not timed (it includes starting the workers)."""
    spec = data.get_dataset(args.dataset)
    recipe = spec.recipe
    augment = data.Augmentation(recipe.get("crop_padding", 0), recipe.get("hflip", 0.5),
                                recipe.get("aa", "none"))
    needed = args.batch_size * (args.data_batches + 1)
    train_set = spec.build(args.data_dir, True, args.img_size or recipe.get("img_size"),
                           needed, augment, download_missing=False)
    if len(train_set) < needed:
        raise data.DataError(f"the data phase needs {needed} training images "
                             f"(--batch-size x (--data-batches + 1)); {args.data_dir} has {len(train_set)}")
    results = {}
    for workers in args.data_workers:
        loader = data.make_loader(train_set, args.batch_size, train=True, workers=workers)
        batches = iter(loader)
        next(batches)                                    # workers start, first batch
        start = time.perf_counter()
        for _ in range(args.data_batches):
            next(batches)
        seconds = time.perf_counter() - start
        del batches
        results[str(workers)] = args.batch_size * args.data_batches / seconds
    return {"dataset": args.dataset, "augmentation": dataclasses.asdict(augment),
            "images": len(train_set), "images_per_s_by_workers": results}


def model_facts(args) -> dict:
    """Parameters, FLOPs per image (forward, all T steps) and the firing rate on random input.

    The model here runs its neurons on their reference loops (the same spikes): FlopCounterMode
    intercepts every operation, and nothing compiled should run under it
    (neuron_fast.CompiledOrEager also refuses to compile under such a mode, which the
    compiler would remember for good)."""
    model = build(args).eval()
    use_reference_loops(model)
    cfg = model.config
    x = torch.randn(1, cfg.in_channels, cfg.img_size, cfg.img_size)
    spikes, count = [], [0]

    def hook(module, inputs, out):           # summed on the device, read once below
        spikes.append(out.detach().sum(dtype=torch.float64))
        count[0] += out.numel()
    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, SpikingNeuron)]
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x)
    for h in handles:
        h.remove()
    return {"parameters": sum(p.numel() for p in model.parameters()),
            "forward_GFLOP_per_image": counter.get_total_flops() / 1e9,
            "mean_firing_rate_random_input": torch.stack(spikes).sum().item() / count[0],
            "T": cfg.T, "img_size": cfg.img_size}


def memory_text(gigabytes) -> str:
    """A peak memory figure as printed: "2.26 GB", or "n/a" where the platform gave none."""
    return "n/a (not readable on this platform)" if gigabytes is None else f"{gigabytes:.2f} GB"


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    amp_dtype = autocast_dtype(device, args.amp)
    if args.amp != "off" and amp_dtype is None:
        print(f"note: --amp {args.amp} ignored: mixed precision is used on GPUs only")
    report = {"model": args.model, "batch_size": args.batch_size, "device": args.device,
              "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                              else f"CPU, {torch.get_num_threads()} threads"),
              "amp": {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(amp_dtype, "off"),
              "tf32": args.tf32 and device.type == "cuda", "reference_neuron": args.reference_neuron,
              "low_memory": args.low_memory, "usable_cpus": data.usable_cpus(), "torch": torch.__version__}
    if "train" in args.phases or "inference" in args.phases:
        facts = model_facts(args)
        report.update(facts)
        print(f"{args.model}: {facts['parameters']:,} parameters, T={facts['T']}, "
              f"{facts['img_size']}px, {facts['forward_GFLOP_per_image']:.2f} GFLOP per image "
              f"(forward); amp {report['amp']}")
    for phase in args.phases:
        if phase == "data":
            try:
                result = data_phase(args)
            except data.DataError as e:
                print(f"error: {e}", file=sys.stderr)
                sys.exit(2)
            report[phase] = result
            print(f"data: the {args.dataset} training loader, its recipe's augmentations "
                  f"{result['augmentation']}, batches of {args.batch_size}")
            for workers, rate in result["images_per_s_by_workers"].items():
                each = f"({rate / int(workers):.1f} per worker)" if int(workers) else "(main process)"
                print(f"{workers:>4} workers: {rate:8.1f} images/s {each}")
            continue
        result = measure(args, phase)
        report[phase] = result
        flops = report["forward_GFLOP_per_image"] * (3 if phase == "train" else 1)
        print(f"{phase:>9}: {result['images_per_s']:8.2f} images/s   "
              f"({result['images_per_s'] * flops:6.1f} GFLOP/s)   "
              f"peak memory {memory_text(result['peak_memory_GB'])}")
    if "train" in report and "data" in report:
        best = max(report["data"]["images_per_s_by_workers"].items(), key=lambda kv: kv[1])
        verdict = "keeps up with" if best[1] >= report["train"]["images_per_s"] else "is slower than"
        print(f"the loader ({best[1]:.1f} images/s with {best[0]} workers) {verdict} training "
              f"({report['train']['images_per_s']:.1f} images/s)")
    with open(args.output, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
