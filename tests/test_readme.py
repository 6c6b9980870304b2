"""README.md: its commands work as written.

The README follows the conventions of tests/_markdown.py: blocks after `<!-- not run -->`
(installation, full training, anything that needs a dataset, a GPU or many minutes) are
not run, but every project command in them must be accepted by the script's own parser;
the other bash blocks are run, in a temporary folder, with the repository on PYTHONPATH.
"""
import os
import subprocess

import pytest

from _markdown import ROOT, check_command, command_lines, read_blocks

README = os.path.join(ROOT, "README.md")
BLOCKS = read_blocks(README)


def test_readme_names_the_ci_test_command():
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        ci = f.read()
    commands = [line for b in BLOCKS if b["lang"] == "bash" for line in command_lines(b["code"])]
    assert "pip install -r requirements.txt" in commands
    assert "python train.py --dataset cifar10" in commands
    tests = [c for c in commands if c.startswith("python -m pytest")]
    assert len(tests) == 1 and tests[0] in ci


def test_commands_not_run_are_accepted_by_their_scripts():
    checked = 0
    for block in BLOCKS:
        if block["lang"] == "bash" and not block["run"]:
            for line in command_lines(block["code"]):
                checked += check_command(line, where=f"README.md:{block['line']}")
    assert checked >= 5


@pytest.mark.parametrize("block", [b for b in BLOCKS if b["lang"] == "bash" and b["run"]],
                         ids=lambda b: f"README.md:{b['line']}")
def test_short_commands_run(block, tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
               MPLBACKEND="Agg")
    for line in command_lines(block["code"]):
        if line.split()[:2] == ["python", "-m"] or line.startswith("pip "):
            continue                        # the test command itself, the installation: CI runs them
        words = line.split()
        script = next((w for w in words if w.endswith(".py")), None)
        if script:                          # the project's scripts, from the repository
            line = line.replace(script, os.path.join(ROOT, script), 1)
        proc = subprocess.run(["bash", "-eo", "pipefail", "-c", line], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, (f"README.md:{block['line']}: {line}\n"
                                      f"{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")


def test_shipped_checkpoint_is_the_one_described():
    """checkpoints/cpu-recipe.pt: the sha256 README gives, the CPU recipe's model and settings,
    and a model that runs (its accuracy needs CIFAR-10: README gives the command)."""
    import hashlib
    import re

    import torch

    import checkpoints
    import qkformer
    import train_settings
    path = os.path.join(ROOT, "checkpoints", "cpu-recipe.pt")
    with open(README, encoding="utf-8") as f:
        text = f.read()
    stated = re.search(r"sha256\s+`([0-9a-f]{64})`", text).group(1)
    with open(path, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == stated
    checkpoint = checkpoints.load_checkpoint(path)
    assert checkpoint["args"]["recipe"] == "cpu"
    args, recipe = checkpoint["args"], train_settings.CPU_RECIPE
    timed = ("epochs", "warmup_epochs")  # chosen by the run's timing (--minutes), the warm-up its share
    assert {k: args[k] for k in recipe if k not in timed} == {k: v for k, v in recipe.items() if k not in timed}
    assert args["warmup_epochs"] == recipe["warmup_epochs"] * args["epochs"] / recipe["epochs"]
    assert f"`--recipe cpu` run above ({args['epochs']} epochs" in " ".join(text.split())  # as README says
    model = checkpoints.model_from_checkpoint(checkpoint).eval()
    assert model.config == qkformer.QKFormerConfig(**qkformer.PRESETS[train_settings.CPU_RECIPE["model"]])
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
