"""The number of epochs that fits a time budget: train.py's wing for --minutes (--recipe cpu).

QKFormer (Zhou et al., "QKFormer: Hierarchical Spiking Transformer using Q-K Attention",
NeurIPS 2024) is trained here for a fixed number of epochs, as the paper's runs were. A recipe
that promises minutes instead (--recipe cpu: CIFAR-10 in 30 minutes on a laptop) cannot hold
its promise with a fixed count: the same 9 epochs took 28 minutes on one 2-core machine and 18
on another (README, "Training on a CPU"). So a new run with --minutes M first times itself:

  1. a copy of the model, its optimizer and its schedule (the run's own stay untouched) trains
     a few steps on the run's batches, which compiles the kernels (torch.compile, the first
     call), then TIMED_STEPS steps, timed; the copy evaluates a few test batches the same way;
  2. the number of epochs N is the most that fit what is left of the M minutes, with their
     evaluations (epochs_that_fit);
  3. the run then is exactly the run of --epochs N: N is stored in its settings (args.json and
     every checkpoint) and the warm-up scaled as --epochs N given alone scales it
     (train_settings.rescale_to_epochs), so --resume continues it and a new run with
     --epochs N repeats it bit for bit on a CPU (tests/test_budget.py).

The random generators are put back after the timing (torch.random.fork_rng), so the run draws
the same augmentations as one that never timed itself. Only a new run of one process times
itself: a resumed run has its count, --epochs given wins, and under torchrun the recipe's count
is kept (each process would time its own share, and all must agree).
"""
import copy
import dataclasses
import itertools
import math
import time

import torch

from train_guards import Interrupts
from train_settings import RESUMED, TYPED, warmup_share

WARM_STEPS = 10       # untimed: the kernels compile on the first call, the allocator settles
TIMED_STEPS = 150     # timed: about 20 s of a 2-core CPU, 1 % of the 30 minutes
EVAL_BATCHES = 4      # evaluation batches timed (after one untimed)


def epochs_that_fit(seconds_left, epoch_s, eval_s, eval_every=1, cooldown=0):
    """The most epochs N (at least 1) whose training, N + cooldown epochs of epoch_s seconds,
    and evaluations (every eval_every epochs and after the last, eval_s each) take at most
    seconds_left."""
    def cost(n):
        total = n + cooldown
        evaluations = total // eval_every + (total % eval_every != 0)
        return total * epoch_s + evaluations * eval_s
    n = max(1, math.floor(seconds_left / epoch_s) - cooldown)  # an upper bound: training alone
    while n > 1 and cost(n) > seconds_left:
        n -= 1
    return n


class Batches:
    """The first n batches of a loader, as a loader of n batches (train_one_epoch takes its length)."""

    def __init__(self, loader, n):
        self.loader, self.n = loader, min(n, len(loader))

    def __len__(self):
        return self.n

    def __iter__(self):
        return itertools.islice(iter(self.loader), self.n)


def time_steps(s, train_one_epoch, evaluate):
    """(seconds per training step, seconds per test image), timed on a copy of the run's model and
    optimizer (copied together, so that the copied optimizer holds the copied weights) with the
    run's schedule."""
    model, optimizer = copy.deepcopy((s.raw_model, s.ctx.optimizer))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, s.ctx.scheduler.lr_lambdas)
    ctx = dataclasses.replace(s.ctx, model=model, optimizer=optimizer, scheduler=scheduler, show=False,
                              bad_streak=None, interrupts=Interrupts(None))

    def seconds(run, n):  # wall time of run(n), per unit
        start = time.perf_counter()
        run(n)
        return (time.perf_counter() - start) / n

    def train(n):
        s.train_loader.sampler.set_epoch(0)
        train_one_epoch(ctx, Batches(s.train_loader, n), 0)

    def test(n):
        evaluate(model, Batches(s.eval_loader, n), s.device, s.spec.mean, s.spec.std, s.ctx.autocast,
                 show=False, model_input=s.spec.model_input, flip=s.args.flip_test)

    seconds(train, WARM_STEPS)  # the first calls compile: not timed
    step_s = seconds(train, min(TIMED_STEPS, len(s.train_loader)))
    seconds(test, 1)
    batches = min(EVAL_BATCHES, len(s.eval_loader))
    batch_s = seconds(test, batches)
    return step_s, batch_s * batches / min(batches * s.eval_loader.batch_size, len(s.eval_loader.dataset))


def fit_epochs(s, train_one_epoch, evaluate):
    """--minutes M on a new run of one process: time the steps (time_steps), then set --epochs to
    the number that fits (epochs_that_fit) and scale the warm-up as --epochs N given alone does.
    Says what it found; the banner's settings table then shows N and where it came from."""
    args = s.args
    if args.minutes is None or s.sources["epochs"] == RESUMED:
        return
    if s.sources["epochs"] == TYPED:
        s.notes.append(f"note: --epochs {args.epochs} given: --minutes {args.minutes:g} (from the "
                       f"{s.sources['minutes']}) is not used")
        return
    if s.world > 1:
        s.notes.append(f"note: --minutes {args.minutes:g} is timed on one process; under torchrun the "
                       f"{args.epochs} epochs of the {s.sources['epochs']} are kept (give --epochs to choose)")
        return
    start = time.time()
    s.say(f"timing {min(TIMED_STEPS, len(s.train_loader))} training steps and a few test batches to fit --minutes "
          f"{args.minutes:g} (the kernels compile first, about a minute) ...", flush=True)
    with torch.random.fork_rng(devices=[s.device] if s.device.type == "cuda" else []):
        step_s, image_s = time_steps(s, train_one_epoch, evaluate)
    s.kernels_ready = True
    cooldown = args.cooldown_epochs if s.sources["cooldown_epochs"] == TYPED else 0
    epoch_s, eval_s = step_s * len(s.train_loader), image_s * len(s.eval_loader.dataset)
    left = 60 * args.minutes - (time.time() - start)
    n = epochs_that_fit(left, epoch_s, eval_s, args.eval_every, cooldown)
    if s.sources["warmup_epochs"] != TYPED:  # as rescale_to_epochs scales it: a bit-for-bit rerun
        args.warmup_epochs = warmup_share(args.warmup_epochs, n, args.epochs)
        s.sources["warmup_epochs"] = "--minutes: the same share of --epochs"
    args.cooldown_epochs, args.epochs = cooldown, n
    s.sources["epochs"] = f"--minutes {args.minutes:g}: timed"
    short = epoch_s + eval_s > left
    s.say((f"not even one epoch fits in the {max(left, 0):.0f} s left of --minutes {args.minutes:g}, so 1 epoch"
           if short else f"{n} epoch{'s fit' if n > 1 else ' fits'} in --minutes {args.minutes:g}")
          + f": an epoch takes about {epoch_s:.0f} s ({step_s * 1000:.0f} ms a step), an evaluation "
          f"{eval_s:.0f} s, and the timing took {time.time() - start:.0f} s. The run is the one of --epochs {n}: "
          f"stored in its settings, --resume continues it, and a new run with --epochs {n} repeats it")
