"""qkformer.py: shapes, equations, presets, and parity with the official code's outputs.

tests/golden/ holds outputs of the official QKFormer code (SpikingJelly 0.0.0.0.14
neurons, CPU, float64) for two narrow configurations; see ../shared/README.md.
"""
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from checkpoints import (convert_official_state_dict, load_checkpoint, load_official_state_dict,
                         model_from_checkpoint, release_checkpoint, save_checkpoint,
                         official_config, official_family, unwrap_state_dict)
from neuron import IFNode, LIFNode, ParametricLIFNode, SpikingNeuron
from qkformer import (ATTENTIONS, PRESETS, QKAttention, QKFormer, QKFormerConfig, SpikeAttention,
                      SpikingSelfAttention, count_parameters, create_model, fold_batchnorm, predict)

GOLDEN = os.path.join(os.path.dirname(__file__), "golden")
OFFICIAL_PARAMS = {"cifar10": 6_706_234, "cifar100": 6_740_884, "imagenet_10_384": 16_473_688,
                   "imagenet_10_512": 29_079_336, "imagenet_10_768": 64_962_760,
                   "cifar10dvs": 1_504_138, "dvs128gesture": 1_999_371}


def small(**overrides):
    settings = dict(embed_dim=32, depths=3, num_heads=2, T=2)
    return create_model("cifar10", **{**settings, **overrides})


# ---------------------------------------------------------------- presets and official weights

@pytest.mark.parametrize("name", sorted(OFFICIAL_PARAMS))
def test_preset_parameter_counts_equal_official(name):
    assert count_parameters(create_model(name)) == OFFICIAL_PARAMS[name]


@pytest.mark.parametrize("name", sorted(OFFICIAL_PARAMS))
def test_official_keys_load_strictly(name):
    """Every key and shape of the seven released models maps onto this model."""
    with open(os.path.join(GOLDEN, "official_state_dict_keys.json")) as f:
        spec = json.load(f)[name]
    official = {"module." + k: torch.zeros(shape, dtype=torch.int64 if k.endswith("num_batches_tracked")
                                             else torch.float32)
                for k, shape in spec["state_dict"].items()}
    assert official_family(official) == PRESETS[name]["family"]
    config = official_config({"model": official})
    for field in ("family", "num_heads", "mlp_ratio", "img_size", "in_channels", "depths"):
        assert getattr(config, field) == PRESETS[name].get(field, getattr(config, field)), field
    model = QKFormer(config)
    assert count_parameters(model) == spec["num_params"]
    load_official_state_dict(model, {"model": official})
    assert model.config.official_quirks


@pytest.mark.parametrize("family", ["cifar", "imagenet", "cifar10dvs", "dvs128gesture"])
def test_parity_with_official_code(family):
    """Eval logits, train logits, loss and every gradient match the official code to 1e-9."""
    golden = torch.load(os.path.join(GOLDEN, f"official_{family}_small.pt"), weights_only=True)
    settings = {k: v for k, v in golden["config"].items() if k != "input_layout"}
    if settings["family"] == "dvs":
        settings["depths"] = 2                  # the official DVS models: one block per stage
    model = QKFormer(QKFormerConfig(**settings)).double()
    load_official_state_dict(model, golden["official_state_dict"])
    x, target = golden["input"], golden["target"]
    if "input_layout" in golden["config"]:      # official (B, T, 2, H, W) event counts -> (T, B, 2, H, W)
        x = x.transpose(0, 1)

    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(x), golden["logits_eval"], rtol=0, atol=1e-9)

    model.train()
    logits = model(x)
    loss = F.cross_entropy(logits, target)
    loss.backward()
    assert torch.allclose(logits, golden["logits_train"], rtol=0, atol=1e-9)
    assert abs(loss.item() - golden["loss_train"].item()) < 1e-9
    grads = convert_official_state_dict(golden["grads"])
    params = dict(model.named_parameters())
    assert grads.keys() == params.keys()
    for name, grad in grads.items():
        assert torch.allclose(params[name].grad, grad, rtol=0, atol=1e-9), name


def test_paper_mode_differs_from_official_quirk_only_through_batch_mixing():
    golden = torch.load(os.path.join(GOLDEN, "official_cifar_small.pt"), weights_only=True)
    model = QKFormer(QKFormerConfig(**golden["config"])).double().eval()
    load_official_state_dict(model, golden["official_state_dict"])
    x = golden["input"]
    with torch.no_grad():
        quirk_batch = model(x)
        quirk_alone = torch.cat([model(x[i:i + 1]) for i in range(len(x))])
        model.set_official_quirks(False)
        paper_batch = model(x)
        paper_alone = torch.cat([model(x[i:i + 1]) for i in range(len(x))])
    # Paper mode: a sample's output does not depend on the rest of its batch.
    assert torch.allclose(paper_batch, paper_alone, rtol=0, atol=1e-12)
    # The official quirk: the membrane of the last SSA neuron runs across samples.
    assert not torch.allclose(quirk_batch, quirk_alone, rtol=0, atol=1e-6)
    assert not torch.allclose(paper_batch, quirk_batch, rtol=0, atol=1e-6)


def test_convert_unwraps_checkpoints_and_rejects_foreign_keys():
    golden = torch.load(os.path.join(GOLDEN, "official_cifar_small.pt"), weights_only=True)
    sd = golden["official_state_dict"]
    wrapped = {"state_dict": {"module." + k: v for k, v in sd.items()}}
    assert convert_official_state_dict(wrapped).keys() == convert_official_state_dict(sd).keys()
    with pytest.raises(ValueError, match="belong to no QKFormer layer"):
        convert_official_state_dict({**sd, "stage1.0.tssa.extra_conv.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="no state dict"):
        unwrap_state_dict({"epoch": 3})


def test_load_official_reports_missing_and_mismatched_keys():
    golden = torch.load(os.path.join(GOLDEN, "official_cifar_small.pt"), weights_only=True)
    sd = dict(golden["official_state_dict"])
    model = QKFormer(QKFormerConfig(**golden["config"]))
    del sd["stage3.0.ssa.v_conv.weight"]
    with pytest.raises(ValueError, match="1 missing"):
        load_official_state_dict(model, sd)
    with pytest.raises(ValueError, match="another shape"):
        load_official_state_dict(create_model("cifar10", embed_dim=64, depths=4, num_heads=8, num_classes=100),
                                 golden["official_state_dict"])


# ---------------------------------------------------------------- shapes and structure

@pytest.mark.parametrize("family,size,grids", [("cifar", 32, (32, 16, 8)), ("imagenet", 64, (16, 8, 4))])
def test_stage_shapes(family, size, grids):
    model = small(family=family, img_size=size, depths=4)
    shapes = []
    for stage in model.stages:
        stage.register_forward_hook(lambda m, i, out: shapes.append(tuple(out.shape)))
    logits = model(torch.randn(3, 3, size, size))
    assert logits.shape == (3, 10)
    widths = (8, 16, 32)
    assert shapes == [(2, 3, w, g, g) for w, g in zip(widths, grids)]


def test_speds_pool_positions():
    """CIFAR: stage-2/3 embeddings pool after their second conv; ImageNet: after the first."""
    def pools(model, stage):
        return [not isinstance(u.pool, torch.nn.Identity) for u in model.stages[stage].embed.main]
    cifar, imagenet = small(), small(family="imagenet", img_size=64, depths=4)
    assert pools(cifar, 1) == [False, True] and pools(cifar, 0) == [False]
    assert pools(imagenet, 1) == [True, False] and pools(imagenet, 0) == [True, False]
    assert not isinstance(imagenet.stages[0].embed.stem.pool, torch.nn.Identity)
    assert isinstance(cifar.stages[0].embed.stem.pool, torch.nn.Identity)
    assert [len(s.blocks) for s in small(depths=5).stages] == [1, 1, 3]
    assert [len(s.blocks) for s in small(family="imagenet", img_size=64, depths=5).stages] == [1, 2, 2]


def test_speds_switch_removes_the_deformed_shortcut_only():
    """speds=False (train.py --no-speds, Table 5's ablation): every embedding is F(Z) alone,
    with the same weights for F; the parameters lost are exactly the shortcuts'."""
    torch.manual_seed(0)
    with_speds = create_model("tiny", embed_dim=32, num_heads=2, T=2).eval()
    without = create_model("tiny", embed_dim=32, num_heads=2, T=2, speds=False).eval()
    assert all(s.embed.shortcut is None for s in without.stages)
    shortcuts = sum(p.numel() for s in with_speds.stages for p in s.embed.shortcut.parameters())
    assert (count_parameters(with_speds) - count_parameters(without)) == shortcuts
    missing, unexpected = without.load_state_dict(with_speds.state_dict(), strict=False)
    assert not missing and all(".embed.shortcut." in k for k in unexpected)
    x = torch.randn(2, 3, 32, 32)
    embed, plain = with_speds.stages[0].embed, without.stages[0].embed
    image = x.unsqueeze(0).repeat(2, 1, 1, 1, 1)                   # (T, B, C, H, W)
    with torch.no_grad():
        embed.shortcut.bn.bias.fill_(5.0)                          # a shortcut that fires
        assert torch.equal(plain(image), embed.main(embed.stem(image)))
        assert torch.equal(embed(image), plain(image) + embed.shortcut(embed.stem(image)))
        assert not torch.equal(plain(image), embed(image))


def test_event_input_used_as_is():
    model = small().eval()
    seq = torch.randn(5, 2, 3, 32, 32)                       # T=5 time steps of events
    with torch.no_grad():
        assert model(seq).shape == (2, 10)
        images = torch.randn(2, 3, 32, 32)
        repeated = images.unsqueeze(0).repeat(2, 1, 1, 1, 1)  # direct encoding by hand, T=2
        assert torch.equal(model(images), model(repeated))


def test_attention_choice_per_stage():
    model = small(attention=("channel", "token", "token"))
    kinds = [type(s.blocks[0].attn) for s in model.stages]
    assert kinds == [QKAttention, QKAttention, QKAttention]
    assert model.stages[0].blocks[0].attn.mode == "channel"
    assert isinstance(small().stages[2].blocks[0].attn, SpikingSelfAttention)
    model(torch.randn(2, 3, 32, 32)).sum().backward()


def test_linear_init():
    model = create_model("cifar100")
    w = model.head.weight
    assert abs(w.std().item() - 0.02) < 0.002
    assert torch.count_nonzero(model.head.bias) == 0


# ---------------------------------------------------------------- the attention equations

def _spiking_bn_eval(module):
    """Eval mode, with batch norms that pass their input through scaled, so layers spike."""
    module.eval()
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.fill_(3.0)
    return module


@pytest.mark.parametrize("mode", ["token", "channel"])
def test_qk_attention_equations(mode):
    torch.manual_seed(0)
    T, B, C, H, W, heads = 2, 2, 8, 4, 4, 2
    attn = _spiking_bn_eval(QKAttention(C, heads, mode)).double()
    x = (torch.rand(T, B, C, H, W, dtype=torch.float64) < 0.5).double()
    masks = []
    attn.attn_lif.register_forward_hook(lambda m, i, out: masks.append(out))
    out = attn(x)
    q = attn.q(x).reshape(T, B, heads, C // heads, H * W)
    k = attn.k(x).reshape(T, B, heads, C // heads, H * W)
    if mode == "token":   # A_t = SN(sum over a head's channels), one value per token
        a = LIFNode(v_threshold=0.5)(q.sum(3, keepdim=True))
        assert masks[0].shape == (T, B, heads, 1, H * W)
    else:                 # A_c = SN(sum over tokens), one value per channel
        a = LIFNode(v_threshold=0.5)(q.sum(4, keepdim=True))
        assert masks[0].shape == (T, B, heads, C // heads, 1)
    assert torch.equal(masks[0], a)
    assert 0 < a.mean() < 1
    assert torch.equal(out, attn.proj((a * k).reshape(T, B, C, H, W)))
    assert set(out.unique().tolist()) <= {0.0, 1.0}


def test_ssa_equals_quadratic_form():
    """SSA computed right to left, Q (K^T V), equals the textbook (Q K^T) V."""
    torch.manual_seed(0)
    T, B, C, H, W, heads = 2, 2, 8, 2, 2, 2
    ssa = _spiking_bn_eval(SpikingSelfAttention(C, heads)).double()
    x = (torch.rand(T, B, C, H, W, dtype=torch.float64) < 0.5).double()
    inputs = []
    ssa.attn_lif.register_forward_hook(lambda m, i, out: inputs.append(i[0]))
    ssa(x)

    def tokens(u):  # (T, B, C, H, W) -> (T, B, h, N, d)
        return u.reshape(T, B, heads, C // heads, H * W).transpose(-2, -1)
    q, k, v = tokens(ssa.q(x)), tokens(ssa.k(x)), tokens(ssa.v(x))
    quadratic = (q @ k.transpose(-2, -1)) @ v * 0.125        # (T, B, h, N, d)
    assert torch.equal(inputs[0], quadratic.transpose(-2, -1).reshape(T, B, C, H, W))


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("overrides,message", [
    (dict(embed_dim=96, num_heads=16), "divisible by num_heads"),
    (dict(embed_dim=36), "divisible by 8"),
    (dict(img_size=30), "multiple of 4"),
    (dict(family="imagenet", img_size=56, depths=4), "multiple of 16"),
    (dict(T=0), "T must be a positive integer"),
    (dict(depths=2), "depths >= 3"),
    (dict(attention=("token", "ssa")), "attention"),
    (dict(attention=("token", "token", "linear")), "attention"),
    (dict(family="mnist"), "family"),
    (dict(mlp_ratio=0), "mlp_ratio"),
    (dict(dropout=0.1), "unknown model setting"),
    (dict(neuron="izhikevich"), "neuron must be one of"),
    (dict(tau=0.5), "tau must be at least 1"),
    (dict(neuron="plif", tau=1.0), "greater than 1"),
    (dict(tau="2"), "tau must be a number"),
    (dict(v_threshold=0.0), "v_threshold must be positive"),
    (dict(attn_v_threshold=-0.5), "attn_v_threshold must be positive"),
    (dict(surrogate_alpha=0), "surrogate_alpha must be positive"),
])
def test_invalid_configuration(overrides, message):
    with pytest.raises(ValueError, match=message):
        small(**overrides)


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown model"):
        create_model("resnet50")


@pytest.mark.parametrize("shape,message", [
    ((2, 1, 32, 32), "3 input channels"),
    ((3, 32, 32), "expected images"),
    ((2, 3, 30, 30), "multiples of 4"),
])
def test_invalid_input(shape, message):
    with pytest.raises(ValueError, match=message):
        small()(torch.randn(shape))


# ---------------------------------------------------------------- checkpoints

def test_checkpoint_round_trip_and_official(tmp_path):
    import dataclasses
    model = small()
    path = tmp_path / "ck.pt"
    torch.save({"model": model.state_dict(), "config": dataclasses.asdict(model.config)}, path)
    rebuilt = model_from_checkpoint(load_checkpoint(str(path)), T=1)
    assert rebuilt.config.T == 1
    for a, b in zip(model.state_dict().values(), rebuilt.state_dict().values()):
        assert torch.equal(a, b)
    golden = torch.load(os.path.join(GOLDEN, "official_cifar_small.pt"), weights_only=True)
    official = model_from_checkpoint({"model": golden["official_state_dict"]})
    assert official.config.official_quirks and official.config.embed_dim == 64


def test_release_checkpoint_keeps_what_evaluation_needs(tmp_path):
    """release_checkpoint (the shipped checkpoint's format): the weights (as trained, or rounded
    to float16 on request), config, the run's settings; the model rebuilt from it is the
    trained one, up to the rounding."""
    torch.manual_seed(0)
    model = create_model("tiny", embed_dim=32, num_heads=2, T=2).eval()
    optimizer = torch.optim.AdamW(model.parameters())
    full = {"model": model.state_dict(), "config": dataclasses.asdict(model.config),
            "optimizer": optimizer.state_dict(), "args": {"recipe": "cpu"}, "best_top1": 50.0}
    exact = release_checkpoint(full)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in exact["model"].items())
    released = release_checkpoint(full, dtype=torch.float16)
    assert set(released) == {"model", "config", "args", "best_top1"}
    assert all(v.dtype in (torch.float16, torch.int64) for v in released["model"].values())
    save_checkpoint(released, str(tmp_path / "small.pt"))
    rebuilt = model_from_checkpoint(load_checkpoint(str(tmp_path / "small.pt"))).eval()
    for name, value in rebuilt.state_dict().items():
        assert value.dtype == model.state_dict()[name].dtype
        torch.testing.assert_close(value, model.state_dict()[name].half().to(value.dtype))
    with pytest.raises(ValueError, match="lacks"):
        release_checkpoint({"model": {}})


def test_bad_checkpoint_files(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_checkpoint(str(tmp_path / "missing.pt"))
    (tmp_path / "text.pt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="refusing to load"):
        load_checkpoint(str(tmp_path / "text.pt"))
    torch.save({"model": small().state_dict()}, tmp_path / "full.pt")
    data = (tmp_path / "full.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="damaged or incomplete"):
        load_checkpoint(str(tmp_path / "cut.pt"))

    class Evil:
        def __reduce__(self):
            return (print, ("code ran",))
    torch.save({"model": {}, "payload": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="refusing to load"):
        load_checkpoint(str(tmp_path / "evil.pt"))


def test_fold_batchnorm_keeps_eval_outputs():
    golden = torch.load(os.path.join(GOLDEN, "official_imagenet_small.pt"), weights_only=True)
    model = QKFormer(QKFormerConfig(**golden["config"])).double()
    load_official_state_dict(model, golden["official_state_dict"])
    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorm(model)
    folded = fold_batchnorm(model.eval())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    with torch.no_grad():
        assert torch.allclose(folded(golden["input"]), golden["logits_eval"], rtol=0, atol=1e-9)


@torch.no_grad()
def test_predict_with_flips_averages_the_image_and_its_mirror():
    golden = torch.load(os.path.join(GOLDEN, "official_imagenet_small.pt"), weights_only=True)
    model = QKFormer(QKFormerConfig(**golden["config"])).double().eval()
    load_official_state_dict(model, golden["official_state_dict"])   # weights whose logits differ
    x = golden["input"]
    one, mirrored = model(x), model(x.flip(-1))
    assert not torch.allclose(one, mirrored)                  # the model is not mirror-symmetric
    assert torch.equal(predict(model, x), one)
    assert torch.allclose(predict(model, x, flip=True), (one + mirrored) / 2)
    # a mirror-symmetric image looks the same both ways: the mean is its single prediction
    half = x[..., :x.shape[-1] // 2]
    symmetric = torch.cat([half, half.flip(-1)], dim=-1)                 # (B, C, H, W)
    assert torch.allclose(predict(model, symmetric, flip=True), model(symmetric))


@pytest.mark.parametrize("backend", ["eager", "compiled"])
@pytest.mark.parametrize("bn_mode", ["train", "eval", "cumulative"])
def test_fused_batchnorm_lif_equals_plain_layers(backend, bn_mode):
    """The fused BatchNormLIF node (batch norm and neuron in one kernel, recomputed in the
    backward pass) changes no number: spikes, gradients and running statistics equal those
    of the plain conv -> nn.BatchNorm2d -> reference LIF layers. bn_mode: batch statistics
    (train), running statistics (eval), momentum=None (a cumulative average)."""
    import neuron_fast
    from qkformer import ConvBNLIF
    previous = neuron_fast.get_backend()
    neuron_fast.set_backend(backend)
    try:
        torch.manual_seed(0)
        unit = ConvBNLIF(4, 6, 3).double()
        unit.bn.weight.data.uniform_(1, 4)
        unit.bn.momentum = None if bn_mode == "cumulative" else 0.1
        unit.bn.running_mean.uniform_(-0.5, 0.5)
        unit.bn.running_var.uniform_(0.5, 2.0)
        unit.train(bn_mode != "eval")
        start = {k: v.clone() for k, v in unit.state_dict().items()}
        x = (torch.rand(3, 2, 4, 6, 6, dtype=torch.float64) < 0.4).double() * 2  # spike counts 0/2

        def run(fused):
            unit.load_state_dict(start)
            unit.zero_grad(set_to_none=True)
            unit.lif.reference = not fused          # the reference neuron also skips BatchNormLIF
            xin = x.clone().requires_grad_()
            out = unit(xin)
            (out * torch.arange(out.numel(), dtype=torch.float64).reshape(out.shape).sin()).sum().backward()
            return out, xin.grad, [p.grad.clone() for p in unit.parameters()], \
                {k: v.clone() for k, v in unit.state_dict().items()}
        out_a, gx_a, gp_a, state_a = run(fused=True)
        out_b, gx_b, gp_b, state_b = run(fused=False)
        if backend == "compiled":
            from neuron_fast import bn_lif_forward_kernel, bn_lif_backward_kernel
            assert bn_lif_forward_kernel.used == bn_lif_backward_kernel.used == "compiled"
        assert torch.equal(out_a, out_b) and 0 < out_a.mean() < 1
        for k in state_a:                          # running statistics updated once, alike
            assert torch.allclose(state_a[k], state_b[k], rtol=0, atol=1e-15), k
        assert int(state_a["bn.num_batches_tracked"]) == (0 if bn_mode == "eval" else 1)
        assert torch.allclose(gx_a, gx_b, rtol=0, atol=1e-12)
        for a, b in zip(gp_a, gp_b):
            assert torch.allclose(a, b, rtol=0, atol=1e-12)
    finally:
        neuron_fast.set_backend(previous)


def test_activations_are_channels_last():
    """The layout the fast paths rely on (see the top of qkformer.py), in training (fused
    batch norm + neuron) and in evaluation, without changing any shape."""
    from qkformer import ConvBNLIF
    model = small()
    seen = []
    for m in model.modules():
        if isinstance(m, ConvBNLIF):
            m.register_forward_hook(lambda mod, inp, out: seen.append(out))
    x = torch.randn(2, 3, 32, 32)
    model.train()(x).sum().backward()
    with torch.no_grad():
        model.eval()(x)
    assert len(seen) == 2 * sum(isinstance(m, ConvBNLIF) for m in model.modules())
    for out in seen:
        assert out.shape[:2] == (model.config.T, 2)
        assert out.flatten(0, 1).is_contiguous(memory_format=torch.channels_last)


def test_if_neuron_option():
    model = small(neuron="if")
    taus = {m.tau for m in model.modules() if isinstance(m, LIFNode)}
    assert taus == {None}
    assert all(type(m) is IFNode for m in model.modules() if isinstance(m, SpikingNeuron))
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    with pytest.raises(ValueError, match="neuron"):
        small(neuron="izhikevich")


# ---------------------------------------------------------------- neurons as configuration

def _neurons(model):
    return [m for m in model.modules() if isinstance(m, SpikingNeuron)]


@pytest.mark.parametrize("kind", ["lif", "if", "plif"])
def test_hooks_fire_on_every_neuron_in_training_and_evaluation(kind):
    """A forward hook on each neuron sees its spikes (T, B, ...) in a training step (where
    LIF and IF run batch norm fused into the neuron) and in an evaluation step."""
    model = small(neuron=kind)
    neurons = _neurons(model)
    assert len(neurons) == 28 and all(type(n).__name__ != "LIFNode" or kind == "lif" for n in neurons)
    calls = []
    for n in neurons:
        n.register_forward_hook(lambda m, inputs, out: calls.append((m, out)))
    x = torch.randn(2, 3, 32, 32)
    for training in (True, False):
        calls.clear()
        model.train(training)
        with torch.set_grad_enabled(training):
            loss = model(x).sum()
        if training:
            loss.backward()
        assert len(calls) == len(neurons) and {id(m) for m, _ in calls} == {id(n) for n in neurons}
        for m, out in calls:
            assert out.shape[:2] == (2, 2)                           # (T, B, ...)
            assert set(out.unique().tolist()) <= {0.0, 1.0}


def test_config_settings_reach_every_neuron():
    model = small(neuron="plif", tau=3.0, v_threshold=0.8, attn_v_threshold=0.3, surrogate_alpha=2.5)
    attention = {id(m.attn_lif) for m in model.modules() if isinstance(m, SpikeAttention)}
    neurons = _neurons(model)
    assert all(type(n) is ParametricLIFNode for n in neurons)
    for n in neurons:
        assert n.v_threshold == (0.3 if id(n) in attention else 0.8)
        assert n.alpha == 2.5 and abs(n.tau - 3.0) < 1e-6
    assert len(attention) == 3


@pytest.mark.parametrize("kind", ["lif", "if", "plif"])
def test_every_neuron_kind_round_trips_through_a_checkpoint(kind, tmp_path):
    import dataclasses
    model = small(neuron=kind, tau=4.0, v_threshold=0.9, attn_v_threshold=0.4, surrogate_alpha=3.0)
    for n in _neurons(model):                                      # a learned tau, for PLIF
        if isinstance(n, ParametricLIFNode):
            n.w.data.fill_(0.3)
    config = dataclasses.asdict(model.config)
    assert QKFormerConfig(**config) == model.config
    assert {k: config[k] for k in ("neuron", "tau", "v_threshold", "attn_v_threshold", "surrogate_alpha")} \
        == dict(neuron=kind, tau=4.0, v_threshold=0.9, attn_v_threshold=0.4, surrogate_alpha=3.0)
    path = tmp_path / "ck.pt"
    torch.save({"model": model.state_dict(), "config": config}, path)
    rebuilt = model_from_checkpoint(load_checkpoint(str(path)))
    assert [(type(a), a.extra_repr()) for a in _neurons(model)] == \
        [(type(b), b.extra_repr()) for b in _neurons(rebuilt)]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), rebuilt.eval()(x))


def test_old_checkpoint_config_without_neuron_fields(tmp_path):
    """A checkpoint written before the neuron settings were fields (neuron="if" only) loads
    with the official defaults and behaves as it did: every neuron without leak."""
    import dataclasses
    model = small(neuron="if")
    config = dataclasses.asdict(model.config)
    for key in ("tau", "v_threshold", "attn_v_threshold", "surrogate_alpha"):
        del config[key]
    rebuilt = model_from_checkpoint({"model": model.state_dict(), "config": config})
    assert rebuilt.config == model.config
    assert all(type(n) is IFNode and n.tau is None for n in _neurons(rebuilt))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), rebuilt.eval()(x))


def test_plif_model_trains():
    """A tiny PLIF model: the loss falls over a few steps and every time constant is learned."""
    torch.manual_seed(0)
    model = small(neuron="plif", num_classes=2, img_size=16)
    x, y = torch.randn(8, 3, 16, 16), torch.arange(8) % 2
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(12):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses
    ws = [n.w.item() for n in _neurons(model)]
    assert all(w != 0.0 for w in ws) and len(set(ws)) > 1
    assert sum(1 for k in model.state_dict() if k.endswith(".w")) == 28


# ---------------------------------------------------------------- attentions and their operations

def test_attention_table_builds_spike_attentions():
    assert set(ATTENTIONS) == {"token", "channel", "ssa"}
    config = QKFormerConfig(embed_dim=32, num_heads=2, official_quirks=True)
    built = {name: make(16, 2, config) for name, make in ATTENTIONS.items()}
    assert all(isinstance(a, SpikeAttention) for a in built.values())
    assert (built["token"].mode, built["channel"].mode) == ("token", "channel")
    assert built["ssa"].official_quirks


def _firing_counter(module, x):
    """Run module on x once; firing(neuron) -> (rate, neurons per image and step)."""
    seen = {}
    handles = [n.register_forward_hook(lambda m, i, out: seen.__setitem__(id(m), out))
               for n in module.modules() if isinstance(n, SpikingNeuron)]
    with torch.no_grad():
        module(x)
    for h in handles:
        h.remove()

    def firing(neuron):
        out = seen[id(neuron)]
        return out.mean().item(), out[0, 0].numel()
    return firing


def test_synaptic_ops_of_the_attentions():
    from torch.utils.flop_counter import FlopCounterMode
    torch.manual_seed(0)
    T, B, C, H, W, heads = 2, 3, 8, 4, 4, 2
    x = (torch.rand(T, B, C, H, W) < 0.5).float()
    for mode in ("token", "channel"):
        attn = _spiking_bn_eval(QKAttention(C, heads, mode)).eval()
        firing = _firing_counter(attn, x)
        ops = attn.synaptic_ops(firing)
        q = attn.q(x)
        assert len(ops) == 1 and ops[0][0] == "sum of Q"
        assert ops[0][1] == C * H * W and abs(ops[0][2] - q.mean().item()) < 1e-7
    ssa = _spiking_bn_eval(SpikingSelfAttention(C, heads)).eval()
    ops = ssa.synaptic_ops(_firing_counter(ssa, x))
    d = C // heads
    assert [(label, macs) for label, macs, _ in ops] == [("K^T V", H * W * C * d), ("Q (K^T V)", H * W * C * d)]
    assert abs(ops[0][2] - ssa.k(x).mean().item()) < 1e-7 and abs(ops[1][2] - ssa.q(x).mean().item()) < 1e-7
    # The reported MACs are the module's own FLOPs / 2 (its four 1x1 convolutions aside).
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        ssa(x)
    conv_flops = 4 * 2 * T * B * H * W * C * C
    own_macs_per_image_and_step = (counter.get_total_flops() - conv_flops) / 2 / (T * B)
    assert own_macs_per_image_and_step == sum(macs for _, macs, _ in ops)


def test_an_attention_without_synaptic_ops_fails_loudly():
    class Mine(SpikeAttention):
        def forward(self, x):
            return x
    with pytest.raises(NotImplementedError, match="Mine must define synaptic_ops"):
        Mine().synaptic_ops(lambda neuron: (0.5, 10))


# The SPEDS shortcut's gradients, checked on oneDNN's AVX2 code path on any machine. PyTorch 2.13's
# oneDNN computes wrong weight gradients (and can corrupt memory) for strided 1x1 convolutions of
# channels-last float32 inputs with fewer than 8 channels on AVX2 CPUs: measured on an AVX-512 AMD EPYC
# made to run its AVX2 kernels, a plain nn.Conv2d(5, 10, 1, stride=2) was off by 108 to 304 against
# float64. ConvBNLIF subsamples first to stay clear of that path. ONEDNN_MAX_CPU_ISA=AVX2 makes oneDNN
# pick its AVX2 kernels, so a subprocess with it reaches that path on an AVX-512 machine too.
# Printed: per channel count, the largest float32-float64 difference of ConvBNLIF's weight gradient.
STRIDED_SHORTCUT_CHECK = """
import json, torch
from qkformer import ConvBNLIF
torch.manual_seed(0)
errors = {}
for channels in (2, 4, 5, 8):
    unit = ConvBNLIF(channels, 2 * channels, 1, stride=2)
    x = torch.randn(2, 4, channels, 16, 16)                      # (T, B, C, H, W)
    grads = []
    for dtype in (torch.float32, torch.float64):
        unit.zero_grad()
        u = unit.to(dtype)
        u.lif.reference = True                                   # a smooth loss through the surrogate
        (u(x.to(dtype)) * torch.arange(8, dtype=dtype)).sum().backward()
        grads.append(u.conv.weight.grad.double())
    errors[channels] = (grads[0] - grads[1]).abs().max().item()
print(json.dumps(errors))
"""


@pytest.mark.parametrize("isa", ["native", "AVX2"])
def test_strided_shortcut_gradients_are_right_in_float32(isa):
    """A strided 1x1 conv-BN-LIF with few input channels (the SPEDS shortcut of a narrow
    model) gives the float64 gradients in float32 too, on the machine's own kernels and on
    oneDNN's AVX2 kernels (see STRIDED_SHORTCUT_CHECK)."""
    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_MAX_CPU_ISA"}
    if isa == "AVX2":
        env["ONEDNN_MAX_CPU_ISA"] = "AVX2"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", STRIDED_SHORTCUT_CHECK], cwd=root, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    errors = json.loads(out.stdout)
    assert all(error < 1e-3 for error in errors.values()), errors
