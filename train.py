"""Train QKFormer on CIFAR-10, CIFAR-100, ImageNet-1K or the event-camera datasets CIFAR10-DVS and
DVS128 Gesture (any dataset described in data.DATASETS), on one CPU or on many GPUs.

Reference: Zhou et al., "QKFormer: Hierarchical Spiking Transformer using Q-K
Attention", NeurIPS 2024. The per-dataset defaults below are the official
training recipes: for CIFAR timm's train.py with the official cifar10.yml /
cifar100.yml, for ImageNet the official MAE-style fine-tuning script. Where
this script differs from them it says so next to the setting.

    python train.py --dataset cifar10                  # the paper's CIFAR-10 recipe (downloads the data)
    python train.py --dataset cifar10 --recipe cpu     # a small model on a 2-core CPU (see README)
    python train.py --dataset cifar10 --recipe lab     # a few minutes on a 2-core CPU: for classes
    python train.py --resume runs/<run>/last.pt        # continue a run where it stopped
    torchrun --nproc_per_node=8 train.py --dataset imagenet --data-dir /data/imagenet
    python train.py --dataset cifar10dvs               # the official CIFAR10-DVS recipe (T=16)

Every epoch: a progress bar with loss, learning rate and images/s; <run>/last.pt
overwritten atomically (before the evaluation, so a failing evaluation loses no
training); top-1/top-5 accuracy on the test set; a line in <run>/log.jsonl; the
curves redrawn in <run>/curves.png; <run>/best.pt when top-1 improves. A run can
be split into sessions (--stop-after, --resume) and, on the CPU, gives bit for
bit the parameters of an uninterrupted run.

When things go wrong nothing is lost and nothing is silent (tests/test_faults.py):
updates with non-finite losses or gradients are skipped on the device and a run
whose steps stay non-finite stops; weights with inf/NaN are never saved; the run
folder is locked (<run>/.lock) for the life of the run; a full disk keeps the
previous checkpoint; every problem the user can fix is one line and exit code 2,
on whichever DDP process it happens.

Distributed data parallel (DDP): torchrun starts one process per GPU (or
several on a CPU, with the gloo backend); each process sees its own share of
every epoch (DistributedSampler) and DDP averages the gradients, so N
processes with --batch-size B train like one process with batch N*B (except
batch norm, whose statistics stay per process unless --sync-bn).

Settings come in layers, each overriding the one before: defaults, the
dataset's official recipe (its description in data.py), --recipe cpu or lab, a
resumed run's saved settings, the command line. A table of every effective
setting and the layer it came from is printed at the start.

Layout, top to bottom: settings and arguments; distributed set-up and random
state; model, optimizer and schedule; one epoch of training; evaluation;
checkpoints, log and plot; the phases of a session; the main loop.
"""
import argparse
import contextlib
import dataclasses
import datetime
import errno
import fcntl
import glob
import json
import math
import os
import random
import sys
import textwrap
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

import data
from data import DataError
from neuron import NEURONS, apply_device_settings, apply_memory_policy, autocast_dtype
from qkformer import (count_parameters, create_model, load_checkpoint, missing_training_keys, predict,
                      write_atomically, save_checkpoint, training_checkpoint)


class TrainError(Exception):
    """A problem the user can fix (bad option, unusable checkpoint, diverged run); the message says how."""


# ----------------------------------------------------------------------------
# Settings: defaults, the dataset's recipe, --recipe cpu/lab, a resumed run, the command line
# ----------------------------------------------------------------------------

# The official recipe of each dataset is part of its description in data.py
# (data.DATASETS[name].recipe). What follows are training choices of this script.

# --recipe cpu: what changes from the dataset's recipe for a run of under 30 minutes on
# a 2-core CPU. It trades the paper's accuracy for time:
#   * the "small" preset (qkformer.PRESETS): CIFAR images through the ImageNet family's
#     layout, whose first patch embedding downsamples by 4 (tokens 8x8, 4x4, 2x2), at
#     D=128. The CIFAR layout keeps 32x32 tokens in its first stage, and there a CPU
#     spends its time: a CIFAR-layout model of half the width (D=64, 191k parameters)
#     trained at 74 img/s on this project's 2-core machine, "small" (609k) at 245 img/s
#     (README, "Training on a CPU");
#   * T=2 instead of 4 (each time step costs a full pass through the network);
#   * a short cosine with a higher peak learning rate;
#   * light augmentation: flips and crops shifted by at most 2 pixels. In so few epochs the
#     model underfits (its training accuracy stays below its test accuracy), so what makes
#     the training images harder slows it down: RandAugment, erasing and mixup are off, and
#     the lab recipe gained 3 points when the shift went from 4 pixels to 2 (README);
#   * test-time flips (--flip-test): each test image is also classified mirrored, and the
#     two logits averaged, for 2 points of top-1 at twice the evaluation time.
# Only for datasets whose description says they are small (DatasetSpec.small).
CPU_RECIPE = dict(
    model="small", T=2,          # widths 32/64/128, blocks 1/2/1, 2 time steps
    epochs=9, cooldown_epochs=0, batch_size=64,
    lr=1e-2, blr=None, min_lr=1e-5, weight_decay=0.05,
    warmup_epochs=9 / 32, warmup_lr=1e-5, warmup_prefix=True,   # warm-up: a 32nd of the run
    mixup=0.0, cutmix=0.0, aa="none", reprob=0.0, crop_padding=2, flip_test=True,
    eval_every=1000,             # evaluate once, at the end (evaluation costs CPU time too)
    low_memory=False,            # a small model's activations fit anyway; see --low-memory
)

# --recipe lab: the CPU recipe cut to fit a lab class (under 5 minutes of training on a
# 2-core CPU): two passes over the first 35,000 training images. T stays 2: with one
# time step LIF, IF and PLIF neurons would differ only by a scale, and the labs compare them.
# Its crops (4 pixels) and single-view evaluation are those the labs' tables were measured with.
LAB_RECIPE = dict(CPU_RECIPE, epochs=2, subset=35000, warmup_epochs=0.1, crop_padding=4, flip_test=False)

RECIPES = {"cpu": CPU_RECIPE, "lab": LAB_RECIPE}

# Settings with no recipe dependence.
DEFAULTS = dict(
    dataset="cifar10", recipe=None, data_dir="./data", download=True, output=None, resume=None,
    device="auto", seed=0, workers=None, amp="off", sync_bn=False, low_memory=True, tf32=True,
    dist_timeout=15,
    subset=None, test_subset=None, eval_batch_size=None, stop_after=None,
    mixup_prob=1.0, dvs_split=None,
    embed_dim=None, depths=None, num_heads=None, mlp_ratio=None, attention=None, neuron=None, tau=None,
    speds=None, flip_test=False,
)

# Options that belong to one invocation: never taken over from a resumed run.
# (--device too: a run may continue on another machine.)
PER_INVOCATION = ("resume", "stop_after", "output", "device", "dist_timeout")

# The layers of settings, later ones winning: the names the settings table shows.
RESUMED, TYPED = "resumed run", "command line"


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def build_parser():
    """Command-line options. Every default is None here, so that what the user
    typed can be told apart from defaults (see resolve_settings)."""
    def describe(title, recipe):
        return textwrap.fill(", ".join(f"{k}={v}" for k, v in recipe.items()), 100,
                             initial_indent=f"  {title}: ", subsequent_indent="    ")

    epilog = "\n".join(["defaults of each dataset (the official recipes), then what --recipe cpu "
                        "and --recipe lab change:"]
                       + [describe(name, spec.recipe) for name, spec in data.DATASETS.items()]
                       + [describe(f"--recipe {name}", r) for name, r in RECIPES.items()]
                       + [describe("all datasets", DEFAULTS)]
                       + textwrap.wrap("precedence (a table of the effective settings is printed at "
                                       "start): defaults < the dataset's recipe < --recipe cpu/lab < a "
                                       "resumed run's saved settings < the command line", 100))
    p = argparse.ArgumentParser(
        description="Train QKFormer (Zhou et al., NeurIPS 2024). Defaults are the official recipe of "
                    "the chosen dataset (listed below); any of them can be overridden.",
        epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter, argument_default=None)
    add_data_options(p.add_argument_group("data"))
    add_recipe_options(p.add_argument_group("recipe"))
    add_run_options(p.add_argument_group("run"))
    return p


def add_data_options(g):
    g.add_argument("--dataset", choices=list(data.DATASETS), help="default cifar10")
    g.add_argument("--data-dir", help="folder holding the dataset (default ./data): "
                   + "; ".join(f"{s.title}: {s.data_hint}" for s in data.DATASETS.values()))
    g.add_argument("--download", action=argparse.BooleanOptionalAction,
                   help="download the dataset when it is missing and can be downloaded (default on)")
    g.add_argument("--subset", type=int, help="train on the first N training images only (quick runs)")
    g.add_argument("--test-subset", type=int, help="evaluate on N evenly spaced test images only")
    g.add_argument("--dvs-split", choices=list(data.DVS_SPLITS), help="CIFAR10-DVS train/test split: "
                   "official (per class the first 90%% of the recordings in sorted file order train, "
                   "the rest test, as the official code) or random (per class, seed 0)")
    g.add_argument("--workers", type=int, help="DataLoader worker processes per process "
                   "(default: 0 on a CPU, min(8, cores per GPU) on GPUs)")


def add_recipe_options(g):
    g.add_argument("--recipe", choices=list(RECIPES), help="'cpu': a small model and short schedule "
                   "for a small dataset (CIFAR) on a 2-core CPU; 'lab': shorter still, minutes, for a "
                   "class (see README for the measured times and accuracies)")
    g.add_argument("--model", help="model preset of qkformer.py (tiny, cifar10, cifar100, imagenet_10_384, ...)")
    g.add_argument("--T", type=int, help="time steps of the spiking neurons")
    g.add_argument("--img-size", type=int, help="image size (ImageNet: crop size)")
    g.add_argument("--embed-dim", type=int, help="override the preset's width D")
    g.add_argument("--depths", type=int, help="override the preset's number of blocks")
    g.add_argument("--num-heads", type=int, help="override the preset's attention heads")
    g.add_argument("--mlp-ratio", type=float, help="override the preset's MLP ratio")
    g.add_argument("--attention", help="attention of the three stages, comma-separated: token (QKTA), "
                   "channel (QKCA) or ssa; default token,token,ssa (the paper's ablation: Table 6)")
    g.add_argument("--neuron", choices=list(NEURONS), help="spiking neuron (neuron.NEURONS): lif "
                   "(default); if, integrate-and-fire without leak (the paper's ablation: Table 7); "
                   "plif, LIF with a learned time constant")
    g.add_argument("--tau", type=float, help="membrane time constant of lif (the initial one of plif); "
                   "default 2, the official code's value (the paper gives none)")
    g.add_argument("--speds", action=argparse.BooleanOptionalAction, help="the deformed shortcut "
                   "of every patch embedding (SPEDS, Eq. (9); default on); --no-speds: without it, "
                   "the paper's ablation (Table 5)")
    g.add_argument("--epochs", type=int, help="length of the cosine schedule in epochs (given alone on a "
                   "new run, it keeps the recipe's warm-up share and drops its cool-down, and says so)")
    g.add_argument("--cooldown-epochs", type=int, help="epochs at min-lr after the schedule (CIFAR "
                   "recipe: 10, as timm added them; 0 when --epochs is given)")
    g.add_argument("--batch-size", type=int, help="images per process per step")
    g.add_argument("--accum-iter", type=int, help="steps whose gradients are summed before each update")
    g.add_argument("--lr", type=float, help="peak learning rate (default for ImageNet: blr * batch / 256)")
    g.add_argument("--blr", type=float, help="base lr for an effective batch of 256, used when --lr is not given")
    g.add_argument("--min-lr", type=float, help="learning rate at the end of the cosine")
    g.add_argument("--warmup-epochs", type=float, help="linear warm-up length in epochs (may be fractional)")
    g.add_argument("--warmup-lr", type=float, help="learning rate at the start of the warm-up")
    g.add_argument("--warmup-prefix", action=argparse.BooleanOptionalAction,
                   help="start the cosine after the warm-up (MAE) instead of at epoch 0 (timm)")
    g.add_argument("--weight-decay", type=float, help="AdamW weight decay (not applied to biases and norms)")
    g.add_argument("--clip-grad", type=float, help="clip the gradient norm to this value")
    g.add_argument("--smoothing", type=float, help="label smoothing")
    g.add_argument("--mixup", type=float, help="mixup alpha (0: off)")
    g.add_argument("--cutmix", type=float, help="cutmix alpha (0: off)")
    g.add_argument("--mixup-prob", type=float, help="probability that a batch is mixed")
    g.add_argument("--mixup-off-epoch", type=int, help="switch mixup/cutmix off from this epoch on (0: never)")
    g.add_argument("--aa", help="RandAugment policy, e.g. rand-m9-n1-mstd0.4-inc1, or 'none'")
    g.add_argument("--reprob", type=float, help="random erasing probability")
    g.add_argument("--remode", choices=["const", "rand", "pixel"], help="random erasing fill")
    g.add_argument("--crop-padding", type=int, help="CIFAR: pad by this many pixels and crop back (0: off)")
    g.add_argument("--hflip", type=float, help="horizontal flip probability")


def add_run_options(g):
    g.add_argument("--output", help="run folder (default runs/<dataset>-<model>-<time>)")
    g.add_argument("--resume", help="checkpoint (or run folder) to continue from")
    g.add_argument("--stop-after", type=int, help="end this session once N epochs are done; the "
                   "schedule still spans --epochs; continue with --resume")
    g.add_argument("--eval-every", type=int, help="evaluate every N epochs (and after the last)")
    g.add_argument("--flip-test", action=argparse.BooleanOptionalAction, help="test-time flips: "
                   "average the logits of each test image and its mirror image (qkformer.predict)")
    g.add_argument("--eval-batch-size", type=int, help="batch size of the evaluation (default: --batch-size)")
    g.add_argument("--device", help="auto, cpu, cuda or cuda:N (auto: CUDA when present); chosen "
                   "anew by each invocation, also on --resume")
    g.add_argument("--amp", nargs="?", const="auto", choices=["off", "auto", "bf16", "fp16"],
                   help="mixed precision on GPU: --amp alone picks bf16 where the GPU computes it "
                        "natively (Ampere and newer), else fp16 (with a grad scaler)")
    g.add_argument("--tf32", action=argparse.BooleanOptionalAction,
                   help="GPU: TF32 matrix products and cuDNN's autotuned convolutions (default on: "
                        "faster, not bit-reproducible); --no-tf32 for exact fp32 arithmetic")
    g.add_argument("--dist-timeout", type=float, metavar="MINUTES",
                   help="DDP: minutes a process waits for the others before the run stops with an "
                        "error (default 15; PyTorch's own is 60). A process that hangs or died stops "
                        "the rest after this long; the other processes wait for rank 0's evaluation "
                        "and checkpoint writing, which must fit in it (raise it for a slow disk or a "
                        "large test set)")
    g.add_argument("--low-memory", action=argparse.BooleanOptionalAction,
                   help="CPU: return the memory of freed large tensors (8 MiB and more) to the "
                        "operating system (default on; off in --recipe cpu). Keeps the resident "
                        "memory down (cifar10 model, batch 16, 40 steps: 2.3 GB instead of 2.6 GB, "
                        "at the same speed; see neuron.apply_memory_policy). Decided before any "
                        "tensor exists: a resumed run reads its saved choice from args.json in its "
                        "run folder")
    g.add_argument("--sync-bn", action="store_true", default=None,
                   help="synchronise batch norm across processes (GPUs)")
    g.add_argument("--seed", type=int, help="random seed")


@dataclasses.dataclass
class Settings:
    """The settings of a run (args), where each came from (sources: option -> layer name)
    and what was changed on the way that the user did not ask for in so many words (notes)."""
    args: argparse.Namespace
    sources: dict
    notes: list


def settings_layers(cli, saved=None):
    """The layers of settings as (name, dict), lowest priority first: DEFAULTS, the
    dataset's recipe, --recipe cpu/lab, the resumed run's saved settings, the command line."""
    saved = {k: v for k, v in (saved or {}).items() if k not in PER_INVOCATION}
    typed = {k: v for k, v in vars(cli).items() if v is not None}
    dataset = data.get_dataset(typed.get("dataset", saved.get("dataset", DEFAULTS["dataset"])))
    layers = [("default", DEFAULTS), (f"{dataset.name} recipe", dataset.recipe)]
    recipe = typed.get("recipe", saved.get("recipe", DEFAULTS["recipe"]))
    if recipe is not None:
        if not dataset.small:
            small = " and ".join(s.title for s in data.DATASETS.values() if s.small)
            raise TrainError(f"--recipe {recipe} is meant for {small}, small enough for a CPU; "
                             f"{dataset.title} is not")
        layers.append((f"--recipe {recipe}", RECIPES[recipe]))
    return layers + [(RESUMED, saved), (TYPED, typed)]


def resolve_settings(cli, saved=None):
    """Fill every option from the layers (see settings_layers), the later winning,
    and note what --epochs given alone rescales."""
    layers = settings_layers(cli, saved)
    merged, sources = {}, {}
    for name, layer in layers:
        for key, value in layer.items():
            merged[key], sources[key] = value, name
    notes = []
    typed, saved = layers[-1][1], layers[-2][1]
    if "epochs" in typed and "epochs" not in saved:
        notes = rescale_to_epochs(merged, sources, layers, typed)
    args = argparse.Namespace(**{k: merged.get(k) for k in set(merged) | set(vars(cli))})
    for key in vars(args):
        sources.setdefault(key, "default")
    check_args(args)
    return Settings(args, sources, notes)


def rescale_to_epochs(merged, sources, layers, typed):
    """--epochs N alone rescales the recipe: its warm-up keeps its share of the
    schedule (CIFAR: 20 of 400 epochs, 5 %), and its cool-down, which belongs to its
    length, is dropped (--epochs 5 trains 5 epochs). Returns a note saying so."""
    recipe_epochs = merged_without(layers, "epochs")
    done = []
    if "warmup_epochs" not in typed:
        before = merged_without(layers, "warmup_epochs")
        merged["warmup_epochs"] = before * typed["epochs"] / recipe_epochs
        if merged["warmup_epochs"] != before:
            sources["warmup_epochs"] = "--epochs rescale"
            done.append(f"the warm-up scaled from {before:g} to {merged['warmup_epochs']:g} epochs "
                        f"(the same share of {recipe_epochs} epochs)")
    if "cooldown_epochs" not in typed and merged_without(layers, "cooldown_epochs"):
        done.append(f"the {merged_without(layers, 'cooldown_epochs')} cool-down epochs dropped")
        merged["cooldown_epochs"], sources["cooldown_epochs"] = 0, "--epochs rescale"
    if not done:
        return []
    return [f"note: --epochs {typed['epochs']} given alone: {' and '.join(done)}; give "
            f"--warmup-epochs / --cooldown-epochs to choose them"]


def merged_without(layers, key):
    """The value of `key` from all layers but the last (the command line)."""
    value = None
    for _, layer in layers[:-1]:
        value = layer.get(key, value)
    return value


def resolve_args(cli, saved=None):
    """The settings of a run alone (see resolve_settings)."""
    return resolve_settings(cli, saved).args


def settings_table(args, sources, effective=None):
    """Every setting, its effective value and the layer it came from, as lines of text.
    effective: {option: (value, source)} for values worked out at run time (e.g. the
    learning rate from --blr), shown instead of the option's own."""
    effective = effective or {}
    order = [a.dest for a in build_parser()._actions if a.dest != "help"]
    rows = []
    for key in order + sorted(set(vars(args)) - set(order)):
        value, source = effective.get(key, (getattr(args, key, None), sources.get(key, "default")))
        rows.append(f"  {key:<16} {'-' if value is None else value!s:<28} {source}")
    layers = " < ".join(["default", f"{args.dataset} recipe", f"--recipe {args.recipe or 'cpu/lab'}",
                         RESUMED, TYPED])
    return [f"settings (each from the last layer that sets it: {layers}):"] + rows


def check_args(a):
    def need(ok, message):
        if not ok:
            raise TrainError(message)
    for name in ("epochs", "batch_size", "accum_iter", "eval_every"):
        need(isinstance(getattr(a, name), int) and getattr(a, name) >= 1,
             f"--{name.replace('_', '-')} must be a positive integer, got {getattr(a, name)}")
    for name in ("subset", "test_subset", "stop_after", "eval_batch_size"):
        v = getattr(a, name)
        need(v is None or v >= 1, f"--{name.replace('_', '-')} must be a positive integer, got {v}")
    need(a.workers is None or a.workers >= 0, f"--workers must be >= 0, got {a.workers}")
    need(a.cooldown_epochs >= 0, "--cooldown-epochs must be >= 0")
    need(0 <= a.warmup_epochs < a.epochs,
         f"--warmup-epochs ({a.warmup_epochs}) must be >= 0 and shorter than --epochs ({a.epochs}); "
         f"for a short run give a shorter warm-up too, e.g. --warmup-epochs {min(1, a.epochs / 4):g}")
    need(a.lr is not None or a.blr is not None, "give --lr or --blr")
    for name in ("lr", "blr"):
        v = getattr(a, name)
        need(v is None or (math.isfinite(v) and v > 0), f"--{name} must be a positive number, got {v}")
    need(0 <= a.min_lr and 0 <= a.warmup_lr, "--min-lr and --warmup-lr must be >= 0")
    need(a.weight_decay >= 0, "--weight-decay must be >= 0")
    need(0 <= a.smoothing < 1, f"--smoothing must be in [0, 1), got {a.smoothing}")
    need(0 <= a.reprob <= 1 and 0 <= a.hflip <= 1, "--reprob and --hflip are probabilities in [0, 1]")
    need(a.mixup >= 0 and a.cutmix >= 0, "--mixup and --cutmix must be >= 0")
    need(0 <= a.mixup_prob <= 1, f"--mixup-prob is a probability in [0, 1], got {a.mixup_prob}")
    need(a.crop_padding >= 0, "--crop-padding must be >= 0")
    need(a.clip_grad is None or a.clip_grad > 0, "--clip-grad must be positive")
    need(isinstance(a.T, int) and a.T >= 1, f"--T must be a positive integer, got {a.T}")
    need(a.dist_timeout is None or a.dist_timeout > 0, "--dist-timeout must be a positive number of minutes")


# ----------------------------------------------------------------------------
# Distributed set-up, devices and random state
# ----------------------------------------------------------------------------

def wants_cuda(device_arg):
    """Whether --device asks for a GPU (auto: when one is present). Creates no tensor."""
    return device_arg == "auto" and torch.cuda.is_available() or device_arg.startswith("cuda")


def setup_distributed(device_arg, timeout_min=DEFAULTS["dist_timeout"]):
    """(rank, world_size, device). torchrun sets RANK, WORLD_SIZE and LOCAL_RANK;
    without them this is one process. NCCL talks between GPUs, gloo between CPU processes.
    timeout_min: how long a collective waits for a process that hangs or died (--dist-timeout)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    want_cuda = wants_cuda(device_arg)
    if want_cuda and not torch.cuda.is_available():
        raise TrainError(f"--device {device_arg}, but PyTorch sees no CUDA GPU; use --device cpu")
    if want_cuda:
        device = torch.device(device_arg if ":" in device_arg and world == 1 else f"cuda:{local_rank}")
        torch.cuda.set_device(device)
    elif device_arg in ("auto", "cpu"):
        device = torch.device("cpu")
    else:
        raise TrainError(f"unknown --device {device_arg!r}: use auto, cpu, cuda or cuda:N")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if want_cuda else "gloo",
                                timeout=datetime.timedelta(minutes=timeout_min))
    return rank, world, device


def shared_error(cls, message):
    """An error that every process raises alike (rank 0's verdict, broadcast by from_rank0):
    main() prints it once, on rank 0, instead of once per process."""
    error = cls(message)
    error.shared = True
    return error


def from_rank0(world, *values):
    """Rank 0's values, on every process. Decisions only rank 0 can take (a folder
    name, a problem found) travel this way, so that all processes act alike
    instead of some waiting forever for one that stopped."""
    if world > 1:
        values = list(values)
        dist.broadcast_object_list(values, src=0)
    return tuple(values)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def rng_state():
    """The state of every random generator, as tensors and numbers (storable with weights_only)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": py_state[0], "state": torch.tensor(py_state[1], dtype=torch.int64),
                   "gauss_next": py_state[2]},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"].tolist()), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather_rng_states(world):
    """Every process's generator states, in rank order: augmentations differ per
    process, so an exact resume needs all of them."""
    if world == 1:
        return [rng_state()]
    states = [None] * world
    dist.all_gather_object(states, rng_state())
    return states


# ----------------------------------------------------------------------------
# Model, optimizer and learning-rate schedule
# ----------------------------------------------------------------------------

MODEL_OVERRIDES = ("embed_dim", "depths", "num_heads", "mlp_ratio", "attention", "neuron", "tau",
                   "speds")


def model_overrides(args) -> dict:
    """The settings of qkformer.create_model that the options give (besides --model)."""
    overrides = {k: getattr(args, k) for k in MODEL_OVERRIDES if getattr(args, k) is not None}
    if "attention" in overrides:
        overrides["attention"] = tuple(a.strip() for a in overrides["attention"].split(","))
    return dict(overrides, T=args.T, img_size=args.img_size)


def build_model(args, num_classes, in_channels=3):
    """The model of the run, initialised from --seed alone (the same on every process)."""
    torch.manual_seed(args.seed)
    try:
        return create_model(args.model, num_classes=num_classes, in_channels=in_channels,
                            **model_overrides(args))
    except ValueError as e:
        raise TrainError(f"invalid model configuration: {e}") from None


def build_optimizer(model, args):
    """AdamW, without weight decay on biases and batch-norm weights (all 1-D
    parameters), as both official scripts do: decaying them toward zero only
    hurts a scale or an offset."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": args.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    # fused: one kernel for the whole update, which takes a device flag (found_inf) that
    # skips the update on the device, without the host waiting for it (train_one_epoch)
    return torch.optim.AdamW(groups, lr=args.lr, fused=True)


def lr_at(epoch, args):
    """Learning rate at a (fractional) epoch: linear warm-up, cosine decay, cool-down.

    warmup_prefix=False is timm's CosineLRScheduler as the official CIFAR runs
    used it: the cosine is a function of the epoch counted from 0, so when the
    warm-up ends it is already slightly past its peak. warmup_prefix=True is
    the MAE schedule of the official ImageNet runs: the cosine starts at the
    end of the warm-up. Both official scripts change the rate once per epoch
    (timm) or per step (MAE); here it changes every optimizer step.
    """
    if epoch < args.warmup_epochs:
        return args.warmup_lr + (args.lr - args.warmup_lr) * epoch / args.warmup_epochs
    if epoch >= args.epochs:  # cool-down
        return args.min_lr
    if args.warmup_prefix:
        progress = (epoch - args.warmup_epochs) / (args.epochs - args.warmup_epochs)
    else:
        progress = epoch / args.epochs
    return args.min_lr + (args.lr - args.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def peak_lr(args, effective_batch):
    """--lr if given, else the linear scaling rule of the MAE recipe: blr * effective batch / 256."""
    return args.lr if args.lr is not None else args.blr * effective_batch / 256


def build_scheduler(optimizer, args, updates_per_epoch):
    """LambdaLR stepped once per optimizer update; its state is just the update count."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda update: lr_at(update / updates_per_epoch, args) / args.lr)


def place_scheduler(scheduler, args, epoch, updates_per_epoch):
    """Put the schedule at the start of `epoch` (epochs done) for this run's peak --lr and
    updates per epoch. The schedule is a function of the training progress in epochs
    (lr_at), so a run resumed with another batch size, number of processes or --lr
    follows the same curve from where it stopped. (The saved update count and base rates
    of the scheduler are not used: they count updates of the old batch geometry.)"""
    scheduler.base_lrs = [args.lr] * len(scheduler.optimizer.param_groups)
    scheduler.last_epoch = epoch * updates_per_epoch
    lr = args.lr * (lr_at(epoch, args) / args.lr)  # as LambdaLR computes it: the same bits
    for group in scheduler.optimizer.param_groups:
        group["initial_lr"], group["lr"] = args.lr, lr
    scheduler._last_lr = [lr] * len(scheduler.optimizer.param_groups)


# ----------------------------------------------------------------------------
# One epoch of training
# ----------------------------------------------------------------------------

def mixup_for_epoch(mixup, args, epoch):
    """The Mixup to use in `epoch` (0-based), or None: the official CIFAR runs
    switch mixup off from epoch 200 on (--mixup-off-epoch; 0 = never)."""
    if not mixup.enabled or 0 < args.mixup_off_epoch <= epoch:
        return None
    return mixup


def reduce_mean(value, world):
    """The mean of a scalar tensor over all processes (every process gets it)."""
    if world > 1:
        value = value.clone()
        dist.all_reduce(value)
        value /= world
    return value


class NonFiniteLoss(TrainError):
    """The loss (or the gradients) stayed NaN or infinite for a whole logging interval:
    training cannot go on from these weights. Their updates were skipped."""

    def __init__(self, epoch, step, count):
        self.epoch, self.step, self.count = epoch, step, count
        super().__init__(f"the loss or the gradients were not finite in {count} steps in a row (up to "
                         f"epoch {epoch + 1}, step {step + 1}); their updates were skipped")


# Statistics stay on the device and are read every LOG_EVERY steps (and at the end of an
# epoch): reading a number from a GPU makes the host wait for all queued work. A run
# whose loss or gradients were non-finite in LOG_EVERY steps in a row (or in every step
# of a shorter epoch) stops with NonFiniteLoss.
LOG_EVERY = 20


@dataclasses.dataclass
class StepContext:
    """What a training step needs besides its batch: the model (wrapped in DDP when
    world > 1), its optimizer, schedule and loss, the settings (args: accum_iter,
    clip_grad, reprob, remode), the device and the dataset's normalisation, and how
    steps run: autocast and the grad scaler (mixed precision), the number of
    processes, and whether this process shows progress bars. bad_streak: the number
    of non-finite steps in a row so far (a device tensor, carried across epochs)."""
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    criterion: nn.Module
    args: argparse.Namespace
    device: torch.device
    mean: tuple
    std: tuple
    scaler: torch.amp.GradScaler = dataclasses.field(
        default_factory=lambda: torch.amp.GradScaler("cpu", enabled=False))
    autocast: object = contextlib.nullcontext
    world: int = 1
    show: bool = True
    model_input: object = lambda x: x  # the dataset's last step before the model (DatasetSpec.model_input)
    bad_streak: torch.Tensor = None


def optimizer_update(ctx, bad_loss):
    """One optimizer update from the accumulated gradients, skipped on the device when
    they (or a loss of the accumulation window: bad_loss, a 0/1 device tensor) are not
    finite. Returns the skip flag (0/1 device tensor); no host synchronisation.

    The fused AdamW takes the flag (found_inf) and leaves the weights, its moments and
    its step count untouched when it is 1, as a grad scaler does. With fp16 the grad
    scaler itself checks the (unscaled) gradients and skips such updates."""
    optimizer, args = ctx.optimizer, ctx.args
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if ctx.scaler.is_enabled():
        ctx.scaler.unscale_(optimizer)
    found = bad_loss.clone()
    if grads:  # sets found to 1 if any gradient holds inf or NaN (multiplies them by 1)
        torch._amp_foreach_non_finite_check_and_unscale_(grads, found, torch.ones((), device=found.device))
    if args.clip_grad:
        nn.utils.clip_grad_norm_(ctx.model.parameters(), args.clip_grad)
    if ctx.scaler.is_enabled():
        ctx.scaler.step(optimizer)
        ctx.scaler.update()
    elif optimizer.defaults.get("fused"):
        optimizer.grad_scale, optimizer.found_inf = None, found
        try:
            optimizer.step()
        finally:
            del optimizer.grad_scale, optimizer.found_inf
    elif not found.item():  # an optimizer that cannot skip on the device: ask the host
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return found


def train_one_epoch(ctx, loader, epoch, mixup=None):
    """Train over one pass of `loader`; returns the epoch's mean loss (over its finite
    steps), top-1 on the (augmented) training batches, images/s, the last learning
    rate and the number of updates skipped for non-finite losses or gradients.

    Gradient accumulation: the loss of each of accum_iter consecutive batches is
    divided by accum_iter and back-propagated, the gradients add up, and one
    optimizer update follows. With DDP the gradient all-reduce is skipped
    (no_sync) on all but the last of those batches. No update with a non-finite
    loss or gradient reaches the weights (optimizer_update); the statistics are
    kept on the device and read every LOG_EVERY steps.
    """
    model, optimizer, args, world = ctx.model, ctx.optimizer, ctx.args, ctx.world
    model.train()
    accum, steps = args.accum_iter, len(loader)
    zero = torch.zeros((), device=ctx.device)
    total_loss, finite_steps, correct, skipped, window_bad = zero.clone(), zero.clone(), zero.clone(), \
        zero.clone(), zero.clone()
    if ctx.bad_streak is None:
        ctx.bad_streak = zero.clone()
    seen, start = 0, time.time()
    bar = tqdm(loader, desc=f"epoch {epoch + 1}", disable=not ctx.show, dynamic_ncols=True, leave=False)
    optimizer.zero_grad(set_to_none=True)
    for i, (images, labels) in enumerate(bar):
        images = images.to(ctx.device, non_blocking=True)
        labels = labels.to(ctx.device, non_blocking=True)
        x = data.normalize(images, ctx.mean, ctx.std)              # uint8 -> normalised float
        if args.reprob > 0:
            x = data.random_erasing(x, args.reprob, args.remode)
        targets = labels
        if mixup is not None:
            x, targets = mixup(x, labels)                         # targets (B, classes), soft
        update = (i + 1) % accum == 0 or i + 1 == steps
        no_sync = model.no_sync if world > 1 and not update else contextlib.nullcontext
        with no_sync():
            with ctx.autocast():
                logits = model(ctx.model_input(x))
            loss = ctx.criterion(logits.float(), targets)
            mean_loss = reduce_mean(loss.detach(), world)
            bad = (~torch.isfinite(mean_loss)).float()            # 0/1, on the device
            ctx.scaler.scale(loss / accum).backward()
        window_bad = torch.maximum(window_bad, bad)
        if update:
            skip = optimizer_update(ctx, window_bad)
            skipped += skip
            bad = torch.maximum(bad, skip)
            window_bad = zero.clone()
            ctx.scheduler.step()  # the schedule follows the progress, updates skipped or not
        ctx.bad_streak = (ctx.bad_streak + 1) * bad                # non-finite steps in a row
        total_loss += torch.where(bad > 0, zero, mean_loss)
        finite_steps += 1 - bad
        correct += (logits.argmax(1) == labels).sum()
        seen += len(labels)
        if (i + 1) % LOG_EVERY == 0 or i + 1 == steps:             # the only host reads
            streak = int(ctx.bad_streak.item())
            if streak >= min(LOG_EVERY, steps):
                raise NonFiniteLoss(epoch, i, streak)
            if ctx.show:
                bar.set_postfix(loss=f"{total_loss.item() / max(finite_steps.item(), 1):.4f}",
                                lr=f"{optimizer.param_groups[0]['lr']:.2e}",
                                img_s=f"{seen * world / (time.time() - start):.0f}", refresh=False)
    bar.close()
    elapsed = time.time() - start
    finite = finite_steps.item()
    return dict(train_loss=total_loss.item() / finite if finite else float("nan"),
                train_top1=100.0 * correct.item() / max(seen, 1), lr=optimizer.param_groups[0]["lr"],
                img_per_s=seen * world / elapsed, train_time_s=elapsed, skipped_updates=int(skipped.item()))


# ----------------------------------------------------------------------------
# Evaluation (evaluate.py adds firing rates and energy to the same loop)
# ----------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model, loader, device, mean, std, autocast=contextlib.nullcontext, show=True,
             model_input=lambda x: x, flip=False):
    """Mean cross-entropy (test_loss), top-1 and top-5 accuracy (top1, top5, in %) over `loader`;
    flip: of the logits averaged with those of the mirrored images (qkformer.predict)."""
    model.eval()
    total_loss, top1, top5, n = 0.0, 0, 0, 0
    for images, labels in tqdm(loader, desc="evaluate", disable=not show, dynamic_ncols=True, leave=False):
        x = data.normalize(images.to(device, non_blocking=True), mean, std)
        labels = labels.to(device, non_blocking=True)
        with autocast():
            logits = predict(model, model_input(x), flip).float()
        total_loss += nn.functional.cross_entropy(logits, labels, reduction="sum").item()
        best5 = logits.topk(min(5, logits.shape[1]), dim=1).indices   # (B, 5)
        hits = best5 == labels[:, None]                               # (B, 5)
        top1 += hits[:, 0].sum().item()
        top5 += hits.any(dim=1).sum().item()
        n += len(labels)
    return dict(test_loss=total_loss / n, top1=100.0 * top1 / n, top5=100.0 * top5 / n)


# ----------------------------------------------------------------------------
# Checkpoints (their format: qkformer.training_checkpoint), log and plot
# ----------------------------------------------------------------------------

def read_training_checkpoint(path):
    """A checkpoint written by this script, checked for what a resume needs."""
    if os.path.isdir(path):
        path = os.path.join(path, "last.pt")
    try:
        ckpt = load_checkpoint(path, map_location="cpu")  # weights_only=True: cannot run code
    except ValueError as e:
        raise TrainError(f"cannot resume: {e}") from None
    missing = missing_training_keys(ckpt)
    if missing:
        raise TrainError(f"cannot resume from {path}: it is not a checkpoint written by train.py "
                         f"(it lacks {', '.join(missing)}). A file with weights only can be "
                         f"evaluated, not resumed.")
    return ckpt, path


def saved_settings(resume):
    """The settings a resumed run saved in args.json beside its checkpoint (plain JSON,
    readable before any tensor exists), or {} when there is none."""
    if not resume:
        return {}
    folder = resume if os.path.isdir(resume) else os.path.dirname(os.path.abspath(resume))
    try:
        with open(os.path.join(folder, "args.json")) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return {}
    return saved if isinstance(saved, dict) else {}


# Older logs (before the names top1/top5) are read under the current names.
OLD_METRIC_NAMES = {"acc1": "top1", "acc5": "top5", "train_acc1": "train_top1", "best_acc1": "best_top1"}


def append_log(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_log(path, warn=None):
    """The records of log.jsonl. A line that is not a whole JSON record (the torn last line
    of a run killed while appending, or of a full disk) is left out, and warn(message)
    says so; setup_run_folder then writes the log back without it."""
    if not os.path.exists(path):
        return []
    records, torn = [], []
    with open(path, errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if isinstance(record, dict) and "epoch" in record:
                records.append({OLD_METRIC_NAMES.get(k, k): v for k, v in record.items()})
            else:
                torn.append(number)
    if torn and warn is not None:
        warn(f"warning: {path}: line {', '.join(map(str, torn))} is not a whole record (torn by a kill "
             f"or a full disk while it was written): left out, the {len(records)} good records are kept")
    return records


def write_text_atomically(path, text):
    """A small text file (args.json, a repaired log.jsonl), atomically: qkformer.write_atomically."""
    write_atomically(path, lambda f: f.write(text.encode()))


def plot_curves(records, path):
    """Loss and accuracy per epoch, redrawn from the whole log into a PNG."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no window: works on servers without a display
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in records]
    evals = [r for r in records if r.get("top1") is not None]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(epochs, [r["train_loss"] for r in records], label="train loss (augmented)")
    if evals:
        ax1.plot([r["epoch"] for r in evals], [r["test_loss"] for r in evals], "o-", label="test loss")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("cross-entropy")
    ax1.legend()
    ax2.plot(epochs, [r["train_top1"] for r in records], label="train top-1 (augmented)")
    if evals:
        ax2.plot([r["epoch"] for r in evals], [r["top1"] for r in evals], "o-", label="test top-1")
        ax2.plot([r["epoch"] for r in evals], [r["top5"] for r in evals], "o-", label="test top-5")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("accuracy (%)")
    ax2.legend()
    fig.tight_layout()
    try:
        write_atomically(path, lambda f: fig.savefig(f, format="png", dpi=100))
    finally:
        plt.close(fig)


# ----------------------------------------------------------------------------
# A training session, phase by phase
# ----------------------------------------------------------------------------

@dataclasses.dataclass
class Session:
    """One invocation of train.py: what its phases set up, in order, for the epoch loop."""
    rank: int
    world: int
    device: torch.device
    ckpt: dict = None                 # the resumed checkpoint, if any, and its path
    resume_path: str = None
    args: argparse.Namespace = None   # the settings, where each came from, notes on them
    sources: dict = None
    notes: list = dataclasses.field(default_factory=list)
    effective: dict = dataclasses.field(default_factory=dict)  # option -> (value, source) at run time
    spec: data.DatasetSpec = None
    amp: str = "off"
    raw_model: nn.Module = None       # the bare model: checkpoints and evaluation
    ctx: StepContext = None           # what train_one_epoch needs
    train_loader: object = None
    eval_loader: object = None
    mixup: data.Mixup = None
    updates_per_epoch: int = 0
    effective_batch: int = 0
    start_epoch: int = 0
    best_top1: float = None
    out_dir: str = None
    lock: object = None               # the open lock file of the run folder (rank 0)

    def say(self, *a, **k):
        if self.rank == 0:
            print(*a, **k)

    @property
    def total_epochs(self):
        return self.args.epochs + self.args.cooldown_epochs

    @property
    def log_path(self):
        return os.path.join(self.out_dir, "log.jsonl")


def setup_device(s):
    """Mixed precision and device settings. autocast runs matrix products in 16 bits;
    fp16's narrow range needs the grad scaler (the loss is scaled up so small gradients
    do not round to zero, and updates with inf/NaN gradients are skipped). The choice of
    bf16 or fp16 and the GPU's fast-math switches are neuron.py's (one rule for every script)."""
    amp = s.args.amp
    amp_dtype = autocast_dtype(s.device, amp)
    if amp != "off" and amp_dtype is None:
        s.notes.append(f"note: --amp {amp} ignored: mixed precision is used on GPUs only")
        amp = "off"
    elif amp_dtype is not None:
        amp = "bf16" if amp_dtype == torch.bfloat16 else "fp16"
    if amp != s.args.amp:
        s.effective["amp"] = (amp, f"{s.sources['amp']}: --amp {s.args.amp} on {s.device.type}")
    s.amp = amp
    autocast = (lambda: torch.autocast("cuda", dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext
    scaler = torch.amp.GradScaler(s.device.type, enabled=amp == "fp16")
    apply_device_settings(s.device, fast=s.args.tf32)  # cuDNN autotuning and TF32 (--no-tf32: off)
    if s.args.sync_bn and s.device.type != "cuda":
        raise TrainError("--sync-bn needs GPUs: PyTorch's SyncBatchNorm has no CPU implementation. "
                         "Without it each process normalises with its own batch statistics.")
    if s.args.sync_bn and s.world > 1:
        s.notes.append("note: --sync-bn: SyncBatchNorm is not a BatchNorm2d, so the fused batch norm + "
                       "LIF step (neuron.py) is off: more memory, the same results")
    return autocast, scaler


def setup_model(s):
    """The model, with the resumed checkpoint's weights: built before any data is read,
    so that a bad configuration is reported at once."""
    model = build_model(s.args, s.spec.num_classes, s.spec.in_channels)
    check_memory(s, model)
    if s.ckpt is None:
        return model
    saved_config, config = s.ckpt["config"], dataclasses.asdict(model.config)
    if saved_config != config:
        diff = {k: (v, saved_config.get(k)) for k, v in config.items() if saved_config.get(k) != v}
        raise TrainError(f"{s.resume_path} holds another model than this run builds "
                         f"(this run vs checkpoint: {diff}); drop the options that change the "
                         f"model to resume it, or start a new run without --resume")
    try:
        model.load_state_dict(s.ckpt["model"])
    except RuntimeError as e:
        raise TrainError(f"the weights in {s.resume_path} do not fit its own model config: "
                         f"{str(e).splitlines()[0]}") from None
    return model


def device_memory(device):
    """The memory of the device in bytes (a GPU's, or the machine's RAM), None if unknown."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(s, model):
    """Refuse options that can only exhaust memory, where the limit is obvious: the output
    of the first convolution for one batch (T x batch x channels x H x W floats, kept for
    the backward pass) alone would not fit in the device's memory."""
    args = s.args
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    side = math.ceil(args.img_size / conv.stride[0])
    batch = max(args.batch_size, args.eval_batch_size or 0)
    need = args.T * batch * conv.out_channels * side * side * 4
    have = device_memory(s.device)
    if have and need > have:
        raise TrainError(f"--T {args.T} with a batch of {batch} images of {args.img_size}x{args.img_size} "
                         f"needs {need / 2 ** 30:.0f} GiB for the first layer's output alone, more than "
                         f"the {have / 2 ** 30:.0f} GiB of {s.device}: lower --T, --batch-size or --img-size")


def class_count(dataset):
    """The number of classes a dataset's labels use: its class folders (ImageFiles) or its
    largest label + 1 (images in memory)."""
    if hasattr(dataset, "classes"):
        return len(dataset.classes)
    labels = getattr(dataset, "labels", None)
    if labels is not None and len(labels):
        return int(max(int(l) for l in labels)) + 1
    return None


def setup_data(s):
    """Datasets and loaders. Rank 0 fetches the data if needed (CIFAR: a download) and
    checks that the evaluation images can be read (their headers: cheap); the others wait
    for its verdict. The classes must fit the model. Then the batch and learning rate
    they imply."""
    args = s.args
    problem = None
    if s.rank == 0:
        try:
            data.prepare(args.dataset, args.data_dir, download_missing=args.download)
        except DataError as e:
            problem = str(e)
    (problem,) = from_rank0(s.world, problem)
    if problem:
        raise shared_error(DataError, problem)
    train_set, test_set = data.build_datasets(
        args.dataset, args.data_dir, args.img_size, args.crop_padding, args.hflip, args.aa,
        args.subset, args.test_subset, download_missing=False, T=args.T, dvs_split=args.dvs_split)
    num_classes = s.spec.num_classes
    for name, dataset in (("training", train_set), ("test", test_set)):
        found = class_count(dataset)
        if found is not None and found > num_classes:
            raise TrainError(f"the {name} images of {args.data_dir} have {found} classes, but the "
                             f"{s.spec.title} model has {num_classes} outputs: remove the extra class "
                             f"folders (every folder is a class), or point --data-dir at {s.spec.title}")
    problem = None
    if s.rank == 0 and hasattr(test_set, "samples"):  # image files: a bad one is found now, not after an epoch
        try:
            data.verify_images(test_set.samples, desc="checking the test images")
        except DataError as e:
            problem = str(e)
    (problem,) = from_rank0(s.world, problem)
    if problem:
        raise shared_error(DataError, problem)
    workers = args.workers
    if workers is None:
        workers = data.default_workers(s.device.type, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        s.effective["workers"] = (workers, f"default on {s.device.type}")
    pin = s.device.type == "cuda"
    s.train_loader = data.make_loader(train_set, args.batch_size, train=True, workers=workers,
                                      seed=args.seed, rank=s.rank, world_size=s.world, pin_memory=pin)
    s.eval_loader = data.make_loader(test_set, args.eval_batch_size or args.batch_size, train=False,
                                     workers=workers, pin_memory=pin)
    if len(s.train_loader) == 0:
        raise TrainError(f"{len(train_set)} training images give no full batch of {args.batch_size} "
                         f"per process ({s.world} processes): lower --batch-size or raise --subset")
    s.updates_per_epoch = math.ceil(len(s.train_loader) / args.accum_iter)
    s.effective_batch = args.batch_size * args.accum_iter * s.world
    if args.lr is None:
        s.sources["lr"] = f"--blr {args.blr:g} x effective batch {s.effective_batch} / 256"
    args.lr = peak_lr(args, s.effective_batch)


def setup_optimization(s, model, autocast, scaler):
    """DDP, optimizer, learning-rate schedule, loss and mixup: the step context."""
    args = s.args
    if args.sync_bn and s.world > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    s.raw_model = model.to(s.device)
    if s.device.type == "cuda":
        # the weights in the layout of the activations (channels-last, see qkformer.py), before
        # DDP registers its gradient buckets on them
        s.raw_model = s.raw_model.to(memory_format=torch.channels_last)
    model = s.raw_model
    if s.world > 1:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[s.device.index] if s.device.type == "cuda" else None)
    optimizer = build_optimizer(s.raw_model, args)
    scheduler = build_scheduler(optimizer, args, s.updates_per_epoch)
    criterion = nn.CrossEntropyLoss(label_smoothing=args.smoothing)  # takes class indices or soft targets
    s.mixup = data.Mixup(args.mixup, args.cutmix, prob=args.mixup_prob, num_classes=s.spec.num_classes)
    s.ctx = StepContext(model, optimizer, scheduler, criterion, args, s.device, s.spec.mean, s.spec.std,
                        scaler, autocast, s.world, show=s.rank == 0, model_input=s.spec.model_input)


def restore_state(s):
    """Optimizer, schedule, scaler and random generators: from the resumed checkpoint
    (where it stopped), or seeded afresh (augmentations differ between processes).
    The schedule is placed by the epochs done (place_scheduler), so another batch size,
    number of processes or --lr continues the same curve; the grad scaler's state is
    loaded only when both the checkpoint and this run use one (fp16)."""
    if s.ckpt is None:
        seed_everything(s.args.seed + s.rank)
        return
    s.ctx.optimizer.load_state_dict(s.ckpt["optimizer"])
    s.ctx.scheduler.load_state_dict(s.ckpt["scheduler"])
    s.start_epoch, s.best_top1 = s.ckpt["epoch"], s.ckpt["best_top1"]
    place_scheduler(s.ctx.scheduler, s.args, s.start_epoch, s.updates_per_epoch)
    if s.ckpt["scaler"] and s.ctx.scaler.is_enabled():
        s.ctx.scaler.load_state_dict(s.ckpt["scaler"])
    if len(s.ckpt["rng"]) == s.world:
        set_rng_state(s.ckpt["rng"][s.rank])
    else:
        s.notes.append(f"note: the checkpoint was written by {len(s.ckpt['rng'])} processes, this run "
                       f"has {s.world}: random augmentations will differ from an uninterrupted run")
        seed_everything(s.args.seed + 1000 * s.start_epoch + s.rank)


# Temporary files of this script in a run folder (save_checkpoint, write_atomically,
# plot_curves): unique names; those of a killed run are removed at the next start.
STALE_TEMPORARY = ("last.pt.*.tmp", "best.pt.*.tmp", "log.jsonl.*.tmp", "log.jsonl.tmp", "args.json.*.tmp",
                   "curves.png.*.tmp")


def lock_run_folder(out_dir):
    """Lock the run folder for the life of this process: an exclusive flock on
    out_dir/.lock, which the operating system releases when the process ends, however it
    ends. Returns the open lock file, or None if another process holds it."""
    lock = open(os.path.join(out_dir, ".lock"), "a")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        return None
    return lock


def claim_run_folder(s, out_dir):
    """Rank 0: create and lock the run folder, check that a new run overwrites nothing,
    and remove the temporary files of killed runs. Returns a problem (text) or None."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        return f"--output {out_dir} is a file, not a folder: choose another --output"
    try:
        os.makedirs(out_dir, exist_ok=True)
        if not os.access(out_dir, os.W_OK):
            raise OSError(errno.EACCES, "not writable")
        s.lock = lock_run_folder(out_dir)
    except OSError as e:
        return (f"cannot write to the run folder {out_dir} ({e.strerror or e}): choose a writable "
                f"--output")
    if s.lock is None:
        return (f"another train.py is running in {out_dir} (it holds {os.path.join(out_dir, '.lock')}): "
                f"wait for it to end, or choose another --output")
    if s.ckpt is None and os.path.exists(os.path.join(out_dir, "last.pt")):
        return (f"{out_dir} already holds a run (last.pt): continue it with --resume {out_dir}, "
                f"or choose another --output")
    for pattern in STALE_TEMPORARY:  # nobody else writes here: we hold the lock
        for stale in glob.glob(os.path.join(glob.escape(out_dir), pattern)):
            os.remove(stale)
    return None


def setup_run_folder(s):
    """The run folder (rank 0's choice for all), locked for the life of the run, its
    args.json and log.jsonl. A new run may not overwrite an old one; a resumed run
    continues in its own folder."""
    args = s.args
    if s.ckpt is not None:
        out_dir = args.output or os.path.dirname(os.path.abspath(s.resume_path))
    else:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        out_dir = args.output or os.path.join("runs", f"{args.dataset}-{args.model}-{stamp}")
    problem = claim_run_folder(s, out_dir) if s.rank == 0 else None
    if problem is None and s.rank == 0:
        try:
            write_text_atomically(os.path.join(out_dir, "args.json"), json.dumps(vars(args), indent=1))
            # A fresh run starts an empty log; a resumed one forgets the lines of epochs
            # after its checkpoint (written before a kill, and about to be redone) and a
            # torn last line.
            records = [r for r in read_log(os.path.join(out_dir, "log.jsonl"), s.notes.append)
                       if r["epoch"] <= s.start_epoch] if s.ckpt else []
            write_text_atomically(os.path.join(out_dir, "log.jsonl"), "".join(json.dumps(r) + "\n" for r in records))
        except OSError as e:
            problem = f"cannot write to the run folder {out_dir} ({e.strerror or e}): choose a writable --output"
    s.out_dir, problem = from_rank0(s.world, out_dir, problem)
    if problem:
        raise shared_error(TrainError, problem)


def print_banner(s):
    """The settings table, the notes on them, and what the run is."""
    args, say = s.args, s.say
    for line in settings_table(args, s.sources, s.effective) + s.notes:
        say(line)
    say(f"QKFormer '{args.model}' ({count_parameters(s.raw_model):,} parameters, T={args.T}) on "
        f"{s.spec.title}: {len(s.train_loader.dataset):,} training / {len(s.eval_loader.dataset):,} test images")
    workers = s.effective.get("workers", (args.workers,))[0]
    say(f"device {s.device}{' x ' + str(s.world) + ' processes' if s.world > 1 else ''}, "
        f"amp {s.amp}, {workers} loader workers; run folder {s.out_dir}")
    say(f"effective batch {s.effective_batch} = {args.batch_size} per process x {args.accum_iter} "
        f"accumulated x {s.world} processes; peak lr {args.lr:.3g}; {s.total_epochs} epochs of "
        f"{s.updates_per_epoch} updates" + (f"; resuming after epoch {s.start_epoch}" if s.ckpt else ""))
    if s.device.type == "cpu" and args.recipe is None and args.model != "tiny" and not args.subset:
        say("note: this is the paper's full-size recipe, meant for GPUs; on a CPU an epoch takes hours. "
            + ("For a run that learns on a laptop in about 30 minutes: --recipe cpu" if s.spec.small else
               "For a quick look on a CPU: --subset, a small --T and a narrow model (--embed-dim 32)"))
    if s.start_epoch >= s.total_epochs:
        say(f"this run is already complete ({s.total_epochs} epochs); give a larger --epochs to train on")


def kept_checkpoint(s):
    """What a stopped run leaves to continue from, in words."""
    last = os.path.join(s.out_dir, "last.pt")
    if not os.path.exists(last):
        return "no checkpoint was written yet"
    try:
        epoch = load_checkpoint(last)["epoch"]
    except (ValueError, KeyError, TypeError):
        return f"{last} is kept"
    return f"the last good checkpoint, {last} (after epoch {epoch}), is kept"


def train_epoch(s, epoch):
    """One epoch of training; a loss or gradients that stay non-finite end the run with a
    message saying what is kept. Updates skipped for them are reported."""
    s.train_loader.sampler.set_epoch(epoch)  # a new shuffle each epoch, the same on every process
    try:
        stats = train_one_epoch(s.ctx, s.train_loader, epoch, mixup_for_epoch(s.mixup, s.args, epoch))
    except NonFiniteLoss as e:  # every process stops at the same step (losses and gradients are shared)
        raise shared_error(TrainError, f"training stopped: {e}; {kept_checkpoint(s)}. Try a lower --lr "
                           f"(now {s.args.lr:.3g}), --clip-grad 1.0, or without --amp.") from None
    if stats["skipped_updates"]:
        n = stats["skipped_updates"]
        s.say(f"note: {n} update{'s' if n > 1 else ''} of epoch {epoch + 1} skipped: the loss or the "
              f"gradients were not finite")
    return stats


def non_finite_state(model, optimizer):
    """Names of the parameters, buffers and optimizer states that hold inf or NaN."""
    bad = [name for name, t in model.state_dict().items()
           if t.is_floating_point() and not torch.isfinite(t).all()]
    for i, state in optimizer.state_dict()["state"].items():
        bad += [f"optimizer state {i}.{k}" for k, v in state.items()
                if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]
    return bad


def evaluate_epoch(s, record):
    """Rank 0 evaluates (the other processes wait in a barrier) and keeps the best top-1."""
    if s.rank != 0:
        return
    start = time.time()
    record.update(evaluate(s.raw_model, s.eval_loader, s.device, s.spec.mean, s.spec.std,
                           s.ctx.autocast, show=True, model_input=s.spec.model_input,
                           flip=s.args.flip_test))
    record["eval_time_s"] = time.time() - start
    if s.best_top1 is None or record["top1"] > s.best_top1:
        s.best_top1 = record["top1"]
        record["best"] = True


def write_checkpoint(s, checkpoint, name):
    """save_checkpoint into the run folder; a full disk or another write error is a
    TrainError saying that the previous file is kept (the write is atomic)."""
    path = os.path.join(s.out_dir, name)
    try:
        save_checkpoint(checkpoint, path)
    except OSError as e:
        kept = kept_checkpoint(s) if name == "last.pt" else f"the previous {path} is kept"
        raise TrainError(f"cannot write {path} ({e.strerror or e}; a full disk?): {kept}, nothing "
                         f"half-written. Free space and continue with --resume {s.out_dir}") from None


def save_epoch(s, record, rngs):
    """Rank 0, before the evaluation: last.pt, so that a failing evaluation loses no
    training. Returns the checkpoint (finish_epoch writes it again with the new best)."""
    checkpoint = training_checkpoint(s.raw_model, s.ctx.optimizer, s.ctx.scheduler, s.ctx.scaler,
                                     record["epoch"], rngs, vars(s.args), s.best_top1)
    write_checkpoint(s, checkpoint, "last.pt")
    return checkpoint


def finish_epoch(s, record, checkpoint):
    """Rank 0, after the evaluation: the epoch's line, log.jsonl, last.pt again when the
    best top-1 changed (and best.pt), curves.png."""
    line = (f"epoch {record['epoch']}/{s.total_epochs}: loss {record['train_loss']:.4f}, "
            f"lr {record['lr']:.2e}, {record['img_per_s']:.0f} img/s, {record['train_time_s']:.0f} s")
    if "top1" in record:
        line += f"; test top-1 {record['top1']:.2f}%, top-5 {record['top5']:.2f}%"
        line += " (with flips)" if s.args.flip_test else ""
    s.say(line)
    if checkpoint["best_top1"] != s.best_top1:
        checkpoint["best_top1"] = s.best_top1
        write_checkpoint(s, checkpoint, "last.pt")
    if record.get("best"):
        write_checkpoint(s, checkpoint, "best.pt")
    try:
        append_log(s.log_path, record)  # a torn line (full disk) is repaired by the next resume
        plot_curves(read_log(s.log_path), os.path.join(s.out_dir, "curves.png"))
    except OSError as e:
        raise TrainError(f"cannot write {s.log_path} or curves.png ({e.strerror or e}; a full disk?): "
                         f"{kept_checkpoint(s)}. Free space and continue with --resume {s.out_dir}") from None


def run_epochs(s):
    """The epoch loop: train, checkpoint, evaluate every --eval-every epochs and after the
    last, log; ends early after --stop-after epochs. Weights or optimizer state that hold
    inf/NaN are never saved: the run stops with the previous checkpoint kept."""
    args = s.args
    for epoch in range(s.start_epoch, s.total_epochs):
        record = {"epoch": epoch + 1, **train_epoch(s, epoch)}
        # rank 0's weights are the ones saved; its verdict stops every process alike
        (bad,) = from_rank0(s.world, non_finite_state(s.raw_model, s.ctx.optimizer) if s.rank == 0 else None)
        if bad:
            raise shared_error(TrainError, f"training stopped: after epoch {epoch + 1} the weights or optimizer state hold "
                             f"inf/NaN ({', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}), not saved; "
                             f"{kept_checkpoint(s)}. Try a lower --lr (now {args.lr:.3g}) or "
                             f"--clip-grad 1.0.")
        # The generator states are taken before anything else can draw from them (the
        # evaluation has generators of its own), so a resumed run starts from exactly here.
        rngs = gather_rng_states(s.world)
        problem, checkpoint = None, None
        if s.rank == 0:
            try:
                checkpoint = save_epoch(s, record, rngs)
            except TrainError as e:
                problem = str(e)
        (problem,) = from_rank0(s.world, problem)
        if problem:
            raise shared_error(TrainError, problem)
        if s.rank == 0:
            try:
                if (epoch + 1) % args.eval_every == 0 or epoch + 1 == s.total_epochs:
                    evaluate_epoch(s, record)
                record["best_top1"] = s.best_top1
                finish_epoch(s, record, checkpoint)
            except (DataError, TrainError) as e:
                problem = f"{e} (the checkpoint of epoch {epoch + 1} was written before the evaluation)"
        # nobody starts the next epoch before rank 0 has evaluated and saved (--dist-timeout)
        (problem,) = from_rank0(s.world, problem)
        if problem:
            raise shared_error(TrainError, problem)
        if args.stop_after and epoch + 1 >= args.stop_after and epoch + 1 < s.total_epochs:
            s.say(f"stopping after epoch {epoch + 1} as asked (--stop-after); continue with "
                  f"python train.py --resume {os.path.join(s.out_dir, 'last.pt')}")
            break


def print_summary(s, session_start):
    records = read_log(s.log_path) if s.rank == 0 else []
    if not records:
        return
    train_time = sum(r["train_time_s"] for r in records)
    last = records[-1]
    summary = (f"done in {(time.time() - session_start) / 60:.1f} min this session; "
               f"training time over the run {train_time / 60:.1f} min")
    if last.get("top1") is not None:
        summary += f"; final test top-1 {last['top1']:.2f}%, best {s.best_top1:.2f}%"
    s.say(summary)
    s.say(f"files: {s.log_path}, {os.path.join(s.out_dir, 'curves.png')}, "
          f"{os.path.join(s.out_dir, 'last.pt')}")


# ----------------------------------------------------------------------------
# The main loop
# ----------------------------------------------------------------------------

def train(cli, low_memory=None):
    """One training session, phase by phase; returns the run folder.
    low_memory: (value, source) of --low-memory as main() decided and applied it."""
    timeout = cli.dist_timeout if cli.dist_timeout is not None else DEFAULTS["dist_timeout"]
    if not timeout > 0:
        raise TrainError("--dist-timeout must be a positive number of minutes")
    rank, world, device = setup_distributed(cli.device or DEFAULTS["device"], timeout)
    s = Session(rank, world, device)
    try:
        return run_session(s, cli, low_memory)
    finally:
        if s.lock is not None:  # (the operating system releases it too when the process dies)
            s.lock.close()


def run_session(s, cli, low_memory):
    """The phases of a session, in order (see train)."""
    if cli.resume:
        s.ckpt, s.resume_path = read_training_checkpoint(cli.resume)
    settings = resolve_settings(cli, s.ckpt["args"] if s.ckpt else None)
    s.args, s.sources, s.notes = settings.args, settings.sources, settings.notes
    if low_memory is not None:  # what was applied before any tensor existed
        s.args.low_memory, s.sources["low_memory"] = low_memory
    s.spec = data.get_dataset(s.args.dataset)

    autocast, scaler = setup_device(s)
    model = setup_model(s)
    setup_data(s)
    setup_optimization(s, model, autocast, scaler)
    restore_state(s)
    setup_run_folder(s)
    print_banner(s)

    session_start = time.time()
    run_epochs(s)
    print_summary(s, session_start)
    return s.out_dir


def apply_process_settings(cli):
    """Process-wide memory settings (neuron.apply_memory_policy), decided and applied
    once, before the first tensor exists: PyTorch reads its huge-page setting at its
    first CPU allocation, and even reading a resumed checkpoint allocates. A resumed
    run's saved --low-memory comes from args.json in its run folder (plain JSON).
    Returns (--low-memory, the layer it came from) for the settings table."""
    layers = settings_layers(cli, saved_settings(cli.resume))
    value, source = next((layer["low_memory"], name) for name, layer in reversed(layers)
                         if "low_memory" in layer)
    on_cpu = not wants_cuda(cli.device or DEFAULTS["device"])
    apply_memory_policy(return_freed_memory=bool(value) and on_cpu)  # freed memory back: CPU runs only
    return value, source


PEER_GONE = "Connection closed by peer"  # gloo's words when another process has died


def main(argv=None):
    """Command-line entry: problems the user can fix are printed as one message
    (exit code 2), not as a traceback."""
    try:
        cli = parse_args(argv)
        return train(cli, apply_process_settings(cli))
    except (DataError, TrainError) as e:
        message = str(e)
        # An error raised in a DataLoader worker arrives wrapped in the worker's
        # traceback; its last line is the message.
        if "Traceback" in message:
            message = message.strip().splitlines()[-1].split(": ", 1)[-1]
        # Every process prints its own errors (with DDP prefixed by its rank: torchrun
        # shows only exit codes); an error all processes share is printed by rank 0 alone.
        rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
        if rank == 0 or not getattr(e, "shared", False):
            print(f"{f'rank {rank}: ' if world > 1 else ''}error: {message}", file=sys.stderr, flush=True)
        raise SystemExit(2)
    except RuntimeError as e:
        # Another process died (its error is printed above, with its rank) or hung past
        # --dist-timeout: this process says so in one line instead of a traceback. (gloo
        # reports a peer that is gone as a plain RuntimeError.)
        if not (isinstance(e, dist.DistError) or PEER_GONE in str(e)):
            raise
        rank = int(os.environ.get("RANK", "0"))
        print(f"rank {rank}: error: stopped because another process failed or did not answer within "
              f"--dist-timeout (see its message above): {str(e).strip().splitlines()[0]}",
              file=sys.stderr, flush=True)
        raise SystemExit(2)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
