"""Code paths only a GPU runs, checked on the first GPU. Skipped without CUDA.

  * the neuron kernels (eager and Triton-compiled) on CUDA against the reference loops and
    the eager kernels on the CPU: float64 and float32 exactly (spikes), bf16 within a
    stated tolerance (see neuron.py, "Precision");
  * the fused batch norm + LIF against the separate layers, in float64 and under bf16;
  * the golden parity with the official code (tests/golden/) on CUDA, float64, 1e-9;
  * dtypes under bf16 and fp16 autocast, the attention neurons' inputs included; the whole
    model with compiled kernels under bf16 and fp16, in training and under inference_mode;
    a float32 training step against the CPU (TF32 off); bf16 and fp16 steps with the grad
    scaler, whose overflow skips do not stop a run; moments saved by a CPU run resumed next
    to channels-last parameters;
  * no host read per batch: train.py's training steps and evaluation, evaluate.py's loop;
  * train.py with the official recipe on a tiny fake CIFAR-10 (bf16, stop, resume; fp16
    with clipping and compiled kernels; --minutes, which times a copy of the model first; a
    SIGTERM mid-epoch to it and its loader workers, resumed); two NCCL processes when there
    are two GPUs (and Ctrl-C to their torchrun, resumed);
  * benchmark.py --device cuda --amp (compiled kernels), and evaluate.py on CUDA.

The kernels: tests/conftest.py makes every test process run them eagerly. Where a test here
asks for them compiled (the `backend` fixture's "compiled", `kernels("compiled")`), it starts
from a fresh compiler and fails if any kernel call ran eagerly: a compile error raises under
the "compiled" backend, and torch.compile's silent fallbacks (its recompile limit, a frame
it skips) are caught by checking each call. The scripts run in subprocesses with
QKFORMER_LIF=compiled where they should compile, so a compile error fails them.

scripts/gpu_check.py runs this file (and the CPU checks) and prints PASS/FAIL per test.
The device settings: parity tests run with neuron_fast.apply_device_settings(fast=False)
(no cuDNN autotuning, no TF32) so that float32 comparisons are bit-stable.
"""
import contextlib
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import neuron_fast                            # the neurons' fast path, which this file checks
from checkpoints import convert_official_state_dict, load_official_state_dict
from neuron import LIFNode, ParametricLIFNode, SpikingNeuron, lif_reference, plif_reference
from neuron_fast import apply_device_settings
from qkformer import QKFormer, QKFormerConfig, create_model
from _runs import free_port

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, "tests", "golden")
CUDA = torch.device("cuda")
# bf16 rounds to an 8-bit mantissa: gradients computed in float32 from bf16 inputs and
# returned in bf16 agree to a few units of that.
BF16_RTOL = 2 ** -6


def _fresh_compiler():
    """Forget what torch.compile compiled before: each setting (tau, threshold), dtype and
    T compiles a kernel of its own, and past the compiler's recompile limit it would run the
    rest eagerly (the kernels then say "eager"; the tests of this file ask for "compiled")."""
    torch._dynamo.reset()


@contextlib.contextmanager
def kernels(name):
    """The neuron kernels eager, or compiled from a fresh compiler and checked: every kernel
    call made under the "compiled" backend (of at most MAX_COMPILED_STEPS steps: longer ones
    run eagerly by design) must have run the compiled code, else the block fails. Yields the
    calls checked: (kernel, input dtype, what ran)."""
    previous, calls = neuron_fast.get_backend(), []
    real = neuron_fast.CompiledOrEager.__call__

    def checked(kernel, *args):
        out = real(kernel, *args)
        if neuron_fast.get_backend() == "compiled" and args[0].shape[0] <= neuron_fast.MAX_COMPILED_STEPS:
            calls.append((kernel.fn.__name__, args[0].dtype, kernel.used))
        return out
    if name == "compiled":
        _fresh_compiler()
    neuron_fast.CompiledOrEager.__call__ = checked
    neuron_fast.set_backend(name)
    try:
        yield calls
    finally:
        neuron_fast.CompiledOrEager.__call__ = real
        neuron_fast.set_backend(previous)
    eager = sorted({(n, str(d)) for n, d, used in calls if used != "compiled"})
    assert name != "compiled" or (calls and not eager), f"kernels that ran eagerly, not compiled: {eager}"


@pytest.fixture(params=["eager", "compiled"])
def backend(request):
    with kernels(request.param):
        yield request.param


@pytest.fixture
def exact():
    """Bit-stable float32 on the GPU for the block (no TF32, no cuDNN autotuning)."""
    apply_device_settings(CUDA, fast=False)
    yield
    apply_device_settings(CUDA, fast=True)


# ---------------------------------------------------------------- neuron kernels

@pytest.mark.parametrize("tau", [2.0, None])
def test_lif_on_cuda_equals_reference_on_cpu(backend, tau):
    torch.manual_seed(0)
    x = torch.randn(4, 3, 6, 50, dtype=torch.float64) * 1.5 + 0.7
    grad = torch.randn_like(x)
    xc = x.cuda().requires_grad_()
    xr = x.clone().requires_grad_()
    fast, ref = LIFNode(tau=tau)(xc), lif_reference(xr, tau)
    assert torch.equal(fast.cpu(), ref)
    if backend == "compiled":
        assert neuron_fast.lif_forward_kernel.used == "compiled"
    gx, = torch.autograd.grad(fast, xc, grad.cuda())
    gr, = torch.autograd.grad(ref, xr, grad)
    assert torch.allclose(gx.cpu(), gr, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_compiled_kernels_on_cuda_equal_eager_on_cpu(dtype, backend):
    """float32: the same spikes, exactly; bf16 and fp16 (computed in float32 on both, see
    neuron.py): at most 1e-4 of the spikes differ (none expected). Gradients to float rounding."""
    torch.manual_seed(5)
    x = (torch.randn(4, 8, 1000) * 1.5 + 0.7).to(dtype)
    grad = torch.randn(x.shape).to(dtype)
    previous = neuron_fast.get_backend()
    neuron_fast.set_backend("eager")                  # the CPU side: eager kernels
    try:
        xr = x.clone().requires_grad_()
        ref = LIFNode()(xr)
        gr, = torch.autograd.grad(ref, xr, grad)
    finally:
        neuron_fast.set_backend(previous)
    xc = x.cuda().requires_grad_()
    out = LIFNode()(xc)
    gx, = torch.autograd.grad(out, xc, grad.cuda())
    assert out.dtype == gx.dtype == dtype
    if dtype == torch.float32:
        assert torch.equal(out.cpu(), ref)
        assert torch.allclose(gx.cpu(), gr, rtol=1e-5, atol=1e-6)
    else:
        assert (out.cpu() != ref).float().mean().item() <= 1e-4
        assert torch.allclose(gx.cpu().float(), gr.float(), rtol=BF16_RTOL, atol=1e-3)
    with torch.no_grad():                              # inference: the spikes-only kernel
        assert torch.equal(LIFNode()(x.cuda()).cpu(), out.detach().cpu())
    with torch.inference_mode():                       # as evaluate.py and benchmark.py run it
        assert torch.equal(LIFNode()(x.cuda()).cpu(), out.detach().cpu())


def test_plif_on_cuda_equals_reference_on_cpu():
    torch.manual_seed(1)
    x = torch.randn(4, 3, 50, dtype=torch.float64) * 1.5 + 0.7
    grad = torch.randn_like(x)
    node = ParametricLIFNode().double().cuda()
    xc = x.cuda().requires_grad_()
    w = torch.zeros((), dtype=torch.float64, requires_grad=True)
    xr = x.clone().requires_grad_()
    fast, ref = node(xc), plif_reference(xr, w)
    assert torch.equal(fast.cpu(), ref)
    gx, gw = torch.autograd.grad(fast, (xc, node.w), grad.cuda())
    rx, rw = torch.autograd.grad(ref, (xr, w), grad)
    assert torch.allclose(gx.cpu(), rx, rtol=1e-12, atol=1e-14)
    assert torch.allclose(gw.cpu(), rw, rtol=1e-12, atol=1e-14)


def test_long_sequences_run_eagerly_on_cuda():
    """official_quirks' T*B steps: eager, not compiled, and the same spikes as the reference."""
    previous = neuron_fast.get_backend()
    neuron_fast.set_backend("auto")
    try:
        x = torch.randn(256, 100, device="cuda") + 0.8
        out = LIFNode()(x)
        assert neuron_fast.lif_spikes_kernel.used == "eager"
        assert torch.equal(out.cpu(), lif_reference(x.cpu(), 2.0))
    finally:
        neuron_fast.set_backend(previous)


def test_fused_batch_norm_lif_on_cuda(backend):
    torch.manual_seed(2)
    x = torch.rand(3, 2, 4, 6, 6, dtype=torch.float64, device="cuda") * 2
    grad = torch.randn(3, 2, 4, 6, 6, dtype=torch.float64, device="cuda")
    bn_a = nn.BatchNorm2d(4).double().cuda()
    bn_a.weight.data.uniform_(1, 4)
    bn_b = nn.BatchNorm2d(4).double().cuda()
    bn_b.load_state_dict(bn_a.state_dict())
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    fused = LIFNode()(xa, norm=bn_a)
    plain = LIFNode(reference=True)(bn_b(xb.flatten(0, 1)).unflatten(0, (3, 2)))
    assert torch.equal(fused, plain)
    if backend == "compiled":
        assert neuron_fast.bn_lif_forward_kernel.used == "compiled"
    ga = torch.autograd.grad(fused, (xa, bn_a.weight, bn_a.bias), grad)
    gb = torch.autograd.grad(plain, (xb, bn_b.weight, bn_b.bias), grad)
    for a, b in zip(ga, gb):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)
    assert torch.allclose(bn_a.running_var, bn_b.running_var, rtol=0, atol=1e-15)


def test_fused_batch_norm_lif_under_bf16_autocast(backend):
    """Under autocast the convolution's output is bf16; cuDNN's batch norm and the fused
    kernel compute BN(Y) in float32 in another order before rounding it to bf16, so a
    spike may rarely differ: at most 1e-3 of them."""
    torch.manual_seed(3)
    conv = nn.Conv2d(8, 16, 3, padding=1, bias=False).cuda()
    bn_a, bn_b = nn.BatchNorm2d(16).cuda(), nn.BatchNorm2d(16).cuda()
    bn_a.weight.data.uniform_(1, 3)
    bn_b.load_state_dict(bn_a.state_dict())
    x = torch.randn(8, 8, 16, 16, device="cuda")                  # (T*B, C, H, W), T = 4
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = conv(x)
        assert y.dtype == torch.bfloat16
        ya, yb = y.detach().requires_grad_(), y.detach().requires_grad_()
        fused = LIFNode()(ya.unflatten(0, (4, 2)), norm=bn_a)
        plain = LIFNode(reference=True)(bn_b(yb).unflatten(0, (4, 2)))
    assert fused.dtype == plain.dtype == torch.bfloat16
    assert (fused != plain).float().mean().item() <= 1e-3 and 0.05 < fused.float().mean() < 0.95
    g = torch.randn(fused.shape, device="cuda").bfloat16()
    ga, = torch.autograd.grad(fused, ya, g)
    gb, = torch.autograd.grad(plain, yb, g)
    assert ga.dtype == torch.bfloat16
    cos = F.cosine_similarity(ga.float().flatten(), gb.float().flatten(), dim=0)
    assert cos > 0.99, cos


# ---------------------------------------------------------------- golden parity on CUDA

def _golden_case(name):
    golden = torch.load(os.path.join(GOLDEN, f"official_{name}_small.pt"), weights_only=True)
    settings = {k: v for k, v in golden["config"].items() if k != "input_layout"}
    x = golden["input"]
    if name in ("cifar10dvs", "dvs128gesture"):        # official (B, T, 2, H, W) -> (T, B, ...)
        settings["depths"] = 2
        x = x.transpose(0, 1)
    return golden, QKFormerConfig(**settings), x


@pytest.mark.parametrize("name,kind", [("cifar", "eager"), ("cifar", "compiled"),
                                       ("imagenet", "eager"), ("cifar10dvs", "eager"),
                                       ("dvs128gesture", "eager")])
def test_golden_parity_on_cuda(name, kind, exact):
    """Eval logits, train logits, loss and every gradient match the official code to 1e-9
    (float64) on the GPU, official_quirks included (the SSA neuron over T*B steps)."""
    path = os.path.join(GOLDEN, f"official_{name}_small.pt")
    if not os.path.exists(path):
        pytest.skip(f"no golden file {os.path.basename(path)}")
    with kernels(kind):
        golden, config, x = _golden_case(name)
        model = QKFormer(config).double()
        load_official_state_dict(model, golden["official_state_dict"])
        assert model.config.official_quirks
        model.cuda()
        x, target = x.cuda(), golden["target"].cuda()
        model.eval()
        with torch.no_grad():
            assert torch.allclose(model(x).cpu(), golden["logits_eval"], rtol=0, atol=1e-9)
        model.train()
        logits = model(x)
        loss = F.cross_entropy(logits, target)
        loss.backward()
        assert torch.allclose(logits.detach().cpu(), golden["logits_train"], rtol=0, atol=1e-9)
        assert abs(loss.item() - golden["loss_train"].item()) < 1e-9
        grads = convert_official_state_dict(golden["grads"])
        params = dict(model.named_parameters())
        assert grads.keys() == params.keys()
        for key, grad in grads.items():
            assert torch.allclose(params[key].grad.cpu(), grad, rtol=0, atol=1e-9), key


# ---------------------------------------------------------------- mixed precision and steps

def _small_model(seed=0, **overrides):
    torch.manual_seed(seed)
    settings = dict(embed_dim=32, depths=3, num_heads=2, T=2)
    return create_model("cifar10", **{**settings, **overrides})


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_dtypes_under_autocast(dtype, backend):
    """Under autocast: every neuron's input and spikes in the activations' half dtype (the Q-K
    attention's neurons too: their sums of Q would be float32, sum being on CUDA autocast's
    float32 list, without qkformer.py's dtype=), logits in it too, the input's gradient in
    float32 (the input is float32), every parameter's gradient in float32."""
    model = _small_model().cuda().train()
    seen = {}

    def record(name):
        def hook(module, inputs, out):                 # returns None: the output stays as it is
            seen.setdefault(name, (inputs[0].dtype, out.dtype))
        return hook
    for name, m in model.named_modules():
        if isinstance(m, SpikingNeuron):
            m.register_forward_hook(record(name))
    x = torch.randn(2, 3, 32, 32, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=dtype):
        logits = model(x)
    assert logits.dtype == dtype
    assert any("attn_lif" in name for name in seen)
    assert {name: d for name, d in seen.items() if d != (dtype, dtype)} == {}
    F.cross_entropy(logits.float(), torch.tensor([1, 2], device="cuda")).backward()
    assert x.grad.dtype == torch.float32 and torch.isfinite(x.grad).all()
    assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_compiled_kernels_in_a_model_under_autocast(amp):
    """The whole model, its kernels compiled (every call checked: `kernels`), under bf16 and
    fp16: a training forward and backward, then eval under torch.inference_mode (the
    spikes-only kernel). The first neuron, which sees the same input either way, gives the
    eager kernels' spikes (at most 1e-3 of them differ: a multiply-add rounded once or twice);
    deeper layers may then differ more (a flipped spike changes what follows), so of the
    logits and gradients only finiteness is asserted."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    torch.manual_seed(6)
    x, y = torch.randn(4, 3, 32, 32, device="cuda"), torch.tensor([0, 3, 5, 9], device="cuda")
    first = {}
    for kind in ("eager", "compiled"):
        with kernels(kind) as calls:
            model = _small_model(seed=5).cuda().to(memory_format=torch.channels_last).train()
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.momentum = 1.0                   # eval then normalises as training did: spikes
            neuron = next(m for m in model.modules() if isinstance(m, SpikingNeuron))
            neuron.register_forward_hook(lambda m, i, out, spikes=first.setdefault(kind, []):
                                         spikes.append(out.detach()))      # (append returns None)
            with torch.autocast("cuda", dtype=dtype):
                logits = model(x)
            F.cross_entropy(logits.float(), y).backward()
            model.eval()
            with torch.inference_mode(), torch.autocast("cuda", dtype=dtype):
                inference = model(x)
        assert logits.dtype == inference.dtype == dtype
        assert torch.isfinite(logits).all() and torch.isfinite(inference).all()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    ran = {(name, d) for name, d, _ in calls}
    assert ("lif_spikes", dtype) in ran, ran                        # inference: the spikes-only kernel
    assert {("lif_forward", dtype), ("bn_lif_forward", dtype)} & ran and \
        {("lif_backward", dtype), ("bn_lif_backward", dtype)} & ran, ran   # training, both directions
    for eager, compiled in zip(first["eager"], first["compiled"]):       # training, then inference
        assert 0.01 < compiled.float().mean() < 0.99
        assert (eager != compiled).float().mean() <= 1e-3


def test_float32_training_step_on_cuda_equals_cpu(exact):
    """One AdamW step of a small cifar10 model, float32, TF32 off: the GPU and the CPU give
    the same loss and gradients up to float rounding (convolutions add in another order;
    a rare spike can flip, hence the cosine for the gradients)."""
    results = []
    for device in ("cpu", "cuda"):
        model = _small_model(seed=1).to(device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.06)
        torch.manual_seed(2)
        x = torch.randn(4, 3, 32, 32).to(device)
        y = torch.tensor([0, 3, 5, 9]).to(device)
        loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
        loss.backward()
        grads = torch.cat([p.grad.flatten().cpu() for p in model.parameters()])
        opt.step()
        with torch.no_grad():
            after = F.cross_entropy(model(x), y).item()
        results.append((loss.item(), grads, after))
    (l_cpu, g_cpu, a_cpu), (l_gpu, g_gpu, a_gpu) = results
    assert abs(l_cpu - l_gpu) < 1e-4 * max(1.0, abs(l_cpu))
    assert F.cosine_similarity(g_cpu, g_gpu, dim=0) > 0.999
    assert abs(a_cpu - a_gpu) < 1e-2 * max(1.0, abs(a_cpu))


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_steps_with_the_scaler(amp):
    """A few steps on one batch under autocast, with the grad scaler for fp16 (as train.py):
    finite losses that fall."""
    dtype = neuron_fast.autocast_dtype(CUDA, amp)
    assert dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    model = _small_model(seed=3).cuda().train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    torch.manual_seed(4)
    x, y = torch.randn(8, 3, 32, 32, device="cuda"), torch.randint(0, 10, (8,), device="cuda")
    losses = []
    for _ in range(8):
        with torch.autocast("cuda", dtype=dtype):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert losses[-1] < losses[0], losses
    if dtype == torch.float16:
        assert 0 < scaler.get_scale() < float("inf")


def _tiny_step_context(model, amp, steps, scaler=None):
    """train.py's step context (fused AdamW, its schedule) for `model` on the GPU under `amp`."""
    import train
    import train_settings
    a = train_settings.resolve_args(train_settings.parse_args(
        ["--lr", "1e-3", "--warmup-epochs", "0.5", "--epochs", "2", "--reprob", "0", "--mixup", "0"]))
    opt = train.build_optimizer(model, a)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    scaler = scaler or torch.amp.GradScaler("cuda", enabled=amp == "fp16")
    return train.StepContext(model, opt, train.build_scheduler(opt, a, steps), nn.CrossEntropyLoss(), a, CUDA,
                             (0.5,) * 3, (0.25,) * 3, scaler=scaler, show=False,
                             autocast=lambda: torch.autocast("cuda", dtype=dtype))


def _batches(n, size=32, batch=4):
    """n batches of random uint8 images and labels in page-locked memory, as a pinned loader gives."""
    torch.manual_seed(7)
    return [(torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8).pin_memory(),
             torch.randint(0, 10, (batch,)).pin_memory()) for _ in range(n)]


def test_fp16_scaler_overflow_skips_do_not_stop_a_run():
    """fp16 with the grad scaler started far too high: it skips the first 20+ updates and
    halves its scale each time (by design); train_guards counts them as non-finite only at
    SCALE_FLOOR, so the epoch ends, its updates then made (tests/test_train.py does this on the CPU)."""
    import train
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10)).cuda()
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0 ** 40)
    stats = train.train_one_epoch(_tiny_step_context(model, "fp16", 30, scaler), _batches(30, size=8), 0)
    assert 20 <= stats["skipped_updates"] < 30 and 1 <= scaler.get_scale() < 2.0 ** 40
    assert torch.isfinite(torch.tensor(stats["train_loss"]))


def test_moments_of_a_cpu_run_resume_next_to_channels_last_parameters():
    """Moments saved contiguous (a CPU run) and loaded next to a channels-last parameter (as
    train.py keeps them on a GPU): after train_guards.match_state_layouts, three fused AdamW
    steps on the GPU give exactly what the same moments in the parameter's layout give.
    (tests/test_train.py shows on the CPU what happens without it.)"""
    import copy
    import train_guards
    torch.manual_seed(1)
    weight = torch.randn(8, 4, 3, 3)                             # a convolution's weight
    grads = [torch.randn(8, 4, 3, 3) for _ in range(5)]

    def run(device, moments=None, first=0, steps=3):
        p = nn.Parameter(weight.to(device))
        if device == "cuda":
            p = nn.Parameter(p.detach().to(memory_format=torch.channels_last))
        opt = torch.optim.AdamW([p], lr=1e-2, weight_decay=0.05, fused=True)
        if moments is not None:
            opt.load_state_dict(copy.deepcopy(moments))          # load_state_dict keeps what it gets
            train_guards.match_state_layouts(opt)
        for g in grads[first:first + steps]:
            p.grad = g.to(device).contiguous(memory_format=torch.channels_last if device == "cuda"
                                             else torch.contiguous_format)
            opt.step()
        return p.detach().cpu(), opt.state_dict()

    _, saved = run("cpu", steps=2)                                # contiguous moments
    assert not saved["state"][0]["exp_avg"].is_contiguous(memory_format=torch.channels_last)
    own = copy.deepcopy(saved)
    for key in ("exp_avg", "exp_avg_sq"):
        own["state"][0][key] = own["state"][0][key].contiguous(memory_format=torch.channels_last)
    same, _ = run("cuda", own, first=2)
    resumed, state = run("cuda", saved, first=2)
    assert torch.equal(resumed, same)
    assert state["state"][0]["exp_avg"].is_contiguous(memory_format=torch.channels_last)


def _syncs(fn):
    """The number of synchronising CUDA calls fn() makes (torch.cuda.set_sync_debug_mode)."""
    import warnings
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_no_host_read_per_batch(amp):
    """train.py's training epoch and evaluation, and evaluate.py's loop, make the host wait for
    the GPU a fixed number of times (their reads at the end), not once per batch: 2 batches and
    6 batches give the same count."""
    import evaluate as ev
    import train
    model = _small_model(seed=3).cuda().to(memory_format=torch.channels_last)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    prepare = lambda images: (images.float() - 127.5) / 64              # noqa: E731
    counts = {}
    for n in (2, 2, 6):                                          # the first round: first-call costs
        batches = _batches(n)
        counts[n] = (
            _syncs(lambda: train.train_one_epoch(_tiny_step_context(model, amp, n), batches, 0)),
            _syncs(lambda: train.evaluate(model, batches, CUDA, (0.5,) * 3, (0.25,) * 3,
                                          lambda: torch.autocast("cuda", dtype=dtype), show=False)),
            _syncs(lambda: ev.evaluate(model, batches, 10, CUDA, prepare, amp_dtype=dtype)))
    assert counts[2] == counts[6], counts


@pytest.mark.parametrize("kind", ["lif", "plif"])
def test_training_step_on_cuda_fires_every_hook(kind):
    model = create_model("cifar10", embed_dim=32, depths=3, num_heads=2, T=2, neuron=kind).cuda()
    neurons = [m for m in model.modules() if isinstance(m, SpikingNeuron)]
    calls = []
    for n in neurons:
        n.register_forward_hook(lambda m, i, out: calls.append(out))
    model(torch.randn(2, 3, 32, 32, device="cuda")).sum().backward()
    assert len(calls) == len(neurons)
    assert all(set(out.unique().tolist()) <= {0.0, 1.0} for out in calls)


# ---------------------------------------------------------------- the scripts on CUDA

TINY = ["--model", "tiny", "--embed-dim", "32", "--num-heads", "1", "--depths", "3", "--T", "2"]


def _train(cifar, out, *extra, lif="eager"):
    """train.py in a fresh process (its device settings stay there), the official cifar10
    recipe but a tiny model, its neuron kernels as `lif` says (QKFORMER_LIF: "compiled"
    fails on a compile error); returns the process."""
    argv = [sys.executable, os.path.join(ROOT, "train.py"), "--dataset", "cifar10",
            "--data-dir", cifar, "--no-download", "--output", str(out), *TINY,
            "--batch-size", "8", "--epochs", "2", "--warmup-epochs", "0.5", "--device", "cuda", *extra]
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "QKFORMER_LIF": lif})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def _log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_train_py_bf16_stop_and_resume(cifar, tmp_path):
    whole = tmp_path / "whole"
    _train(cifar, whole, "--amp", "bf16")
    split = tmp_path / "split"
    _train(cifar, split, "--amp", "bf16", "--stop-after", "1")
    assert torch.load(split / "last.pt", weights_only=True)["epoch"] == 1
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--resume",
                           str(split / "last.pt")], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = _log(whole), _log(split)
    assert [r["epoch"] for r in a] == [r["epoch"] for r in b] == [1, 2]
    for ra, rb in zip(a, b):          # GPU kernels need not be bit-reproducible: close, finite
        assert abs(ra["train_loss"] - rb["train_loss"]) < 0.05 * abs(ra["train_loss"]) + 1e-3
    ckpt = torch.load(whole / "last.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_train_py_fp16_with_clipping(cifar, tmp_path):
    """fp16 with the grad scaler, clipping and the kernels compiled (a compile error fails)."""
    out = tmp_path / "fp16"
    proc = _train(cifar, out, "--amp", "fp16", "--clip-grad", "1.0", lif="compiled")
    assert "fp16" in proc.stdout
    log = _log(out)
    assert len(log) == 2 and all(torch.isfinite(torch.tensor(r["train_loss"])) for r in log)


def test_train_py_times_itself_on_cuda(cifar, tmp_path):
    """--minutes on a GPU (train_budget.py: the copy trains with compiled kernels, CUDA's generators are
    forked and put back): the count it chose is printed, stored and trained."""
    out = tmp_path / "timed"
    argv = [sys.executable, os.path.join(ROOT, "train.py"), "--dataset", "cifar10", "--data-dir", cifar,
            "--no-download", "--output", str(out), *TINY, "--batch-size", "8", "--device", "cuda",
            "--minutes", "0.2"]
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "QKFORMER_LIF": "compiled"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "fit in --minutes 0.2" in proc.stdout
    with open(out / "args.json") as f:
        epochs = json.load(f)["epochs"]
    assert [r["epoch"] for r in _log(out)] == list(range(1, epochs + 1))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_train_py_two_nccl_processes(cifar, tmp_path):
    out = tmp_path / "ddp"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           "--master_addr=127.0.0.1", f"--master_port={free_port()}",
                           os.path.join(ROOT, "train.py"), "--dataset", "cifar10", "--data-dir", cifar,
                           "--no-download", *TINY, "--batch-size", "8", "--epochs", "1",
                           "--device", "cuda", "--amp", "bf16", "--output", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "x 2 processes" in proc.stdout
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 1


def _signalled(argv, sig, after, group=False):
    """A process started with `argv`, sent `sig` once its stderr shows `after` (group: to its whole
    process group, loader workers included, as SLURM sends it); returns (exit code, stdout)."""
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=False,
                            start_new_session=group)
    try:
        seen = b""
        while after.encode() not in seen:
            chunk = proc.stderr.read1(4096)
            assert chunk, seen.decode()[-3000:]
            seen += chunk
        (os.killpg if group else os.kill)(proc.pid, sig)
        out, _ = proc.communicate(timeout=300)
    finally:
        proc.kill()
    return proc.returncode, out.decode()


def test_train_py_sigterm_mid_epoch_with_loader_workers_and_fp16(cifar, tmp_path):
    """SIGTERM to the whole process group, loader workers included: the run stops after a step of
    epoch 2 with a mid-epoch checkpoint (fp16: the grad scaler's state too), and the resumed run
    ends the schedule. (Bit-for-bit equality is the CPU's: tests/test_interrupts.py.)"""
    out = tmp_path / "run"
    argv = [sys.executable, os.path.join(ROOT, "train.py"), "--dataset", "cifar10", "--data-dir", cifar,
            "--no-download", "--output", str(out), *TINY, "--batch-size", "4", "--epochs", "2",
            "--warmup-epochs", "0.5", "--device", "cuda", "--amp", "fp16", "--workers", "2"]
    code, stdout = _signalled(argv, signal.SIGTERM, "epoch 2:", group=True)
    assert code == 128 + signal.SIGTERM, stdout[-2000:]
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and 1 <= ckpt["progress"]["step"] < 10 and ckpt["scaler"]["scale"] > 0
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--resume", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "note: resuming in the middle of epoch 2" in proc.stdout and "loader workers draw" in proc.stdout
    log = _log(out)
    assert [r["epoch"] for r in log] == [1, 2] and all(torch.isfinite(torch.tensor(r["train_loss"])) for r in log)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_train_py_ctrl_c_to_torchrun_with_two_nccl_processes(cifar, tmp_path):
    """Ctrl-C reaches torchrun, which passes SIGINT on to each process: both stop after the same
    step (their decision goes through a gloo group beside NCCL), one checkpoint, resumed by two."""
    out = tmp_path / "ddp"
    flags = ["--dataset", "cifar10", "--data-dir", cifar, "--no-download", *TINY, "--batch-size", "2",
             "--epochs", "1", "--device", "cuda", "--amp", "bf16", "--workers", "1"]

    def torchrun(*extra):
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                f"--master_port={free_port()}", os.path.join(ROOT, "train.py"), *extra]

    code, stdout = _signalled(torchrun(*flags, "--output", str(out)), signal.SIGINT, "epoch 1:")
    ckpt = torch.load(out / "last.pt", weights_only=True)
    step = ckpt["progress"]["step"]
    assert len(ckpt["rng"]) == 2 and 1 <= step < 10, stdout[-2000:]
    assert f"stopped by SIGINT in epoch 1 after step {step} of 10" in stdout
    proc = subprocess.run(torchrun("--resume", str(out)), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 1


@pytest.mark.parametrize("amp", ["auto", "fp16"])
def test_benchmark_on_cuda_with_amp(tmp_path, amp):
    """benchmark.py on the GPU, its kernels compiled (a compile error fails): train.py's step
    (the fp16 one with its grad scaler) and inference."""
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmark.py"), "--model", "tiny",
                           "--batch-size", "4", "--T", "2", "--steps", "2", "--warmup", "1",
                           "--device", "cuda", "--amp", amp, "--output", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "QKFORMER_LIF": "compiled"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    expected = "fp16" if amp == "fp16" else (
        "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16")
    assert report["amp"] == expected and report["tf32"] is True
    for phase in ("train", "inference"):
        assert report[phase]["images_per_s"] > 0 and report[phase]["peak_memory_GB"] > 0


def test_evaluate_on_cuda_equals_cpu(cifar, tmp_path):
    import evaluate as ev
    torch.manual_seed(0)
    model = create_model("cifar10", embed_dim=16, depths=3, num_heads=2, T=2)
    ckpt = tmp_path / "run.pt"
    torch.save({"model": model.state_dict(), "config": dict(vars(model.config)),
                "args": {"model": "cifar10"}, "epoch": 0}, ckpt)
    runs = {}
    for name, extra in (("cpu", ["--device", "cpu"]),
                        ("cuda", ["--device", "cuda", "--no-tf32", "--workers", "2"]),
                        ("cuda-bf16", ["--device", "cuda", "--amp", "bf16"])):
        out = tmp_path / name
        assert ev.main(["--checkpoint", str(ckpt), "--dataset", "cifar10", "--data-dir", cifar,
                        "--batch-size", "8", "--pictures", "1", "--output", str(out), *extra]) == 0
        runs[name] = json.loads((out / "metrics.json").read_text())
    apply_device_settings(CUDA, fast=True)
    assert runs["cpu"]["images"] == runs["cuda"]["images"] == runs["cuda-bf16"]["images"] == 16
    assert abs(runs["cpu"]["loss"] - runs["cuda"]["loss"]) < 1e-3
    assert abs(runs["cpu"]["loss"] - runs["cuda-bf16"]["loss"]) < 0.1
    rates_cpu, rates_gpu = runs["cpu"]["firing_rates"], runs["cuda"]["firing_rates"]
    assert rates_cpu.keys() == rates_gpu.keys()
    assert all(abs(rates_cpu[k] - rates_gpu[k]) < 1e-2 for k in rates_cpu)
