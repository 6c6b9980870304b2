"""benchmark.py (and evaluate.py's device options, the same rule): the --amp rule of
train.py on the CPU, the data phase on a fake CIFAR-10, clear errors. The GPU side is in
tests/test_cuda.py (benchmark.py --device cuda --amp)."""
import json
import os
import subprocess
import sys

import pytest
import torch

import data

import benchmark
import evaluate as ev
from _fakedata import write_cifar, write_imagenet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    write_cifar(root, per_file=8, n_test=4)            # 40 training images
    return str(root)


def test_options_follow_train_py():
    args = benchmark.parse_args(["--device", "cpu", "--amp"])
    assert args.amp == "auto" and args.tf32 and args.phases == ["train", "inference"]
    assert benchmark.parse_args(["--device", "cpu", "--amp", "fp16", "--no-tf32"]).tf32 is False
    assert benchmark.parse_args(["--device", "cpu"]).amp == "off"
    counts = benchmark.parse_args(["--device", "cpu"]).data_workers
    assert counts[0] == 0 and counts == sorted(set(counts))
    assert counts[-1] == len(os.sched_getaffinity(0))            # the CPUs this process may use
    for bad in (["--phases", "train,warp"], ["--data-workers", "1,x"], ["--data-workers", "-1"],
                ["--amp", "fp8"]):
        with pytest.raises(SystemExit) as e:
            benchmark.parse_args(["--device", "cpu", *bad])
        assert e.value.code == 2


def test_data_phase_on_cifar(cifar, tmp_path, capsys):
    out = tmp_path / "bench.json"
    benchmark.main(["--phases", "data", "--device", "cpu", "--data-dir", cifar, "--batch-size", "4",
                    "--data-batches", "3", "--data-workers", "0,1", "--amp", "--output", str(out)])
    printed = capsys.readouterr().out
    assert "--amp auto ignored" in printed                         # the CPU: as train.py
    report = json.loads(out.read_text())
    assert report["amp"] == "off" and report["tf32"] is False
    data = report["data"]
    assert data["augmentation"]["randaugment"] == "rand-m9-n1-mstd0.4-inc1"   # the recipe's
    assert set(data["images_per_s_by_workers"]) == {"0", "1"}
    assert all(rate > 0 for rate in data["images_per_s_by_workers"].values())
    assert "1 workers" in printed and "per worker" in printed


def test_data_phase_on_imagenet_jpegs(tmp_path, capsys):
    root = write_imagenet(str(tmp_path / "imagenet"), per_class=4, size=(64, 48))   # 12 JPEGs
    benchmark.main(["--phases", "data", "--device", "cpu", "--dataset", "imagenet", "--data-dir", root,
                    "--img-size", "32", "--batch-size", "3", "--data-batches", "2",
                    "--data-workers", "0", "--output", str(tmp_path / "b.json")])
    report = json.loads((tmp_path / "b.json").read_text())
    assert report["data"]["augmentation"]["randaugment"] == "rand-m9-mstd0.5-inc1"
    assert report["data"]["images_per_s_by_workers"]["0"] > 0


def test_data_phase_without_enough_images_is_one_clear_error(cifar, tmp_path):
    proc = subprocess.run([sys.executable, "benchmark.py", "--phases", "data", "--device", "cpu",
                           "--data-dir", cifar, "--batch-size", "64", "--output", str(tmp_path / "b.json")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "needs 704 training images" in lines[0]


def test_evaluate_device_options():
    args = ev.build_parser().parse_args(["--checkpoint", "x.pt", "--amp"])
    assert args.amp == "auto" and args.tf32 and args.workers is None
    assert data.default_workers("cpu") == 0                         # the rule of all three scripts
    assert data.default_workers("cuda") == min(8, len(os.sched_getaffinity(0)))
    assert data.default_workers("cuda", processes_per_machine=1000) == 1


def test_training_phase_times_train_py_step(monkeypatch):
    """The training phase runs train.py's own step (train.train_one_epoch with its fused AdamW),
    one whole step per timed interval, warm-up steps left out."""
    import train
    seen = []
    real = train.train_one_epoch

    def spy(ctx, loader, epoch, mixup=None):
        seen.append((ctx.optimizer.defaults["fused"], len(loader), ctx.scaler.is_enabled()))
        return real(ctx, loader, epoch, mixup)
    monkeypatch.setattr(train, "train_one_epoch", spy)
    args = benchmark.parse_args(["--device", "cpu", "--model", "tiny", "--batch-size", "2", "--T", "1",
                                 "--steps", "2", "--warmup", "1"])
    model = benchmark.build(args)
    times = benchmark.time_training_steps(args, model, torch.device("cpu"), None)
    assert seen == [(True, 3, False)]
    assert len(times) == 2 and all(t > 0 for t in times)
