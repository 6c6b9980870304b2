"""tutorial.md: run its code, so that the tutorial cannot drift from the code.

How tutorial.md is read (the conventions its authors follow):

  * ```python blocks are executed in order, in one namespace, in a temporary working
    directory laid out like the repository root: the project's .py files, tests/golden/,
    checkpoints/ and scripts/ are linked there, and the repository is on sys.path. Whatever
    a block writes (pictures under scratch/, JSON files) lands in that directory.
  * ```bash blocks are commands, run there with `bash -eo pipefail`, in turn with the
    python blocks (a later python block may read what a command wrote).
  * A line `<!-- not run -->` just before a block (blank lines allowed in between) marks
    a block that is shown but not run: full training, anything that needs a dataset, a
    GPU or minutes. Such commands are still checked: every `python train.py`,
    `torchrun ... train.py`, `python evaluate.py` and `python benchmark.py` line must be
    accepted by that script's argument parser (`check_command` of tests/_markdown.py).
  * A line `<!-- file: NAME -->` just before a block: the block is the content of a file
    the reader saves as NAME; the test writes it to NAME in the working directory.
  * Other fences (```text, bare ```) are not run.
  * A line `<!-- output -->` before a ```text block: what the run block above prints. The
    run compares them (numbers within 2 %), and a block that prints must show its output.
  * Every picture the tutorial shows, ![...](docs/NAME.png), is committed under docs/,
    is smaller than 150 KB, and is written by the run as scratch/NAME.png (never over the
    committed docs/), or, for pictures of a trained model, named by a not-run command
    (`--output docs/...`).
  * The table after `<!-- shapes table -->` (section 4) is compared with the stage outputs
    that the tutorial's code records (`stage_shapes`: forward hooks on the real presets) and
    with the models it names; the table after `<!-- presets table -->` with their configs.
  * Reading the blocks and their marks, splitting commands and checking them against the
    scripts' parsers is done by tests/_markdown.py, which other markdown tests share.
  * Names written as `module.attribute` in backticks (module one of neuron, qkformer,
    evaluate, train, data) must exist in the code.

The whole run takes about half a minute on two CPU cores (tiny models, T <= 4).

The committed pictures under docs/ come from the same run (of the tutorial and of the
labs, labs/*.md, which tests/test_labs.py runs the same way). To regenerate them:

    python tests/test_tutorial.py --write-docs
"""
import argparse
import os
import re
import sys
import tempfile

import pytest

from _markdown import (cited_names, missing_names, check_command, check_pictures, command_lines, markdown_table_after,
                       output_mismatch, pictures_shown, prepare_workdir, read_blocks, run_page,
                       scratch_path, write_outputs)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TUTORIAL = os.path.join(ROOT, "tutorial.md")
MAX_PICTURE_BYTES = 150 * 1024

os.environ.setdefault("QKFORMER_LIF", "eager")     # as conftest.py: no torch.compile per process
os.environ.setdefault("MPLBACKEND", "Agg")          # pictures to files, no display needed


# ----------------------------------------------------------------------------------------
# Running tutorial.md

def run_tutorial(workdir, log=print):
    """Run every block of tutorial.md in `workdir`; returns the python namespace.
    Raises AssertionError naming the block (tutorial.md line) that failed or printed
    something else than the page shows."""
    prepare_workdir(workdir)
    return run_page(TUTORIAL, workdir, {"__name__": "__tutorial__"}, log=log)


# ----------------------------------------------------------------------------------------
# The tests

@pytest.fixture(scope="module")
def tutorial_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("tutorial"))
    namespace = run_tutorial(workdir, log=lambda *a: None)
    return workdir, namespace


def test_every_block_runs(tutorial_run):
    workdir, namespace = tutorial_run
    blocks = read_blocks(TUTORIAL)
    assert sum(b["run"] and b["lang"] == "python" and not b["file"] for b in blocks) >= 10
    assert any(b["run"] and b["lang"] == "bash" for b in blocks)
    assert any(not b["run"] for b in blocks)
    for b in blocks:
        assert b["lang"] in ("python", "bash", "text", ""), f"tutorial.md:{b['line']}: ```{b['lang']}"


def test_pictures_are_written_by_the_tutorial_and_committed(tutorial_run):
    workdir, _ = tutorial_run
    assert len(check_pictures(TUTORIAL, workdir, MAX_PICTURE_BYTES)) >= 4


def test_every_printing_block_shows_its_output():
    """The run itself compares each block's output with the page (run_page); here: the page
    does show outputs, and the checker does catch a page that drifted from the code."""
    assert sum(b["output"] is not None for b in read_blocks(TUTORIAL)) >= 10
    assert output_mismatch("spikes per level: [0, 4, 10]", "spikes per level: [0, 5, 10]")
    assert output_mismatch("loss 2.303", "loss 2.303\nextra line")
    assert not output_mismatch("mean  0.500 ", "mean 0.5004")


def test_write_outputs_rewrites_only_the_outputs_that_drifted(tmp_path):
    page = tmp_path / "page.md"
    text = ("Text.\n\n```python\nprint(1 + 1)\n```\n\n<!-- output -->\n```text\n3\n```\n\n"
            "More.\n\n```python\nprint('a'); print('b')\n```\n\n<!-- output -->\n```text\na\nb\n```\n")
    page.write_text(text)
    with pytest.raises(AssertionError, match="printed 2, the page shows 3"):
        run_page(str(page), str(tmp_path), log=lambda *a: None)
    assert write_outputs(str(page), str(tmp_path)) == 1
    assert page.read_text() == text.replace("```text\n3\n```", "```text\n2\n```")
    run_page(str(page), str(tmp_path), log=lambda *a: None)              # passes now


def test_shapes_table_matches_the_model(tutorial_run):
    """Section 4's table against the models: the tokens and widths of each stage's output, as
    the tutorial recorded them with forward hooks (one image through each real preset, T=1;
    `stage_shapes`), and the blocks, attention and widths of the built models."""
    import qkformer
    _, namespace = tutorial_run
    with open(TUTORIAL, encoding="utf-8") as f:
        text = f.read()
    header, rows = markdown_table_after(text, "<!-- shapes table -->")
    assert header == ["preset", "input", "stage", "blocks", "attention", "tokens", "N", "width"]
    by_preset, preset, size = {}, None, None
    for cells in rows:
        preset = cells[0].strip("`") or preset
        size = cells[1] or size
        by_preset.setdefault((preset, size), []).append(cells)
    recorded = namespace["stage_shapes"]
    assert {p for p, _ in by_preset} == set(recorded) == {"cifar10", "imagenet_10_384"}
    names = {"token": "QKTA", "channel": "QKCA"}
    for (preset, size), cells in by_preset.items():
        side = tuple(map(int, re.match(r"(\d+)\s*[×x]\s*(\d+)", size).groups()))
        model = qkformer.create_model(preset, T=1)
        assert side == (model.config.img_size,) * 2
        assert [int(c[2]) for c in cells] == [1, 2, 3]
        for c, stage, width, shape in zip(cells, model.stages, model.config.stage_widths,
                                          recorded[preset]):
            grid = tuple(map(int, re.match(r"(\d+)\s*[×x]\s*(\d+)", c[5]).groups()))
            attn = stage.blocks[0].attn
            kind = names.get(getattr(attn, "mode", None), "SSA")
            assert isinstance(attn, qkformer.SpikingSelfAttention) == (kind == "SSA")
            assert shape == (1, 1, int(c[7]), *grid), (preset, c, shape)
            assert int(c[7]) == width, c
            assert int(c[6].replace(",", "")) == grid[0] * grid[1], c
            assert int(c[3]) == len(stage.blocks), c
            assert c[4] == kind, c


def test_presets_table_matches_the_configs():
    import qkformer
    with open(TUTORIAL, encoding="utf-8") as f:
        text = f.read()
    header, rows = markdown_table_after(text, "<!-- presets table -->")
    assert header == ["preset", "family", "D", "widths", "blocks", "heads", "T", "parameters"]
    assert {r[0].strip("`") for r in rows} == set(qkformer.PRESETS)
    for r in rows:
        model = qkformer.create_model(r[0].strip("`"))
        cfg = model.config
        assert r[1] == cfg.family
        assert int(r[2]) == cfg.embed_dim
        assert tuple(int(v) for v in r[3].split("/")) == cfg.stage_widths
        assert tuple(int(v) for v in r[4].split("+")) == cfg.stage_depths
        assert int(r[5]) == cfg.num_heads and int(r[6]) == cfg.T
        assert int(r[7].replace(",", "")) == qkformer.count_parameters(model)


def test_names_the_tutorial_cites_exist():
    with open(TUTORIAL, encoding="utf-8") as f:
        text = f.read()
    assert len(cited_names(text)) >= 15
    assert missing_names(text) == [], "tutorial.md cites names that do not exist"


def test_commands_not_run_are_valid():
    """The long commands are not run, but their options must exist and fit together."""
    checked = 0
    for block in read_blocks(TUTORIAL):
        if block["lang"] != "bash" or block["run"]:
            continue
        for line in command_lines(block["code"]):
            checked += check_command(line, where=f"tutorial.md:{block['line']}")
    assert checked >= 5


# ----------------------------------------------------------------------------------------
# Regenerating the committed pictures

def pages():
    """The markdown pages whose code the tests run: the tutorial and the labs."""
    labs = os.path.join(ROOT, "labs")
    return [TUTORIAL] + (sorted(os.path.join(labs, n) for n in os.listdir(labs) if n.endswith(".md"))
                         if os.path.isdir(labs) else [])


def write_docs():
    """Run the tutorial and the labs in temporary folders and copy the pictures they show
    from scratch/ into docs/, as 256-colour PNGs (the same picture, a fraction of the bytes)."""
    from PIL import Image
    for page in pages():
        with open(page, encoding="utf-8") as f:
            shown = pictures_shown(f.read())
        with tempfile.TemporaryDirectory() as workdir:
            prepare_workdir(workdir)
            run_page(page, workdir)
            for path in shown:
                src = os.path.join(workdir, scratch_path(path))
                if not os.path.exists(src):
                    print(f"{path}: not written by the run (a trained model's picture), left as it is")
                    continue
                dst = os.path.join(ROOT, path)
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                picture = Image.open(src)
                dpi = {"dpi": picture.info["dpi"]} if "dpi" in picture.info else {}   # kept: slides
                picture.convert("RGB").quantize(256).save(dst, optimize=True, **dpi)
                print(f"wrote {path} ({os.path.getsize(dst) // 1024} KB)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--write-docs", action="store_true",
                        help="run the tutorial and the labs and copy the pictures they write "
                             "into scratch/ to docs/")
    parser.add_argument("--write-outputs", action="store_true",
                        help="run the tutorial and the labs and write what their blocks print "
                             "into the <!-- output --> blocks that differ (after a deliberate "
                             "change; review the diff)")
    options = parser.parse_args()
    if options.write_outputs:
        for page in pages():
            with tempfile.TemporaryDirectory() as workdir:
                prepare_workdir(workdir)
                print(f"{os.path.relpath(page, ROOT)}: {write_outputs(page, workdir)} output blocks rewritten")
    if options.write_docs:
        write_docs()
    elif not options.write_outputs:
        sys.exit(pytest.main([__file__, "-q"]))
