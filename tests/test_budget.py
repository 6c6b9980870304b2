"""--minutes (train_budget.py): a run that times itself and trains the epochs that fit is the run
of that epoch count, bit for bit, whether continued with --resume or repeated with --epochs N."""
import json
import os

import pytest
import torch

import train
import train_budget
import train_settings
from _runs import assert_same_run

pytestmark = pytest.mark.usefixtures("one_thread")     # conftest.py

# --recipe cpu (crops and flips: the timing's batches draw random numbers) on the tiny model of
# test_train.py, in batches the fake CIFAR-10's 40 images can fill.
FLAGS = ["--dataset", "cifar10", "--recipe", "cpu", "--batch-size", "8", "--workers", "0", "--no-low-memory",
         "--model", "tiny", "--embed-dim", "32", "--num-heads", "1", "--depths", "3", "--T", "1"]


def test_epochs_that_fit():
    # 100 s: 10 epochs of 9 s and the one evaluation at the end (5 s), not 11
    assert train_budget.epochs_that_fit(100, 9, 5, eval_every=1000) == 10
    assert train_budget.epochs_that_fit(100, 9, 5, eval_every=1) == 7          # an evaluation each epoch
    assert train_budget.epochs_that_fit(100, 9, 5, eval_every=1000, cooldown=2) == 8  # 10 epochs in all
    assert train_budget.epochs_that_fit(100, 9, 5, eval_every=2) == 8          # 9 would evaluate 5 times: 106 s
    assert train_budget.epochs_that_fit(10, 60, 5) == 1                        # at least one
    assert train_budget.epochs_that_fit(-5, 60, 5) == 1


def test_a_timed_run_is_the_run_of_its_epoch_count(cifar, tmp_path, monkeypatch, capsys):
    """The timing is real (a copy of the model trains and evaluates on the run's batches); the
    count it leads to is pinned at 3, so that the test is short and the warm-up is scaled."""
    found = []
    real = train_budget.epochs_that_fit
    monkeypatch.setattr(train_budget, "epochs_that_fit", lambda *a, **k: found.append(real(*a, **k)) or 3)
    timed = train.main(FLAGS + ["--data-dir", cifar, "--output", str(tmp_path / "timed"), "--minutes", "0.5",
                                "--stop-after", "1"])
    printed = capsys.readouterr().out
    assert found and found[0] >= 1                                     # what the timing found
    assert "3 epochs fit in --minutes 0.5" in printed
    settings = json.load(open(os.path.join(timed, "args.json")))
    assert settings["epochs"] == 3 and settings["warmup_epochs"] == 9 / 32 * 3 / 9   # the share of 9 epochs
    train.main(["--resume", timed])                                    # a resume does not time again
    assert "timing" not in capsys.readouterr().out
    again = train.main(FLAGS + ["--data-dir", cifar, "--output", str(tmp_path / "again"), "--epochs", "3"])
    assert "--minutes 28 (from the --recipe cpu) is not used" in capsys.readouterr().out
    assert_same_run(timed, again)  # weights, Adam's state, schedule, every epoch's loss and top-1
    repeated = json.load(open(os.path.join(again, "args.json")))
    own = ("output", "minutes", "stop_after")  # what the two invocations were told apart
    assert {k: v for k, v in repeated.items() if k not in own} == {k: v for k, v in settings.items() if k not in own}


def test_several_processes_keep_the_recipes_count():
    """Under torchrun each process would time its own share: the recipe's epochs are kept, and said."""
    s = train_settings.Session(rank=0, world=2, device=torch.device("cpu"))
    s.args = train_settings.resolve_args(train_settings.parse_args(["--recipe", "cpu"]))
    s.sources = {"epochs": "--recipe cpu"}
    train_budget.fit_epochs(s, train_one_epoch=None, evaluate=None)
    assert s.args.epochs == train_settings.CPU_RECIPE["epochs"]
    assert "timed on one process" in s.notes[0]


def test_minutes_must_be_positive():
    for bad in ("0", "-1", "nan"):
        with pytest.raises(train_settings.TrainError, match="--minutes must be a positive number"):
            train_settings.resolve_args(train_settings.parse_args(["--minutes", bad]))
