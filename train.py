"""Train QKFormer on CIFAR-10, CIFAR-100 or ImageNet-1K, on one CPU or on many GPUs.

Reference: Zhou et al., "QKFormer: Hierarchical Spiking Transformer using Q-K
Attention", NeurIPS 2024. The per-dataset defaults below are the official
training recipes: for CIFAR timm's train.py with the official cifar10.yml /
cifar100.yml, for ImageNet the official MAE-style fine-tuning script. Where
this script differs from them it says so next to the setting.

    python train.py --dataset cifar10                  # the paper's CIFAR-10 recipe (downloads the data)
    python train.py --dataset cifar10 --recipe cpu     # about 30 minutes on a 2-core CPU
    python train.py --resume runs/<run>/last.pt        # continue a run where it stopped
    torchrun --nproc_per_node=8 train.py --dataset imagenet --data-dir /data/imagenet

Every epoch: a progress bar with loss, learning rate and images/s; top-1/top-5
accuracy on the test set; a line in <run>/log.jsonl; the curves redrawn in
<run>/curves.png; <run>/last.pt overwritten atomically (and <run>/best.pt
when top-1 improves). A run can be split into sessions (--stop-after,
--resume) and, on the CPU, gives bit for bit the parameters of an
uninterrupted run.

Distributed data parallel (DDP): torchrun starts one process per GPU (or
several on a CPU, with the gloo backend); each process sees its own share of
every epoch (DistributedSampler) and DDP averages the gradients, so N
processes with --batch-size B train like one process with batch N*B (except
batch norm, whose statistics stay per process unless --sync-bn).

Layout, top to bottom: recipes and arguments; distributed set-up and random
state; model, optimizer and schedule; one epoch of training; evaluation;
checkpoints, log and plot; the main loop.
"""
import argparse
import contextlib
import dataclasses
import datetime
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
from neuron import apply_memory_policy
from qkformer import count_parameters, create_model, load_checkpoint, save_checkpoint


class TrainError(Exception):
    """A problem the user can fix (bad option, unusable checkpoint, diverged run); the message says how."""


# ----------------------------------------------------------------------------
# Recipes: the defaults of every dataset
# ----------------------------------------------------------------------------

# The official recipe of each dataset lives in its description (data.DATASETS[name].recipe).
RECIPES = {name: spec.recipe for name, spec in data.DATASETS.items()}

# --recipe cpu: what changes from the dataset's recipe for a 30-minute run on a
# 2-core CPU. It trades the paper's accuracy for time: a model 6x narrower
# (D=64) with 4 blocks, T=2 instead of 4 (each time step costs a full forward
# pass; T=1 learned clearly worse in our trials), 7 epochs on a short cosine
# with a higher learning rate and small batches (more updates per image), and
# light augmentation (crop and flip only: in so few epochs the model underfits,
# and RandAugment, erasing and mixup would only slow its learning further).
CPU_RECIPE = dict(
    model="tiny", embed_dim=64, depths=4, T=2,   # widths 16/32/64, blocks 1/1/2, 2 time steps
    epochs=7, cooldown_epochs=0, batch_size=32,
    lr=8e-3, blr=None, min_lr=1e-5, weight_decay=0.05,
    warmup_epochs=0.25, warmup_lr=1e-5, warmup_prefix=True,
    mixup=0.0, cutmix=0.0, aa="none", reprob=0.0, crop_padding=4,
    eval_every=1000,             # evaluate once, at the end (evaluation costs CPU time too)
    low_memory=False,            # a small model's activations fit anyway; see --low-memory
)

# Settings with no recipe dependence.
DEFAULTS = dict(
    dataset="cifar10", recipe=None, data_dir="./data", download=True, output=None,
    device="auto", seed=0, workers=None, amp="off", sync_bn=False, low_memory=True,
    subset=None, test_subset=None, eval_batch_size=None, stop_after=None,
    embed_dim=None, depths=None, num_heads=None, mlp_ratio=None, attention=None, neuron=None,
)

# Options that belong to one invocation: never taken over from a checkpoint.
PER_INVOCATION = ("resume", "stop_after", "output")


def parse_args(argv=None):
    """Command-line options. Every default is None here, so that what the user
    typed can be told apart from defaults (see resolve_args)."""
    def describe(title, recipe):
        return textwrap.fill(", ".join(f"{k}={v}" for k, v in recipe.items()), 100,
                             initial_indent=f"  {title}: ", subsequent_indent="    ")

    epilog = "\n".join(["defaults of each dataset (the official recipes), then what --recipe cpu changes:"]
                       + [describe(name, recipe) for name, recipe in RECIPES.items()]
                       + [describe("--recipe cpu", CPU_RECIPE), describe("all datasets", DEFAULTS)])
    p = argparse.ArgumentParser(
        description="Train QKFormer (Zhou et al., NeurIPS 2024). Defaults are the official recipe of "
                    "the chosen dataset (listed below); any of them can be overridden.",
        epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter, argument_default=None)
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=list(data.DATASETS), help="default cifar10")
    g.add_argument("--data-dir", help="folder with cifar-10-batches-py/, cifar-100-python/ or "
                   "ImageNet's train/ and val/ (default ./data)")
    g.add_argument("--download", action=argparse.BooleanOptionalAction,
                   help="download CIFAR when it is missing (default on)")
    g.add_argument("--subset", type=int, help="train on the first N training images only (quick runs)")
    g.add_argument("--test-subset", type=int, help="evaluate on N evenly spaced test images only")
    g.add_argument("--workers", type=int, help="DataLoader worker processes per process "
                   "(default: 0 on a CPU, min(8, cores per GPU) on GPUs)")
    g = p.add_argument_group("recipe")
    g.add_argument("--recipe", choices=["cpu"], help="'cpu': a small model and short schedule that "
                   "trains CIFAR in about 30 minutes on a 2-core CPU")
    g.add_argument("--model", help="model preset of qkformer.py (tiny, cifar10, cifar100, imagenet_10_384, ...)")
    g.add_argument("--T", type=int, help="time steps of the spiking neurons")
    g.add_argument("--img-size", type=int, help="image size (ImageNet: crop size)")
    g.add_argument("--embed-dim", type=int, help="override the preset's width D")
    g.add_argument("--depths", type=int, help="override the preset's number of blocks")
    g.add_argument("--num-heads", type=int, help="override the preset's attention heads")
    g.add_argument("--mlp-ratio", type=float, help="override the preset's MLP ratio")
    g.add_argument("--attention", help="attention of the three stages, comma-separated: token (QKTA), "
                   "channel (QKCA) or ssa; default token,token,ssa (the paper's ablation: Table 6)")
    g.add_argument("--neuron", choices=["lif", "if"], help="spiking neuron: lif (default) or if, "
                   "integrate-and-fire without leak (the paper's ablation: Table 7)")
    g.add_argument("--epochs", type=int, help="length of the cosine schedule in epochs (given alone, it "
                   "keeps the recipe's warm-up share and drops its cool-down)")
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
    g.add_argument("--mixup-off-epoch", type=int, help="switch mixup/cutmix off from this epoch on (0: never)")
    g.add_argument("--aa", help="RandAugment policy, e.g. rand-m9-n1-mstd0.4-inc1, or 'none'")
    g.add_argument("--reprob", type=float, help="random erasing probability")
    g.add_argument("--remode", choices=["const", "rand", "pixel"], help="random erasing fill")
    g.add_argument("--crop-padding", type=int, help="CIFAR: pad by this many pixels and crop back (0: off)")
    g.add_argument("--hflip", type=float, help="horizontal flip probability")
    g = p.add_argument_group("run")
    g.add_argument("--output", help="run folder (default runs/<dataset>-<model>-<time>)")
    g.add_argument("--resume", help="checkpoint (or run folder) to continue from")
    g.add_argument("--stop-after", type=int, help="end this session once N epochs are done; the "
                   "schedule still spans --epochs; continue with --resume")
    g.add_argument("--eval-every", type=int, help="evaluate every N epochs (and after the last)")
    g.add_argument("--eval-batch-size", type=int, help="batch size of the evaluation (default: --batch-size)")
    g.add_argument("--device", help="auto, cpu, cuda or cuda:N (auto: CUDA when present)")
    g.add_argument("--amp", nargs="?", const="auto", choices=["off", "auto", "bf16", "fp16"],
                   help="mixed precision on GPU: --amp alone picks bf16 where supported, else fp16 "
                        "(with a grad scaler)")
    g.add_argument("--low-memory", action=argparse.BooleanOptionalAction,
                   help="CPU: return the memory of freed large tensors (8 MiB and more) to the "
                        "operating system (default on; off in --recipe cpu). Keeps the resident "
                        "memory down (cifar10 model, batch 16, 40 steps: 2.3 GB instead of 2.6 GB, "
                        "at the same speed; see neuron.apply_memory_policy)")
    g.add_argument("--sync-bn", action="store_true", default=None,
                   help="synchronise batch norm across processes (GPUs)")
    g.add_argument("--seed", type=int, help="random seed")
    return p.parse_args(argv)


def resolve_args(cli, saved=None):
    """Fill every option, by priority: command line > the resumed checkpoint's
    options > --recipe cpu > the dataset's recipe > DEFAULTS."""
    saved = {k: v for k, v in (saved or {}).items() if k not in PER_INVOCATION}
    typed = {k: v for k, v in vars(cli).items() if v is not None}
    dataset = typed.get("dataset", saved.get("dataset", DEFAULTS["dataset"]))
    recipe = typed.get("recipe", saved.get("recipe", DEFAULTS["recipe"]))
    layers = [DEFAULTS, RECIPES[dataset]]
    if recipe == "cpu":
        if not data.get_dataset(dataset).small:
            small = " and ".join(s.title for s in data.DATASETS.values() if s.small)
            raise TrainError(f"--recipe cpu is meant for {small}, small enough for a CPU; "
                             f"{data.get_dataset(dataset).title} is not")
        layers.append(CPU_RECIPE)
    layers += [saved, typed]
    merged = {}
    for layer in layers:
        merged.update(layer)
    if "epochs" in typed and "epochs" not in saved:
        # --epochs N rescales the recipe: its warm-up keeps its share of the schedule
        # (CIFAR: 20 of 400 epochs, 5 %), and its cool-down, which belongs to its
        # length, is dropped: --epochs 5 trains 5 epochs.
        recipe_epochs = merged_without(layers, "epochs")
        if "warmup_epochs" not in typed:
            merged["warmup_epochs"] = merged_without(layers, "warmup_epochs") * typed["epochs"] / recipe_epochs
        if "cooldown_epochs" not in typed:
            merged["cooldown_epochs"] = 0
    args = argparse.Namespace(**{k: merged.get(k) for k in set(merged) | set(vars(cli))})
    check_args(args)
    return args


def merged_without(layers, key):
    """The value of `key` from all layers but the last (the command line)."""
    value = None
    for layer in layers[:-1]:
        value = layer.get(key, value)
    return value


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
    need(a.crop_padding >= 0, "--crop-padding must be >= 0")
    need(a.clip_grad is None or a.clip_grad > 0, "--clip-grad must be positive")


# ----------------------------------------------------------------------------
# Distributed set-up, devices and random state
# ----------------------------------------------------------------------------

def setup_distributed(device_arg):
    """(rank, world_size, device). torchrun sets RANK, WORLD_SIZE and LOCAL_RANK;
    without them this is one process. NCCL talks between GPUs, gloo between CPU processes."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    want_cuda = device_arg == "auto" and torch.cuda.is_available() or device_arg.startswith("cuda")
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
        dist.init_process_group("nccl" if want_cuda else "gloo", timeout=datetime.timedelta(minutes=60))
    return rank, world, device


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

MODEL_OVERRIDES = ("embed_dim", "depths", "num_heads", "mlp_ratio", "attention", "neuron")


def model_overrides(args) -> dict:
    """The settings of qkformer.create_model that the options give (besides --model)."""
    overrides = {k: getattr(args, k) for k in MODEL_OVERRIDES if getattr(args, k) is not None}
    if "attention" in overrides:
        overrides["attention"] = tuple(a.strip() for a in overrides["attention"].split(","))
    return dict(overrides, T=args.T, img_size=args.img_size)


def build_model(args, num_classes):
    """The model of the run, initialised from --seed alone (the same on every process)."""
    torch.manual_seed(args.seed)
    try:
        return create_model(args.model, num_classes=num_classes, **model_overrides(args))
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
    return torch.optim.AdamW(groups, lr=args.lr)


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
    """The loss of a step is NaN or infinite: training cannot go on from these weights."""

    def __init__(self, epoch, step, value):
        self.epoch, self.step, self.value = epoch, step, value
        super().__init__(f"the loss became {value} at epoch {epoch + 1}, step {step + 1}")


def train_one_epoch(model, loader, optimizer, scheduler, scaler, criterion, args, epoch, device,
                    mean, std, mixup=None, autocast=contextlib.nullcontext, world=1, show=True):
    """Train over one pass of `loader`; returns the epoch's mean loss, top-1 on the
    (augmented) training batches, images/s and the last learning rate.

    Gradient accumulation: the loss of each of accum_iter consecutive batches is
    divided by accum_iter and back-propagated, the gradients add up, and one
    optimizer update follows. With DDP the gradient all-reduce is skipped
    (no_sync) on all but the last of those batches. Stops with a TrainError,
    before the bad loss reaches the weights, when the loss is NaN or infinite.
    """
    model.train()
    accum = args.accum_iter
    steps = len(loader)
    total_loss, correct, seen, start = 0.0, 0.0, 0, time.time()
    bar = tqdm(loader, desc=f"epoch {epoch + 1}", disable=not show, dynamic_ncols=True, leave=False)
    optimizer.zero_grad(set_to_none=True)
    for i, (images, labels) in enumerate(bar):
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        x = data.normalize(images, mean, std)                     # uint8 -> normalised float
        if args.reprob > 0:
            x = data.random_erasing(x, args.reprob, args.remode)
        targets = labels
        if mixup is not None:
            x, targets = mixup(x, labels)                         # targets (B, classes), soft
        update = (i + 1) % accum == 0 or i + 1 == steps
        no_sync = model.no_sync if world > 1 and not update else contextlib.nullcontext
        with no_sync():
            with autocast():
                logits = model(x)
            loss = criterion(logits.float(), targets)
            mean_loss = reduce_mean(loss.detach(), world).item()
            if not math.isfinite(mean_loss):
                raise NonFiniteLoss(epoch, i, mean_loss)
            scaler.scale(loss / accum).backward()
        if update:
            if args.clip_grad:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
        total_loss += mean_loss
        correct += (logits.argmax(1) == labels).sum().item()
        seen += len(labels)
        if show:
            bar.set_postfix(loss=f"{total_loss / (i + 1):.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}",
                            img_s=f"{seen * world / (time.time() - start):.0f}", refresh=False)
    bar.close()
    elapsed = time.time() - start
    return dict(train_loss=total_loss / max(steps, 1), train_acc1=100.0 * correct / max(seen, 1),
                lr=optimizer.param_groups[0]["lr"], img_per_s=seen * world / elapsed, train_time_s=elapsed)


# ----------------------------------------------------------------------------
# Evaluation (evaluate.py adds firing rates and energy to the same loop)
# ----------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model, loader, device, mean, std, autocast=contextlib.nullcontext, show=True):
    """Mean cross-entropy, top-1 and top-5 accuracy (in %) of `model` over `loader`."""
    model.eval()
    total_loss, top1, top5, n = 0.0, 0, 0, 0
    for images, labels in tqdm(loader, desc="evaluate", disable=not show, dynamic_ncols=True, leave=False):
        x = data.normalize(images.to(device, non_blocking=True), mean, std)
        labels = labels.to(device, non_blocking=True)
        with autocast():
            logits = model(x).float()
        total_loss += nn.functional.cross_entropy(logits, labels, reduction="sum").item()
        best5 = logits.topk(min(5, logits.shape[1]), dim=1).indices   # (B, 5)
        hits = best5 == labels[:, None]                               # (B, 5)
        top1 += hits[:, 0].sum().item()
        top5 += hits.any(dim=1).sum().item()
        n += len(labels)
    return dict(test_loss=total_loss / n, acc1=100.0 * top1 / n, acc5=100.0 * top5 / n)


# ----------------------------------------------------------------------------
# Checkpoints, log and plot
# ----------------------------------------------------------------------------

CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "scaler", "epoch", "rng", "config", "args", "best_acc1")


def read_training_checkpoint(path):
    """A checkpoint written by this script, checked for what a resume needs."""
    if os.path.isdir(path):
        path = os.path.join(path, "last.pt")
    try:
        ckpt = load_checkpoint(path, map_location="cpu")  # weights_only=True: cannot run code
    except ValueError as e:
        raise TrainError(f"cannot resume: {e}") from None
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise TrainError(f"cannot resume from {path}: it is not a checkpoint written by train.py "
                         f"(it lacks {', '.join(missing)}). A file with weights only can be "
                         f"evaluated, not resumed.")
    return ckpt, path


def append_log(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_log(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_curves(records, path):
    """Loss and accuracy per epoch, redrawn from the whole log into a PNG."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no window: works on servers without a display
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in records]
    evals = [r for r in records if r.get("acc1") is not None]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(epochs, [r["train_loss"] for r in records], label="train loss (augmented)")
    if evals:
        ax1.plot([r["epoch"] for r in evals], [r["test_loss"] for r in evals], "o-", label="test loss")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("cross-entropy")
    ax1.legend()
    ax2.plot(epochs, [r["train_acc1"] for r in records], label="train top-1 (augmented)")
    if evals:
        ax2.plot([r["epoch"] for r in evals], [r["acc1"] for r in evals], "o-", label="test top-1")
        ax2.plot([r["epoch"] for r in evals], [r["acc5"] for r in evals], "o-", label="test top-5")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("accuracy (%)")
    ax2.legend()
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------
# The main loop
# ----------------------------------------------------------------------------

def train(cli):
    rank, world, device = setup_distributed(cli.device or DEFAULTS["device"])
    show = rank == 0
    say = print if show else (lambda *a, **k: None)

    ckpt = None
    if cli.resume:
        ckpt, resume_path = read_training_checkpoint(cli.resume)
    args = resolve_args(cli, ckpt["args"] if ckpt else None)
    info = data.dataset_info(args.dataset)

    # Mixed precision: autocast runs matrix products in 16 bits; fp16's narrow
    # range needs the grad scaler (the loss is scaled up so small gradients do
    # not round to zero, and updates with inf/NaN gradients are skipped).
    amp = args.amp
    if amp != "off" and device.type != "cuda":
        say(f"note: --amp {amp} ignored: mixed precision is used on GPUs only")
        amp = "off"
    if amp == "auto":
        amp = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    autocast = (lambda: torch.autocast("cuda", dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fastest conv algorithms (not bit-reproducible)
    elif args.low_memory:
        apply_memory_policy(return_freed_memory=True)  # else each step's activations stay in the process's memory
    if args.sync_bn and device.type != "cuda":
        raise TrainError("--sync-bn needs GPUs: PyTorch's SyncBatchNorm has no CPU implementation. "
                         "Without it each process normalises with its own batch statistics.")

    # The model first: a bad configuration is reported before any data is read.
    model = build_model(args, info["num_classes"])
    if ckpt is not None:
        saved_config = ckpt["config"]
        if saved_config != dataclasses.asdict(model.config):
            diff = {k: (v, saved_config.get(k)) for k, v in dataclasses.asdict(model.config).items()
                    if saved_config.get(k) != v}
            raise TrainError(f"{resume_path} holds another model than this run builds "
                             f"(this run vs checkpoint: {diff}); drop the options that change the "
                             f"model to resume it, or start a new run without --resume")
        try:
            model.load_state_dict(ckpt["model"])
        except RuntimeError as e:
            raise TrainError(f"the weights in {resume_path} do not fit its own model config: "
                             f"{str(e).splitlines()[0]}") from None

    # Data. Rank 0 downloads CIFAR if needed; the others wait for its verdict.
    problem = None
    if rank == 0:
        try:
            data.prepare(args.dataset, args.data_dir, download_missing=args.download)
        except DataError as e:
            problem = str(e)
    (problem,) = from_rank0(world, problem)
    if problem:
        raise DataError(problem)
    train_set, test_set = data.build_datasets(
        args.dataset, args.data_dir, args.img_size, args.crop_padding, args.hflip, args.aa,
        args.subset, args.test_subset, download_missing=False)
    workers = args.workers
    if workers is None:
        # On a CPU the model needs every core and the per-image work is small next
        # to it (about 1 %), so the main process loads. A GPU waits for data unless
        # worker processes prepare the next batches in parallel.
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        workers = 0 if device.type == "cpu" else min(8, max(1, cores // local))
    train_loader = data.make_loader(train_set, args.batch_size, train=True, workers=workers,
                                    seed=args.seed, rank=rank, world_size=world,
                                    pin_memory=device.type == "cuda")
    eval_loader = data.make_loader(test_set, args.eval_batch_size or args.batch_size, train=False,
                                   workers=workers, pin_memory=device.type == "cuda")
    if len(train_loader) == 0:
        raise TrainError(f"{len(train_set)} training images give no full batch of {args.batch_size} "
                         f"per process ({world} processes): lower --batch-size or raise --subset")
    updates_per_epoch = math.ceil(len(train_loader) / args.accum_iter)
    effective_batch = args.batch_size * args.accum_iter * world
    args.lr = peak_lr(args, effective_batch)

    # Optimizer and schedule.
    raw_model = model
    if args.sync_bn and world > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        raw_model = model
    model.to(device)
    if world > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = build_optimizer(raw_model, args)
    scheduler = build_scheduler(optimizer, args, updates_per_epoch)
    criterion = nn.CrossEntropyLoss(label_smoothing=args.smoothing)  # takes class indices or soft targets
    mixup = data.Mixup(args.mixup, args.cutmix, num_classes=info["num_classes"])
    total_epochs = args.epochs + args.cooldown_epochs

    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        start_epoch, best_acc1 = ckpt["epoch"], ckpt["best_acc1"]
        if len(ckpt["rng"]) == world:
            set_rng_state(ckpt["rng"][rank])
        else:
            say(f"note: the checkpoint was written by {len(ckpt['rng'])} processes, this run has "
                f"{world}: random augmentations will differ from an uninterrupted run")
            seed_everything(args.seed + 1000 * start_epoch + rank)
        out_dir = args.output or os.path.dirname(os.path.abspath(resume_path))
    else:
        start_epoch, best_acc1 = 0, None
        seed_everything(args.seed + rank)  # augmentations differ between processes
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        out_dir = args.output or os.path.join("runs", f"{args.dataset}-{args.model}-{stamp}")
    problem = None
    if rank == 0 and ckpt is None and os.path.exists(os.path.join(out_dir, "last.pt")):
        problem = (f"{out_dir} already holds a run (last.pt): continue it with --resume {out_dir}, "
                   f"or choose another --output")
    out_dir, problem = from_rank0(world, out_dir, problem)  # rank 0's time stamp and verdict for all
    if problem:
        raise TrainError(problem)
    log_path = os.path.join(out_dir, "log.jsonl")
    if rank == 0:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "args.json"), "w") as f:
            json.dump(vars(args), f, indent=1)
        # A fresh run starts an empty log; a resumed one forgets the lines of epochs
        # after its checkpoint (written before a kill, and about to be redone).
        records = [r for r in read_log(log_path) if r["epoch"] <= start_epoch] if ckpt else []
        with open(log_path + ".tmp", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        os.replace(log_path + ".tmp", log_path)

    say(f"QKFormer '{args.model}' ({count_parameters(raw_model):,} parameters, T={args.T}) on "
        f"{args.dataset}: {len(train_set):,} training / {len(test_set):,} test images")
    say(f"device {device}{' x ' + str(world) + ' processes' if world > 1 else ''}, "
        f"amp {amp}, {workers} loader workers; run folder {out_dir}")
    say(f"effective batch {effective_batch} = {args.batch_size} per process x {args.accum_iter} "
        f"accumulated x {world} processes; peak lr {args.lr:.3g}; {total_epochs} epochs of "
        f"{updates_per_epoch} updates" + (f"; resuming after epoch {start_epoch}" if ckpt else ""))

    if device.type == "cpu" and args.recipe != "cpu" and args.model != "tiny" and not args.subset:
        say("note: this is the paper's full-size recipe, meant for GPUs; on a CPU an epoch takes hours. "
            "For a run that learns on a laptop in about 30 minutes: --recipe cpu")
    if start_epoch >= total_epochs:
        say(f"this run is already complete ({total_epochs} epochs); give a larger --epochs to train on")
    run_start = time.time()
    for epoch in range(start_epoch, total_epochs):
        train_loader.sampler.set_epoch(epoch)  # a new shuffle each epoch, the same on every process
        try:
            stats = train_one_epoch(model, train_loader, optimizer, scheduler, scaler, criterion, args,
                                    epoch, device, info["mean"], info["std"],
                                    mixup_for_epoch(mixup, args, epoch), autocast, world, show)
        except NonFiniteLoss as e:
            last = os.path.join(out_dir, "last.pt")
            kept = (f"the last good checkpoint, {last} (after epoch {epoch}), is kept"
                    if os.path.exists(last) else "no checkpoint was written yet")
            raise TrainError(f"training stopped: {e}; {kept}. Try a lower --lr (now {args.lr:.3g}), "
                             f"--clip-grad 1.0, or without --amp.") from None
        record = {"epoch": epoch + 1, **stats}
        if (epoch + 1) % args.eval_every == 0 or epoch + 1 == total_epochs:
            if rank == 0:  # the other processes wait in gather_rng_states below
                t = time.time()
                record.update(evaluate(raw_model, eval_loader, device, info["mean"], info["std"],
                                       autocast, show))
                record["eval_time_s"] = time.time() - t
                if best_acc1 is None or record["acc1"] > best_acc1:
                    best_acc1 = record["acc1"]
                    record["best"] = True
        record["best_acc1"] = best_acc1
        # The generator states are taken after the evaluation and before anything
        # else can draw from them, so a resumed run starts from exactly here.
        rngs = gather_rng_states(world)
        if rank == 0:
            line = (f"epoch {epoch + 1}/{total_epochs}: loss {stats['train_loss']:.4f}, "
                    f"lr {stats['lr']:.2e}, {stats['img_per_s']:.0f} img/s, {stats['train_time_s']:.0f} s")
            if "acc1" in record:
                line += f"; test top-1 {record['acc1']:.2f}%, top-5 {record['acc5']:.2f}%"
            say(line)
            append_log(log_path, record)
            checkpoint = {
                "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                "epoch": epoch + 1, "rng": rngs, "config": dataclasses.asdict(raw_model.config),
                "args": vars(args), "best_acc1": best_acc1,
            }
            save_checkpoint(checkpoint, os.path.join(out_dir, "last.pt"))
            if record.get("best"):
                save_checkpoint(checkpoint, os.path.join(out_dir, "best.pt"))
            plot_curves(read_log(log_path), os.path.join(out_dir, "curves.png"))
        if world > 1:
            dist.barrier()  # nobody starts the next epoch before the checkpoint is written
        if args.stop_after and epoch + 1 >= args.stop_after and epoch + 1 < total_epochs:
            say(f"stopping after epoch {epoch + 1} as asked (--stop-after); continue with "
                f"python train.py --resume {os.path.join(out_dir, 'last.pt')}")
            break

    records = read_log(log_path) if rank == 0 else []
    if records:
        train_time = sum(r["train_time_s"] for r in records)
        last = records[-1]
        summary = (f"done in {(time.time() - run_start) / 60:.1f} min this session; "
                   f"training time over the run {train_time / 60:.1f} min")
        if last.get("acc1") is not None:
            summary += f"; final test top-1 {last['acc1']:.2f}%, best {best_acc1:.2f}%"
        say(summary)
        say(f"files: {log_path}, {os.path.join(out_dir, 'curves.png')}, {os.path.join(out_dir, 'last.pt')}")
    return out_dir


def main(argv=None):
    """Command-line entry: problems the user can fix are printed as one message
    (exit code 2), not as a traceback."""
    try:
        cli = parse_args(argv)
        apply_memory_policy(return_freed_memory=False)  # huge pages: before the first tensor exists
        return train(cli)
    except (DataError, TrainError) as e:
        message = str(e)
        # An error raised in a DataLoader worker arrives wrapped in the worker's
        # traceback; its last line is the message.
        if "Traceback" in message:
            message = message.strip().splitlines()[-1].split(": ", 1)[-1]
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
