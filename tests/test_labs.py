"""labs/*.md, the course in three labs: run their code and check their structure.

Each lab page follows the conventions of tutorial.md (tests/_markdown.py: python and bash
blocks run in order in a folder laid out like the repository root, `<!-- not run -->`
blocks are shown only, `<!-- output -->` blocks are what the block above prints), and has:

  * a `## Goals` section (what the student can do afterwards);
  * a `## Time plan` whose table gives minutes as ranges "a-b" that follow each other from 0
    and end at 90 or before (a class of 90 minutes);
  * links to the tutorial sections to read, `../tutorial.md#anchor`, whose anchors exist;
  * at least three `### Exercise N` sections, the runnable code in them run by this test;
  * training commands (not run) that train.py and evaluate.py accept, checked by their parsers;
  * at the end, the solutions in `<details><summary>Solution...</summary>` blocks with a blank
    line after the summary (GitHub renders code blocks inside <details> only so); the code in
    them is run too.

Each lab runs in well under a minute on two CPU cores (tiny models, T <= 4).
"""
import os
import re

import pytest

from _markdown import (missing_names, check_command, check_pictures, command_lines, prepare_workdir,
                       read_blocks, run_page)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LABS = ("labs/1-neuron.md", "labs/2-attention.md", "labs/3-training.md")
TUTORIAL = os.path.join(ROOT, "tutorial.md")

os.environ.setdefault("QKFORMER_LIF", "eager")     # as conftest.py: no torch.compile per process
os.environ.setdefault("MPLBACKEND", "Agg")          # pictures to files, no display needed
pytestmark = pytest.mark.usefixtures("one_thread")


def text_of(lab):
    with open(os.path.join(ROOT, lab), encoding="utf-8") as f:
        return f.read()


def section(text, heading):
    """The text of the `## heading` section (up to the next ## heading)."""
    m = re.search(rf"^## {re.escape(heading)}[^\n]*\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert m, f"no '## {heading}' section"
    return m.group(1)


def anchor(heading):
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


# ----------------------------------------------------------------------------------------
# Running the labs

@pytest.mark.parametrize("lab", LABS)
def test_lab_runs_and_prints_what_it_shows(lab, tmp_path):
    """Every block runs, and prints what the page shows under it (run_page checks both)."""
    workdir = str(tmp_path)
    prepare_workdir(workdir)
    run_page(os.path.join(ROOT, lab), workdir, log=lambda *a: None)
    check_pictures(os.path.join(ROOT, lab), workdir)
    blocks = read_blocks(os.path.join(ROOT, lab))
    assert sum(b["output"] is not None for b in blocks) >= 3, f"{lab}: show what the blocks print"


# ----------------------------------------------------------------------------------------
# The structure of a lab

@pytest.mark.parametrize("lab", LABS)
def test_goals_time_plan_and_reading(lab):
    text = text_of(lab)
    goals = section(text, "Goals")
    assert len(re.findall(r"^\* ", goals, re.M)) >= 3, f"{lab}: list at least three goals"
    plan = section(text, "Time plan")
    ranges = [tuple(map(int, m)) for m in re.findall(r"^\|\s*(\d+)\s*-\s*(\d+)\s*\|", plan, re.M)]
    assert len(ranges) >= 4, f"{lab}: the time plan's table gives minutes as 'a-b'"
    assert ranges[0][0] == 0 and ranges[-1][1] <= 90, f"{lab}: the plan must fit 90 minutes"
    for (a, b), (c, d) in zip(ranges, ranges[1:]):
        assert a < b == c < d, f"{lab}: time plan rows {a}-{b} and {c}-{d} do not follow each other"
    # The tutorial sections to read, linked by their anchors (which must exist).
    with open(TUTORIAL, encoding="utf-8") as f:
        anchors = {anchor(h) for h in re.findall(r"^#{1,6} (.*)$", f.read(), re.M)}
    links = re.findall(r"\(\.\./tutorial\.md#([^)\s]+)\)", text)
    assert links, f"{lab}: link the tutorial sections to read"
    for link in links:
        assert link in anchors, f"{lab} links ../tutorial.md#{link}, which is no heading of tutorial.md"
    # Other relative links (the other labs, files of the repository) exist.
    for target in re.findall(r"\]\((?!https?:|#|\.\./tutorial\.md#)([^)#\s]+)(?:#[^)\s]*)?\)", text):
        assert os.path.exists(os.path.join(ROOT, "labs", target)), f"{lab} links {target}, which does not exist"


@pytest.mark.parametrize("lab", LABS)
def test_exercises_and_solutions(lab):
    text = text_of(lab)
    exercises = re.findall(r"^### Exercise (\d+)", text, re.M)
    assert len(exercises) >= 3, f"{lab}: at least three exercises"
    assert exercises == [str(i) for i in range(1, len(exercises) + 1)], f"{lab}: exercises numbered 1, 2, ..."
    details = [m.start() for m in re.finditer(r"<details><summary>Solution", text)]
    assert details, f"{lab}: solutions in <details><summary>Solution...</summary> blocks"
    last_exercise = max(m.start() for m in re.finditer(r"^### Exercise", text, re.M))
    assert min(details) > last_exercise, f"{lab}: the solutions come at the end, after the exercises"
    assert text.count("<details>") == text.count("</details>"), f"{lab}: a <details> is not closed"
    # GitHub renders markdown (code blocks) inside <details> only after a blank line.
    for m in re.finditer(r"<summary>.*?</summary>\n(\n?)", text):
        assert m.group(1) == "\n", f"{lab}: a blank line must follow <summary>...</summary>"
    # Every exercise has its solution.
    solved = set(re.findall(r"<summary>Solution to exercise (\d+)</summary>", text))
    assert solved == set(exercises), f"{lab}: solutions for exercises {sorted(set(exercises) - solved)} missing"
    # Runnable code in the exercises and in the solutions.
    blocks = read_blocks(os.path.join(ROOT, lab))
    lines = text[:min(details)].count("\n")
    assert sum(b["run"] and b["lang"] == "python" and b["line"] < lines for b in blocks) >= 3
    assert any(b["run"] and b["lang"] in ("python", "bash") and b["line"] > lines for b in blocks), \
        f"{lab}: the solutions hold runnable code"


@pytest.mark.parametrize("lab", LABS)
def test_training_commands_are_valid(lab):
    """The training and evaluation commands (not run) must be accepted by the scripts' parsers."""
    scripts = set()
    for block in read_blocks(os.path.join(ROOT, lab)):
        if block["lang"] != "bash" or block["run"]:
            continue
        for line in command_lines(block["code"]):
            if check_command(line, where=f"{lab}:{block['line']}"):
                scripts.add(line.split(".py")[0].split()[-1])
    assert "train" in scripts and "evaluate" in scripts, f"{lab}: show the training and evaluation commands"


@pytest.mark.parametrize("lab", LABS)
def test_names_the_lab_cites_exist(lab):
    assert missing_names(text_of(lab)) == [], f"{lab} cites names that do not exist"


def test_the_tutorial_points_to_the_labs():
    """tutorial.md's section 9 hands the exercises over to the three labs."""
    with open(TUTORIAL, encoding="utf-8") as f:
        text = f.read()
    exercises = section(text, "9. Exercises")
    for lab in LABS:
        assert f"({lab})" in exercises, f"tutorial.md section 9 does not link {lab}"
