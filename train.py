"""Train QKFormer on CIFAR-10, CIFAR-100, ImageNet-1K or the event-camera datasets CIFAR10-DVS and
DVS128 Gesture (any dataset described in data.DATASETS), on one CPU or on many GPUs.

Reference: Zhou et al., "QKFormer: Hierarchical Spiking Transformer using Q-K
Attention", NeurIPS 2024. The per-dataset defaults are the official training
recipes (data.DATASETS[name].recipe): for CIFAR timm's train.py with the official
cifar10.yml / cifar100.yml, for ImageNet the official MAE-style fine-tuning script.
Where this script differs from them it says so next to the setting.

    python train.py --dataset cifar10                  # the paper's CIFAR-10 recipe (downloads the data)
    python train.py --dataset cifar10 --recipe cpu     # a small model on a 2-core CPU (see README)
    python train.py --dataset cifar10 --recipe lab     # a few minutes on a 2-core CPU: for classes
    python train.py --resume runs/<run>/last.pt        # continue a run where it stopped
    torchrun --nproc_per_node=8 train.py --dataset imagenet --data-dir /data/imagenet
    python train.py --dataset cifar10dvs               # the official CIFAR10-DVS recipe (T=16)

Every epoch: a progress bar with loss, learning rate and images/s; <run>/last.pt
overwritten atomically (before the evaluation, so a failing evaluation loses no
training: --resume evaluates an epoch that has no line in the log); top-1/top-5
accuracy on the test set; a line in <run>/log.jsonl; the
curves redrawn in <run>/curves.png; <run>/best.pt when top-1 improves. Ctrl-C or
SIGTERM ends the step in progress, writes last.pt there, in the middle of its epoch, and
stops; --resume continues from that step (--save-every writes it every few minutes too).

Distributed data parallel (DDP): torchrun starts one process per GPU (or
several on a CPU, with the gloo backend); each process sees its own share of
every epoch (DistributedSampler) and DDP averages the gradients, so N
processes with --batch-size B train like one process with batch N*B (except
batch norm, whose statistics stay per process unless --sync-bn).

Read it top to bottom: the model, the optimizer and the learning-rate schedule; one
epoch of training (train_one_epoch) and the evaluation; the set-up of a run, phase by
phase; main(), which calls them in order and then holds the epoch loop. Three wings hold
what a first reading may skip: train_budget.py, the epochs that fit --minutes (--recipe cpu
times itself), train_settings.py, the recipes, the command line and the
layers of settings (defaults < the dataset's recipe < --recipe cpu/lab < a resumed run's
saved settings < the command line: a table of every setting and its layer is printed at
the start), and train_guards.py, what can go wrong (one-line errors on any DDP process,
non-finite steps, the locked run folder, full disks) and the exact resume (a run split
into sessions gives, on the CPU, bit for bit the parameters of an uninterrupted run).
"""
import contextlib
import dataclasses
import math
import os
import time

import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

import data
import data_events                         # registers the event-camera datasets in data.DATASETS
import data_files
from data import DataError
from qkformer import create_model, predict
from train_budget import fit_epochs
from train_guards import (Interrupts, NonFiniteWatch, TrainError, check_classes, check_memory, check_saveable,
                          finish_epoch, gather_rng_states, load_resumed_weights, print_summary, rank0_decides,
                          read_training_checkpoint, restore_state, save_epoch, say_skipped, setup_run_folder,
                          stop_if_diverged, user_errors)
from train_settings import (DEFAULTS, Session, apply_process_settings, dist_timeout, model_overrides, parse_args,
                            print_banner, resolve_settings, setup_device, setup_distributed)


# ----------------------------------------------------------------------------
# Model, optimizer and learning-rate schedule
# ----------------------------------------------------------------------------

def build_model(args, num_classes, in_channels=3):
    """The model of the run, initialised from --seed alone (the same on every process)."""
    torch.manual_seed(args.seed)  # DDP needs equal weights everywhere; a resume overwrites them
    try:
        return create_model(args.model, num_classes=num_classes, in_channels=in_channels,
                            **model_overrides(args))
    except ValueError as e:  # e.g. a width the heads do not divide: the user's to fix
        raise TrainError(f"invalid model configuration: {e}") from None


def build_optimizer(model, args):
    """AdamW, without weight decay on biases and batch-norm weights (all 1-D
    parameters), as both official scripts do: decaying them toward zero only
    hurts a scale or an offset."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]       # conv, linear
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]   # biases, BN
    groups = [{"params": decay, "weight_decay": args.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    # fused: one kernel for the whole update, which takes a device flag (found_inf) that
    # skips the update on the device, without the host waiting for it (optimizer_update)
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
    if epoch < args.warmup_epochs:  # linear: Adam's moments and BN statistics settle first
        return args.warmup_lr + (args.lr - args.warmup_lr) * epoch / args.warmup_epochs
    if epoch >= args.epochs:  # cool-down
        return args.min_lr
    if args.warmup_prefix:  # progress along the cosine, 0 -> 1
        progress = (epoch - args.warmup_epochs) / (args.epochs - args.warmup_epochs)
    else:
        progress = epoch / args.epochs
    return args.min_lr + (args.lr - args.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))  # lr -> min_lr


def peak_lr(args, effective_batch):
    """--lr if given, else the linear scaling rule of the MAE recipe: blr * effective batch / 256."""
    return args.lr if args.lr is not None else args.blr * effective_batch / 256


def build_scheduler(optimizer, args, updates_per_epoch):
    """LambdaLR stepped once per optimizer update; its state is just the update count.
    (A resumed run puts it where its epochs done say: train_guards.place_scheduler.)"""
    return torch.optim.lr_scheduler.LambdaLR(  # LambdaLR multiplies the peak rate by the lambda
        optimizer, lambda update: lr_at(update / updates_per_epoch, args) / args.lr)


# ----------------------------------------------------------------------------
# One epoch of training, and the evaluation
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
        value = value.clone()  # all_reduce works in place: the caller's tensor stays as it was
        dist.all_reduce(value)  # a sum
        value /= world
    return value


@dataclasses.dataclass
class StepContext:
    """What a training step needs besides its batch: the model (wrapped in DDP when
    world > 1), its optimizer, schedule and loss, the settings (args: accum_iter,
    clip_grad, reprob, remode), the device and the dataset's normalisation, and how
    steps run: autocast and the grad scaler (mixed precision), the number of
    processes, and whether this process shows progress bars. bad_streak: the number
    of non-finite steps in a row so far (a device tensor, carried across epochs).
    interrupts: what a signal or --save-every does between steps (train_guards.Interrupts)."""
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    criterion: nn.Module
    args: object
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
    interrupts: Interrupts = dataclasses.field(default_factory=Interrupts)


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
        ctx.scaler.unscale_(optimizer)  # fp16: the true gradients, before they are checked and clipped
    found = bad_loss.clone()  # the caller's flag stays as it was
    if grads:  # sets found to 1 if any gradient holds inf or NaN (multiplies them by 1)
        torch._amp_foreach_non_finite_check_and_unscale_(grads, found, torch.ones((), device=found.device))
    if args.clip_grad:  # after unscaling: the threshold is in the gradients' true units
        nn.utils.clip_grad_norm_(ctx.model.parameters(), args.clip_grad)
    if ctx.scaler.is_enabled():
        ctx.scaler.step(optimizer)  # skips the step itself if it found inf/NaN
        ctx.scaler.update()  # the scale halves after a skip, grows after a run of good steps
    elif optimizer.defaults.get("fused"):
        optimizer.grad_scale, optimizer.found_inf = None, found  # read by AdamW's step, as a scaler sets them
        try:
            optimizer.step()
        finally:
            del optimizer.grad_scale, optimizer.found_inf
    elif not found.item():  # an optimizer that cannot skip on the device: ask the host
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)  # None: the next backward writes instead of adding
    return found


def train_one_epoch(ctx, loader, epoch, mixup=None):
    """Train over one pass of `loader`; returns the epoch's mean loss (over its finite steps),
    top-1 on the (augmented) training batches, images/s, the last learning rate and the number
    of updates skipped for non-finite losses or gradients (train_guards.NonFiniteWatch).

    Gradient accumulation: the loss of each of accum_iter consecutive batches is divided by
    accum_iter and back-propagated, the gradients add up, and one optimizer update follows.
    With DDP the gradient all-reduce is skipped (no_sync) on all but the last of those batches.
    """
    model, args, world, steps = ctx.model, ctx.args, ctx.world, len(loader)
    model.train()                                # batch norm: batch statistics, running ones updated
    watch = NonFiniteWatch(ctx, epoch, steps)    # the loss statistics, kept on the device
    tally = ctx.interrupts.tally(epoch, watch)   # accuracy and time; a resumed epoch: where it stopped
    bar = tqdm(loader, f"epoch {epoch + 1}", initial=tally.step, disable=not ctx.show, dynamic_ncols=True,
               leave=False)
    ctx.optimizer.zero_grad(set_to_none=True)
    for i, (images, labels) in enumerate(bar, tally.step):  # uint8 images: 1/4 of float's bytes to copy
        images, labels = images.to(ctx.device, non_blocking=True), labels.to(ctx.device, non_blocking=True)
        x = data.normalize(images, ctx.mean, ctx.std)              # uint8 -> normalised float
        if args.reprob > 0:                                        # erasing, then mixing: timm's order
            x = data.random_erasing(x, args.reprob, args.remode)
        x, targets = (x, labels) if mixup is None else mixup(x, labels)  # mixup: targets (B, classes), soft
        update = (i + 1) % args.accum_iter == 0 or i + 1 == steps  # the window's last batch
        no_sync = model.no_sync if world > 1 and not update else contextlib.nullcontext
        with no_sync():                                            # DDP: all-reduce on updates only
            with ctx.autocast():                                   # mixed precision (--amp), if on
                logits = model(ctx.model_input(x))                # T time steps inside, averaged
            loss = ctx.criterion(logits.float(), targets)         # in float32 whatever the autocast
            mean_loss = reduce_mean(loss.detach(), world)         # the loss logged: all processes'
            ctx.scaler.scale(loss / args.accum_iter).backward()   # surrogate gradients add up
        skip = None
        if update:  # skipped on the device if a loss of the window, or a gradient, is not finite
            skip = optimizer_update(ctx, watch.window_bad(mean_loss))
            ctx.scheduler.step()  # the schedule follows the progress, updates skipped or not
        tally.correct += (logits.argmax(1) == labels).sum()      # on the device too: no host wait
        tally.seen += len(labels)
        if watch.step(i, mean_loss, skip) and ctx.show:           # host reads: LOG_EVERY steps (CPU: 1)
            bar.set_postfix(loss=f"{watch.mean_loss():.4f}", lr=f"{ctx.optimizer.param_groups[0]['lr']:.2e}",
                            img_s=f"{tally.seen * world / tally.elapsed():.0f}", refresh=False)
        ctx.interrupts.after_step(i, update, tally)  # at an update: Ctrl-C, SIGTERM, --save-every save
    bar.close()
    return dict(train_loss=watch.mean_loss(), train_top1=100.0 * tally.correct.item() / max(tally.seen, 1),
                lr=ctx.optimizer.param_groups[0]["lr"], img_per_s=tally.seen * world / tally.elapsed(),
                train_time_s=tally.elapsed(), skipped_updates=int(watch.skipped.item()))


@torch.no_grad()
def evaluate(model, loader, device, mean, std, autocast=contextlib.nullcontext, show=True,
             model_input=lambda x: x, flip=False):
    """Mean cross-entropy (test_loss), top-1 and top-5 accuracy (top1, top5, in %) over `loader`;
    flip: of the logits averaged with those of the mirrored images (qkformer.predict).
    (evaluate.py adds firing rates and energy to the same loop.)"""
    model.eval()
    sums, n = torch.zeros(3, dtype=torch.float64, device=device), 0  # loss, top-1, top-5: read at the end
    for images, labels in tqdm(loader, desc="evaluate", disable=not show, dynamic_ncols=True, leave=False):
        x = data.normalize(images.to(device, non_blocking=True), mean, std)
        labels = labels.to(device, non_blocking=True)
        with autocast():
            logits = predict(model, model_input(x), flip).float()
        best5 = logits.topk(min(5, logits.shape[1]), dim=1).indices   # (B, 5)
        hits = best5 == labels[:, None]                               # (B, 5)
        sums += torch.stack([nn.functional.cross_entropy(logits, labels, reduction="sum").double(),
                             hits[:, 0].sum().double(), hits.any(dim=1).sum().double()])
        n += len(labels)
    total_loss, top1, top5 = sums.tolist()  # one host read: a read per batch would make it wait each time
    return dict(test_loss=total_loss / n, top1=100.0 * top1 / n, top5=100.0 * top5 / n)


# ----------------------------------------------------------------------------
# A run, phase by phase
# ----------------------------------------------------------------------------

def setup_settings(s, cli, low_memory):
    """The settings of the run (train_settings.resolve_settings): a resumed run's saved
    ones come from its checkpoint, --low-memory as main() applied it (low_memory: its
    value and the layer it came from)."""
    if cli.resume:
        s.ckpt, s.resume_path = read_training_checkpoint(cli.resume, s.rank)
    settings = resolve_settings(cli, s.ckpt["args"] if s.ckpt else None, s.world)  # --accum-iter per world
    s.args, s.sources, s.notes = settings.args, settings.sources, settings.notes
    s.args.low_memory, s.sources["low_memory"] = low_memory
    s.spec = data.get_dataset(s.args.dataset)


def setup_model(s):
    """The model, with the resumed checkpoint's weights: built before any data is read,
    so that a bad configuration is reported at once."""
    model = build_model(s.args, s.spec.num_classes, s.spec.in_channels)
    check_memory(s, model)  # options that can only exhaust memory are refused now
    if s.ckpt is not None:
        load_resumed_weights(s, model)
    return model


def setup_data(s):
    """Datasets and loaders, then the batch and the learning rate they imply. Rank 0 fetches
    the data if needed (CIFAR: a download) and checks that the evaluation images can be read
    (their headers: cheap; a bad file found now, not after an epoch); the others wait for
    its verdict. The classes must fit the model."""
    args = s.args
    rank0_decides(s, lambda: data.prepare(args.dataset, args.data_dir, download_missing=args.download))
    train_set, test_set = data.build_datasets(
        args.dataset, args.data_dir, args.img_size, args.crop_padding, args.hflip, args.aa,
        args.subset, args.test_subset, download_missing=False, T=args.T, dvs_split=args.dvs_split,
        cache_dir=args.cache_dir)
    check_classes(s, train_set, test_set)
    if hasattr(test_set, "samples"):  # image files
        rank0_decides(s, lambda: data_files.verify_images(test_set.samples, desc="checking the test images"))
    workers = args.workers
    if workers is None:
        workers = data.default_workers(s.device.type, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        s.effective["workers"] = (workers, f"default on {s.device.type}")
    pin = s.device.type == "cuda"  # page-locked batches: faster copies to the GPU
    s.train_loader = data.make_loader(train_set, args.batch_size, train=True, workers=workers,
                                      seed=args.seed, rank=s.rank, world_size=s.world, pin_memory=pin)
    s.eval_loader = data.make_loader(test_set, args.eval_batch_size or args.batch_size, train=False,
                                     workers=workers, pin_memory=pin)
    if len(s.train_loader) == 0:  # the loader drops an incomplete last batch
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
                        scaler, autocast, s.world, show=s.rank == 0, model_input=s.spec.model_input,
                        interrupts=Interrupts(s))


def evaluate_epoch(s, epoch, record, checkpoint):
    """Rank 0, after last.pt is written: evaluate every --eval-every epochs and after the last
    (the best top-1 kept), then the epoch's line, log and pictures (train_guards.finish_epoch)."""
    try:
        if (epoch + 1) % s.args.eval_every == 0 or epoch + 1 == s.total_epochs:
            start = time.time()
            record.update(evaluate(s.raw_model, s.eval_loader, s.device, s.spec.mean, s.spec.std,
                                   s.ctx.autocast, show=True, model_input=s.spec.model_input,
                                   flip=s.args.flip_test))
            record["eval_time_s"] = time.time() - start
            if s.best_top1 is None or record["top1"] > s.best_top1:
                s.best_top1, record["best"] = record["top1"], True
        record["best_top1"] = s.best_top1
        finish_epoch(s, record, checkpoint)
    except (DataError, TrainError) as e:
        raise TrainError(f"{e} (the checkpoint of epoch {epoch + 1} was written before the evaluation)") from None


def finish_unlogged_epoch(s):
    """A resumed epoch whose checkpoint was written but whose evaluation, best.pt or line in
    log.jsonl was not (a second Ctrl-C or a kill during the evaluation, a failing evaluation,
    a full disk): evaluated and logged now, as it would have been, before the run goes on or
    ends. (train_guards.unlogged_epoch found it: its record of training is in last.pt.)"""
    if s.unlogged is None:
        return
    epoch = s.unlogged["epoch"] - 1
    s.ctx.interrupts.evaluating = epoch + 1
    rank0_decides(s, lambda: evaluate_epoch(s, epoch, s.unlogged, s.ckpt))
    s.ctx.interrupts.between_epochs(epoch)  # a signal during it: the stop is here, as after any epoch


def main(argv=None):
    """Train: settings, model, data, optimizer and schedule, then the epoch loop; returns the
    run folder. A problem the user can fix ends as one line and exit code 2 (user_errors)."""
    with user_errors(), contextlib.ExitStack() as cleanup:
        cli = parse_args(argv)
        low_memory = apply_process_settings(cli)  # before the first tensor: PyTorch reads it then
        s = Session(*setup_distributed(cli.device or DEFAULTS["device"], dist_timeout(cli)))
        setup_settings(s, cli, low_memory)
        autocast, scaler = setup_device(s)        # mixed precision, TF32 (train_settings)
        model = setup_model(s)
        setup_data(s)
        setup_optimization(s, model, autocast, scaler)
        fit_epochs(s, train_one_epoch, evaluate)  # --minutes (--recipe cpu): the epochs that fit
        restore_state(s)                          # a resumed run: exactly where it stopped
        setup_run_folder(s, cleanup)              # locked until the run ends (cleanup)
        s.ctx.interrupts.install(cleanup)         # from here on SIGINT/SIGTERM save, then stop
        print_banner(s)

        session_start = time.time()
        finish_unlogged_epoch(s)  # a resumed epoch whose evaluation was stopped: evaluated first
        for epoch in range(s.start_epoch, s.total_epochs):
            s.train_loader.sampler.set_epoch(epoch)  # a new shuffle each epoch, the same on every process
            loader = s.ctx.interrupts.loader(s.train_loader, epoch)  # a resumed epoch: the batches not done
            with stop_if_diverged(s):  # losses non-finite for LOG_EVERY steps: all processes stop
                stats = train_one_epoch(s.ctx, loader, epoch, mixup_for_epoch(s.mixup, s.args, epoch))
            say_skipped(s, epoch, stats["skipped_updates"])
            record = {"epoch": epoch + 1, **stats}
            rank0_decides(s, lambda: check_saveable(s, epoch))  # weights with inf/NaN are never saved
            # The generator states are taken before anything else can draw from them (the
            # evaluation has generators of its own), so a resumed run starts from exactly here.
            rngs = gather_rng_states(s.world)
            checkpoint = rank0_decides(s, lambda: save_epoch(s, record, rngs))
            s.ctx.interrupts.evaluating = epoch + 1  # a second Ctrl-C now: --resume evaluates the epoch
            # nobody starts the next epoch before rank 0 has evaluated and saved (--dist-timeout)
            rank0_decides(s, lambda: evaluate_epoch(s, epoch, record, checkpoint))
            s.ctx.interrupts.between_epochs(epoch)  # a signal during the epoch's end: the stop is here
            if s.args.stop_after and epoch + 1 >= s.args.stop_after and epoch + 1 < s.total_epochs:
                s.say(f"stopping after epoch {epoch + 1} as asked (--stop-after); continue with "
                      f"python train.py --resume {os.path.join(s.out_dir, 'last.pt')}")
                break
        print_summary(s, session_start)
        return s.out_dir


if __name__ == "__main__":
    main()
