"""Settings of a training run: train.py's wing for its recipes and its command line.

train.py holds the training loop of QKFormer (Zhou et al., "QKFormer: Hierarchical Spiking
Transformer using Q-K Attention", NeurIPS 2024); this file holds what decides its settings:

  * the recipes. The official recipe of each dataset is part of its description in data.py
    (data.DATASETS[name].recipe: timm's cifar10.yml / cifar100.yml, the MAE-style ImageNet
    fine-tuning, the official CIFAR10-DVS and DVS128 Gesture scripts); here are this project's
    own, --recipe cpu and --recipe lab, and the defaults of all datasets;
  * the command line (build_parser, parse_args), every option's default None, so that what
    the user typed can be told apart from the layers below it;
  * the layers, each overriding the one before: defaults < the dataset's recipe < the official
    run of its model where that differs (OFFICIAL_RUNS) < --recipe cpu/lab < a resumed run's saved
    settings < the command line (resolve_settings), the effective batch (derive_accumulation), the checks
    of the result (check_args), the table printed at the start (settings_table), and the
    model options over a --model preset (model_overrides);
  * the settings decided before any tensor exists (--low-memory: apply_process_settings);
  * a session (Session: what train.main sets up, phase by phase, for its epoch loop), its
    processes (setup_distributed: one per GPU under torchrun), its device settings (--amp,
    --tf32, --sync-bn: setup_device) and the banner that says what the run is (print_banner).
"""
import argparse
import contextlib
import dataclasses
import datetime
import json
import math
import os
import textwrap

import torch
import torch.distributed as dist
import torch.nn as nn

import data
import data_events                         # registers the event-camera datasets in data.DATASETS
from neuron import NEURONS
from neuron_fast import (MAX_COMPILED_STEPS, add_device_arguments, apply_device_settings, apply_memory_policy,
                         autocast_dtype, get_backend)
from qkformer import count_parameters
from train_guards import TrainError


# ----------------------------------------------------------------------------
# Recipes and defaults. The official recipe of each dataset is part of its description in
# data.py (data.DATASETS[name].recipe); what follows are training choices of this project.
# ----------------------------------------------------------------------------

# --recipe cpu: what changes from the dataset's recipe for a run of under 30 minutes on
# a 2-core CPU. Its length is a time, not a number of epochs: the same epoch took 188 s on
# one 2-core machine and 115 s on another (README), so a new run times itself and trains the
# epochs that fit 28 minutes (--minutes, train_budget.py: 2 minutes left for the machine's
# speed to vary), its warm-up a 32nd of them; the epochs=9 below are what the warm-up share is
# counted from, and what several processes (torchrun) train, which do not time themselves.
# It trades the paper's accuracy for time:
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
    minutes=28,                  # as many epochs as fit 28 minutes on this CPU (train_budget.py)
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
LAB_RECIPE = dict(CPU_RECIPE, minutes=None, epochs=2, subset=35000, warmup_epochs=0.1, crop_padding=4,
                  flip_test=False)   # minutes=None: its two epochs are what the labs measured


RECIPES = {"cpu": CPU_RECIPE, "lab": LAB_RECIPE}


# The official run of a model where it departs from its dataset's recipe (a layer of settings
# between the two: settings_layers). The released ImageNet models were trained on 8 GPUs with
# the batch their logs record (imagenet/logs/QKFormer_*.txt of the official repository):
#   QKFormer_16M.txt (imagenet_10_384) and QKFormer_29M.txt (imagenet_10_512): batch_size=32,
#     accum_iter=2, world_size=8, "effective batch size: 512", "actual lr: 1.20e-03": the
#     ImageNet recipe itself (data.IMAGENET_RECIPE);
#   QKFormer_64M.txt (imagenet_10_768): batch_size=24, accum_iter=3, world_size=8,
#     "effective batch size: 576", "actual lr: 1.35e-03" (6e-4 x 576 / 256): below.
# The effective batch is what is kept on any number of processes (derive_accumulation).
OFFICIAL_RUNS = {
    ("imagenet", "imagenet_10_768"): dict(batch_size=24, effective_batch=576),
}


# Settings with no recipe dependence.
DEFAULTS = dict(
    dataset="cifar10", recipe=None, data_dir="./data", download=True, output=None, resume=None,
    device="auto", seed=0, workers=None, amp="off", sync_bn=False, low_memory=True, tf32=True,
    dist_timeout=15, save_every=10, minutes=None,
    subset=None, test_subset=None, eval_batch_size=None, stop_after=None, effective_batch=None,
    mixup_prob=1.0, dvs_split=None, cache_dir=None,
    embed_dim=None, depths=None, num_heads=None, mlp_ratio=None, attention=None, neuron=None, tau=None,
    speds=None, flip_test=False,
)


# Options that belong to one invocation: never taken over from a resumed run.
# (--device too: a run may continue on another machine.)
PER_INVOCATION = ("resume", "stop_after", "output", "device", "dist_timeout")


# The layers of settings, later ones winning: the names the settings table shows.
RESUMED, TYPED = "resumed run", "command line"


# ----------------------------------------------------------------------------
# The command line: every default None, so that what the user typed shows
# ----------------------------------------------------------------------------

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
                       + [describe(f"{d} with --model {m}", r) for (d, m), r in OFFICIAL_RUNS.items()]
                       + [describe(f"--recipe {name}", r) for name, r in RECIPES.items()]
                       + [describe("all datasets", DEFAULTS)]
                       + textwrap.wrap("precedence (a table of the effective settings is printed at "
                                       "start): defaults < the dataset's recipe < its model's official run "
                                       "(OFFICIAL_RUNS) < --recipe cpu/lab < a "
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
    g.add_argument("--dvs-split", choices=list(data_events.DVS_SPLITS), help="CIFAR10-DVS train/test split: "
                   "official (per class the first 90%% of the recordings in sorted file order train, "
                   "the rest test, as the official code) or random (per class, seed 0)")
    g.add_argument("--cache-dir", help="event data: where the frame cache goes (default: beside the "
                   "recordings in --data-dir; give another folder when that one is read-only or full)")
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
    g.add_argument("--minutes", type=float, help="a new run: train as many epochs as fit MINUTES on "
                   "this machine, with their evaluations, timed on a copy of the model before the first "
                   "epoch; the count is printed and stored as --epochs (--recipe cpu: 28; --epochs given "
                   "wins; see train_budget.py)")
    g.add_argument("--cooldown-epochs", type=int, help="epochs at min-lr after the schedule (CIFAR "
                   "recipe: 10, as timm added them; 0 when --epochs is given)")
    g.add_argument("--batch-size", type=int, help="images per process per step")
    g.add_argument("--accum-iter", type=int, help="steps whose gradients are summed before each update; "
                   "effective batch (images per update) = --batch-size x --accum-iter x processes")
    g.add_argument("--effective-batch", type=int, help="images per update over all processes, kept "
                   "whatever their number: --accum-iter = this / (--batch-size x processes), unless "
                   "--accum-iter is given (ImageNet recipe: 512 as the official logs record, 576 for "
                   "imagenet_10_768)")
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
    g.add_argument("--save-every", type=float, metavar="MINUTES",
                   help="write last.pt in the middle of an epoch once MINUTES of it have passed since the "
                        "last checkpoint (default 10; 0: at the end of epochs only). An epoch shorter than "
                        "that is never cut; a long one loses at most that much to a kill that no signal "
                        "announces (SIGKILL, a power cut). SIGINT (Ctrl-C) and SIGTERM always write it: "
                        "the run stops after the step in progress and --resume continues from there")
    g.add_argument("--eval-every", type=int, help="evaluate every N epochs (and after the last)")
    g.add_argument("--flip-test", action=argparse.BooleanOptionalAction, help="test-time flips: "
                   "average the logits of each test image and its mirror image (qkformer.predict)")
    g.add_argument("--eval-batch-size", type=int, help="batch size of the evaluation (default: --batch-size)")
    add_device_arguments(g, defaults=False)    # --device, --amp, --tf32: their defaults come from DEFAULTS
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


# ----------------------------------------------------------------------------
# The layers of settings, resolved and checked
# ----------------------------------------------------------------------------

@dataclasses.dataclass
class Settings:
    """The settings of a run (args), where each came from (sources: option -> layer name)
    and what was changed on the way that the user did not ask for in so many words (notes)."""
    args: argparse.Namespace
    sources: dict
    notes: list


def settings_layers(cli, saved=None):
    """The layers of settings as (name, dict), lowest priority first: DEFAULTS, the
    dataset's recipe, the official run of the chosen model where it differs (OFFICIAL_RUNS),
    --recipe cpu/lab, the resumed run's saved settings, the command line."""
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
    model = typed.get("model", saved.get("model", layers[-1][1].get("model", dataset.recipe["model"])))
    if (dataset.name, model) in OFFICIAL_RUNS:  # just above the dataset's recipe
        layers.insert(2, (f"{model} official run", OFFICIAL_RUNS[dataset.name, model]))
    return layers + [(RESUMED, saved), (TYPED, typed)]


def resolve_settings(cli, saved=None, world=1):
    """Fill every option from the layers (see settings_layers), the later winning; note what
    --epochs given alone rescales; derive --accum-iter for `world` processes (derive_accumulation)."""
    layers = settings_layers(cli, saved)
    merged, sources = {}, {}
    for name, layer in layers:
        for key, value in layer.items():
            merged[key], sources[key] = value, name
    notes = []
    typed, saved = layers[-1][1], layers[-2][1]
    check_resumed_model(typed, saved)
    if "epochs" in typed and "epochs" not in saved:
        notes = rescale_to_epochs(merged, sources, layers, typed)
    notes += derive_accumulation(merged, sources, [name for name, _ in layers], world)
    args = argparse.Namespace(**{k: merged.get(k) for k in set(merged) | set(vars(cli))})
    for key in vars(args):
        sources.setdefault(key, "default")
    check_args(args)
    return Settings(args, sources, notes)


def check_resumed_model(typed, saved):
    """A resume continues the run's own model: a --model naming another preset is refused,
    naming both (built, it would mix the new preset with the run's saved sizes, and fail with a
    message about those, or build another model than the checkpoint's)."""
    if saved.get("model") is not None and typed.get("model", saved["model"]) != saved["model"]:
        raise TrainError(f"--model {typed['model']} given, but the resumed run trains --model "
                         f"{saved['model']}: a resume continues its own model; drop --model "
                         f"{typed['model']}, or start a new run (without --resume) to train it")


def rescale_to_epochs(merged, sources, layers, typed):
    """--epochs N alone rescales the recipe: its warm-up keeps its share of the
    schedule (CIFAR: 20 of 400 epochs, 5 %), and its cool-down, which belongs to its
    length, is dropped (--epochs 5 trains 5 epochs). Returns a note saying so."""
    recipe_epochs = merged_without(layers, "epochs")
    done = []
    if "warmup_epochs" not in typed:
        before = merged_without(layers, "warmup_epochs")
        merged["warmup_epochs"] = warmup_share(before, typed["epochs"], recipe_epochs)
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


def warmup_share(warmup, epochs, recipe_epochs):
    """The warm-up of a schedule of `epochs` that keeps its share of the recipe's (--epochs given
    alone, and the count --minutes chose: train_budget.fit_epochs). One expression for both, so
    that a timed run and a run of --epochs N get the same float, bit for bit."""
    return warmup * epochs / recipe_epochs


def derive_accumulation(merged, sources, order, world):
    """The effective batch, the images of one update, is --batch-size x --accum-iter x processes
    (DDP averages the processes' gradients, accumulation sums accum_iter steps). A recipe that
    names it (effective_batch: the ImageNet recipe, as the official logs record it) keeps it on
    any number of processes: accum_iter = effective_batch / (batch_size x world), the nearest
    whole number (at least 1), said in a note when it cannot be met exactly. An --accum-iter from
    a higher layer than the effective batch's (typed, say) wins, and the effective batch follows.
    merged["effective_batch"] becomes the one trained with, which a resumed run keeps.
    order: the layer names, lowest first. Returns notes."""
    target, batch, accum = merged.get("effective_batch"), merged.get("batch_size"), merged.get("accum_iter")
    if target is None or not all(isinstance(v, int) and v >= 1 for v in (target, batch)):
        return []  # nothing to derive (check_args reports bad values)
    source = sources["effective_batch"]
    derived = accum is None or order.index(source) >= order.index(sources["accum_iter"])
    if derived:
        accum = max(1, round(target / (batch * world)))
        merged["accum_iter"] = accum
        sources["accum_iter"] = f"effective batch {target} / ({batch} x {world} processes)"
    if not isinstance(accum, int) or accum < 1:
        return []
    merged["effective_batch"] = done = batch * accum * world
    if done == target:
        return []
    sources["effective_batch"] = f"{batch} x {accum} accumulated x {world} processes"
    if not derived:
        why = f"--accum-iter {accum} comes from the {sources['accum_iter']}"
    else:
        why = f"{target} is not a multiple of {batch} x {world} processes"
        exact = [b for b in range(batch, 0, -1) if target % (b * world) == 0]
        why += f"; --batch-size {exact[0]} meets it" if exact else ""
    return [f"note: effective batch {done} ({batch} per process x {accum} accumulated x {world} processes) "
            f"instead of the {source}'s {target}: {why}. A learning rate from --blr follows it "
            f"(blr x effective batch / 256); one given as --lr does not"]


def merged_without(layers, key):
    """The value of `key` from all layers but the last (the command line)."""
    value = None
    for _, layer in layers[:-1]:
        value = layer.get(key, value)
    return value


def resolve_args(cli, saved=None, world=1):
    """The settings of a run of `world` processes alone (see resolve_settings)."""
    return resolve_settings(cli, saved, world).args


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
    layers = " < ".join(["default", f"{args.dataset} recipe", "its model's official run",
                         f"--recipe {args.recipe or 'cpu/lab'}", RESUMED, TYPED])
    return [f"settings (each from the last layer that sets it: {layers}):"] + rows


def check_args(a):
    def need(ok, message):
        if not ok:
            raise TrainError(message)
    v = a.effective_batch
    need(v is None or isinstance(v, int) and v >= 1, f"--effective-batch must be a positive integer, got {v}")
    for name in ("epochs", "batch_size", "accum_iter", "eval_every"):
        need(isinstance(getattr(a, name), int) and getattr(a, name) >= 1,
             f"--{name.replace('_', '-')} must be a positive integer, got {getattr(a, name)}")
    for name in ("subset", "test_subset", "stop_after", "eval_batch_size"):
        v = getattr(a, name)
        need(v is None or v >= 1, f"--{name.replace('_', '-')} must be a positive integer, got {v}")
    need(a.workers is None or a.workers >= 0, f"--workers must be >= 0, got {a.workers}")
    need(a.cooldown_epochs >= 0, "--cooldown-epochs must be >= 0")
    need(a.minutes is None or (math.isfinite(a.minutes) and a.minutes > 0),
         f"--minutes must be a positive number, got {a.minutes}")
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
    need(math.isfinite(a.save_every) and a.save_every >= 0, f"--save-every must be >= 0 minutes, got {a.save_every}")
    # numpy's generator takes seeds in [0, 2**32); the run seeds it with seed + 1000 * epoch + rank
    need(0 <= a.seed < 2 ** 31, f"--seed must be an integer from 0 to {2 ** 31 - 1}, got {a.seed}")


# The options that change the model of a --model preset (qkformer.PRESETS): the paper's
# ablations (--attention: Table 6, --neuron if: Table 7, --no-speds: Table 5) and sizes.
MODEL_OVERRIDES = ("embed_dim", "depths", "num_heads", "mlp_ratio", "attention", "neuron", "tau",
                   "speds")


def model_overrides(args) -> dict:
    """The settings of qkformer.create_model that the options give (besides --model)."""
    overrides = {k: getattr(args, k) for k in MODEL_OVERRIDES if getattr(args, k) is not None}
    if "attention" in overrides:  # "token,token,ssa" on the command line: one kind per stage
        overrides["attention"] = tuple(a.strip() for a in overrides["attention"].split(","))
    return dict(overrides, T=args.T, img_size=args.img_size)


# ----------------------------------------------------------------------------
# Before the first tensor: the settings of the process
# ----------------------------------------------------------------------------

def wants_cuda(device_arg):
    """Whether --device asks for a GPU (auto: when one is present). Creates no tensor."""
    return device_arg == "auto" and torch.cuda.is_available() or device_arg.startswith("cuda")


def dist_timeout(cli):
    """--dist-timeout in minutes, checked now: the process group is made (with it) before the
    settings are resolved and checked as a whole (check_args)."""
    timeout = cli.dist_timeout if cli.dist_timeout is not None else DEFAULTS["dist_timeout"]
    if not timeout > 0:
        raise TrainError("--dist-timeout must be a positive number of minutes")
    return timeout


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


# ----------------------------------------------------------------------------
# A session: its processes, its device, its banner
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
    ctx: object = None                # what train_one_epoch needs (train.StepContext)
    train_loader: object = None
    eval_loader: object = None
    mixup: data.Mixup = None
    updates_per_epoch: int = 0
    effective_batch: int = 0
    start_epoch: int = 0
    best_top1: float = None
    out_dir: str = None
    unlogged: dict = None             # a resumed epoch to finish first (train_guards.unlogged_epoch)
    kernels_ready: bool = False       # compiled already (train_budget.fit_epochs timed the steps)

    def say(self, *a, **k):
        if self.rank == 0:  # one process speaks for all
            print(*a, **k)

    @property
    def total_epochs(self):
        return self.args.epochs + self.args.cooldown_epochs

    @property
    def log_path(self):
        return os.path.join(self.out_dir, "log.jsonl")


def setup_distributed(device_arg, timeout_min=DEFAULTS["dist_timeout"]):
    """(rank, world_size, device). torchrun sets RANK, WORLD_SIZE and LOCAL_RANK;
    without them this is one process. NCCL talks between GPUs, gloo between CPU processes.
    timeout_min: how long a collective waits for a process that hangs or died (--dist-timeout)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    want_cuda = wants_cuda(device_arg)
    if want_cuda and not torch.cuda.is_available():
        raise TrainError(f"--device {device_arg}, but PyTorch sees no CUDA GPU; use --device cpu")
    if want_cuda:  # one GPU per process: torchrun's LOCAL_RANK picks it
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
    if args.warmup_epochs > 0 and args.warmup_lr > args.lr:   # a warm-up from above: a typo, most likely
        say(f"warning: --warmup-lr {args.warmup_lr:g} is above the peak learning rate {args.lr:.3g}: the "
            f"warm-up starts higher than the peak and comes down to it; give a --warmup-lr below --lr")
    if s.device.type == "cpu" and args.recipe is None and args.model != "tiny" and not args.subset:
        say("note: this is the paper's full-size recipe, meant for GPUs; on a CPU an epoch takes hours. "
            + ("For a run that learns on a laptop in about 30 minutes: --recipe cpu" if s.spec.small else
               "For a quick look on a CPU: --subset, a small --T and a narrow model (--embed-dim 32)"))
    if s.start_epoch >= s.total_epochs and s.unlogged is None:
        say(f"this run is already complete ({s.total_epochs} epochs); give a larger --epochs to train on")
    elif get_backend() != "eager" and args.T <= MAX_COMPILED_STEPS and not s.kernels_ready:
        say("compiling kernels (once, about a minute): torch.compile fuses the neurons' loops on the first "
            "step, and again on the first evaluation; the progress bar waits at 0 until then")
