"""Guards of a training run: train.py's wing for what can go wrong, and for an exact resume.

train.py holds the training loop of QKFormer (Zhou et al., "QKFormer: Hierarchical Spiking
Transformer using Q-K Attention", NeurIPS 2024); this file holds what a long run needs around
that loop, and a first reading may skip. Nothing is lost and nothing is silent
(tests/test_faults.py makes each fault happen):

  * every problem the user can fix (TrainError, data.DataError) is one line and exit code 2,
    on whichever DDP process it happens (user_errors); what only rank 0 can decide (a
    download, the run folder, a checkpoint written, an evaluation) it decides once, for all
    processes (rank0_decides), so that none waits forever for one that stopped;
  * updates with non-finite losses or gradients are skipped on the device, and a run whose
    steps stay non-finite stops (NonFiniteWatch, NonFiniteLoss); weights with inf/NaN are
    never saved (check_saveable);
  * a run can be split into sessions (--stop-after, --resume) and, on the CPU, gives bit for
    bit the parameters of an uninterrupted run: the random generators of every process, the
    optimizer, the schedule and the grad scaler are saved and put back (restore_state); a run is
    complete when its last epoch's line is in log.jsonl, not when its checkpoint exists: a resume
    first evaluates and logs an epoch whose evaluation was stopped (unlogged_epoch);
  * SIGINT (Ctrl-C) and SIGTERM (what SLURM, Kubernetes and Colab send before they stop a job)
    end the step in progress, write a checkpoint in the middle of the epoch and stop; --save-every
    writes the same checkpoint periodically; a resume continues in the middle of the epoch,
    on the CPU bit for bit as the uninterrupted run (Interrupts, ResumedEpoch);
  * the run folder is locked for the life of the run (<run>/.lock); checkpoints, settings
    and log are written atomically, so that a kill or a full disk keeps the previous file
    (setup_run_folder, write_checkpoint, finish_epoch); a resume writes only where its own run
    is (check_resume_folder) and removes the temporary files of killed writes;
  * options that can only exhaust memory, and data with more classes than the model has
    outputs, are refused before training (check_memory, check_classes).
"""
import contextlib
import dataclasses
import datetime
import errno
import functools
import glob
import itertools
import json
import math
import os
import random
import signal
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

from data import DataError
from data_files import error_line
from pictures import plot_curves
from checkpoints import load_checkpoint, lock_folder, missing_training_keys, output_folder_problem, \
    remove_temporaries, save_checkpoint, training_checkpoint, write_text_atomically


class TrainError(Exception):
    """A problem the user can fix (bad option, unusable checkpoint, diverged run); the message says how."""


# ----------------------------------------------------------------------------
# Errors: one line each, and one verdict for all processes
# ----------------------------------------------------------------------------

def shared_error(cls, message):
    """An error that every process raises alike (rank 0's verdict, from rank0_decides):
    user_errors prints it once, on rank 0, instead of once per process."""
    error = cls(message)
    error.shared = True
    return error


def rank0_decides(s, work, share=False):
    """work() on rank 0 alone; returns its result there (on every process if share).

    A problem work() raises that the user can fix (TrainError, DataError) is sent to every
    process, which all raise it alike. The other processes wait here for rank 0's verdict
    (up to --dist-timeout): so all of them go on, or all stop with the same message, instead
    of some waiting forever in a collective for one that stopped. A problem of another kind
    (a bug) stops rank 0 alone, and the others after --dist-timeout."""
    result, problem = None, None
    if s.rank == 0:
        try:
            result = work()
        except (DataError, TrainError) as e:
            problem = (DataError if isinstance(e, DataError) else TrainError, str(e))
    if s.world > 1:
        shared = [result if share else None, problem]
        dist.broadcast_object_list(shared, src=0)
        result = shared[0] if share else result
        problem = shared[1]
    if problem:
        raise shared_error(*problem)
    return result


# gloo's words (in a plain RuntimeError) when another process has died, or has not answered
# within --dist-timeout (a frozen or unreachable node)
PEER_GONE = ("Connection closed by peer", "Timed out waiting")


@contextlib.contextmanager
def user_errors():
    """main()'s frame: problems the user can fix end as one message (exit code 2), not as a
    traceback, and so does a Ctrl-C that stops at once (exit code 130: before training began, or
    a second one, Interrupts); the DDP process group is closed at the end, however the run ends."""
    try:
        yield
        if dist.is_available() and dist.is_initialized():
            # A run that ended well: all processes close the group together. gloo aborts a
            # process ("terminate called without an active exception") whose peer tears the
            # connection down while its own threads still use it; seen under load.
            dist.barrier()
    except (DataError, TrainError) as e:
        message = error_line(e)  # one line, also for an error raised in a DataLoader worker
        # Every process prints its own errors (with DDP prefixed by its rank: torchrun
        # shows only exit codes); an error all processes share is printed by rank 0 alone.
        rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
        if rank == 0 or not getattr(e, "shared", False):
            print(f"{f'rank {rank}: ' if world > 1 else ''}error: {message}", file=sys.stderr, flush=True)
        raise SystemExit(2)
    except KeyboardInterrupt as e:
        rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
        print(f"{f'rank {rank}: ' if world > 1 else ''}stopped at once (Ctrl-C): "
              f"{e or 'before training began in this session, nothing was lost'}", file=sys.stderr, flush=True)
        raise SystemExit(128 + signal.SIGINT)
    except RuntimeError as e:
        # Another process died (its error is printed above, with its rank) or hung past
        # --dist-timeout: this process says so in one line instead of a traceback. (gloo
        # reports a peer that is gone as a plain RuntimeError.)
        if not (isinstance(e, dist.DistError) or any(words in str(e) for words in PEER_GONE)):
            raise
        rank = int(os.environ.get("RANK", "0"))
        print(f"rank {rank}: error: stopped because another process failed or did not answer within "
              f"--dist-timeout (see its message above): {str(e).strip().splitlines()[0]}",
              file=sys.stderr, flush=True)
        raise SystemExit(2)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


# ----------------------------------------------------------------------------
# Non-finite losses and gradients
# ----------------------------------------------------------------------------

class NonFiniteLoss(TrainError):
    """The loss (or the gradients) stayed NaN or infinite for a whole logging interval:
    training cannot go on from these weights. Their updates were skipped."""

    def __init__(self, epoch, step, count):
        self.epoch, self.step, self.count = epoch, step, count
        super().__init__(f"the loss or the gradients were not finite in {count} steps in a row (up to "
                         f"epoch {epoch + 1}, step {step + 1}); their updates were skipped")


# Statistics stay on the device and are read every LOG_EVERY steps (and at the end of an
# epoch): reading a number from a GPU makes the host wait for all queued work. On a CPU,
# where a read waits for nothing, a progress bar shows them after every step. A run
# whose loss or gradients were non-finite in LOG_EVERY steps in a row (or in every step
# of a shorter epoch) stops with NonFiniteLoss.
LOG_EVERY = 20
# fp16's grad scaler skips an update whose scaled gradients overflow and halves its scale: by
# design, and the steps after it go on (a run's first steps may skip a dozen times while the
# scale settles from 2**16). Such a skip counts as non-finite only once the scale is at most
# SCALE_FLOOR: gradients that overflow unscaled, or are NaN, are not the scale's doing.
SCALE_FLOOR = 1.0


class NonFiniteWatch:
    """The non-finite bookkeeping of one epoch of train.train_one_epoch, all on the device:
    the losses of the current accumulation window, the sum of the finite losses and their
    count (the epoch's mean loss leaves the others out), the updates skipped, and the number
    of non-finite steps in a row (ctx.bad_streak, carried across epochs; a skip of the fp16
    grad scaler that its scale recovers from is not one: SCALE_FLOOR)."""

    def __init__(self, ctx, epoch, steps):
        self.ctx, self.epoch, self.steps = ctx, epoch, steps
        self.every = 1 if ctx.show and ctx.device.type == "cpu" else LOG_EVERY   # host reads
        self.zero = torch.zeros((), device=ctx.device)
        self.total_loss, self.finite_steps, self.skipped, self.window = (self.zero.clone() for _ in range(4))
        if ctx.bad_streak is None:
            ctx.bad_streak = self.zero.clone()

    def window_bad(self, mean_loss):
        """1 (a 0/1 device tensor) if a loss of this accumulation window, this step's
        included, was not finite: the update that ends the window is then skipped."""
        return torch.maximum(self.window, (~torch.isfinite(mean_loss)).float())

    def step(self, i, mean_loss, skip=None):
        """Count step i: its loss (the mean over the processes) and, if it ended with an update,
        whether that update was skipped (skip, 0/1 device tensor). Returns True every
        LOG_EVERY steps (every step on a CPU with a progress bar) and at the end of the
        epoch, after the one host read: the number of
        non-finite steps in a row, which stops the run (NonFiniteLoss) when it reaches
        LOG_EVERY, or the whole epoch when that is shorter."""
        bad = (~torch.isfinite(mean_loss)).float()            # 0/1, on the device
        if skip is None:                                      # inside an accumulation window
            self.window = torch.maximum(self.window, bad)
        else:
            self.skipped += skip
            bad = torch.maximum(bad, self.unrecoverable(skip))
            self.window = self.zero.clone()
        self.ctx.bad_streak = (self.ctx.bad_streak + 1) * bad    # non-finite steps in a row
        self.total_loss += torch.where(bad > 0, self.zero, mean_loss)
        self.finite_steps += 1 - bad
        if (i + 1) % self.every and i + 1 != self.steps:
            return False
        streak = int(self.ctx.bad_streak.item())
        if streak >= min(LOG_EVERY, self.steps):
            raise NonFiniteLoss(self.epoch, i, streak)
        return True

    def unrecoverable(self, skip):
        """skip (0/1 device tensor, an update just skipped), unless the fp16 grad scaler skipped
        it at a scale above SCALE_FLOOR: the scale has halved (update()) and the next steps retry."""
        scaler = self.ctx.scaler
        if not scaler.is_enabled():
            return skip
        scale = scaler._get_scale_async()  # the device tensor, after update(): no host read
        return skip * (scale <= SCALE_FLOOR * scaler.get_backoff_factor()).float()

    def mean_loss(self):
        """The mean of the finite losses so far (NaN if there is none)."""
        finite = self.finite_steps.item()
        return self.total_loss.item() / finite if finite else float("nan")


@contextlib.contextmanager
def stop_if_diverged(s):
    """NonFiniteLoss out of train.train_one_epoch ends the run with a message saying what is
    kept. Every process stops at the same step: the losses and gradients are shared."""
    try:
        yield
    except NonFiniteLoss as e:
        raise shared_error(TrainError, f"training stopped: {e}; {kept_checkpoint(s)}. Try a lower --lr "
                           f"(now {s.args.lr:.3g}), --clip-grad 1.0, or without --amp.") from None


def say_skipped(s, epoch, n):
    """The updates of an epoch skipped for non-finite losses or gradients, if any."""
    if n:
        why = ("the loss or the gradients were not finite, or (fp16) the grad scaler's scale was too high: "
               "it halves at each such skip, by design" if s.ctx.scaler.is_enabled()
               else "the loss or the gradients were not finite")
        s.say(f"note: {n} update{'s' if n > 1 else ''} of epoch {epoch + 1} skipped: {why}")


def non_finite_state(model, optimizer):
    """Names of the parameters, buffers and optimizer states that hold inf or NaN."""
    bad = [name for name, t in model.state_dict().items()
           if t.is_floating_point() and not torch.isfinite(t).all()]
    for i, state in optimizer.state_dict()["state"].items():
        bad += [f"optimizer state {i}.{k}" for k, v in state.items()
                if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]
    return bad


def check_saveable(s, epoch, step=None):
    """Rank 0, after an epoch (or `step` steps into it: Interrupts.save): weights or optimizer state
    that hold inf/NaN are never saved; the run stops with the previous checkpoint kept. (Rank 0's
    weights are the ones saved.)"""
    bad = non_finite_state(s.raw_model, s.ctx.optimizer)
    if bad:
        where = f"after epoch {epoch + 1}" if step is None else f"in epoch {epoch + 1} after step {step}"
        raise TrainError(f"training stopped: {where} the weights or optimizer state hold "
                         f"inf/NaN ({', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}), not saved; "
                         f"{kept_checkpoint(s)}. Try a lower --lr (now {s.args.lr:.3g}) or "
                         f"--clip-grad 1.0.")


# ----------------------------------------------------------------------------
# Exact resume: random generators, checkpoints, optimizer and schedule
# ----------------------------------------------------------------------------

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


def read_training_checkpoint(path, rank=0):
    """A checkpoint written by train.py, checked for what a resume needs, and its path. Where there
    is none, rank 0 removes the unfinished writes that a kill left beside it (unfinished_writes)."""
    if os.path.isdir(path):
        path = os.path.join(path, "last.pt")
    try:
        ckpt = load_checkpoint(path, map_location="cpu")  # weights_only=True: cannot run code
    except ValueError as e:
        raise TrainError(f"cannot resume: {e}{unfinished_writes(path) if rank == 0 else ''}") from None
    missing = missing_training_keys(ckpt)
    if missing:
        raise TrainError(f"cannot resume from {path}: it is not a checkpoint written by train.py "
                         f"(it lacks {', '.join(missing)}). A file with weights only can be "
                         f"evaluated, not resumed.")
    return ckpt, path


def unfinished_writes(path):
    """Rank 0, when the checkpoint to resume, `path`, is missing or unreadable: the temporary files
    that killed writes left in its folder (STALE_TEMPORARY: a kill while the first last.pt was being
    written leaves one as large as a checkpoint, and no last.pt) are removed, unless another train.py
    holds the folder. Returns the words that say so, for the error message ("" if none)."""
    folder = os.path.dirname(os.path.abspath(path))
    if not glob.glob(os.path.join(glob.escape(folder), "*.tmp")):
        return ""
    try:
        lock = lock_run_folder(folder)
        if lock is None:
            return ""  # a train.py is running there: its temporary file is its write in progress
        with lock:
            removed = remove_temporaries(folder, STALE_TEMPORARY)
    except OSError:  # a folder that cannot be written: nothing removed, the error stays as it was
        return ""
    if not removed:
        return ""
    first = " (the run was killed while writing its first checkpoint: start it again without --resume)"
    return (f"; the unfinished write{'s' if len(removed) > 1 else ''} of a killed run, "
            f"{', '.join(removed)}, removed{first if not os.path.exists(path) else ''}")


def load_resumed_weights(s, model):
    """The resumed checkpoint's weights into the model, if it is the same model."""
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


def place_scheduler(scheduler, peak_lr, epoch, updates_per_epoch, updates=0):
    """Put the schedule (train.build_scheduler) at the start of `epoch` (epochs done), or `updates`
    updates into it (a checkpoint of the middle of an epoch), for this run's peak learning rate
    and updates per epoch. The schedule is a function of the training
    progress in epochs (train.lr_at), so a run resumed with another batch size, number of
    processes or --lr follows the same curve from where it stopped. (The saved update count and
    base rates of the scheduler are not used: they count updates of the old batch geometry.)"""
    scheduler.base_lrs = [peak_lr] * len(scheduler.optimizer.param_groups)
    scheduler.last_epoch = epoch * updates_per_epoch + updates
    lr = peak_lr * scheduler.lr_lambdas[0](scheduler.last_epoch)  # as LambdaLR computes it: the same bits
    for group in scheduler.optimizer.param_groups:
        group["initial_lr"], group["lr"] = peak_lr, lr
    scheduler._last_lr = [lr] * len(scheduler.optimizer.param_groups)


def match_state_layouts(optimizer):
    """Give each optimizer state tensor (AdamW's moments) its parameter's memory layout.

    load_state_dict keeps the layout the moments were saved in: channels-last from a run on
    a GPU (train.setup_optimization), contiguous from one on a CPU. The fused AdamW walks a
    parameter and its moments as flat memory, so with two layouts it pairs the wrong elements,
    silently (tests/test_train.py, test_resume_on_another_layout); the foreach one does not."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            for key, value in state.items():
                if torch.is_tensor(value) and value.shape == p.shape and value.stride() != p.stride():
                    state[key] = torch.empty_like(p, dtype=value.dtype).copy_(value)  # p's strides


def restore_state(s):
    """Optimizer, schedule, scaler and random generators: from the resumed checkpoint
    (where it stopped), or seeded afresh (augmentations differ between processes).
    The schedule is placed by the epochs done (place_scheduler), so another batch size,
    number of processes or --lr continues the same curve; the grad scaler's state is
    loaded only when both the checkpoint and this run use one (fp16). A checkpoint of the
    middle of an epoch continues there (resume_mid_epoch)."""
    if s.ckpt is None:
        seed_everything(s.args.seed + s.rank)
        return
    s.ctx.optimizer.load_state_dict(s.ckpt["optimizer"])
    match_state_layouts(s.ctx.optimizer)  # saved on a GPU (channels-last), resumed on a CPU, or back
    s.ctx.scheduler.load_state_dict(s.ckpt["scheduler"])
    s.start_epoch, s.best_top1 = s.ckpt["epoch"], s.ckpt["best_top1"]
    updates = resume_mid_epoch(s) if s.ckpt.get("progress") else 0
    place_scheduler(s.ctx.scheduler, s.args.lr, s.start_epoch, s.updates_per_epoch, updates)
    if s.ckpt["scaler"] and s.ctx.scaler.is_enabled():
        s.ctx.scaler.load_state_dict(s.ckpt["scaler"])
    if len(s.ckpt["rng"]) == s.world:
        set_rng_state(s.ckpt["rng"][s.rank])
    else:
        s.notes.append(f"note: the checkpoint was written by {len(s.ckpt['rng'])} processes, this run "
                       f"has {s.world}: random augmentations will differ from an uninterrupted run")
        seed_everything(s.args.seed + 1000 * s.start_epoch + s.rank)


# ----------------------------------------------------------------------------
# Interruptions: SIGINT, SIGTERM and --save-every, a checkpoint in the middle of an epoch
# ----------------------------------------------------------------------------

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@dataclasses.dataclass
class EpochTally:
    """Where one epoch of train.train_one_epoch stands besides its loss statistics (watch): the
    first step of this session (0, or where a mid-epoch checkpoint stopped), the training images
    seen and those classified right (correct, a device tensor; both this process's own), and the
    seconds of training in earlier sessions (before)."""
    epoch: int
    steps: int
    watch: NonFiniteWatch
    correct: torch.Tensor
    step: int = 0
    seen: int = 0
    before: float = 0.0
    start: float = dataclasses.field(default_factory=time.time)

    def elapsed(self):
        """Seconds of training in this epoch, over all its sessions."""
        return self.before + time.time() - self.start


class Interrupts:
    """SIGINT (Ctrl-C), SIGTERM (what SLURM, Kubernetes and Colab send before they stop a job) and
    --save-every: a checkpoint in the middle of an epoch, from which --resume continues exactly.

    The first signal asks for a stop: the step in progress is finished (with --accum-iter, its
    accumulation window: checkpoints are taken at optimizer updates only), last.pt is written with
    the position in the epoch (save), the run says where it stands and how to continue, and ends
    with exit code 128 + the signal's number: 130 for SIGINT, 143 for SIGTERM (stop). A signal
    during the end of an epoch (its checkpoint, its evaluation) stops after it (between_epochs).
    A second Ctrl-C stops at once: the step in progress, and all since the last checkpoint
    written, are lost. Further SIGTERMs change nothing: a scheduler follows its SIGTERM with a
    SIGKILL when its grace period ends (30 s by default for SLURM, Kubernetes and torchrun), which
    a step and a checkpoint must fit in. --save-every M writes the same checkpoint once M minutes
    of an epoch have passed since the last one: an epoch shorter than M is never cut, and a
    kill that no signal announces (SIGKILL, a power cut) loses at most M minutes.

    train.train_one_epoch calls after_step once per step. With DDP every process takes part in
    the decision at every optimizer update: an all-reduce of two numbers (the signal, if any,
    and whether rank 0's clock says a save is due), so that all stop at the same step whichever
    of them got the signal, and rank 0 writes the one checkpoint. On GPUs it goes through a gloo
    group on the CPU: the host waits for the other processes' hosts, never for a GPU. (Two CPU
    processes on this project's busy 2-core machine took about 1 ms per such all-reduce.)
    Interrupts(None), the default of a bare train.StepContext, does nothing."""

    def __init__(self, s=None):
        self.s, self.signum, self.pid = s, 0, os.getpid()
        self.resumed = None       # the progress of the mid-epoch checkpoint being resumed (resume_mid_epoch)
        self.batches = None       # the iterator of the epoch's batches (loader): release_workers stops it
        self.group = None         # DDP on GPUs: the gloo group of the decisions
        self.last_save = time.monotonic()
        self.saved = "no checkpoint was written yet"
        self.evaluating = 0       # the epoch being evaluated (its last.pt written), else 0 (train.main sets it)
        if s is not None and s.ckpt is not None:
            progress = s.ckpt.get("progress")
            self.saved = (f"in epoch {s.ckpt['epoch'] + 1} after step {progress['step']}" if progress else
                          f"after epoch {s.ckpt['epoch']}")

    def install(self, cleanup):
        """Catch SIGINT and SIGTERM until the run ends (cleanup, an ExitStack, puts the previous
        handlers back). Loader workers ignore both (quiet_worker): the process they serve stops them,
        at the latest when the run ends (release_workers)."""
        s = self.s
        if s.world > 1 and dist.get_backend() != "gloo":
            self.group = dist.new_group(backend="gloo", timeout=datetime.timedelta(minutes=s.args.dist_timeout))
        for loader in (s.train_loader, s.eval_loader):
            loader.worker_init_fn = functools.partial(quiet_worker, loader.worker_init_fn)
        cleanup.callback(self.release_workers)
        try:
            previous = {sig: signal.signal(sig, self.handle) for sig in STOP_SIGNALS}
        except ValueError:  # not the main thread (Python's rule): signals are left to it
            return
        cleanup.callback(lambda: [signal.signal(sig, handler) for sig, handler in previous.items()])
        self.last_save = time.monotonic()

    def release_workers(self):
        """Stop the workers the loaders keep between epochs (the evaluation's), and those of an epoch
        that an error ended (a damaged file read by a worker: the error's traceback keeps its
        iterator, and so its workers, alive until Python's exit): told to stop, they end; at its
        exit Python would instead send them a SIGTERM, which they ignore, and wait for ever."""
        kept = [getattr(loader, "_iterator", None) for loader in (self.s.train_loader, self.s.eval_loader)]
        for batches in kept + [self.batches]:  # (_iterator: where a DataLoader keeps persistent workers)
            if batches is not None and hasattr(batches, "_shutdown_workers"):
                batches._shutdown_workers()

    def handle(self, signum, frame):
        """The signal handler: the first signal asks for a stop, a second SIGINT stops at once."""
        if os.getpid() != self.pid:  # a loader worker forked from this process: not its decision
            return
        evaluating = self.evaluating
        if self.signum and signum == signal.SIGINT:
            lost = f"the evaluation of epoch {evaluating}" if evaluating else "the step in progress"
            again = f", which evaluates epoch {evaluating} first" if evaluating else ""
            raise KeyboardInterrupt(f"{lost} is lost; last.pt holds the run {self.saved}: continue with "
                                    f"python train.py --resume {self.s.out_dir}{again}")
        if not self.signum:
            self.signum = signum
            if self.s.rank == 0:  # written directly: a print could land inside another print
                again = " (Ctrl-C again: stop at once)" if signum == signal.SIGINT else ""
                if evaluating:  # its checkpoint is written: a stop at once loses only the evaluation
                    again = again and " (Ctrl-C again: stop at once; --resume then evaluates it)"
                when = (f"once the evaluation of epoch {evaluating} ends, its last.pt written" if evaluating
                        else "after this step, once last.pt is written")
                os.write(2, f"\n{signal.Signals(signum).name}: the run stops {when}{again}\n".encode())

    def requests(self):
        """(the signal that asked for a stop or 0, whether --save-every is due), the same on every
        process: a signal to any process stops all of them; the time to save is rank 0's."""
        s = self.s
        due = s.rank == 0 and s.args.save_every > 0 and time.monotonic() - self.last_save >= 60 * s.args.save_every
        if s.world == 1:
            return self.signum, due
        flags = torch.tensor([self.signum, int(due)])
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group)
        return int(flags[0]), bool(flags[1])

    def loader(self, loader, epoch):
        """The batches of `epoch` (loader's sampler set to it): all, or in the epoch of a resumed
        mid-epoch checkpoint those it had not trained on (ResumedEpoch); their iterator is kept
        (KeptBatches), for release_workers."""
        if self.resumed is not None and epoch == self.s.start_epoch:
            loader = ResumedEpoch(loader, self.resumed["step"], self.s.ckpt["rng"][self.s.rank])
        return KeptBatches(loader, self)

    def tally(self, epoch, watch):
        """The tally of `epoch` from its start or, in the epoch of a resumed mid-epoch checkpoint,
        from where it stopped: its loss statistics go back into `watch`, the streak of non-finite
        steps into the step context, so that the epoch logs what the uninterrupted run logs."""
        tally = EpochTally(epoch, watch.steps, watch, watch.zero.clone())
        progress, self.resumed = self.resumed, None
        if progress is None:
            return tally
        device = watch.zero.device
        watch.total_loss, watch.finite_steps, watch.skipped = (
            progress[k].to(device) for k in ("total_loss", "finite_steps", "skipped"))
        watch.ctx.bad_streak = progress["bad_streak"].to(device)
        tally.step, tally.correct = progress["step"], progress["correct"].to(device)
        tally.seen, tally.before = progress["seen"], progress["train_time_s"]
        return tally

    def after_step(self, i, update, tally):
        """After step i of train.train_one_epoch (update: it ended with an optimizer update): at an
        update that does not end the epoch (the epoch's own checkpoint follows that one), the
        mid-epoch checkpoint when a signal asked for a stop (then the stop) or --save-every is due."""
        if self.s is None or not update or i + 1 == tally.steps:
            return
        signum, due = self.requests()
        if signum or due:
            self.save(tally, i + 1, announce=not signum)
        if signum:
            self.stop(signum, f"in epoch {tally.epoch + 1} after step {i + 1} of {tally.steps}")

    def save(self, tally, step, announce=False):
        """last.pt `step` steps into an epoch: what an epoch's checkpoint holds, the random generators
        as they are before the next batch draws from them, and where the epoch stands (progress:
        rank 0's tally, the one its log shows)."""
        s, watch = self.s, tally.watch
        rank0_decides(s, lambda: check_saveable(s, tally.epoch, step))
        rngs = gather_rng_states(s.world)
        progress = dict(step=step, steps=tally.steps, batch_size=s.args.batch_size, accum_iter=s.args.accum_iter,
                        world=s.world, total_loss=watch.total_loss.cpu(), finite_steps=watch.finite_steps.cpu(),
                        skipped=watch.skipped.cpu(), bad_streak=s.ctx.bad_streak.cpu(),
                        correct=tally.correct.cpu(), seen=tally.seen, train_time_s=tally.elapsed())
        checkpoint = training_checkpoint(s.raw_model, s.ctx.optimizer, s.ctx.scheduler, s.ctx.scaler, tally.epoch,
                                         rngs, vars(s.args), s.best_top1, progress)
        rank0_decides(s, lambda: write_checkpoint(s, checkpoint, "last.pt"))
        self.last_save, self.saved = time.monotonic(), f"in epoch {tally.epoch + 1} after step {step}"
        if announce and s.rank == 0:
            tqdm.write(f"last.pt written {self.saved} of {tally.steps} (--save-every {s.args.save_every:g})")

    def stop(self, signum, where):
        """The end of a session that a signal stopped: where it stands, how to continue, and the
        exit code 128 + the signal's number, as a shell reports a process the signal ended."""
        if self.s.rank == 0:
            tqdm.write(f"stopped by {signal.Signals(signum).name} {where}: last.pt holds the run as it stands; "
                       f"continue with python train.py --resume {self.s.out_dir}")
        raise SystemExit(128 + signum)

    def between_epochs(self, epoch):
        """After the checkpoint and the evaluation of `epoch`: a stop asked meanwhile (or during the
        epoch's last step) stops here, unless the run is complete."""
        if self.s is None:
            return
        self.last_save, self.evaluating = time.monotonic(), 0  # the epoch's checkpoint was just written
        signum, _ = self.requests()
        if signum and epoch + 1 < self.s.total_epochs:
            self.stop(signum, f"after epoch {epoch + 1}")


def quiet_worker(previous, worker_id):
    """The start of a loader worker: it ignores SIGINT and SIGTERM, which a terminal, SLURM or
    torchrun send to a whole process group. The process it serves stops it when done; a worker
    dying of the signal would instead make PyTorch raise an error in that process, at whatever
    point of its step it is. `previous`: the loader's own worker_init_fn, if any."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if previous is not None:
        previous(worker_id)


def resume_mid_epoch(s):
    """A checkpoint of the middle of an epoch: checked to fit this run (the position is a number of
    batches of this size, per process), its progress kept for the epoch (Interrupts.loader,
    Interrupts.tally). Returns the optimizer updates done in that epoch."""
    p, epoch = s.ckpt["progress"], s.ckpt["epoch"]
    then = (p["steps"], p["batch_size"], p["world"], p["accum_iter"])
    now = (len(s.train_loader), s.args.batch_size, s.world, s.args.accum_iter)
    if then != now:
        raise TrainError(f"{s.resume_path} was written in the middle of epoch {epoch + 1}, after step {p['step']} "
                         f"of {then[0]} (batch {then[1]} per process, {then[2]} processes, --accum-iter {then[3]}); "
                         f"this run has {now[0]} steps of {now[1]} ({now[2]} processes, --accum-iter {now[3]}). "
                         f"Resume it with its own --batch-size, --accum-iter, --subset and number of processes "
                         f"(--stop-after {epoch + 1} ends the session with that epoch, after which they can change)")
    s.ctx.interrupts.resumed = p
    s.notes.append(f"note: resuming in the middle of epoch {epoch + 1}, after step {p['step']} of {p['steps']}")
    if s.train_loader.num_workers:
        s.notes.append(f"note: loader workers draw from random generators of their own, which no checkpoint holds: "
                       f"the augmentations of the rest of epoch {epoch + 1} differ from an uninterrupted run's "
                       f"(with --workers 0 they are the same)")
    return p["step"] // s.args.accum_iter


class SkipSampler(Sampler):
    """The indices of `sampler` without the first `skip`."""

    def __init__(self, sampler, skip):
        self.sampler, self.skip = sampler, skip

    def __iter__(self):
        return itertools.islice(iter(self.sampler), self.skip, None)

    def __len__(self):
        return max(0, len(self.sampler) - self.skip)


def loader_like(loader, sampler):
    """A DataLoader as `loader` (data.make_loader's training loader) over another sampler."""
    options = dict(batch_size=loader.batch_size, num_workers=loader.num_workers, collate_fn=loader.collate_fn,
                   pin_memory=loader.pin_memory, drop_last=loader.drop_last, timeout=loader.timeout,
                   worker_init_fn=loader.worker_init_fn, multiprocessing_context=loader.multiprocessing_context,
                   generator=loader.generator, persistent_workers=False)
    if loader.num_workers:
        options["prefetch_factor"] = loader.prefetch_factor
    return DataLoader(loader.dataset, sampler=sampler, **options)


class ResumedEpoch:
    """The epoch of a mid-epoch checkpoint, from its step `step` on: the epoch's order (the
    loader's sampler, set to the epoch: data.make_loader) without the first `step` batches, which
    are not even read. Its length is the whole epoch's: train_one_epoch counts from `step`.

    Starting a loader draws its workers' seed from the random generator; after that, the
    generators are put back as they were at the stop (rng: this process's). Where the batches
    are prepared in this process (--workers 0, the CPU's default) every random draw from there
    on is then the uninterrupted run's; loader workers draw from generators of their own, which
    no checkpoint holds (resume_mid_epoch says so)."""

    def __init__(self, loader, step, rng):
        self.loader, self.step, self.rng = loader, step, rng

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        batches = iter(loader_like(self.loader, SkipSampler(self.loader.sampler, self.step * self.loader.batch_size)))
        set_rng_state(self.rng)
        return batches  # the DataLoader's own iterator: KeptBatches keeps it


class KeptBatches:
    """An epoch's batches (a DataLoader, a ResumedEpoch) whose iterator is kept in keeper.batches
    (Interrupts), so that release_workers can stop its loader workers."""

    def __init__(self, batches, keeper):
        self.batches, self.keeper = batches, keeper

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        self.keeper.batches = iter(self.batches)
        return self.keeper.batches


# ----------------------------------------------------------------------------
# Memory and classes: refused before training
# ----------------------------------------------------------------------------

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


def check_classes(s, train_set, test_set):
    """The classes of the data must fit the model's outputs."""
    num_classes = s.spec.num_classes
    for name, dataset in (("training", train_set), ("test", test_set)):
        found = class_count(dataset)
        if found is not None and found > num_classes:
            raise TrainError(f"the {name} images of {s.args.data_dir} have {found} classes, but the "
                             f"{s.spec.title} model has {num_classes} outputs: remove the extra class "
                             f"folders (every folder is a class), or point --data-dir at {s.spec.title}")


# ----------------------------------------------------------------------------
# The run folder: its lock, checkpoints, settings and log
# ----------------------------------------------------------------------------

# Temporary files of train.py in a run folder (save_checkpoint, write_atomically,
# plot_curves): unique names; those of a killed run are removed at the next start.
STALE_TEMPORARY = ("last.pt.*.tmp", "best.pt.*.tmp", "log.jsonl.*.tmp", "log.jsonl.tmp", "args.json.*.tmp",
                   "curves.png.*.tmp")


def lock_run_folder(out_dir):
    """Lock the run folder for the life of this process (checkpoints.lock_folder: <run>/.lock,
    which the operating system releases when the process ends). Returns the open lock file
    (close it to let go), or None if another process holds it. Where nothing can lock, the
    run goes on with a one-line note on stderr."""
    return lock_folder(out_dir, "run folder", "train.py")


def claim_run_folder(s, out_dir, cleanup):
    """Rank 0: create and lock the run folder (cleanup, an ExitStack, lets go of the lock at
    the end), check that a new run overwrites nothing, and remove the temporary files of
    killed runs."""
    problem = output_folder_problem(out_dir)  # a file, or a symbolic link to nowhere
    if problem:
        raise TrainError(f"--output {out_dir} {problem}: choose another --output")
    try:
        os.makedirs(out_dir, exist_ok=True)
        if not os.access(out_dir, os.W_OK):
            raise OSError(errno.EACCES, "not writable")
        lock = lock_run_folder(out_dir)
    except OSError as e:
        raise TrainError(f"cannot write to the run folder {out_dir} ({e.strerror or e}): choose a "
                         f"writable --output") from None
    if lock is None:
        raise TrainError(f"another train.py is running in {out_dir} (it holds "
                         f"{os.path.join(out_dir, '.lock')}): wait for it to end, or choose another --output")
    cleanup.callback(lock.close)  # (the operating system releases it too when the process dies)
    if s.ckpt is not None:
        check_resume_folder(s, out_dir)
    elif os.path.exists(os.path.join(out_dir, "last.pt")):
        raise TrainError(f"{out_dir} already holds a run (last.pt): continue it with --resume {out_dir}, "
                         f"or choose another --output")
    remove_temporaries(out_dir, STALE_TEMPORARY)  # nobody else writes here: we hold the lock


def check_resume_folder(s, out_dir):
    """Rank 0, holding the lock of the run folder: a resume writes only where its own run is.
    A folder whose last.pt is not the checkpoint resumed holds another run (--output elsewhere) or
    another state of this one (an older checkpoint of the same folder, say epoch1.pt): resuming
    there would replace its last.pt, args.json and curves and cut its log, so it is refused."""
    last = os.path.join(out_dir, "last.pt")
    if not os.path.exists(last) or os.path.samefile(last, s.resume_path):
        return
    run, where = checkpoint_words(last)
    if not os.path.samefile(os.path.dirname(os.path.abspath(s.resume_path)), out_dir):
        raise TrainError(f"--output {out_dir} holds another run ({run}; its last.pt {where}): resuming "
                         f"{s.resume_path} there would replace it. Continue it in its own folder (leave out "
                         f"--output), or give an --output that holds no run")
    raise TrainError(f"{last} holds this run {where}; resuming {s.resume_path} ({position(s.ckpt)}) in "
                     f"{out_dir} would replace it and cut log.jsonl back. Continue from last.pt with "
                     f"--resume {out_dir}, or resume {os.path.basename(s.resume_path)} into a new folder "
                     f"with --output")


def position(ckpt):
    """Where a training checkpoint stands, in words: "after epoch 3", "in epoch 2 after step 5"."""
    if ckpt.get("progress"):
        return f"in epoch {ckpt['epoch'] + 1} after step {ckpt['progress']['step']}"
    return f"after epoch {ckpt['epoch']}"


def checkpoint_words(path):
    """(its run: dataset and model, its position) of a checkpoint file, in words."""
    try:
        ckpt = load_checkpoint(path)
        args = ckpt.get("args") or {}
        return f"{args.get('dataset')}, model {args.get('model')}", position(ckpt)
    except (ValueError, KeyError, TypeError, AttributeError):
        return "unknown", "(unreadable)"


def start_run_folder(s, out_dir, cleanup):
    """Rank 0: claim the run folder, write its args.json and start its log.jsonl. Returns the
    folder, the resumed epoch to finish first (unlogged_epoch) and the best top-1 before it."""
    claim_run_folder(s, out_dir, cleanup)
    try:
        write_text_atomically(os.path.join(out_dir, "args.json"), json.dumps(vars(s.args), indent=1))
        # A fresh run starts an empty log; a resumed one forgets the lines of epochs
        # after its checkpoint (written before a kill, and about to be redone) and a
        # torn last line.
        records = [r for r in read_log(os.path.join(out_dir, "log.jsonl"), s.notes.append)
                   if r["epoch"] <= s.start_epoch] if s.ckpt else []
        write_text_atomically(os.path.join(out_dir, "log.jsonl"), "".join(json.dumps(r) + "\n" for r in records))
    except OSError as e:
        raise TrainError(f"cannot write to the run folder {out_dir} ({e.strerror or e}): choose a "
                         f"writable --output") from None
    return out_dir, unlogged_epoch(s, records), s.best_top1


def unlogged_epoch(s, records):
    """Rank 0: the record of the resumed epoch if its checkpoint has no line in log.jsonl, else None.

    A run is complete when its last epoch's line is in the log, not when its checkpoint exists:
    last.pt is written before the evaluation, and the evaluation, best.pt or the line can be
    stopped (a second Ctrl-C, a kill, a failing evaluation, a full disk). The checkpoint holds the
    epoch's training statistics (its record, without the evaluation); train.finish_unlogged_epoch
    evaluates and logs the epoch before the run goes on or ends. The best top-1 goes back to what it
    was before the epoch (the log's, when it holds every earlier epoch), so that best.pt is decided
    as in the uninterrupted run even if last.pt already holds the epoch's best."""
    epoch = s.ckpt["epoch"] if s.ckpt is not None and not s.ckpt.get("progress") else 0
    if epoch == 0 or any(r["epoch"] == epoch for r in records):
        return None
    if {r["epoch"] for r in records} >= set(range(1, epoch)):
        s.best_top1 = max((r["top1"] for r in records if r.get("top1") is not None), default=None)
    s.notes.append(f"note: epoch {epoch} has its checkpoint but no line in log.jsonl (its evaluation or "
                   f"the writing of its results was stopped): it is finished first")
    return dict(s.ckpt.get("record") or {"epoch": epoch})  # (a checkpoint of an older train.py: no statistics)


def setup_run_folder(s, cleanup):
    """The run folder (rank 0's choice for all), locked for the life of the run, its
    args.json and log.jsonl. A new run may not overwrite an old one; a resumed run
    continues in its own folder (or in one that holds no run: check_resume_folder), with
    its epoch whose line the log lacks, if any, to finish first (s.unlogged)."""
    if s.ckpt is not None:
        out_dir = s.args.output or os.path.dirname(os.path.abspath(s.resume_path))
    else:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        out_dir = s.args.output or os.path.join("runs", f"{s.args.dataset}-{s.args.model}-{stamp}")
    s.out_dir, s.unlogged, s.best_top1 = rank0_decides(s, lambda: start_run_folder(s, out_dir, cleanup),
                                                       share=True)


def kept_checkpoint(s):
    """What a stopped run leaves to continue from, in words."""
    last = os.path.join(s.out_dir, "last.pt")
    if not os.path.exists(last):
        return "no checkpoint was written yet"
    try:
        where = position(load_checkpoint(last))
    except (ValueError, KeyError, TypeError, AttributeError):
        return f"{last} is kept"
    return f"the last good checkpoint, {last} ({where}), is kept"


def write_checkpoint(s, checkpoint, name):
    """save_checkpoint into the run folder; a full disk or another write error is a
    TrainError saying that the previous file is kept (the write is atomic)."""
    path = os.path.join(s.out_dir, name)
    try:
        save_checkpoint(checkpoint, path)
    except OSError as e:
        # (a best.pt never written before has no previous one: last.pt is what is kept)
        kept = f"the previous {path} is kept" if name != "last.pt" and os.path.exists(path) else kept_checkpoint(s)
        raise TrainError(f"cannot write {path} ({e.strerror or e}; a full disk?): {kept}, nothing "
                         f"half-written. Free space and continue with --resume {s.out_dir}") from None


def save_epoch(s, record, rngs):
    """Rank 0, before the evaluation: last.pt, so that a failing evaluation loses no
    training. Returns the checkpoint (finish_epoch writes it again with the new best)."""
    checkpoint = training_checkpoint(s.raw_model, s.ctx.optimizer, s.ctx.scheduler, s.ctx.scaler,
                                     record["epoch"], rngs, vars(s.args), s.best_top1, record=record)
    write_checkpoint(s, checkpoint, "last.pt")
    s.ctx.interrupts.saved = f"after epoch {record['epoch']}"
    return checkpoint


def append_log(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_log(path, warn=None):
    """The records of log.jsonl. A line that is not a whole JSON record (the torn last line
    of a run killed while appending, or of a full disk) is left out, and warn(message)
    says so; start_run_folder then writes the log back without it."""
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
                records.append(record)
            else:
                torn.append(number)
    if torn and warn is not None:
        warn(f"warning: {path}: line {', '.join(map(str, torn))} is not a whole record (torn by a kill "
             f"or a full disk while it was written): left out, the {len(records)} good records are kept")
    return records


def finish_epoch(s, record, checkpoint):
    """Rank 0, after the evaluation: the epoch's line, log.jsonl, last.pt again when the
    best top-1 changed (and best.pt), curves.png."""
    parts = []
    if "train_loss" in record:  # (not in an epoch that unlogged_epoch found in an older train.py's checkpoint)
        parts.append(f"loss {record['train_loss']:.4f}, lr {record['lr']:.2e}, {record['img_per_s']:.0f} img/s, "
                     f"{record['train_time_s']:.0f} s")
    if "top1" in record:
        parts.append(f"test top-1 {record['top1']:.2f}%, top-5 {record['top5']:.2f}%"
                     + (" (with flips)" if s.args.flip_test else ""))
    s.say(f"epoch {record['epoch']}/{s.total_epochs}: " + "; ".join(parts))
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


def print_summary(s, session_start):
    """Rank 0, at the end of a session: its time, the run's accuracy, and its files."""
    records = read_log(s.log_path) if s.rank == 0 else []
    if not records:
        return
    train_time = sum(r.get("train_time_s", 0) for r in records)
    last = records[-1]
    summary = (f"done in {(time.time() - session_start) / 60:.1f} min this session; "
               f"training time over the run {train_time / 60:.1f} min")
    if last.get("top1") is not None:
        summary += f"; final test top-1 {last['top1']:.2f}%, best {s.best_top1:.2f}%"
    s.say(summary)
    s.say(f"files: {s.log_path}, {os.path.join(s.out_dir, 'curves.png')}, "
          f"{os.path.join(s.out_dir, 'last.pt')}")
