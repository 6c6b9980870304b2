"""scripts/figures.py: the three teaching diagrams are written as slide-ready PNGs, and what
hierarchy.png and qkta_vs_ssa.png draw is what the model computes."""
import importlib.util
import os

import numpy as np
import pytest
import torch
from PIL import Image

import qkformer
from _markdown import ROOT

pytestmark = pytest.mark.usefixtures("one_thread")

SCRIPT = os.path.join(ROOT, "scripts", "figures.py")


def load_figures():
    spec = importlib.util.spec_from_file_location("figures", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def figures():
    return load_figures()


@pytest.fixture(scope="module")
def written(figures, tmp_path_factory):
    """The script's command line, run once: `figures.py --output DIR`."""
    out = tmp_path_factory.mktemp("figures")
    figures.main(["--output", str(out)])
    return out


@pytest.mark.parametrize("name", ["bptt.png", "hierarchy.png", "qkta_vs_ssa.png"])
def test_pictures_are_slide_ready_pngs(written, name):
    path = written / name
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert min(im.info["dpi"]) >= 150                       # what the team rules ask
        width, height = im.size
        assert 2000 <= width <= 3600 and 1200 <= height <= 2200     # ~13-15 in at 200 dpi
        assert len(im.getcolors(256) or ()) > 8                 # drawn, not blank
    assert path.stat().st_size < 150 * 1024                     # the size limit of docs/


def test_pictures_survive_the_docs_writer_unchanged(written):
    """tests/test_tutorial.py --write-docs quantises to 256 colours: our 128-colour pictures
    come out of it pixel for pixel the same, and still under 150 KB."""
    for name in ("bptt.png", "hierarchy.png", "qkta_vs_ssa.png"):
        with Image.open(written / name) as im:
            ours = np.asarray(im.convert("RGB"))
            again = im.convert("RGB").quantize(256)
        assert np.array_equal(np.asarray(again.convert("RGB")), ours)


def test_hierarchy_table_is_the_models(figures):
    """The stage table hierarchy.png draws equals the model's configuration, and its token
    grids equal the shapes a forward pass gives (a narrow model: the grid does not depend
    on the width)."""
    for preset in ("cifar10", "imagenet_10_384"):
        table = figures.stage_table(preset)
        config = qkformer.create_model(preset).config if preset == "cifar10" else \
            qkformer.QKFormerConfig(**qkformer.PRESETS[preset])
        assert [r["width"] for r in table] == list(config.stage_widths)
        assert [r["blocks"] for r in table] == list(config.stage_depths)
        assert [r["attention"] for r in table] == list(config.attention)
        assert {r["heads"] for r in table} == {config.num_heads}

        narrow = qkformer.create_model(preset, embed_dim=32, num_heads=2, T=1).eval()
        grids = []
        hooks = [stage.register_forward_hook(lambda m, i, out: grids.append(tuple(out.shape[-2:])))
                 for stage in narrow.stages]
        with torch.no_grad():
            narrow(torch.zeros(1, config.in_channels, config.img_size, config.img_size))
        for hook in hooks:
            hook.remove()
        assert [r["grid"] for r in table] == grids
    cifar = figures.stage_table("cifar10")                      # the figures the brief names
    assert [(r["width"], r["grid"], r["blocks"]) for r in cifar] == \
        [(96, (32, 32), 1), (192, (16, 16), 1), (384, (8, 8), 2)]


def test_toy_attention_is_the_models(figures):
    """The numbers qkta_vs_ssa.png shows: A_t masks the tokens whose Q is silent (at t = 0 the
    attention neuron, threshold 0.5 and tau 2, fires on one spike), and SSA's output is the
    model's SN(Q K^T V * 0.125); both steps do something visible."""
    toy = figures.toy_attention()
    q, k, v, a_t = toy["q"], toy["k"], toy["v"], toy["a_t"]
    assert np.array_equal(a_t[:, 0], (q.sum(1) >= 1).astype(np.float32))
    assert np.array_equal(toy["masked"], a_t * k)
    assert 0 < a_t.sum() < len(a_t)                             # some tokens kept, some dropped
    assert toy["scale"] == 0.125
    ssa = toy["ssa"]
    assert np.array_equal(ssa, ((q @ k.T @ v) * 0.125 / 2 >= 0.5).astype(np.float32))
    assert 0 < ssa.sum() < ssa.size
