"""What goes wrong in a training run, and what is kept (issue 12, "Nothing lost, nothing silent").

Diverged runs, resumes with another batch geometry, torn logs, two runs on one folder, bad
images, killed runs' temporary files, unusable --output / --data-dir, full disks, errors on
another DDP rank, options that cannot fit in memory. Each test makes the fault happen (a
small tmpfs is a full disk, where the tests may mount one (root); a file size limit,
RLIMIT_FSIZE, makes writes fail for real without root; a patched os.access stands for a
read-only folder: the tests run as root, whom chmod does not stop) and checks the one-line
message, the exit code 2 and the files left behind.

Tiny models (embed_dim 32, T=1), 16-40 fake images, one thread, one or two epochs.
"""
import contextlib
import dataclasses
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import types

import pytest
import torch

try:
    import resource               # POSIX: file size limits
except ImportError:               # Windows
    resource = None

import checkpoints
import data
import qkformer
import train
import train_guards
import train_settings
from _runs import free_port
from _fakedata import write_imagenet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--model", "tiny", "--embed-dim", "32", "--num-heads", "1", "--depths", "3", "--T", "1"]
pytestmark = pytest.mark.usefixtures("one_thread")     # conftest.py


def run(cifar, out, *extra):
    """train.py's main() in this process on the fake CIFAR-10; returns the run folder."""
    return train.main(["--dataset", "cifar10", "--data-dir", cifar, "--output", str(out), *TINY,
                       "--batch-size", "8", "--workers", "0", "--warmup-epochs", "0.5", "--no-low-memory",
                       "--aa", "none", "--reprob", "0", "--mixup", "0", *extra])


def fails(capsys, *argv, runner=train.main):
    """Run, expect exit code 2 and one line on stderr (after the progress bars): return it."""
    with pytest.raises(SystemExit) as e:
        runner(*argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def finite(ckpt):
    tensors = [v for v in ckpt["model"].values() if v.is_floating_point()]
    tensors += [v for state in ckpt["optimizer"]["state"].values() for v in state.values()
                if torch.is_tensor(v) and v.is_floating_point()]
    return all(torch.isfinite(t).all() for t in tensors)


# ---------------------------------------------------------------- 1. diverging runs

def test_an_update_with_nan_gradients_never_reaches_the_weights():
    a = train_settings.resolve_args(train_settings.parse_args([*TINY, "--lr", "1e-2", "--epochs", "2",
                                                               "--warmup-epochs", "0"]))
    model = train.build_model(a, 10)
    opt = train.build_optimizer(model, a)
    sched = train.build_scheduler(opt, a, updates_per_epoch=4)
    spec = data.get_dataset("cifar10")
    ctx = train.StepContext(model, opt, sched, torch.nn.CrossEntropyLoss(), a, torch.device("cpu"),
                            spec.mean, spec.std, show=False)
    images, labels = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8), torch.arange(4)
    train.train_one_epoch(ctx, [(images, labels)], 0)         # one good update: Adam has state
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adam = {i: {k: v.clone() for k, v in s.items()} for i, s in opt.state_dict()["state"].items()}
    head = model.head.weight
    head.register_hook(lambda g: g * float("nan"))             # the gradients turn NaN, the loss does not
    with pytest.raises(train_guards.NonFiniteLoss, match="not finite in 3 steps in a row"):  # a whole (short) epoch
        train.train_one_epoch(ctx, [(images, labels)] * 3, 0)
    assert sched.last_epoch == 4                                # skipped, but the schedule moved on
    for k, v in model.state_dict().items():
        if v.is_floating_point() and "running" not in k and "num_batches" not in k:
            assert torch.equal(v, before[k]), k
    for i, state in opt.state_dict()["state"].items():
        for k, v in state.items():
            assert torch.equal(v, adam[i][k]), (i, k)


def test_item_host_reads_are_few(monkeypatch):
    """Statistics stay on the device: the host reads them every LOG_EVERY steps, not every step."""
    a = train_settings.resolve_args(train_settings.parse_args([*TINY, "--lr", "1e-3", "--epochs", "2",
                                                               "--warmup-epochs", "0"]))
    model = train.build_model(a, 10)
    opt = train.build_optimizer(model, a)
    spec = data.get_dataset("cifar10")
    ctx = train.StepContext(model, opt, train.build_scheduler(opt, a, 40), torch.nn.CrossEntropyLoss(), a,
                            torch.device("cpu"), spec.mean, spec.std, show=False)
    batch = (torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8), torch.arange(2))
    reads, item = [0], torch.Tensor.item

    def counting(self):
        reads[0] += 1
        return item(self)
    monkeypatch.setattr(torch.Tensor, "item", counting)
    train.train_one_epoch(ctx, [batch] * 40, 0)
    monkeypatch.undo()
    assert reads[0] <= 3 * 40 // train_guards.LOG_EVERY + 6, reads[0]  # was 2 per step (loss, accuracy)


def test_diverged_weights_are_never_saved_as_good(cifar, tmp_path, capsys):
    """--lr 1e6: within epoch 1 the weights' batch-norm statistics reach inf (the loss of its last
    step too: that update is skipped). No checkpoint with inf/NaN is written: the run stops and says
    that nothing was kept (test_train's NaN test: a good checkpoint of an earlier epoch is kept)."""
    out = tmp_path / "run"
    line = fails(capsys, ["--dataset", "cifar10", "--data-dir", cifar, "--output", str(out), *TINY,
                          "--batch-size", "8", "--workers", "0", "--no-low-memory", "--epochs", "3",
                          "--lr", "1e6", "--warmup-epochs", "0"])
    assert "training stopped: after epoch 1 the weights or optimizer state hold inf/NaN" in line
    assert "not saved; no checkpoint was written yet" in line and "lower --lr" in line
    assert not (out / "last.pt").exists() and not (out / "best.pt").exists()


# ---------------------------------------------------------------- 2. resume with another geometry

def test_resume_with_another_batch_size_and_lr_follows_the_schedule(cifar, tmp_path, capsys):
    out = run(cifar, tmp_path / "run", "--epochs", "3", "--lr", "1e-3", "--stop-after", "1")
    capsys.readouterr()
    train.main(["--resume", out, "--batch-size", "4", "--lr", "1e-2", "--stop-after", "2"])
    printed = capsys.readouterr().out
    assert "peak lr 0.01" in printed and "3 epochs of 10 updates" in printed
    a = train_settings.resolve_args(train_settings.parse_args(["--epochs", "3", "--lr", "1e-2",
                                                               "--warmup-epochs", "0.5", "--cooldown-epochs", "0"]))
    records = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    # the lr after epoch 2 is the curve's at 2.0 epochs, for the peak that was printed
    assert [r["epoch"] for r in records] == [1, 2] and records[1]["lr"] == pytest.approx(train.lr_at(2, a))
    ckpt = torch.load(os.path.join(out, "last.pt"), weights_only=True)
    assert ckpt["scheduler"]["base_lrs"] == [1e-2, 1e-2] and ckpt["scheduler"]["last_epoch"] == 20


def test_resume_without_fp16_into_a_run_with_a_grad_scaler():
    """A run saved without fp16 stores an empty scaler state; a resume that uses one starts it fresh."""
    a = train_settings.resolve_args(train_settings.parse_args([*TINY, "--lr", "1e-3"]))
    model = train.build_model(a, 10)
    opt = train.build_optimizer(model, a)
    sched = train.build_scheduler(opt, a, 4)
    off = torch.amp.GradScaler("cpu", enabled=False)
    ckpt = checkpoints.training_checkpoint(model, opt, sched, off, 1, [train_guards.rng_state()], vars(a), None)
    assert ckpt["scaler"] == {}
    s = train_settings.Session(0, 1, torch.device("cpu"), ckpt=ckpt, args=a, updates_per_epoch=4)
    on = torch.amp.GradScaler("cpu", enabled=True)
    s.ctx = train.StepContext(model, opt, sched, torch.nn.CrossEntropyLoss(), a, s.device, (0,) * 3, (1,) * 3,
                              on)
    train_guards.restore_state(s)
    assert s.start_epoch == 1 and on.is_enabled() and on.get_scale() == 2.0 ** 16


# ---------------------------------------------------------------- 4. more classes than the model

@pytest.fixture
def imagenet(tmp_path, monkeypatch):
    """A fake ImageNet of 3 classes (3 images each) with a 3-class model."""
    monkeypatch.setitem(data.DATASETS, "imagenet", dataclasses.replace(data.DATASETS["imagenet"], num_classes=3))
    return write_imagenet(str(tmp_path / "imagenet"), per_class=3)


def imagenet_argv(root, out, *extra):
    return ["--dataset", "imagenet", "--data-dir", root, "--output", str(out), *TINY, "--img-size", "32",
            "--batch-size", "3", "--accum-iter", "1", "--workers", "0", "--no-low-memory", "--epochs", "1",
            "--warmup-epochs", "0", "--aa", "none", "--reprob", "0", *extra]


def test_more_classes_than_the_model_is_refused_before_training(imagenet, tmp_path, capsys):
    write_imagenet(imagenet, classes=("n01", "n02", "n03", "n04"), per_class=3)  # 4 class folders
    line = fails(capsys, imagenet_argv(imagenet, tmp_path / "run"))
    assert "have 4 classes, but the ImageNet-1K model has 3 outputs" in line


# ---------------------------------------------------------------- 5. a torn log line

def test_a_torn_last_log_line_is_repaired_on_resume(cifar, tmp_path, capsys):
    out = run(cifar, tmp_path / "run", "--epochs", "2", "--lr", "1e-3", "--stop-after", "1")
    with open(os.path.join(out, "log.jsonl"), "a") as f:
        f.write('{"epoch": 2, "train_lo')                       # killed while appending
    capsys.readouterr()
    train.main(["--resume", out])
    assert "line 2 is not a whole record" in capsys.readouterr().out
    assert [json.loads(line)["epoch"] for line in open(os.path.join(out, "log.jsonl"))] == [1, 2]


# ---------------------------------------------------------------- 6. two runs on one folder

def test_a_run_folder_in_use_is_refused(cifar, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    with train_guards.lock_run_folder(str(out)):                 # another train.py holds the folder
        line = fails(capsys, ["--dataset", "cifar10", "--data-dir", cifar, "--output", str(out), *TINY,
                              "--batch-size", "8", "--no-low-memory", "--epochs", "1", "--subset", "8",
                              "--workers", "0", "--warmup-epochs", "0", "--lr", "1e-3"])
        assert "another train.py is running in" in line and "choose another --output" in line
    assert not (out / "last.pt").exists()
    run(cifar, out, "--epochs", "1", "--lr", "1e-3", "--subset", "8")  # free again: it runs, and lets go
    lock = train_guards.lock_run_folder(str(out))
    assert lock is not None
    lock.close()


def test_a_resume_into_another_runs_folder_is_refused(cifar, tmp_path, capsys):
    """--resume A --output B, B a finished run of its own: refused, naming B's run; B untouched.
    (A folder that holds no run may still take a resumed run: a branch of it.)"""
    a = run(cifar, tmp_path / "a", "--epochs", "2", "--lr", "1e-3", "--stop-after", "1", "--subset", "16")
    b = run(cifar, tmp_path / "b", "--epochs", "1", "--lr", "1e-3", "--subset", "16")
    before = {name: open(os.path.join(b, name), "rb").read() for name in os.listdir(b) if name != ".lock"}
    line = fails(capsys, ["--resume", a, "--output", b])
    assert f"--output {b} holds another run (cifar10, model tiny; its last.pt after epoch 1)" in line
    assert "Continue it in its own folder (leave out --output)" in line
    assert {name: open(os.path.join(b, name), "rb").read() for name in os.listdir(b) if name != ".lock"} == before
    train.main(["--resume", a, "--output", str(tmp_path / "branch")])
    assert torch.load(tmp_path / "branch" / "last.pt", weights_only=True)["epoch"] == 2


def test_resuming_an_older_checkpoint_of_the_same_folder_is_refused(cifar, tmp_path, capsys):
    """--resume C/epoch1.pt when C/last.pt is further on would replace last.pt and cut the log back."""
    c = run(cifar, tmp_path / "c", "--epochs", "3", "--lr", "1e-3", "--stop-after", "1", "--subset", "16")
    shutil.copy(os.path.join(c, "last.pt"), os.path.join(c, "epoch1.pt"))
    train.main(["--resume", c, "--stop-after", "2"])
    older = os.path.join(c, "epoch1.pt")
    line = fails(capsys, ["--resume", older])
    assert f"{os.path.join(c, 'last.pt')} holds this run after epoch 2; resuming {older} (after epoch 1)" in line
    assert f"Continue from last.pt with --resume {c}, or resume epoch1.pt into a new folder with --output" in line
    assert torch.load(os.path.join(c, "last.pt"), weights_only=True)["epoch"] == 2
    assert [json.loads(r)["epoch"] for r in open(os.path.join(c, "log.jsonl"))] == [1, 2]


# ---------------------------------------------------------------- 7. bad test images, evaluation failures

def test_a_bad_test_image_is_found_before_training(imagenet, tmp_path, capsys, monkeypatch):
    bad = os.path.join(imagenet, "val", "n02", "img_1.JPEG")
    with open(bad, "wb") as f:
        f.write(b"not a JPEG")

    def no_training(*a, **k):
        raise AssertionError("trained before the test images were checked")
    monkeypatch.setattr(train, "train_one_epoch", no_training)
    line = fails(capsys, imagenet_argv(imagenet, tmp_path / "run"))
    assert "cannot read image" in line and bad in line


def test_the_checkpoint_is_written_before_the_evaluation(cifar, tmp_path, capsys, monkeypatch):
    def broken(*a, **k):
        raise data.DataError("cannot read image x.png (broken); replace or delete it")
    monkeypatch.setattr(train, "evaluate", broken)
    out = tmp_path / "run"
    line = fails(capsys, ["--dataset", "cifar10", "--data-dir", cifar, "--output", str(out), *TINY,
                          "--batch-size", "8", "--workers", "0", "--no-low-memory", "--epochs", "1",
                          "--warmup-epochs", "0", "--lr", "1e-3"])
    assert "cannot read image x.png" in line and "checkpoint of epoch 1 was written before" in line
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 1


def test_an_epoch_whose_evaluation_was_stopped_is_finished_on_resume(cifar, tmp_path, capsys, monkeypatch):
    """A full disk while best.pt of epoch 1 (of 2) is written: last.pt is already written (its best
    top-1 too), the epoch's line is not. --resume evaluates epoch 1, writes best.pt and the line,
    then trains epoch 2: the run ends as the uninterrupted one. (A run is complete when its last
    epoch's line is in the log, not when its checkpoint exists; test_interrupts has a Ctrl-C.)"""
    recipe = ["--epochs", "2", "--lr", "1e-3", "--subset", "16"]
    whole = run(cifar, tmp_path / "whole", *recipe)
    real, saves = torch.save, []

    def full_disk_for_best_pt(obj, f, *a, **k):
        saves.append(obj["epoch"])
        if len(saves) == 3:  # epoch 1 writes last.pt, last.pt again with its best top-1, then best.pt
            f.write(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(obj, f, *a, **k)
    monkeypatch.setattr(torch, "save", full_disk_for_best_pt)
    line = fails(capsys, ["--dataset", "cifar10", "--data-dir", cifar, "--output", str(tmp_path / "split"), *TINY,
                          "--batch-size", "8", "--workers", "0", "--warmup-epochs", "0.5", "--no-low-memory",
                          "--aa", "none", "--reprob", "0", "--mixup", "0", *recipe])
    monkeypatch.undo()
    assert "best.pt (No space left on device" in line
    split = str(tmp_path / "split")
    assert open(os.path.join(split, "log.jsonl")).read() == "" and not os.path.exists(os.path.join(split, "best.pt"))
    train.main(["--resume", split])
    assert "note: epoch 1 has its checkpoint but no line in log.jsonl" in capsys.readouterr().out
    logs = [[json.loads(line) for line in open(os.path.join(d, "log.jsonl"))] for d in (whole, split)]
    keys = ("epoch", "train_loss", "train_top1", "lr", "top1", "best", "best_top1")
    assert [[r.get(k) for k in keys] for r in logs[0]] == [[r.get(k) for k in keys] for r in logs[1]]
    for name in ("last.pt", "best.pt"):
        a, b = (torch.load(os.path.join(d, name), weights_only=True) for d in (whole, split))
        assert a["epoch"] == b["epoch"] and a["best_top1"] == b["best_top1"], name
        assert all(torch.equal(value, b["model"][key]) for key, value in a["model"].items()), name


def test_train_and_val_class_folders_must_match_and_are_named(tmp_path):
    root = write_imagenet(str(tmp_path / "imagenet"), per_class=1)
    write_imagenet(str(tmp_path / "extra"), classes=("n04",), per_class=1)
    os.rename(str(tmp_path / "extra" / "val" / "n04"), os.path.join(root, "val", "n04"))
    with pytest.raises(data.DataError, match=r"\(3 and 4; only in val: n04\)"):
        data.build_datasets("imagenet", root, 32, download_missing=False)


# ---------------------------------------------------------------- 8. temporary files of killed runs

def test_temporary_files_of_killed_runs_are_removed(cifar, tmp_path):
    out = run(cifar, tmp_path / "run", "--epochs", "2", "--lr", "1e-3", "--stop-after", "1", "--subset", "16")
    stale = ["last.pt.k1ll3d.tmp", "best.pt.x7.tmp", "log.jsonl.tmp", "curves.png.a1.tmp"]
    for name in stale:
        open(os.path.join(out, name), "wb").write(b"half")
    open(os.path.join(out, "notes.txt"), "w").write("mine")
    train.main(["--resume", out])
    left = set(os.listdir(out))
    assert not left & set(stale) and "notes.txt" in left
    assert not [f for f in left if "tmp" in f]


def test_a_kill_during_the_first_checkpoint_write_is_cleaned_on_resume(cifar, tmp_path):
    """A real SIGKILL to train.py while it writes its first last.pt (its torch.save, hooked, kills
    the process half-way): the folder holds last.pt.<random>.tmp and no last.pt. --resume removes
    the temporary file, says so, and says to start again (a new run in the folder would also remove it)."""
    kill_in_save = ("import os, signal, sys, runpy, torch\n"
                    "def save(obj, f, *a, **k):\n"
                    "    f.write(b'half a checkpoint' * 65536); f.flush(); os.kill(os.getpid(), signal.SIGKILL)\n"
                    "torch.save = save\n"
                    f"sys.argv[0] = {os.path.join(ROOT, 'train.py')!r}\n"
                    "runpy.run_path(sys.argv[0], run_name='__main__')\n")
    argv = ["--dataset", "cifar10", "--data-dir", cifar, "--output", "run", *TINY, "--batch-size", "8",
            "--workers", "0", "--no-low-memory", "--epochs", "1", "--lr", "1e-3", "--subset", "16"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    killed = subprocess.run([sys.executable, "-c", kill_in_save, *argv], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    [tmp] = [f for f in os.listdir(tmp_path / "run") if f.endswith(".tmp")]
    assert tmp.startswith("last.pt.") and "last.pt" not in os.listdir(tmp_path / "run")
    resumed = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--resume", "run"], cwd=tmp_path,
                             env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 2 and "Traceback" not in resumed.stderr, resumed.stderr
    assert f"the unfinished write of a killed run, {tmp} (1.1 MB), removed (the run was killed while writing " \
           f"its first checkpoint: start it again without --resume)" in resumed.stderr
    assert not [f for f in os.listdir(tmp_path / "run") if f.endswith(".tmp")]


# ---------------------------------------------------------------- 9. unusable folders, full disks

def test_output_or_data_dir_that_is_a_file(cifar, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    line = fails(capsys, ["--data-dir", cifar, "--output", str(afile), *TINY, "--batch-size", "8",
                          "--no-low-memory"])
    assert "--output" in line and "is a file, not a folder" in line
    line = fails(capsys, ["--data-dir", str(afile), "--output", str(tmp_path / "run"), *TINY, "--no-low-memory"])
    assert "--data-dir" in line and "is a file, not a folder" in line
    assert afile.read_text() == "x"


def test_read_only_output(cifar, tmp_path, capsys, monkeypatch):
    out = tmp_path / "readonly"
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, *a, **k: False if str(p) == str(out) and mode & os.W_OK
                        else real(p, mode, *a, **k))
    line = fails(capsys, ["--dataset", "cifar10", "--data-dir", cifar, "--output", str(out), *TINY,
                          "--batch-size", "8", "--no-low-memory", "--epochs", "1", "--subset", "8",
                          "--workers", "0", "--warmup-epochs", "0", "--lr", "1e-3"])
    assert f"cannot write to the run folder {out}" in line and "choose a writable --output" in line


@contextlib.contextmanager
def small_disk(folder, size):
    """A real filesystem of `size` bytes at `folder`: a tmpfs. Mounting one needs root and the
    right to mount (CAP_SYS_ADMIN, which a container may withhold): skipped otherwise, with the
    reason. Unmounted at the end."""
    os.makedirs(folder)
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        pytest.skip("a real full disk here is a small tmpfs, and only root may mount one")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        if subprocess.run(["umount", str(folder)]).returncode:
            subprocess.run(["umount", "-l", str(folder)])  # busy: detached now, freed when let go


def checkpoint_size(cifar, tmp_path):
    """The size of the tiny runs' checkpoints (weights and Adam's state): a run of one epoch."""
    out = run(cifar, tmp_path / "sized", "--epochs", "1", "--lr", "1e-3", "--subset", "16")
    return os.path.getsize(os.path.join(out, "last.pt"))


@pytest.mark.parametrize("extra, kept", [
    ([], "after epoch 1"),                                  # last.pt again, with the epoch's top-1
    (["--save-every", "0.0001"], "in epoch 1 after step 1"),  # a mid-epoch last.pt (6 ms apart)
])
def test_a_full_disk_while_writing_a_checkpoint_keeps_the_previous_one(cifar, tmp_path, capsys, extra, kept):
    """A real full disk: a tmpfs with room for about 1.5 checkpoints. The first last.pt fits;
    writing the next one beside it (atomically: a temporary file, then a rename) fills the
    disk, and torch.save reports the short write as a RuntimeError of its zip writer."""
    size = checkpoint_size(cifar, tmp_path)
    with small_disk(tmp_path / "disk", size * 3 // 2) as disk:
        out = disk / "run"
        line = fails(capsys, ["--dataset", "cifar10", "--data-dir", cifar, "--output", str(out), *TINY,
                              "--batch-size", "8", "--workers", "0", "--no-low-memory", "--epochs", "2",
                              "--warmup-epochs", "0", "--lr", "1e-3", "--subset", "16", "--aa", "none",
                              "--reprob", "0", "--mixup", "0", *extra])
        assert f"cannot write {out / 'last.pt'} (No space left on device" in line, line
        assert f"({kept}), is kept" in line and f"--resume {out}" in line
        ckpt = torch.load(out / "last.pt", weights_only=True)
        assert ckpt["epoch"] == (1 if not extra else 0) and ("progress" in ckpt) == bool(extra)
        assert not [f for f in os.listdir(out) if "tmp" in f]


def test_a_full_disk_while_writing_best_pt(cifar, tmp_path):
    """best.pt, written after last.pt: the same fault, the same words (when best.pt was never
    written before, last.pt is what is kept)."""
    size = checkpoint_size(cifar, tmp_path)
    ckpt = torch.load(tmp_path / "sized" / "last.pt", weights_only=True)
    with small_disk(tmp_path / "disk", size * 3 // 2) as disk:
        s = types.SimpleNamespace(out_dir=str(disk))             # what write_checkpoint reads of a run
        checkpoints.save_checkpoint(ckpt, str(disk / "last.pt"))
        with pytest.raises(train_guards.TrainError) as e:
            train_guards.write_checkpoint(s, ckpt, "best.pt")
        assert f"cannot write {disk / 'best.pt'} (No space left on device" in str(e.value)
        assert f"{disk / 'last.pt'} (after epoch 1), is kept" in str(e.value)
        assert sorted(os.listdir(disk)) == ["last.pt"]


@pytest.mark.skipif(not hasattr(resource, "RLIMIT_FSIZE"), reason="no file size limits (RLIMIT_FSIZE) here")
@pytest.mark.parametrize("extra, failed", [([], "after epoch 1"), (["--save-every", "0.0001"], "mid-epoch")])
def test_a_checkpoint_write_that_fails_for_real_keeps_the_previous_one(cifar, tmp_path, extra, failed):
    """Without root: a file size limit (RLIMIT_FSIZE, as `ulimit -f`) makes the writes of a
    resumed run's checkpoints fail for real, with EFBIG, which torch.save reports as the same
    RuntimeError as a full disk's ENOSPC. (Python ignores SIGXFSZ: the write returns the error.)"""
    out = run(cifar, tmp_path / "run", "--epochs", "2", "--lr", "1e-3", "--stop-after", "1", "--subset", "16")
    limit = os.path.getsize(os.path.join(out, "last.pt")) // 2   # args.json and the log fit
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--resume", out, *extra],
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)),
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"},
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.replace("\r", "\n").splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert f"cannot write {os.path.join(out, 'last.pt')} (File too large" in lines[0]
    assert "(after epoch 1), is kept" in lines[0] and f"--resume {out}" in lines[0]
    assert torch.load(os.path.join(out, "last.pt"), weights_only=True)["epoch"] == 1
    assert not [f for f in os.listdir(out) if "tmp" in f]


# ---------------------------------------------------------------- 9b. said, not silent (issue 22, item 8)

def test_an_output_link_to_nowhere_is_named_as_one(cifar, tmp_path, capsys):
    out = tmp_path / "run"
    os.symlink(tmp_path / "gone", out)                          # os.makedirs said only "File exists"
    line = fails(capsys, ["--data-dir", cifar, "--output", str(out), *TINY, "--batch-size", "8",
                          "--no-low-memory"])
    assert f"--output {out} is a symbolic link to {tmp_path / 'gone'}, which does not exist" in line


def test_a_class_folder_linking_to_its_own_split_is_refused(tmp_path):
    """train/loop -> train and val/loop -> val: each would be one more class, holding every
    image of the others (train/ and val/ still have the same class folders)."""
    root = write_imagenet(str(tmp_path / "imagenet"), per_class=1)
    for split in ("train", "val"):
        os.symlink(os.path.join(root, split), os.path.join(root, split, "loop"))
    with pytest.raises(data.DataError, match=r"class folder .*train/loop is a link to .*train, which holds"):
        data.build_datasets("imagenet", root, 32, download_missing=False)
    with pytest.raises(data.DataError, match=r"class folder .*val/loop is a link to .*val, which holds"):
        data.build_test_set("imagenet", root, 32, download_missing=False)    # evaluate.py's


def test_resume_with_another_model_preset_names_both(cifar, tmp_path, capsys):
    out = run(cifar, tmp_path / "run", "--epochs", "2", "--lr", "1e-3", "--stop-after", "1", "--subset", "8")
    capsys.readouterr()
    line = fails(capsys, ["--resume", out, "--model", "small"])
    assert "--model small given, but the resumed run trains --model tiny" in line and "drop --model small" in line


def test_a_warm_up_above_the_peak_learning_rate_is_warned_of(cifar, tmp_path, capsys):
    run(cifar, tmp_path / "run", "--epochs", "1", "--lr", "1e-3", "--warmup-lr", "0.01", "--subset", "8")
    printed = capsys.readouterr().out
    assert "warning: --warmup-lr 0.01 is above the peak learning rate 0.001" in printed
    run(cifar, tmp_path / "run2", "--epochs", "1", "--lr", "1e-3", "--warmup-lr", "1e-4", "--subset", "8")
    assert "--warmup-lr" not in capsys.readouterr().out.replace("warmup_lr", "")


def test_seed_out_of_range_is_refused_before_the_data_is_read(cifar, tmp_path, capsys):
    for seed in ("-1", "99999999999"):
        line = fails(capsys, ["--dataset", "cifar10", "--data-dir", cifar, "--output", str(tmp_path / seed),
                              *TINY, "--no-low-memory", "--subset", "8", "--seed", seed])
        assert line == f"error: --seed must be an integer from 0 to 2147483647, got {seed}"
        assert not (tmp_path / seed).exists()     # refused with the other options: nothing begun
    a = train_settings.resolve_args(train_settings.parse_args([*TINY, "--seed", "2147483647"]))
    assert a.seed == 2 ** 31 - 1


# ---------------------------------------------------------------- 10. DDP: errors of other ranks

def test_an_error_on_rank_1_reaches_the_terminal(tmp_path):
    root = write_imagenet(str(tmp_path / "imagenet"), per_class=4)   # 12 training images, 3 classes
    # the first image rank 1 reads in epoch 0 (the sampler is seeded: its order is known)
    train_set, _ = data.build_datasets("imagenet", root, 32, download_missing=False)
    sampler = torch.utils.data.DistributedSampler(train_set, num_replicas=2, rank=1, shuffle=True, seed=0,
                                                  drop_last=True)
    sampler.set_epoch(0)
    bad = train_set.samples[next(iter(sampler))][0]
    with open(bad, "wb") as f:
        f.write(b"not a JPEG")
    argv = ["--dataset", "imagenet", "--data-dir", root, *TINY, "--img-size", "32", "--batch-size", "2",
            "--accum-iter", "1", "--workers", "0", "--epochs", "1", "--warmup-epochs", "0", "--aa", "none",
            "--reprob", "0", "--test-subset", "3", "--output", str(tmp_path / "run"), "--dist-timeout", "2"]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           "--master_addr=127.0.0.1", f"--master_port={free_port()}",
                           os.path.join(ROOT, "train.py"), *argv],
                          cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode != 0
    assert f"rank 1: error: cannot read image {bad}" in proc.stderr, proc.stderr[-3000:]


def test_dist_timeout_reaches_the_process_group(monkeypatch, capsys):
    seen = {}

    def init(backend, timeout):
        seen.update(backend=backend, timeout=timeout)
        raise train.TrainError("stop here")
    monkeypatch.setattr(train.dist, "init_process_group", init)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit):
        train.main(["--device", "cpu", "--dist-timeout", "3", "--no-low-memory"])
    assert seen["backend"] == "gloo" and seen["timeout"].total_seconds() == 180
    assert "rank 1: error: stop here" in capsys.readouterr().err
    assert "--dist-timeout" in train_settings.build_parser().format_help()


# ---------------------------------------------------------------- 11. memory, test sets, bare weights

def test_options_that_cannot_fit_in_memory_are_refused(cifar, tmp_path, capsys):
    line = fails(capsys, ["--dataset", "cifar10", "--data-dir", cifar, "--output", str(tmp_path / "run"),
                          *TINY[:-2], "--T", "10000000", "--batch-size", "8", "--no-low-memory"])
    assert "--T 10000000" in line and "GiB" in line and "lower --T" in line


def test_imagenet_test_set_needs_val_only(tmp_path):
    root = write_imagenet(str(tmp_path / "imagenet"), per_class=2)
    os.rename(os.path.join(root, "train"), os.path.join(root, "elsewhere"))
    test_set = data.build_test_set("imagenet", root, img_size=32)
    assert len(test_set) == 6 and test_set.classes == ["n01", "n02", "n03"]


def test_a_bare_state_dict_asks_for_the_training_checkpoint():
    model = qkformer.create_model("tiny", num_classes=10, embed_dim=32, num_heads=1, depths=3, T=1)
    with pytest.raises(ValueError, match="without the config .* checkpoint written by train.py"):
        checkpoints.model_from_checkpoint(model.state_dict())


def test_sync_bn_says_the_fused_path_is_off(monkeypatch):
    flags = (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    s = train_settings.Session(0, 2, torch.device("cuda", 0))
    s.args = train_settings.resolve_args(train_settings.parse_args(["--sync-bn", "--no-tf32"]))
    s.sources = {"amp": "default"}
    train_settings.setup_device(s)
    torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
    assert any("--sync-bn" in n and "more memory, the same results" in n for n in s.notes)
