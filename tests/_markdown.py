"""Reading the project's markdown files (tutorial.md, README.md) for the tests.

The conventions, shared by every markdown file whose code the tests check:

  * Code is in fenced blocks (```python, ```bash, ```text, bare ```). A line
    `<!-- not run -->` just before a block (blank lines allowed in between) marks a block
    that is shown but not run; a line `<!-- file: NAME -->` marks a block that is the content
    of a file the reader saves as NAME. `read_blocks` returns the blocks with these marks.
  * A line `<!-- output -->` (or `<!-- output tol=0.1 -->`) before a ```text block marks it
    as what the run block just above it prints. `run_page` runs a page's blocks and compares:
    line by line, numbers within a relative tolerance (default 2e-2, absolute 1e-3 near
    zero), everything else exactly, runs of spaces not significant. A run block that prints
    and is not followed by its output is an error too: the page shows every output.
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
import shutil
import subprocess
import sys
import time
from unittest import mock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:                    # the project's scripts, as conftest.py does
    sys.path.insert(0, ROOT)

SCRIPTS = ("train.py", "evaluate.py", "complexity.py", "benchmark.py")

FENCE = re.compile(r"^```(\w*)\s*$")
MARK = re.compile(r"^<!--\s*(not run|file:\s*(\S+)|output(?:\s+tol=(\S+))?)\s*-->\s*$")
DEFAULT_TOL = 2e-2                          # relative tolerance of printed numbers
NUMBER = re.compile(r"([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)")


# ----------------------------------------------------------------------------------------
# Blocks, pictures and tables

def read_blocks(path):
    """The fenced blocks of a markdown file, in order: dicts with lang, code, line (of the
    first code line, 1-based), run (False after <!-- not run -->), file (a name after
    <!-- file: NAME -->, else None) and output (the tolerance after <!-- output -->: the
    block is what the run block before it prints; else None)."""
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
        output = None
        if mark and mark.group(1).startswith("output"):
            output = float(mark.group(3)) if mark.group(3) else DEFAULT_TOL
        blocks.append(dict(lang=m.group(1), code="\n".join(lines[i + 1:end]) + "\n", line=i + 2,
                           run=not (mark and mark.group(1) == "not run") and output is None,
                           file=mark.group(2) if mark and mark.group(2) else None,
                           output=output))
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


CITED_MODULES = ("neuron", "qkformer", "checkpoints", "evaluate", "complexity", "train", "data")


def cited_names(text):
    """The names a page writes as `module.attribute` in backticks (module one of
    CITED_MODULES), without file names such as `train.py`."""
    cited = set(re.findall(rf"`((?:{'|'.join(CITED_MODULES)})(?:\.[A-Za-z_]\w*)+)(?:\(\))?`", text))
    return sorted(cited - {f"{m}.py" for m in CITED_MODULES})


def missing_names(text):
    """The names of `cited_names(text)` that the code does not have."""
    import importlib
    missing = []
    for name in cited_names(text):
        module, *attrs = name.split(".")
        obj = importlib.import_module(module)
        for a in attrs:
            if not hasattr(obj, a):
                missing.append(name)
                break
            obj = getattr(obj, a)
    return missing


# ----------------------------------------------------------------------------------------
# Running a page: its blocks in order, their printed output against the page's

SCRATCH = "scratch"     # where a page's code writes its pictures; the page shows docs/ copies
LINKED = ("tests/golden", "checkpoints", "scripts")   # besides the .py files of the root


def prepare_workdir(workdir):
    """Make `workdir` look like the repository root: the project's scripts, the golden files,
    the shipped checkpoints and scripts/, linked (copied where links are not possible)."""
    for name in os.listdir(ROOT):
        if name.endswith(".py"):
            _link(os.path.join(ROOT, name), os.path.join(workdir, name))
    for name in LINKED:
        if os.path.exists(os.path.join(ROOT, name)):
            os.makedirs(os.path.dirname(os.path.join(workdir, name)), exist_ok=True)
            _link(os.path.join(ROOT, name), os.path.join(workdir, name))


def _link(src, dst):
    if os.path.lexists(dst):
        return
    try:
        os.symlink(src, dst)
    except OSError:
        (shutil.copytree if os.path.isdir(src) else shutil.copy)(src, dst)


def output_mismatch(expected, printed, tol=DEFAULT_TOL):
    """None if `printed` reads as `expected` (numbers within `tol`, relative, or 1e-3
    absolute; other text exactly, runs of white space not significant), else a message."""
    want = [line.split() for line in expected.strip("\n").splitlines()]
    got = [line.split() for line in printed.strip("\n").splitlines()]
    if len(want) != len(got):
        return f"{len(got)} lines printed, the page shows {len(want)}"
    for n, (w, g) in enumerate(zip(want, got), 1):
        w, g = NUMBER.split(" ".join(w)), NUMBER.split(" ".join(g))
        if len(w) != len(g) or w[0::2] != g[0::2]:
            return f"line {n}: printed {' '.join(g)!r}, the page shows {' '.join(w)!r}"
        for a, b in zip(w[1::2], g[1::2]):
            if abs(float(a) - float(b)) > max(tol * max(abs(float(a)), abs(float(b))), 1e-3):
                return f"line {n}: printed {b}, the page shows {a} (tolerance {tol:g})"
    return None


def run_page(path, workdir, namespace=None, log=print, new_outputs=None):
    """Run every block of the markdown file `path` in `workdir` (see `prepare_workdir`), in
    order, python blocks in one namespace (returned), bash blocks with `bash -eo pipefail`;
    `<!-- file: NAME -->` blocks are written to NAME. What each run block prints is compared
    with the `<!-- output -->` block after it. Raises AssertionError naming page:line.
    new_outputs: a dict instead of an error for a differing output: {block: what was printed}
    (for `write_outputs`, after a deliberate change such as a new shipped checkpoint)."""
    name = os.path.basename(path)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    namespace = {"__name__": "__page__"} if namespace is None else namespace
    old_cwd, old_path = os.getcwd(), list(sys.path)
    os.chdir(workdir)
    sys.path[:0] = [ROOT, workdir]
    printed, where = "", None              # the last run block's output, not yet compared
    try:
        for block in read_blocks(path):
            here = f"{name}:{block['line']}"
            if block["output"] is not None:
                if where is None:
                    raise AssertionError(f"{here}: an output block that follows no run block")
                problem = output_mismatch(block["code"], printed, block["output"])
                if problem and new_outputs is not None:
                    log(f"{here}: {problem}")
                    new_outputs[block["line"]] = (block["code"], printed)
                elif problem:
                    raise AssertionError(f"{where}: the output differs from the page's ({here}): "
                                         f"{problem}\nprinted:\n{printed}")
                printed, where = "", None
                continue
            if printed.strip():
                raise AssertionError(f"{where}: the block prints, but the page shows no "
                                     f"<!-- output --> block after it. It printed:\n{printed}")
            printed, where = "", None
            if block["file"]:
                with open(os.path.join(workdir, block["file"]), "w") as f:
                    f.write(block["code"])
                continue
            if not block["run"] or block["lang"] not in ("python", "bash"):
                continue
            start, where = time.time(), here
            if block["lang"] == "python":
                # padded with blank lines, so that tracebacks give the page's line numbers
                code = compile("\n" * (block["line"] - 1) + block["code"], name, "exec")
                out = io.StringIO()
                try:
                    with contextlib.redirect_stdout(out):
                        exec(code, namespace)
                except Exception as e:
                    raise AssertionError(f"the python block at {here} failed: "
                                         f"{type(e).__name__}: {e}") from e
                printed = out.getvalue()
            else:
                proc = subprocess.run(["bash", "-eo", "pipefail", "-c", block["code"]], cwd=workdir,
                                      env=env, capture_output=True, text=True, timeout=300)
                if proc.returncode != 0:
                    raise AssertionError(f"the bash block at {here} failed (exit {proc.returncode}):\n"
                                         f"{block['code']}\nstdout:\n{proc.stdout[-3000:]}\n"
                                         f"stderr:\n{proc.stderr[-3000:]}")
                printed = proc.stdout
            log(f"{here} ({block['lang']}) {time.time() - start:.1f} s")
        if printed.strip():
            raise AssertionError(f"{where}: the block prints, but the page shows no "
                                 f"<!-- output --> block after it. It printed:\n{printed}")
    finally:
        os.chdir(old_cwd)
        sys.path[:] = old_path
    return namespace


def write_outputs(path, workdir):
    """Run the page and write what its blocks print into the output blocks that differ (for
    a maintainer after a deliberate change; read the diff before committing it). Returns the
    number of blocks rewritten."""
    new_outputs = {}
    run_page(path, workdir, new_outputs=new_outputs)
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines(keepends=True)
    for first, (old, printed) in sorted(new_outputs.items(), reverse=True):   # bottom up
        start = first - 1                                   # 0-based index of the first line
        lines[start:start + len(old.splitlines())] = [line + "\n" for line in
                                                      printed.rstrip("\n").splitlines()]
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(lines)
    return len(new_outputs)


def check_pictures(path, workdir, max_bytes=150 * 1024):
    """Every picture the page shows, ![...](docs/NAME.png), is committed (smaller than
    `max_bytes`) and was written by the run as scratch/NAME.png, or, for a trained model's
    pictures, lies in a folder that a not-run command of the page writes (--output docs/...)."""
    with open(path, encoding="utf-8") as f:
        shown = pictures_shown(f.read())
    not_run = "\n".join(b["code"] for b in read_blocks(path) if not b["run"])
    for picture in shown:
        committed = os.path.join(ROOT, picture)
        assert os.path.isfile(committed), f"{picture} is shown but not committed"
        assert os.path.getsize(committed) < max_bytes, f"{picture} is too large"
        produced = os.path.join(workdir, scratch_path(picture))
        if os.path.exists(produced):
            with open(produced, "rb") as f:
                assert f.read(8) == b"\x89PNG\r\n\x1a\n", picture
        else:
            folder = os.path.dirname(picture)
            assert re.search(rf"--output\s+{re.escape(folder)}\b", not_run), \
                f"{picture} is written neither into {SCRATCH}/ by the page's code nor by a command it shows"
    return shown


def scratch_path(picture):
    """docs/NAME.png -> scratch/NAME.png: where the page's code writes what docs/ holds."""
    return os.path.join(SCRATCH, os.path.relpath(picture, "docs"))


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
