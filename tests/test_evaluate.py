"""evaluate.py: firing rates, SOP / energy arithmetic, pictures and the command line
(the complexity experiment: tests/test_complexity.py).

Everything runs on tiny models (embed_dim 16-32, T = 2, 8x8 or 32x32 images) and a fake
CIFAR-10 folder of a few random images written in the official pickle format.
"""
import dataclasses
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

import evaluate as ev
import pictures
import qkformer
import data
import neuron
from neuron import LIFNode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, "tests", "golden")
PICTURES = ("firing_rates.png", "spike_raster.png", "token_masks.png", "qk_attention.png",
            "confusion_matrix.png")


def tiny(**overrides):
    """A 3-stage QKFormer on 8x8 images: stage widths 4, 8, 16; tokens 64, 16, 4."""
    settings = dict(embed_dim=16, depths=3, num_heads=2, T=2, img_size=8)
    return qkformer.create_model("cifar10", **{**settings, **overrides}).eval()


def force_bn_bias(module: nn.Module, value: float):
    """Make every neuron after these batch norms fire at every step (value = +100) or never
    (value = -100): in eval mode BN(y) = y + bias with the default running statistics."""
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.bias, value)


def run(model, images=4, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(images, 3, size, size, generator=g)
    y = torch.randint(0, 10, (images,), generator=g)
    return ev.evaluate(model, [(x[:2], y[:2]), (x[2:], y[2:])], 10)


# ---------------------------------------------------------------- firing rates

@pytest.mark.parametrize("bias, rate", [(100.0, 1.0), (-100.0, 0.0)])
def test_firing_rates_of_layers_forced_to_always_or_never_spike(bias, rate):
    model = tiny()
    force_bn_bias(model, bias)
    results, rec = run(model)
    rates = rec.firing_rates()
    lifs = [n for n, m in model.named_modules() if isinstance(m, neuron.SpikingNeuron)]
    assert list(rates) == lifs                               # every spiking layer, in order
    assert all(r == rate for r in rates.values())
    assert all(r == rate for r in ev.stage_firing_rates(rec).values())
    table = ev.table4(model, rec)
    assert list(table) == ["stage 1", "stage 2"]             # the QKTA stages, as in Table 4
    assert all(v == rate for rows in table.values() for v in rows.values())   # X' = A_t (*) K too
    assert results["images"] == 4 and results["confusion"].sum() == 4


def test_one_forced_layer_and_its_successors_input():
    model = tiny()
    force_bn_bias(model, -100.0)                             # silence the whole network ...
    force_bn_bias(model.stages[0].blocks[0].mlp.fc1, 100.0)  # ... except one MLP layer
    _, rec = run(model)
    rates = rec.firing_rates()
    assert rates["stages.0.blocks.0.mlp.fc1.lif"] == 1.0
    assert sum(rates.values()) == 1.0
    inputs = rec.input_rates()
    assert inputs["stages.0.blocks.0.mlp.fc2.conv"] == 1.0   # fc2 is fed by fc1's spikes
    assert inputs["stages.0.blocks.0.mlp.fc1.conv"] == 0.0


def test_counts_stay_on_the_device_until_read(monkeypatch):
    """No value is read back per batch: the hooks and the accuracy only add on the device,
    and the results are read with one transfer each (results, then the recorder's sums)."""
    model = tiny()
    reads = []
    for method in ("item", "tolist", "cpu"):
        original = getattr(torch.Tensor, method)
        monkeypatch.setattr(torch.Tensor, method,
                            lambda self, *a, _f=original, _m=method, **k: (reads.append(_m), _f(self, *a, **k))[1])
    results, rec = run(model)
    assert reads.count("item") == 0 and reads.count("tolist") == 1     # results: one read
    rates = rec.firing_rates()
    rec.input_rates(), ev.stage_firing_rates(rec), ev.table4(model, rec)
    assert reads.count("item") == 0 and reads.count("tolist") == 2     # the recorder: one more
    assert len(rates) == sum(isinstance(m, neuron.SpikingNeuron) for m in model.modules())


def test_accuracy_and_confusion_with_known_predictions():
    class Fixed(nn.Module):                                  # ranks the classes 3, 1, 0, 2, 4, ...
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(1))

        def forward(self, x):
            logits = -torch.arange(10.0).repeat(len(x), 1)
            logits[:, 3], logits[:, 1] = 10.0, 5.0
            return logits

    x = torch.zeros(6, 3, 4, 4)
    y = torch.tensor([3, 3, 1, 0, 5, 3])
    results, _ = ev.evaluate(Fixed(), [(x[:4], y[:4]), (x[4:], y[4:])], 10, limit=5)
    assert results["images"] == 5                            # --limit cuts the last batch
    assert results["top1"] == pytest.approx(40.0)            # 3, 3 right; 1, 0, 5 wrong
    assert results["top5"] == pytest.approx(80.0)            # 3, 3, 1, 0 in the top 5; 5 is not
    assert results["confusion"][3, 3] == 2 and results["confusion"][5, 3] == 1


# ---------------------------------------------------------------- SOPs and energy

class TinySNN(nn.Module):
    """conv1 (3 -> 4, 1x1) -> BN -> LIF -> conv2 (4 -> 2, 1x1) -> BN -> LIF -> mean -> head (2 -> 5)
    on 4x4 images at T = 2. MACs per image and step: conv1 3*4*16 = 192, conv2 4*2*16 = 128,
    head 2*5 = 10."""
    T = 2

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1, self.lif1 = nn.Conv2d(3, 4, 1, bias=False), nn.BatchNorm2d(4), LIFNode()
        self.conv2, self.bn2, self.lif2 = nn.Conv2d(4, 2, 1, bias=False), nn.BatchNorm2d(2), LIFNode()
        self.head = nn.Linear(2, 5)

    def forward(self, x):
        if x.dim() == 4:
            x = x.unsqueeze(0).repeat(self.T, 1, 1, 1, 1)   # (T, B, C, H, W)
        T, B = x.shape[:2]
        s = self.lif1(self.bn1(self.conv1(x.flatten(0, 1))).reshape(T, B, 4, *x.shape[-2:]))
        s = self.lif2(self.bn2(self.conv2(s.flatten(0, 1))).reshape(T, B, 2, *x.shape[-2:]))
        return self.head(s.flatten(3).mean(3).mean(0))


def tiny_snn_energy(bias1, bias2):
    model = TinySNN().eval()
    model.bn1.bias.data = torch.tensor(bias1)
    model.bn2.bias.data.fill_(bias2)
    x = torch.randn(3, 3, 4, 4)
    _, rec = ev.evaluate(model, [(x, torch.zeros(3, dtype=torch.long))], 5)
    macs = ev.layer_macs(model, torch.zeros(1, 1, 3, 4, 4))
    return macs, ev.energy_report(model, rec, images=3, T=2, macs=macs)


def test_macs_and_energy_of_a_hand_computed_network():
    # lif1: channels 0 and 1 always fire, 2 and 3 never (input rate of conv2 = 0.5);
    # lif2 always fires (the head's input is all ones).
    macs, e = tiny_snn_energy([100.0, 100.0, -100.0, -100.0], 100.0)
    assert macs["layers"] == {"conv1": 192, "conv2": 128, "head": 10}
    assert macs["total"] == 330
    assert e["mac_layers"] == ["conv1"] and e["ac_layers"] == ["conv2", "head"]
    rows = {r["name"]: r for r in e["layers"]}
    assert rows["conv1"]["ops"] == 192                       # MACs, counted once (Eq. 20)
    assert rows["conv2"]["input_rate"] == 0.5
    assert rows["conv2"]["ops"] == pytest.approx(0.5 * 2 * 128)   # SOP = fr x T x FLOPs, Eq. 19
    assert rows["head"]["ops"] == pytest.approx(1.0 * 2 * 10)
    assert e["SOPs"] == pytest.approx(128 + 20)
    assert e["E_snn_mJ"] == pytest.approx((0.9 * 148 + 4.6 * 192) * 1e-9)
    assert e["E_ann_mJ"] == pytest.approx(4.6 * 330 * 1e-9)


def test_silent_network_costs_only_its_first_layer():
    _, e = tiny_snn_energy([-100.0] * 4, -100.0)
    assert e["SOPs"] == 0
    assert e["E_snn_mJ"] == pytest.approx(4.6 * 192 * 1e-9)


def test_qkformer_energy_terms_when_every_neuron_fires():
    model = tiny()
    force_bn_bias(model, 100.0)
    results, rec = run(model)
    macs = ev.layer_macs(model)
    # stem: 3x3 conv, 3 -> 2 channels (embed_dim / 8), on 8x8 pixels (CIFAR stage 1: stride 1)
    assert macs["layers"]["stages.0.embed.stem.conv"] == 3 * 3 * 3 * 2 * 8 * 8
    # stage-3 SSA, C = 16, 2 heads of d = 8, N = 2x2 tokens: K^T V and (K^T V) Q, h N d^2 each
    assert macs["own"] == {"stages.2.blocks.0.attn": 2 * 2 * 4 * 8 * 8}
    e = ev.energy_report(model, rec, results["images"], model.config.T, macs)
    rows = {r["name"]: r for r in e["layers"]}
    assert e["mac_layers"] == ["stages.0.embed.stem.conv"]
    assert len(e["ac_layers"]) == len(e["layers"]) - 1
    # every Q neuron fires: QKTA's sum costs one addition per Q spike = T x C x N
    assert rows["stages.0.blocks.0.attn (sum of Q)"]["ops"] == 2 * 4 * 64
    assert rows["stages.1.blocks.0.attn (sum of Q)"]["ops"] == 2 * 8 * 16
    assert (rows["stages.2.blocks.0.attn (K^T V)"]["ops"]
            + rows["stages.2.blocks.0.attn (Q (K^T V))"]["ops"]) == 2 * 1024
    # the layers right after a neuron see rate 1; after a residual sum, spike counts > 1
    assert rows["stages.0.blocks.0.mlp.fc2.conv"]["input_rate"] == 1.0
    assert rows["stages.0.blocks.0.attn.q.conv"]["input_rate"] == 2.0   # SPEDS: main + shortcut
    for r in e["layers"]:
        if r["kind"] == "AC" and "(" not in r["name"]:
            assert r["ops"] == pytest.approx(r["input_rate"] * 2 * r["macs"])
    assert e["E_snn_mJ"] == pytest.approx(
        (0.9 * e["SOPs"] + 4.6 * macs["layers"]["stages.0.embed.stem.conv"]) * 1e-9)


# ---------------------------------------------------------------- new neurons and attentions

class SignNeuron(neuron.SpikingNeuron):
    """A neuron type evaluate.py has never heard of: a spike wherever the input is positive."""

    def spikes(self, x_seq):
        return (x_seq > 0).float()


@pytest.mark.parametrize("bias, rate", [(100.0, 1.0), (-100.0, 0.0)])
def test_recorder_counts_a_new_neuron_type(bias, rate):
    model = tiny()
    unit = model.stages[0].blocks[0].mlp.fc1
    unit.lif = SignNeuron()
    force_bn_bias(unit, bias)
    _, rec = run(model)
    rates = rec.firing_rates()
    assert rates["stages.0.blocks.0.mlp.fc1.lif"] == rate
    lifs = [n for n, m in model.named_modules() if isinstance(m, neuron.SpikingNeuron)]
    assert list(rates) == lifs
    # and the spikes it sends on are the next layer's input, and Table 4's "SMLP Layer1"
    assert rec.input_rates()["stages.0.blocks.0.mlp.fc2.conv"] == rate
    assert ev.table4(model, rec)["stage 1"]["SMLP Layer1"] == rate


def test_layer_macs_leaves_the_neurons_as_they_were():
    model = tiny()
    flags = [m.reference for m in model.modules() if hasattr(m, "reference")]
    assert flags and not any(flags)
    ev.layer_macs(model)
    assert [m.reference for m in model.modules() if hasattr(m, "reference")] == flags


class GramAttention(qkformer.QKAttention):
    """Q-K token attention followed by a product of spikes it does not report: Y (Y^T Y)."""

    def forward(self, x):
        y = super().forward(x)                                   # (T, B, C, H, W) spikes
        T, B, C, H, W = y.shape
        t = y.flatten(3)                                         # (T, B, C, N)
        gram = t.transpose(-2, -1) @ t                           # (T, B, N, N)
        return (t @ gram).reshape(T, B, C, H, W)                 # (T, B, C, H, W)


class ReportedGramAttention(GramAttention):
    def synaptic_ops(self, firing):
        rate, neurons = firing(self.proj.lif)                    # N*C
        n = neurons / self.proj.conv.out_channels                # N
        return super().synaptic_ops(firing) + [("Y^T Y", neurons * n, rate),
                                               ("Y (Y^T Y)", neurons * n, rate)]


def energy_of(model):
    results, rec = run(model)
    return ev.energy_report(model, rec, results["images"], model.config.T, ev.layer_macs(model))


def test_an_unreported_product_on_spikes_is_an_error():
    model = tiny()
    model.stages[0].blocks[0].attn.__class__ = GramAttention    # same weights, one more product
    with pytest.raises(ValueError, match=r"stages\.0\.blocks\.0\.attn \(GramAttention\)"):
        energy_of(model)


def test_a_reported_product_on_spikes_is_counted():
    model = tiny()
    force_bn_bias(model, 100.0)                                  # every neuron fires
    model.stages[0].blocks[0].attn.__class__ = ReportedGramAttention
    rows = {r["name"]: r for r in energy_of(model)["layers"]}
    # C = 4, N = 64 tokens: each product N*N*C MACs, every input a spike, T = 2
    for label in ("Y^T Y", "Y (Y^T Y)"):
        assert rows[f"stages.0.blocks.0.attn ({label})"]["ops"] == 2 * 64 * 64 * 4
    assert rows["stages.0.blocks.0.attn (sum of Q)"]["ops"] == 2 * 4 * 64


def test_a_product_outside_any_attention_is_an_error():
    class GramMLP(qkformer.SpikingMLP):
        def forward(self, x):
            y = super().forward(x)
            t = y.flatten(3)                                     # (T, B, C, N)
            return (t @ (t.transpose(-2, -1) @ t)).reshape(y.shape)

    model = tiny()
    model.stages[1].blocks[0].mlp.__class__ = GramMLP
    with pytest.raises(ValueError, match=r"stages\.1\.blocks\.0\.mlp \(GramMLP\)"):
        energy_of(model)


# ---------------------------------------------------------------- pictures

def png_dpi(path):
    from PIL import Image
    with Image.open(path) as img:
        assert img.format == "PNG"
        return img.info["dpi"]


def test_qk_attention_spikes_are_the_masked_k():
    """The matrices of the Figure 3(a) picture: Q and K per head, A_t, and X' = A_t (*) K,
    which keeps K's column of a token where A_t is 1 and zeroes it where A_t is 0."""
    model = tiny(embed_dim=32, num_heads=2)                  # stage 1: 8 channels, 2 heads of 4
    force_bn_bias(model, 1.5)                                # some neurons fire, some do not
    names = pictures.qk_attention_neurons(model)
    assert list(names) == ["stage 1", "stage 2"]
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with ev.SpikeRecorder(model, keep=[n for v in names.values() for n in v]) as rec, torch.no_grad():
        model(x)
    q, k, a = (rec.kept[n][0] for n in names["stage 1"])
    spikes = pictures.qk_attention_spikes(q, k, a, num_heads=2)
    assert spikes["Q"].shape == spikes["K"].shape == spikes["X'"].shape == (2, 2, 2, 4, 64)
    assert spikes["A_t"].shape == (2, 2, 2, 1, 64)           # (T, B, heads, 1, N)
    kept = spikes["A_t"].expand_as(spikes["K"]) > 0
    assert torch.equal(spikes["X'"][kept], spikes["K"][kept])
    assert not spikes["X'"][~kept].any()
    assert 0 < spikes["A_t"].mean() < 1 and 0 < spikes["K"].mean() < 1
    # Eq. (6): A_t = SN(sum of the head's Q over its channels). At the first step the membrane
    # starts at 0 and charges to sum / tau (tau = 2): one spike of Q reaches the threshold 0.5
    fired = spikes["Q"][0].sum(dim=2, keepdim=True) >= 1      # (B, heads, 1, N)
    assert torch.equal(spikes["A_t"][0] > 0, fired)


def test_qk_attention_picture(tmp_path):
    model = tiny()
    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    names = pictures.qk_attention_neurons(model)
    blocks = pictures.qk_attention_blocks(model)
    with ev.SpikeRecorder(model, keep=[n for v in names.values() for n in v]) as rec, torch.no_grad():
        model(x)
    stages = {}
    for stage, (q, k, a) in names.items():
        s = pictures.qk_attention_spikes(rec.kept[q][0], rec.kept[k][0], rec.kept[a][0],
                                         blocks[stage][1].num_heads)
        stages[stage] = {panel: v[:, 0] for panel, v in s.items()}
    path = tmp_path / "qk_attention.png"
    pictures.plot_qk_attention(pictures.show_image(x[0]), stages, str(path), label="test image 0 (cat)")
    assert png_dpi(path)[0] == pytest.approx(150, abs=1)
    pictures.plot_qk_attention(pictures.show_image(x[0]), stages, str(path), head=1, step=0)
    # The head and step shown by default: where A_t keeps closest to half of the tokens (a
    # silent head draws black A_t and X' panels, one that keeps all draws X' = K)
    T, heads = 2, 3
    spikes = {p: torch.zeros(T, heads, 4, 16) for p in ("Q", "K", "X'")} | {"A_t": torch.zeros(T, heads, 1, 16)}
    assert pictures.busiest_head_and_step(spikes, 0, 16) == (0, T - 1)     # nothing fires: head 0, last step
    spikes["A_t"][1, 2] = 1                                                  # keeps every token
    spikes["A_t"][0, 1, 0, :5] = 1                                           # keeps 5 of 16
    spikes["A_t"][1, 0, 0, :3] = 1                                           # keeps 3 of 16
    assert pictures.busiest_head_and_step(spikes, 0, 16) == (1, 0)
    assert pictures.busiest_head_and_step(spikes, 0, 16, head=0) == (0, 1)
    assert pictures.busiest_head_and_step(spikes, 5, 16, step=0) == (0, 0)  # 0 ones in the segment: ties
    assert pictures.token_segment(1024) == (462, 562)        # 100 tokens from the middle
    assert pictures.token_segment(64) == (0, 64)             # all, when there are fewer
    assert pictures.token_segment(256, start=0) == (0, 100)
    with pytest.raises(ValueError):
        pictures.token_segment(256, start=200)


def test_pictures_are_written_at_150_dpi(tmp_path):
    model = tiny()
    results, rec = run(model)
    x = torch.randn(2, 3, 8, 8)
    paths = pictures.draw_pictures(model, x, results, rec.firing_rates(), str(tmp_path),
                                   titles=["test image 3 (cat)", "test image 10 (dog)"])
    assert [os.path.basename(p) for p in paths] == list(PICTURES)
    for p in paths:
        assert png_dpi(p)[0] == pytest.approx(150, abs=1), p


def test_image_indices_option():
    parser = ev.build_parser()
    args = parser.parse_args(["--checkpoint", "x.pt", "--images", "3,10,21"])
    assert args.images == (3, 10, 21) and args.pictures is None
    assert parser.parse_args(["--checkpoint", "x.pt"]).images == pictures.DEFAULT_IMAGES
    for bad in ("3,x", "-1", ""):
        with pytest.raises(SystemExit):
            parser.parse_args(["--checkpoint", "x.pt", "--images", bad])


# ---------------------------------------------------------------- command line

def write_fake_cifar10(root, test_images=12, seed=0):
    """The official python-format files (pickled dicts with bytes keys), filled with noise."""
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder)
    files = {f"data_batch_{i}": 2 for i in range(1, 6)}
    files["test_batch"] = test_images
    for name, n in files.items():
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"labels": [int(v) for v in rng.integers(0, 10, n)]}
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump(batch, f, protocol=2)
    return str(root)


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory):
    return write_fake_cifar10(tmp_path_factory.mktemp("data"))


def own_checkpoint(path, **overrides):
    """A checkpoint in the format train.py writes: {"model", "config", "args", "epoch", ...}
    (without running train.py, for speed; test_cli_on_a_checkpoint_train_py_wrote runs it)."""
    settings = dict(embed_dim=16, depths=3, num_heads=2, T=2)
    torch.manual_seed(0)
    model = qkformer.create_model("cifar10", **{**settings, **overrides})
    torch.save({"model": model.state_dict(), "config": dict(vars(model.config)),
                "args": {"model": "cifar10"}, "epoch": 0}, path)
    return str(path)


def check_outputs(out, images):
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["images"] == images
    assert 0 <= metrics["top1"] <= metrics["top5"] <= 100
    assert metrics["firing_rates"] and all(0 <= r <= 1 for r in metrics["firing_rates"].values())
    assert set(metrics["stage_firing_rates"]) == {"stage 1", "stage 2", "stage 3"}
    e = metrics["energy"]
    assert e["mac_layers"] == ["stages.0.embed.stem.conv"] and "head" in e["ac_layers"]
    assert 0 < e["E_snn_mJ"] < e["E_ann_mJ"]
    for name in PICTURES:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    return metrics


def test_cli_on_own_checkpoint(tmp_path, cifar_dir, capsys):
    ckpt = own_checkpoint(tmp_path / "run.pt")
    out = tmp_path / "eval"
    assert ev.main(["--checkpoint", ckpt, "--dataset", "cifar10", "--data-dir", cifar_dir,
                    "--limit", "8", "--batch-size", "4", "--pictures", "2", "--output", str(out)]) == 0
    metrics = check_outputs(out, images=8)
    assert metrics["T"] == 2 and not metrics["official_quirks"]
    printed = capsys.readouterr().out
    assert "top-1" in printed and "MAC layers" in printed and "stages.0.embed.stem.conv" in printed


def test_cli_flip_test_counts_energy_per_forward_pass(tmp_path, cifar_dir, capsys):
    """--flip-test runs each image twice (and mirrored); the energy stays that of one pass: the
    operation counts per image equal those of the plain evaluation."""
    ckpt = own_checkpoint(tmp_path / "run.pt")
    runs = {}
    for flip in (False, True):
        out = tmp_path / f"eval-{flip}"
        argv = ["--checkpoint", ckpt, "--dataset", "cifar10", "--data-dir", cifar_dir, "--limit", "8",
                "--batch-size", "4", "--pictures", "0", "--output", str(out)] + ["--flip-test"] * flip
        assert ev.main(argv) == 0
        runs[flip] = json.loads((out / "metrics.json").read_text())
    assert [runs[f]["flip_test"] for f in (False, True)] == [False, True]
    assert "each also mirrored" in capsys.readouterr().out
    plain, flipped = ([(r["name"], r["macs"]) for r in runs[f]["energy"]["layers"]] for f in (False, True))
    assert plain == flipped


def test_cli_pictures_show_test_images_by_index_whatever_limit(tmp_path, cifar_dir, capsys):
    """--images counts in the test file's order, also when --limit evaluates a selection (an
    evenly spaced one: with 12 images and --limit 4, images 0, 3, 6, 9)."""
    ckpt = own_checkpoint(tmp_path / "run.pt")
    with open(os.path.join(cifar_dir, "cifar-10-batches-py", "test_batch"), "rb") as f:
        labels = pickle.load(f)[b"labels"]
    names = data.CIFAR10_CLASSES
    out = tmp_path / "eval"
    assert ev.main(["--checkpoint", ckpt, "--dataset", "cifar10", "--data-dir", cifar_dir,
                    "--limit", "4", "--images", "5,11,2", "--pictures", "2", "--output", str(out)]) == 0
    metrics = check_outputs(out, images=4)
    shown = metrics["picture_images"]
    assert shown["indices"] == [5, 11]
    assert shown["titles"] == [f"test image {i} ({names[labels[i]]})" for i in (5, 11)]
    assert "not the official test file" in shown["note"]        # these are random images
    printed = capsys.readouterr().out
    assert f"pictures of test image 5 ({names[labels[5]]})" in printed and "note:" in printed
    code = ev.main(["--checkpoint", ckpt, "--dataset", "cifar10", "--data-dir", cifar_dir,
                    "--images", "3,12", "--output", str(tmp_path / "out2")])
    assert code == 2 and "--images 12: the CIFAR-10 test set has 12 images" in capsys.readouterr().err
    out = tmp_path / "none"
    assert ev.main(["--checkpoint", ckpt, "--dataset", "cifar10", "--data-dir", cifar_dir,
                    "--pictures", "0", "--output", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["pictures"] == [] and not list(out.glob("*.png"))


def test_picture_note_knows_the_official_cifar_test_files(tmp_path, monkeypatch):
    assert pictures.picture_note("imagenet", str(tmp_path)) is None
    folder = tmp_path / "cifar-10-batches-py"
    write_fake_cifar10(tmp_path)
    (folder / "test_batch").write_bytes(b"official")
    import hashlib                                       # this stand-in plays the official file
    monkeypatch.setitem(pictures.OFFICIAL_TEST_MD5, "cifar10", hashlib.md5(b"official").hexdigest())
    assert pictures.picture_note("cifar10", str(tmp_path)) is None
    (folder / "test_batch").write_bytes(b"rebuilt in another order")
    assert "not the official test file" in pictures.picture_note("cifar10", str(tmp_path))


def test_cli_on_a_checkpoint_train_py_wrote(tmp_path, cifar_dir):
    """One epoch of train.py on 4 images, then the evaluation of its last.pt."""
    if not os.path.exists(os.path.join(ROOT, "train.py")):
        pytest.skip("train.py is not there")
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "train.py", "--dataset", "cifar10", "--data-dir", cifar_dir, "--no-download",
         "--model", "tiny", "--embed-dim", "16", "--depths", "3", "--num-heads", "2", "--T", "2",
         "--epochs", "1", "--cooldown-epochs", "0", "--warmup-epochs", "0", "--batch-size", "4",
         "--subset", "4", "--test-subset", "4", "--output", str(run_dir)],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = tmp_path / "eval"
    assert ev.main(["--checkpoint", str(run_dir / "last.pt"), "--dataset", "cifar10", "--data-dir",
                    cifar_dir, "--pictures", "2", "--output", str(out)]) == 0
    metrics = check_outputs(out, images=12)
    assert metrics["config"]["embed_dim"] == 16


def test_cli_on_official_state_dict(tmp_path, cifar_dir):
    golden = torch.load(os.path.join(GOLDEN, "official_cifar_small.pt"), weights_only=True)
    path = tmp_path / "official.pth"
    torch.save({"state_dict": golden["official_state_dict"], "epoch": 3}, path)   # timm-style file
    out = tmp_path / "eval"
    assert ev.main(["--checkpoint", str(path), "--dataset", "cifar10", "--data-dir", cifar_dir,
                    "--limit", "4", "--pictures", "2", "--output", str(out)]) == 0
    metrics = check_outputs(out, images=4)
    assert metrics["official_quirks"] and metrics["config"]["embed_dim"] == 64


def test_cli_on_imagenet_folders(tmp_path):
    """ImageNet layout (val/<class>/*.JPEG), an ImageNet-family model, 1000 classes."""
    from PIL import Image
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("n01440764", "n01443537"):
            os.makedirs(tmp_path / "imagenet" / split / cls)
            Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(
                tmp_path / "imagenet" / split / cls / "a.JPEG")
    torch.manual_seed(0)
    model = qkformer.create_model("imagenet_10_384", embed_dim=16, depths=4, num_heads=2, T=2,
                                  img_size=32)
    ckpt = tmp_path / "imagenet.pt"
    torch.save({"model": model.state_dict(), "config": dict(vars(model.config)), "epoch": 0}, ckpt)
    out = tmp_path / "eval"
    assert ev.main(["--checkpoint", str(ckpt), "--dataset", "imagenet", "--data-dir",
                    str(tmp_path / "imagenet"), "--pictures", "1", "--output", str(out)]) == 0
    metrics = check_outputs(out, images=2)
    assert len(metrics["confusion"]) == 1000
    assert set(metrics["table4"]) == {"stage 1", "stage 2"}


def bad_checkpoints(tmp):
    missing_keys = tmp / "missing_keys.pt"
    model = qkformer.create_model("cifar10", embed_dim=16, depths=3, num_heads=2, T=2)
    state = model.state_dict()
    del state["head.weight"]
    torch.save({"model": state, "config": dict(vars(model.config)), "epoch": 0}, missing_keys)
    garbage = tmp / "garbage.pt"
    garbage.write_text("not a checkpoint")
    resnet = tmp / "resnet.pt"
    torch.save({"model": {"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(10, 512)}},
               resnet)
    return {
        "missing file": (str(tmp / "nope.pt"), "does not exist"),
        "not a checkpoint": (str(garbage), "checkpoint"),
        "wrong number of classes": (own_checkpoint(tmp / "c100.pt", num_classes=100), "100 classes"),
        "missing keys": (str(missing_keys), "missing"),
        "another model": (str(resnet), "not an official QKFormer state dict"),
    }


@pytest.mark.parametrize("case", ["missing file", "not a checkpoint", "wrong number of classes",
                                  "missing keys", "another model"])
def test_cli_bad_checkpoints_give_clear_errors(case, tmp_path, capsys):
    path, message = bad_checkpoints(tmp_path)[case]
    # an empty data folder: the checkpoint must be refused before any data is read
    code = ev.main(["--checkpoint", path, "--dataset", "cifar10", "--data-dir", str(tmp_path / "none"),
                    "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_cli_missing_data_is_a_clear_error(tmp_path, capsys):
    ckpt = own_checkpoint(tmp_path / "run.pt")
    code = ev.main(["--checkpoint", ckpt, "--dataset", "cifar10", "--data-dir", str(tmp_path / "none"),
                    "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "CIFAR-10" in err


def test_cli_as_a_program_prints_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "evaluate.py", "--checkpoint", str(tmp_path / "nope.pt")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr


def test_cli_on_a_new_dataset_described_once(tmp_path, monkeypatch):
    """A dataset evaluate.py has never heard of, described by a data.DatasetSpec only: 8x8
    images, 4 classes with names; the model is built for it."""
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (10, 3, 8, 8), dtype=np.uint8))
    labels = [int(v) for v in rng.integers(0, 4, 10)]

    def reader(spec, data_dir, train, img_size, subset, augment, download_missing):
        assert img_size == spec.image_size
        return data.TensorImages(images, labels)

    spec = dataclasses.replace(data.get_dataset("cifar10"), name="dots", title="Dots",
                               num_classes=4, class_names=("red", "green", "blue", "grey"),
                               image_size=8, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
                               fetch=lambda spec, data_dir, download_missing: None, reader=reader)
    monkeypatch.setitem(data.DATASETS, "dots", spec)
    ckpt = own_checkpoint(tmp_path / "dots.pt", img_size=8, num_classes=4)
    out = tmp_path / "eval"
    assert ev.main(["--checkpoint", ckpt, "--dataset", "dots", "--data-dir", str(tmp_path),
                    "--batch-size", "4", "--pictures", "2", "--output", str(out)]) == 0
    metrics = check_outputs(out, images=10)
    assert metrics["dataset"] == "dots" and metrics["class_names"] == ["red", "green", "blue", "grey"]
    assert np.array(metrics["confusion"]).shape == (4, 4)
    assert metrics["loss"] > 0 and {"top1", "top5", "loss"} <= set(metrics)


def test_cli_cuda_without_a_gpu_is_a_one_line_error(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "evaluate.py", "--checkpoint", str(tmp_path / "nope.pt"),
                           "--data-dir", str(tmp_path / "none"), "--device", "cuda"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--device cuda" in lines[0]
