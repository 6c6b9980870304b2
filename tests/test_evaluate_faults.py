"""What goes wrong in an evaluation, and what is kept (issue 22, "Nothing lost, round two").

evaluate.py's output folder: named after the run (two runs' best.pt never share one), locked
while an evaluation writes there, metrics.json written atomically (a real failing write: the
file size limit RLIMIT_FSIZE of a real evaluate.py process, which makes its write fail as a
full disk does, after the bytes that fit). And checkpoints or options that used to give a
traceback, a "does not exist" for a folder, or a meaningless accuracy: each one line, exit 2.

Tiny models (embed_dim 16, T = 2) on a fake CIFAR-10 of 12 test images (test_evaluate's).
"""
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

import checkpoints
import data
import evaluate as ev
import qkformer
import train_guards
from _fakedata import write_imagenet
from test_evaluate import own_checkpoint, write_fake_cifar10

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.usefixtures("one_thread")     # conftest.py


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory):
    return write_fake_cifar10(tmp_path_factory.mktemp("data"))


def evaluate_cli(ckpt, cifar_dir, *extra):
    """evaluate.py's main() on 4 images, without pictures; returns its exit code."""
    return ev.main(["--checkpoint", str(ckpt), "--dataset", "cifar10", "--data-dir", cifar_dir, "--limit", "4",
                    "--batch-size", "4", "--pictures", "0", *extra])


def error_line(capsys):
    """The one line starting with "error: " that evaluate.py printed on stderr (after the
    progress bars), and nothing of a traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: ") and sum(line.startswith("error:") for line in lines) == 1, err
    return lines[-1]


# ---------------------------------------------------------------- 4. the output folder

def test_the_default_output_is_named_after_the_run(tmp_path, cifar_dir, capsys, monkeypatch):
    """The best.pt of two runs: two folders, eval/<run>-best/, each with its own results."""
    monkeypatch.chdir(tmp_path)
    for run in ("a", "b"):
        os.makedirs(f"runs/{run}")
        own_checkpoint(f"runs/{run}/best.pt")
        assert evaluate_cli(f"runs/{run}/best.pt", cifar_dir) == 0
        assert f"wrote {os.path.join('eval', run + '-best')}/metrics.json" in capsys.readouterr().out
    for run in ("a", "b"):
        metrics = json.loads((tmp_path / "eval" / f"{run}-best" / "metrics.json").read_text())
        assert metrics["checkpoint"] == str(tmp_path / "runs" / run / "best.pt")
    assert "eval/<folder>-<name>" in ev.build_parser().format_help()


def test_a_second_evaluation_on_one_output_is_refused(tmp_path, cifar_dir, capsys):
    """A folder locked by another process (<out>/.lock: an evaluate.py writing there, or here a
    train.py whose run folder it is; the same lock) is refused before anything is computed."""
    ckpt = own_checkpoint(tmp_path / "run.pt")
    out = tmp_path / "eval"
    out.mkdir()
    held = train_guards.lock_run_folder(str(out))
    try:
        assert evaluate_cli(ckpt, cifar_dir, "--output", str(out)) == 2
        line = error_line(capsys)
        assert f"another process is writing to {out}" in line and "choose another --output" in line
        assert not (out / "metrics.json").exists()
    finally:
        held.close()
    assert evaluate_cli(ckpt, cifar_dir, "--output", str(out)) == 0         # free again: it runs
    lock = checkpoints.lock_folder(str(out), "output folder", "evaluate.py")   # and it let go
    assert lock is not None
    lock.close()


FILE_SIZE_LIMIT = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)     # a write past the limit fails (EFBIG), as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
sys.path.insert(0, {root!r})
import evaluate
sys.exit(evaluate.main(sys.argv[1:]))
"""


def test_a_failing_write_keeps_the_previous_metrics(tmp_path, cifar_dir, capsys):
    """A real evaluate.py process whose writes fail past 8 KiB, as they do on a disk that fills
    up: metrics.json was left as its first 8,192 bytes, invalid JSON; now the previous file is
    kept whole and one line says so."""
    ckpt = own_checkpoint(tmp_path / "run.pt")
    out = tmp_path / "eval"
    assert evaluate_cli(ckpt, cifar_dir, "--output", str(out)) == 0
    before = (out / "metrics.json").read_bytes()
    assert len(before) > 8192                                   # the limit cuts it
    proc = subprocess.run([sys.executable, "-c", FILE_SIZE_LIMIT.format(limit=8192, root=ROOT),
                           "--checkpoint", ckpt, "--dataset", "cifar10", "--data-dir", cifar_dir, "--limit",
                           "8", "--batch-size", "4", "--pictures", "0", "--output", str(out)],
                          cwd=str(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert (out / "metrics.json").read_bytes() == before        # whole, the first evaluation's
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"cannot write {out / 'metrics.json'}" in lines[0] and "the previous one is kept" in lines[0]


# ---------------------------------------------------------------- 7. one line, not a traceback

def test_a_weight_of_another_shape_is_one_line(tmp_path, cifar_dir, capsys):
    ckpt = own_checkpoint(tmp_path / "run.pt")
    saved = torch.load(ckpt, weights_only=True)
    saved["model"]["head.weight"] = torch.zeros(10, 8)          # the config says 10 x 64
    torch.save(saved, ckpt)
    assert evaluate_cli(ckpt, cifar_dir, "--output", str(tmp_path / "eval")) == 2
    line = error_line(capsys)
    assert "do not fit its own config" in line and "1 of another shape" in line and "head.weight (10, 8)" in line


def test_a_bad_image_read_by_a_loader_worker_is_one_line(tmp_path, capsys, monkeypatch):
    """With --workers 1 the unreadable image is found in a worker process, whose traceback
    torch passes on inside the error's message: one line is printed, as without workers."""
    monkeypatch.setitem(data.DATASETS, "imagenet", dataclasses.replace(data.DATASETS["imagenet"], num_classes=3))
    root = write_imagenet(str(tmp_path / "imagenet"), per_class=2)
    bad = os.path.join(root, "val", "n02", "img_1.JPEG")
    with open(bad, "wb") as f:
        f.write(b"not a JPEG")
    model = qkformer.create_model("imagenet_10_384", embed_dim=16, depths=4, num_heads=2, T=1, img_size=32,
                                  num_classes=3)
    ckpt = tmp_path / "imagenet.pt"
    torch.save({"model": model.state_dict(), "config": dict(vars(model.config))}, ckpt)
    code = ev.main(["--checkpoint", str(ckpt), "--dataset", "imagenet", "--data-dir", root, "--workers", "1",
                    "--batch-size", "2", "--pictures", "0", "--output", str(tmp_path / "eval")])
    assert code == 2
    line = error_line(capsys)
    assert line.startswith(f"error: cannot read image {bad}") and "DataLoader worker" not in line


# ---------------------------------------------------------------- 8. refused, not reported

def test_non_finite_weights_are_refused(tmp_path, cifar_dir, capsys):
    """A diverged run's weights predict one class for every image: no accuracy to report."""
    ckpt = own_checkpoint(tmp_path / "run.pt")
    saved = torch.load(ckpt, weights_only=True)
    saved["model"]["head.weight"][0, 0] = float("nan")
    torch.save(saved, ckpt)
    out = tmp_path / "eval"
    assert evaluate_cli(ckpt, cifar_dir, "--output", str(out)) == 2
    line = error_line(capsys)
    assert "are not finite: head.weight hold" in line and "inf or NaN" in line
    assert not (out / "metrics.json").exists()


def test_a_checkpoint_folder_is_named_as_one(tmp_path, cifar_dir, capsys):
    run = tmp_path / "run"
    run.mkdir()
    own_checkpoint(run / "best.pt")
    assert evaluate_cli(run, cifar_dir, "--output", str(tmp_path / "eval")) == 2
    line = error_line(capsys)
    assert "is a folder, not a file" in line and "best.pt" in line and "does not exist" not in line


def test_an_output_link_to_nowhere_is_named_as_one(tmp_path, cifar_dir, capsys):
    out = tmp_path / "eval"
    os.symlink(tmp_path / "gone", out)
    ckpt = own_checkpoint(tmp_path / "run.pt")
    assert evaluate_cli(ckpt, cifar_dir, "--output", str(out)) == 2
    line = error_line(capsys)
    assert f"--output {out} is a symbolic link to {tmp_path / 'gone'}, which does not exist" in line
    assert "File exists" not in line
