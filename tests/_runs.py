"""What the training tests share: the comparison of two runs that must be one (a resumed run
and the uninterrupted one), a free port for a process group, and the reference that the DDP
tests compare two gloo processes with.

The DDP reference is one process making the same updates: each of its steps takes rank 0's batch
and then rank 1's (as DistributedSampler deals them), accumulating the two (--accum-iter 2:
loss / 2 each). DDP averages the two processes' gradients, so with no augmentation randomness
its weights are the reference's, bit for bit, when both run one thread (the one_thread fixture
here, OMP_NUM_THREADS=1 in the processes): the same kernels, the same rounding.
"""
import json
import os
import socket

import torch

import data
import train
import train_settings


def assert_same_run(whole, split):
    """The final checkpoints and logs of two runs are equal: weights, batch-norm statistics, Adam's
    state, the schedule, and what the log says of every epoch (but its times)."""
    a, b = (torch.load(os.path.join(d, "last.pt"), weights_only=True) for d in (whole, split))
    assert a["epoch"] == b["epoch"] and "progress" not in b
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    for i, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][i][name]), (i, name)
    assert a["scheduler"] == b["scheduler"]
    logs = [[json.loads(line) for line in open(os.path.join(d, "log.jsonl"))] for d in (whole, split)]
    keys = ("epoch", "train_loss", "train_top1", "lr", "skipped_updates", "top1")
    assert [[r.get(k) for k in keys] for r in logs[0]] == [[r.get(k) for k in keys] for r in logs[1]]


def free_port():
    """A TCP port of 127.0.0.1 that nothing listens on now (for MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_process_reference(flags, cifar, batch_size, subset):
    """One epoch of train.py's `flags` (a CIFAR-10 run without augmentation randomness) in this
    process, as two processes of `batch_size` would make it. Returns the trained model and the
    number of updates."""
    a = train_settings.resolve_args(train_settings.parse_args(flags + ["--accum-iter", "2"]))
    train_set, _ = data.build_datasets("cifar10", cifar, 32, 0, 0.0, "none", subset=subset, download_missing=False)
    per_rank = []
    for rank in (0, 1):
        loader = data.make_loader(train_set, batch_size, train=True, seed=a.seed, rank=rank, world_size=2)
        loader.sampler.set_epoch(0)
        per_rank.append(list(loader))
    interleaved = [batch for pair in zip(*per_rank) for batch in pair]  # rank 0's, rank 1's, rank 0's, ...
    model = train.build_model(a, 10)
    opt = train.build_optimizer(model, a)
    sched = train.build_scheduler(opt, a, updates_per_epoch=len(per_rank[0]))
    spec = data.get_dataset("cifar10")
    loss = torch.nn.CrossEntropyLoss(label_smoothing=a.smoothing)
    train.train_one_epoch(train.StepContext(model, opt, sched, loss, a, torch.device("cpu"), spec.mean, spec.std,
                                            show=False), interleaved, 0)
    return model, len(per_rank[0])
