"""Reading the project's markdown files (tutorial.md, README.md) for the tests.

The conventions, shared by every markdown file whose code the tests check:

  * Code is in fenced blocks (```python, ```bash, ```text, bare ```). A line
    `<!-- not run -->` just before a block (blank lines allowed in between) marks a block
    that is shown but not run; a line `<!-- file: NAME -->` marks a block that is the content
    of a file the reader saves as NAME. `read_blocks` returns the blocks with these marks.
  * A bash block holds command lines; `command_lines` splits it into logical lines
    (backslash continuations joined, comments dropped).
  * A command line that runs one of the project's scripts (`python train.py ...`,
    `torchrun ... train.py ...`, `python evaluate.py ...`, `python benchmark.py ...`) must be
    accepted by that script's own argument parser: `check_command` parses it as the script
    would, without running anything.

Usage:

    for block in read_blocks("README.md"):
        if block["lang"] == "bash":
            for line in command_lines(block["code"]):
                check_command(line, where=f"README.md:{block['line']}")
"""
import contextlib
import io
import os
import re
import shlex
import sys
from unittest import mock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:                    # the project's scripts, as conftest.py does
    sys.path.insert(0, ROOT)

SCRIPTS = ("train.py", "evaluate.py", "complexity.py", "benchmark.py")

FENCE = re.compile(r"^```(\w*)\s*$")
MARK = re.compile(r"^<!--\s*(not run|file:\s*(\S+))\s*-->\s*$")


# ----------------------------------------------------------------------------------------
# Blocks, pictures and tables

def read_blocks(path):
    """The fenced blocks of a markdown file, in order: dicts with lang, code, line (of the
    first code line, 1-based), run (False after <!-- not run -->) and file (a name after
    <!-- file: NAME -->, else None)."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    name = os.path.basename(path)
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        j = i - 1                                   # the marker, above blank lines
        while j >= 0 and not lines[j].strip():
            j -= 1
        mark = MARK.match(lines[j]) if j >= 0 else None
        end = i + 1
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        if end == len(lines):
            raise ValueError(f"{name}:{i + 1}: a code block that is never closed")
        blocks.append(dict(lang=m.group(1), code="\n".join(lines[i + 1:end]) + "\n", line=i + 2,
                           run=not (mark and mark.group(1) == "not run"),
                           file=mark.group(2) if mark and mark.group(2) else None))
        i = end + 1
    return blocks


def pictures_shown(text):
    """The pictures under docs/ that a markdown text shows, ![...](docs/NAME.png)."""
    return re.findall(r"!\[[^\]]*\]\((docs/[^)\s]+\.png)\)", text)


def markdown_table_after(text, marker):
    """(header, rows), lists of cell strings, of the first markdown table after `marker`."""
    rest = text[text.index(marker):].splitlines()[1:]
    rows = []
    for line in rest:
        if not line.strip():
            if rows:
                break
            continue
        if not line.lstrip().startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not all(set(c) <= set("-: ") for c in cells):   # skip the |---|---| line
            rows.append(cells)
    return rows[0], rows[1:]


# ----------------------------------------------------------------------------------------
# Command lines

def command_lines(code):
    """Logical command lines of a bash block (continuations joined, comments dropped)."""
    joined = re.sub(r"\\\n\s*", " ", code)
    return [line.split(" #")[0].strip() for line in joined.splitlines()
            if line.strip() and not line.strip().startswith("#")]


def script_command(line):
    """(script, argv) when `line` runs one of the project's SCRIPTS (through python, torchrun,
    with environment variables before it, ...), else None. argv: the words after the script."""
    for i, word in enumerate(shlex.split(line)):
        if word.endswith(".py"):
            if os.path.basename(word) in SCRIPTS:
                return os.path.basename(word), shlex.split(line)[i + 1:]
            return None                             # another script (tests/test_tutorial.py, ...)
    return None


def check_command(line, where=None):
    """True if `line` runs one of the project's scripts and the script's parser accepts its
    options; False if it runs none of them (nothing to check). Raises AssertionError, with
    the parser's message, if the script would reject the options.

    What is checked, per script (nothing is run, no file is read):
      * train.py: `train.parse_args` and `train.resolve_args` (the recipes and the checks of
        `train.check_args`), then the model configuration the options describe (preset,
        --attention, --neuron, sizes), as `train.build_model` would build it. A --resume
        line is checked against the defaults, not against the checkpoint's options.
      * evaluate.py, complexity.py: their `build_parser`.
      * benchmark.py: `benchmark.parse_args`, as on a machine with a GPU (a `--device cuda`
        command is valid; this machine may have none).
    `--help` is accepted.
    """
    found = script_command(line)
    if found is None:
        return False
    script, argv = found
    where = f"{where}: {line}" if where else line
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            problem = _parse(script, argv)
    except SystemExit as e:
        if e.code in (0, None):                     # --help
            return True
        message = err.getvalue().strip().splitlines()    # argparse: its usage, then "prog: error: ..."
        problem = message[-1].split("error: ", 1)[-1] if message else f"exit status {e.code}"
    except Exception as e:                          # train.TrainError, a bad model config
        problem = f"{type(e).__name__}: {e}"
    if problem:
        raise AssertionError(f"{where}\n  {script} rejects these options: {problem}")
    return True


def _parse(script, argv):
    """Parse argv as `script` does; returns a problem (str) or None. Parser errors exit."""
    if script == "train.py":
        import qkformer
        import train
        args = train.resolve_args(train.parse_args(argv))
        if args.model not in qkformer.PRESETS:
            return f"unknown --model {args.model!r}; choose one of {sorted(qkformer.PRESETS)}"
        qkformer.QKFormerConfig(**{**qkformer.PRESETS[args.model], **train.model_overrides(args)})
        return None
    if script in ("evaluate.py", "complexity.py"):
        module = __import__(script[:-len(".py")])
        module.build_parser().parse_args(argv)
        return None
    import benchmark
    import torch
    with mock.patch.object(torch.cuda, "is_available", return_value=True):
        benchmark.parse_args(argv)
    return None
