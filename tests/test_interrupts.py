"""Interrupted runs: SIGTERM and Ctrl-C (SIGINT) sent to a real train.py process at a step it
does not choose, --save-every, a second Ctrl-C, and two gloo DDP processes of which one gets
the signal. Each interrupted run is resumed and compared, bit for bit, with the run that
nobody interrupted (train_guards.Interrupts, ResumedEpoch).

A tiny QKFormer (embed_dim 32, T=1) on a fake CIFAR-10 (tests/_fakedata.py, conftest.cifar:
40 training images): batch 4 gives 10 steps per epoch. One thread everywhere, in this process
(the one_thread fixture) as in the subprocesses (OMP_NUM_THREADS=1): the same kernels, the
same rounding.
"""
import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

import train
import train_guards
import train_settings
from _runs import assert_same_run, free_port, one_process_reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "train.py")
TINY = ["--model", "tiny", "--embed-dim", "32", "--num-heads", "1", "--depths", "3", "--T", "1"]
SHORT = [*TINY, "--batch-size", "4", "--workers", "0", "--no-low-memory", "--epochs", "2", "--lr", "2e-3",
         "--warmup-epochs", "0.5", "--test-subset", "4", "--eval-every", "1000"]
# every source of randomness on: crop, flip, RandAugment, erasing, mixup/cutmix; and 2 steps per update
RANDOM = ["--crop-padding", "4", "--aa", "rand-m9-n1-mstd0.4-inc1", "--reprob", "0.5", "--mixup", "0.5",
          "--cutmix", "1.0", "--accum-iter", "2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
pytestmark = pytest.mark.usefixtures("one_thread")     # conftest.py


def signalled(argv, sig, after, cwd, env=ENV, pid=None):
    """Start train.py with `argv`, wait until its progress bar (stderr) shows `after`, send `sig`
    (to process `pid` if given: another process of the same run) and wait for the end. The step the
    signal lands in is whatever step is running then. Returns (exit code, stdout, stderr)."""
    proc = subprocess.Popen([sys.executable, TRAIN, *argv], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        seen = b""
        while after.encode() not in seen:
            chunk = proc.stderr.read1(4096)
            assert chunk, f"train.py ended before showing {after!r}: {seen.decode()[-2000:]}"
            seen += chunk
        os.kill(pid or proc.pid, sig)
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    return proc.returncode, out.decode(), (seen + err).decode()


@pytest.fixture(scope="module")
def whole(cifar, tmp_path_factory, one_thread):
    """The run that nobody interrupts, every source of randomness on: its folder."""
    return train.main(["--dataset", "cifar10", "--data-dir", cifar, *SHORT, *RANDOM,
                       "--output", str(tmp_path_factory.mktemp("whole") / "run")])


def test_sigterm_in_the_middle_of_an_epoch_then_resume_is_the_uninterrupted_run(cifar, whole, tmp_path):
    argv = ["--dataset", "cifar10", "--data-dir", cifar, *SHORT, *RANDOM]
    # --save-every 0.0001 (6 ms): a mid-epoch checkpoint at every update besides the signal's
    code, out, err = signalled([*argv, "--save-every", "0.0001", "--output", "split"], signal.SIGTERM,
                               "epoch 2:", tmp_path)
    assert code == 128 + signal.SIGTERM, err[-3000:]
    assert "SIGTERM: the run stops after this step, once last.pt is written" in err
    assert "last.pt written in epoch 1 after step 2 of 10 (--save-every 0.0001)" in out
    ckpt = torch.load(tmp_path / "split" / "last.pt", weights_only=True)
    step = ckpt["progress"]["step"]
    assert ckpt["epoch"] == 1 and 2 <= step < 10 and step % 2 == 0  # epoch 2, at an update (--accum-iter 2)
    assert f"stopped by SIGTERM in epoch 2 after step {step} of 10: last.pt holds the run as it stands; " \
           f"continue with python train.py --resume split" in out
    assert sorted(os.listdir(tmp_path / "split")) == [".lock", "args.json", "curves.png", "last.pt", "log.jsonl"]
    train.main(["--resume", str(tmp_path / "split")])
    assert_same_run(whole, tmp_path / "split")


def test_sigkill_loses_at_most_save_every(cifar, whole, tmp_path):
    """A kill that no signal announces: the run resumes from the last checkpoint --save-every wrote
    (or the epoch's), whatever the moment, even inside a checkpoint's write, and ends as the
    uninterrupted run."""
    argv = ["--dataset", "cifar10", "--data-dir", cifar, *SHORT, *RANDOM, "--save-every", "0.0001"]
    code, out, err = signalled([*argv, "--output", "split"], signal.SIGKILL, "epoch 2:", tmp_path)
    assert code == -signal.SIGKILL
    assert torch.load(tmp_path / "split" / "last.pt", weights_only=True)["epoch"] == 1
    train.main(["--resume", str(tmp_path / "split")])
    assert_same_run(whole, tmp_path / "split")
    assert not [f for f in os.listdir(tmp_path / "split") if f.endswith(".tmp")]


# train.py run as a script, with the evaluation's first batch held for 60 s (qkformer.predict, which
# train.evaluate calls, hooked before train.py imports it): signals sent once the evaluation shows its
# bar land inside it, however busy the machine.
SLOW_EVALUATION = ("import runpy, sys, time, qkformer\n"
                   "predict, held = qkformer.predict, []\n"
                   "def slow(*a, **k):\n"
                   "    if not held:\n"
                   "        held.append(time.sleep(60))\n"
                   "    return predict(*a, **k)\n"
                   "qkformer.predict = slow\n"
                   f"sys.argv[0] = {TRAIN!r}\n"
                   "runpy.run_path(sys.argv[0], run_name='__main__')\n")


def test_ctrl_c_twice_during_the_last_evaluation_then_resume_evaluates_it(cifar, whole, tmp_path, capsys):
    """Ctrl-C during the evaluation of the last epoch (its last.pt written) says the run stops once the
    evaluation ends; a second Ctrl-C stops at once (exit code 130), saying that the evaluation is lost
    and how to continue. The run is not complete: --resume evaluates that epoch, writes best.pt and
    its line in log.jsonl, and ends as the uninterrupted run."""
    argv = ["--dataset", "cifar10", "--data-dir", cifar, *SHORT, *RANDOM, "--output", "split"]
    proc = subprocess.Popen([sys.executable, "-c", SLOW_EVALUATION, *argv], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**ENV, "PYTHONPATH": ROOT})
    try:
        seen = b""
        for marker in (b"evaluate:", b"SIGINT: the run stops"):
            while marker not in seen:
                chunk = proc.stderr.read1(4096)
                assert chunk, f"train.py ended before showing {marker!r}: {seen.decode()[-2000:]}"
                seen += chunk
            os.kill(proc.pid, signal.SIGINT)  # the second once the first is seen: two signals, not one
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    err = (seen + err).decode()
    assert proc.returncode == 128 + signal.SIGINT and "Traceback" not in err, err[-3000:]
    assert "SIGINT: the run stops once the evaluation of epoch 2 ends, its last.pt written (Ctrl-C again: stop " \
           "at once; --resume then evaluates it)" in err
    assert "stopped at once (Ctrl-C): the evaluation of epoch 2 is lost; last.pt holds the run after epoch 2: " \
           "continue with python train.py --resume split, which evaluates epoch 2 first" in err
    split = tmp_path / "split"
    assert torch.load(split / "last.pt", weights_only=True)["epoch"] == 2 and not (split / "best.pt").exists()
    assert [json.loads(line)["epoch"] for line in open(split / "log.jsonl")] == [1]

    capsys.readouterr()
    train.main(["--resume", str(split)])
    printed = capsys.readouterr().out
    assert "already complete" not in printed and "epoch 2/2: loss" in printed and "final test top-1" in printed
    assert_same_run(whole, split)
    assert torch.load(split / "best.pt", weights_only=True)["epoch"] == 2


def test_save_every_is_checked():
    with pytest.raises(train_guards.TrainError, match="--save-every must be >= 0 minutes"):
        train_settings.resolve_args(train_settings.parse_args(["--save-every", "-1"]))


def test_ctrl_c_in_the_first_epoch_then_resume_is_the_uninterrupted_run(cifar, tmp_path, capsys):
    argv = ["--dataset", "cifar10", "--data-dir", cifar, *SHORT]
    whole = train.main([*argv, "--output", str(tmp_path / "whole")])
    code, out, err = signalled([*argv, "--output", "split"], signal.SIGINT, "epoch 1:", tmp_path)
    assert code == 128 + signal.SIGINT, err[-3000:]
    assert "SIGINT: the run stops after this step, once last.pt is written (Ctrl-C again: stop at once)" in err
    ckpt = torch.load(tmp_path / "split" / "last.pt", weights_only=True)
    step = ckpt["progress"]["step"]
    assert ckpt["epoch"] == 0 and 1 <= step < 10 and "Traceback" not in err
    assert f"stopped by SIGINT in epoch 1 after step {step} of 10" in out
    assert open(tmp_path / "split" / "log.jsonl").read() == ""  # no epoch ended yet

    # the position is a number of batches of its size: another batch size is refused, in one line
    os.makedirs(tmp_path / "copy")
    shutil.copy(tmp_path / "split" / "last.pt", tmp_path / "copy" / "last.pt")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        train.main(["--resume", str(tmp_path / "copy"), "--batch-size", "8"])
    line = capsys.readouterr().err
    assert e.value.code == 2 and f"was written in the middle of epoch 1, after step {step} of 10" in line
    assert "Resume it with its own --batch-size" in line and sorted(os.listdir(tmp_path / "copy")) == ["last.pt"]

    train.main(["--resume", str(tmp_path / "split")])
    assert f"note: resuming in the middle of epoch 1, after step {step} of 10" in capsys.readouterr().out
    assert_same_run(whole, tmp_path / "split")


def test_a_second_ctrl_c_stops_at_once(tmp_path, capfd):
    """Real signals, to this process: the first asks for a stop and says so; the second raises
    KeyboardInterrupt at once, which main() ends as one line and exit code 130."""
    args = argparse.Namespace(save_every=0, batch_size=4, accum_iter=1, dist_timeout=15)
    s = train_settings.Session(0, 1, torch.device("cpu"), args=args, out_dir=str(tmp_path))
    s.train_loader = s.eval_loader = torch.utils.data.DataLoader(list(range(8)))
    interrupts = train_guards.Interrupts(s)
    with contextlib.ExitStack() as cleanup:
        interrupts.install(cleanup)
        os.kill(os.getpid(), signal.SIGINT)
        assert interrupts.signum == signal.SIGINT and interrupts.requests() == (signal.SIGINT, False)
        with pytest.raises(KeyboardInterrupt, match="the step in progress is lost; last.pt holds the run no "
                                                    "checkpoint was written yet"):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back
    assert "SIGINT: the run stops after this step" in capfd.readouterr().err
    with pytest.raises(SystemExit) as e:
        with train_guards.user_errors():
            raise KeyboardInterrupt("the step in progress is lost")
    assert e.value.code == 130
    assert capfd.readouterr().err == "stopped at once (Ctrl-C): the step in progress is lost\n"


def test_ddp_a_signal_to_one_process_stops_both_at_the_same_step(cifar, tmp_path):
    """Two gloo processes, started as torchrun starts them; SIGTERM to rank 1 alone. Both stop
    after the same step, rank 0 writes the one checkpoint, and two processes resume it to the
    parameters of one process summing the gradients of the same half-batches (as test_train's
    DDP test; no augmentation randomness). 20 steps of an epoch: the signal, sent when the bar
    appears, lands mid-epoch even when this test process is scheduled late on a busy machine."""
    flags = ["--dataset", "cifar10", "--data-dir", cifar, *TINY, "--batch-size", "1", "--epochs", "1",
             "--lr", "1e-2", "--warmup-epochs", "0.5", "--crop-padding", "0", "--hflip", "0", "--aa", "none",
             "--reprob", "0", "--mixup", "0", "--subset", "40", "--test-subset", "4", "--workers", "0",
             "--no-low-memory"]

    def env(rank, port):
        return {**ENV, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank), "WORLD_SIZE": "2",
                "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2"}

    def start(rank, port, argv):
        return subprocess.Popen([sys.executable, TRAIN, *argv], cwd=tmp_path, env=env(rank, port),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    port = free_port()
    rank1 = start(1, port, [*flags, "--output", "ddp"])
    try:
        code, out, err = signalled([*flags, "--output", "ddp"], signal.SIGTERM, "epoch 1:", tmp_path,
                                   env=env(0, port), pid=rank1.pid)
        out1, err1 = rank1.communicate(timeout=300)
    finally:
        rank1.kill()
    assert code == rank1.returncode == 128 + signal.SIGTERM, (err[-2000:], err1[-2000:])
    ckpt = torch.load(tmp_path / "ddp" / "last.pt", weights_only=True)
    step = ckpt["progress"]["step"]
    assert ckpt["epoch"] == 0 and 1 <= step < 20 and len(ckpt["rng"]) == 2 and ckpt["progress"]["world"] == 2
    assert f"stopped by SIGTERM in epoch 1 after step {step} of 20" in out and out1 == ""  # rank 0 speaks
    assert sorted(os.listdir(tmp_path / "ddp")) == [".lock", "args.json", "last.pt", "log.jsonl"]

    port = free_port()
    both = [start(rank, port, ["--resume", "ddp"]) for rank in (0, 1)]
    try:
        ends = [p.communicate(timeout=300) for p in both]
    finally:
        for p in both:
            p.kill()
    assert [p.returncode for p in both] == [0, 0], ends[0][1][-2000:] + ends[1][1][-2000:]
    assert f"note: resuming in the middle of epoch 1, after step {step} of 20" in ends[0][0]

    model, _ = one_process_reference(flags, cifar, batch_size=1, subset=40)  # the same updates in one process
    ddp = torch.load(tmp_path / "ddp" / "last.pt", weights_only=True)
    assert ddp["epoch"] == 1 and "progress" not in ddp
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), ddp["model"][name]), name
