"""The spiking neurons (neuron.py) against their equations, (N1)-(N3) of neuron.py's docstring
(the LIF model of the paper's Appendix 6.1), and their fast path (neuron_fast.py) against
the reference loops."""
import functools

import torch
import pytest

import torch.nn as nn

from neuron import (NEURONS, IFNode, LIFNode, ParametricLIFNode, SpikingNeuron,
                    lif_reference, make_neuron, plif_reference, sigmoid_surrogate_grad)
from neuron_fast import LIFFunction          # importing it gives the neurons their fast path

tensor = functools.partial(torch.tensor, dtype=torch.float64)


def test_membrane_trace_by_hand():
    # tau = 2, V_th = 1:  H[t] = V[t-1] + (X[t] - V[t-1]) / 2
    x = tensor([1.5, 0.5, 2.0, 0.4])
    # t=0: H = 0 + 1.5/2 = 0.75            no spike, V = 0.75
    # t=1: H = 0.75 + (0.5 - 0.75)/2 = 0.625  no spike, V = 0.625
    # t=2: H = 0.625 + (2 - 0.625)/2 = 1.3125 spike,  V = 0 (hard reset)
    # t=3: H = 0 + 0.4/2 = 0.2              no spike
    expected = tensor([0.0, 0.0, 1.0, 0.0])
    for node in (LIFNode(), LIFNode(reference=True)):
        assert torch.equal(node(x), expected)


def test_spike_when_membrane_equals_threshold():
    # H[0] = X[0] / tau = 1.0 = V_th exactly: Heaviside(0) = 1, so it fires.
    x = tensor([2.0, 0.0])
    assert torch.equal(LIFNode()(x), tensor([1.0, 0.0]))
    # Just below the threshold it does not.
    assert torch.equal(LIFNode()(tensor([1.999, 0.0])), tensor([0.0, 0.0]))
    # The attention neuron's threshold is 0.5: X = 1 gives H = 0.5 and a spike.
    assert torch.equal(LIFNode(v_threshold=0.5)(tensor([1.0])), tensor([1.0]))


def test_leak_accumulates_subthreshold_input():
    # A constant input of 1.2 settles towards 1.2 and crosses V_th = 1 at step 2:
    # H = 0.6, then 0.6 + (1.2 - 0.6)/2 = 0.9, then 0.9 + 0.15 = 1.05.
    spikes = LIFNode()(torch.full((3,), 1.2, dtype=torch.float64))
    assert torch.equal(spikes, tensor([0.0, 0.0, 1.0]))


def test_surrogate_gradient_closed_form():
    # One step: S = Heaviside(X/tau - V_th), so dS/dX = alpha sg (1 - sg) / tau with
    # sg = sigmoid(alpha (X/tau - V_th)).
    x = torch.linspace(-1, 4, 11, dtype=torch.float64).reshape(1, 11).requires_grad_()
    LIFNode()(x).sum().backward()
    h = x.detach() / 2.0
    sg = torch.sigmoid(4.0 * (h - 1.0))
    assert torch.allclose(x.grad, 4.0 * sg * (1 - sg) / 2.0, rtol=0, atol=1e-15)
    assert torch.allclose(sigmoid_surrogate_grad(h - 1.0, 4.0), 4.0 * sg * (1 - sg))


@pytest.mark.parametrize("reference", [False, True])
def test_detached_reset_gradient(reference):
    # Two steps. dS[1]/dX[0] = surrogate'(H[1] - 1) * dH[1]/dV[0] * dV[0]/dX[0]
    #   dH[1]/dV[0] = 1 - 1/tau = 0.5
    #   dV[0]/dH[0] = 1 - S[0]   (the spike in V = H (1 - S) is detached)
    #   dH[0]/dX[0] = 1/tau = 0.5
    for x0, s0 in ((1.0, 0.0), (3.0, 1.0)):                 # below / above threshold at t=0
        x = tensor([x0, 1.5], requires_grad=True)
        s = LIFNode(reference=reference)(x)
        assert s[0].item() == s0
        s[1].backward()
        h1 = (x0 / 2) * (1 - s0) + (1.5 - (x0 / 2) * (1 - s0)) / 2
        expected = sigmoid_surrogate_grad(tensor(h1 - 1.0), 4.0) * 0.5 * (1 - s0) * 0.5
        assert torch.allclose(x.grad[0], expected, rtol=0, atol=1e-15)
    # After a spike no gradient reaches the past through the membrane: the reset cut it.
    assert x.grad[0].item() == 0.0


def test_fast_path_equals_reference_loop():
    torch.manual_seed(0)
    x = (torch.randn(6, 3, 5, 7, dtype=torch.float64) * 1.5 + 0.8).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    grad_out = torch.randn(6, 3, 5, 7, dtype=torch.float64)
    for threshold, tau in ((1.0, 2.0), (0.5, 2.0), (1.0, None)):
        fast = LIFFunction.apply(x, tau, threshold, 4.0)
        ref = lif_reference(x_ref, tau, threshold, 4.0)
        assert torch.equal(fast, ref)
        assert 0.1 < fast.mean().item() < 0.9                 # the test exercises both branches
        gx, = torch.autograd.grad(fast, x, grad_out)
        gr, = torch.autograd.grad(ref, x_ref, grad_out)
        assert torch.allclose(gx, gr, rtol=1e-12, atol=1e-14)


def test_fast_path_float32_matches_reference():
    torch.manual_seed(1)
    x = torch.randn(4, 64, dtype=torch.float32) * 2
    assert torch.equal(LIFNode()(x), LIFNode(reference=True)(x))


def test_no_state_between_calls():
    node = LIFNode()
    x = torch.rand(4, 10, dtype=torch.float64) * 3
    assert torch.equal(node(x), node(x))


def test_invalid_tau():
    with pytest.raises(ValueError, match="tau"):
        LIFNode(tau=0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_compiled_kernels_equal_reference(dtype):
    """The torch.compile'd kernels (the default outside the tests) give the same spikes and
    gradients as the plain loop; bf16 too (both compute in float32)."""
    import neuron_fast
    previous = neuron_fast.get_backend()
    neuron_fast.set_backend("compiled")
    try:
        torch.manual_seed(2)
        x = (torch.randn(4, 3, 50, dtype=dtype) * 1.5 + 0.7).requires_grad_()
        x_ref = x.detach().clone().requires_grad_()
        grad_out = torch.randn(4, 3, 50, dtype=dtype)
        for threshold in (1.0, 0.5):
            fast = LIFNode(v_threshold=threshold)(x)
            ref = lif_reference(x_ref, 2.0, threshold, 4.0)
            assert neuron_fast.lif_forward_kernel.used == "compiled"
            assert torch.equal(fast, ref)
            gx, = torch.autograd.grad(fast, x, grad_out)
            gr, = torch.autograd.grad(ref, x_ref, grad_out)
            assert gx.dtype == dtype
            tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2 ** -7}[dtype]
            assert torch.allclose(gx.double(), gr.double(), rtol=tol, atol=tol)
    finally:
        neuron_fast.set_backend(previous)


def test_backend_choice():
    import neuron_fast
    with pytest.raises(ValueError, match="backend"):
        neuron_fast.set_backend("cuda-magic")


@pytest.mark.parametrize("reference", [False, True])
def test_if_neuron_has_no_leak(reference):
    # tau=None: H[t] = V[t-1] + X[t]. Inputs 0.4, 0.4, 0.4: H = 0.4, 0.8, 1.2 -> spike at t=2,
    # where a LIF neuron (tau=2) only reaches 0.2, 0.3, 0.35.
    x = tensor([0.4, 0.4, 0.4, 0.4]).requires_grad_()
    node = LIFNode(tau=None, reference=reference)
    s = node(x)
    assert torch.equal(s.detach(), tensor([0.0, 0.0, 1.0, 0.0]))
    assert LIFNode()(x).sum() == 0
    # Gradient of S[1] w.r.t. X[0]: dH[1]/dV[0] = 1, dV[0]/dH[0] = 1 (no spike), dH[0]/dX[0] = 1.
    s[1].backward()
    assert torch.allclose(x.grad[0], sigmoid_surrogate_grad(tensor(0.8 - 1.0), 4.0), rtol=0, atol=1e-15)


def test_any_memory_layout_gives_the_same_spikes_and_gradients():
    """TimeByNeurons flattens the neurons in memory order: a channels-last input, and an
    incoming gradient of yet another layout, must give what the contiguous tensors give."""
    torch.manual_seed(3)
    x = torch.randn(3, 2, 5, 4, 4, dtype=torch.float64) + 0.8
    grad = torch.randn(3, 2, 5, 4, 4, dtype=torch.float64)
    x_cl = x.flatten(0, 1).contiguous(memory_format=torch.channels_last).reshape(x.shape)
    assert not x_cl.is_contiguous()
    a, b = x.clone().requires_grad_(), x_cl.clone().requires_grad_()
    out_a, out_b = LIFNode()(a), LIFNode()(b)
    assert torch.equal(out_a, out_b)
    assert out_b.stride() == b.stride()                     # the output keeps the input's layout
    out_a.backward(grad)
    out_b.backward(grad.transpose(3, 4).contiguous().transpose(3, 4))   # same values, other strides
    assert torch.equal(a.grad, b.grad)


# ---------------------------------------------------------------- kinds of neuron and the factory

def test_make_neuron_builds_every_kind():
    lif, if_, plif = (make_neuron(k, v_threshold=0.5, tau=3.0, alpha=2.0) for k in ("lif", "if", "plif"))
    assert type(lif) is LIFNode and (lif.tau, lif.v_threshold, lif.alpha) == (3.0, 0.5, 2.0)
    assert type(if_) is IFNode and if_.tau is None and if_.v_threshold == 0.5
    assert type(plif) is ParametricLIFNode and abs(plif.tau - 3.0) < 1e-6 and plif.alpha == 2.0
    assert all(isinstance(n, SpikingNeuron) for n in (lif, if_, plif))
    assert set(NEURONS) == {"lif", "if", "plif"}
    with pytest.raises(ValueError, match="'if', 'lif', 'plif'"):
        make_neuron("izhikevich", 1.0)
    with pytest.raises(ValueError, match="v_threshold"):
        make_neuron("lif", 0.0)
    with pytest.raises(ValueError, match="alpha"):
        make_neuron("lif", 1.0, alpha=-1.0)
    with pytest.raises(ValueError, match="greater than 1"):
        make_neuron("plif", 1.0, tau=1.0)


def test_if_node_is_lif_without_leak():
    torch.manual_seed(4)
    x = torch.rand(5, 20, dtype=torch.float64)
    assert torch.equal(IFNode()(x), LIFNode(tau=None)(x))
    assert torch.equal(IFNode()(x), lif_reference(x, tau=None))


def test_plif_starts_at_tau_2_and_follows_its_equation():
    node = ParametricLIFNode()
    assert node.w.item() == 0.0 and node.tau == 2.0              # sigmoid(0) = 1/2 = 1/tau
    x = tensor([1.5, 0.5, 2.0, 0.4])                             # the trace of the LIF test above
    assert torch.equal(node(x), tensor([0.0, 0.0, 1.0, 0.0]))
    # 1/tau = sigmoid(w) = 0.8 (tau = 1.25): H = 1.2 at step 0 already fires.
    node.w.data.fill_(torch.logit(torch.tensor(0.8)).item())
    assert torch.equal(node.double()(tensor([1.5, 0.5])), tensor([1.0, 0.0]))


@pytest.mark.parametrize("w0", [0.0, -1.0, 0.7])
def test_plif_fast_path_equals_autograd_on_reference_loop(w0):
    """PLIFFunction's hand-written backward gives the gradients autograd finds on the plain
    loop, for the input and for the learnable w."""
    torch.manual_seed(5)
    x = (torch.randn(6, 3, 5, 7, dtype=torch.float64) * 1.5 + 0.8).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    grad_out = torch.randn(6, 3, 5, 7, dtype=torch.float64)
    fast, ref = ParametricLIFNode().double(), ParametricLIFNode(reference=True).double()
    for node in (fast, ref):
        node.w.data.fill_(w0)
    s_fast, s_ref = fast(x), ref(x_ref)
    assert torch.equal(s_fast, s_ref)
    assert torch.equal(s_ref, plif_reference(x_ref, ref.w, 1.0, 4.0))
    assert 0.05 < s_fast.mean().item() < 0.9                    # both branches exercised
    gx, gw = torch.autograd.grad(s_fast, (x, fast.w), grad_out)
    rx, rw = torch.autograd.grad(s_ref, (x_ref, ref.w), grad_out)
    assert torch.allclose(gx, rx, rtol=1e-12, atol=1e-14)
    assert torch.allclose(gw, rw, rtol=1e-12, atol=1e-14) and gw.abs() > 1e-3


def test_plif_w_gradient_by_hand():
    # One step: S = Heaviside(X sigmoid(w) - 1); dS/dw = surrogate'(H - 1) X sigmoid'(w).
    node = ParametricLIFNode().double()
    x = tensor([[1.6, 2.4, 1.0]])
    node(x).sum().backward()
    k = 0.5
    expected = (sigmoid_surrogate_grad(x * k - 1.0, 4.0) * x * k * (1 - k)).sum()
    assert torch.allclose(node.w.grad, expected, rtol=1e-12, atol=0)


def test_plif_float32_neuron_on_float64_input():
    x = torch.rand(3, 8, dtype=torch.float64) * 3
    assert torch.equal(ParametricLIFNode()(x), LIFNode()(x))      # tau 2 either way


def test_a_neuron_must_define_its_dynamics():
    class Silent(SpikingNeuron):
        pass
    with pytest.raises(NotImplementedError, match="Silent must define spikes"):
        Silent()(torch.zeros(2, 3))


# ---------------------------------------------------------------- neurons handed a batch norm

def _bn(channels, seed=0):
    torch.manual_seed(seed)
    bn = nn.BatchNorm2d(channels).double()
    bn.weight.data.uniform_(1, 4)
    bn.bias.data.uniform_(-0.5, 0.5)
    return bn


@pytest.mark.parametrize("kind", ["lif", "if", "plif"])
@pytest.mark.parametrize("grad", [True, False])
def test_norm_argument_equals_norm_then_neuron(kind, grad):
    """neuron(x, norm=bn) is SN(BN(x)) whether or not the fused kernel runs (LIF and IF fuse
    in training, PLIF never does); forward hooks on the neuron fire either way."""
    x = torch.rand(3, 2, 4, 5, 5, dtype=torch.float64) * 2           # (T, B, C, H, W)
    bn_a, bn_b = _bn(4), _bn(4)
    node = make_neuron(kind, 1.0).double()
    seen = []
    node.register_forward_hook(lambda m, inputs, out: seen.append((inputs[0], out)))
    with torch.set_grad_enabled(grad):
        xa = x.clone().requires_grad_(grad)
        out = node(xa, norm=bn_a)
        xb = x.clone().requires_grad_(grad)
        plain = node(bn_b(xb.flatten(0, 1)).unflatten(0, (3, 2)))
    assert torch.equal(out, plain) and 0 < out.mean() < 1
    assert len(seen) == 2 and seen[0][0] is xa and seen[0][1] is out   # hook input: before the norm
    assert torch.allclose(bn_a.running_mean, bn_b.running_mean, rtol=0, atol=1e-15)
    if grad:
        g = torch.randn_like(out)
        ga = torch.autograd.grad(out, (xa, bn_a.weight, bn_a.bias), g)
        gb = torch.autograd.grad(plain, (xb, bn_b.weight, bn_b.bias), g)
        for a, b in zip(ga, gb):
            assert torch.allclose(a, b, rtol=0, atol=1e-12)


def test_fused_path_only_for_the_plain_neuron_and_batch_norm():
    bn = nn.BatchNorm2d(3)

    class Doubled(LIFNode):                       # a subclass with other dynamics
        def spikes(self, x_seq):
            return super().spikes(2 * x_seq)
    assert LIFNode().fuses_with(bn) and IFNode().fuses_with(bn)
    assert not Doubled().fuses_with(bn)
    assert not LIFNode(reference=True).fuses_with(bn)
    assert not ParametricLIFNode().fuses_with(bn)
    assert not LIFNode().fuses_with(nn.Identity())
    handle = bn.register_forward_hook(lambda *a: None)
    assert not LIFNode().fuses_with(bn)           # a hooked batch norm runs as a layer
    handle.remove()
    x = torch.rand(2, 2, 3, 4, 4).requires_grad_()
    assert torch.equal(Doubled()(x, norm=bn), LIFNode()(2 * bn(x.flatten(0, 1)).unflatten(0, (2, 2))))


def test_neuron_py_alone_runs_the_loops_and_neuron_fast_plugs_in():
    """neuron.py imports nothing of ours: alone, its neurons run the reference loops (and
    fuse nothing); importing neuron_fast fills neuron.fast_path, the one plug."""
    import subprocess
    import sys
    code = ("import sys, torch, torch.nn as nn, neuron; "
            "x = torch.rand(3, 2, 4, 5, 5, requires_grad=True); "
            "alone = (neuron.fast_path.lif, type(neuron.LIFNode()(x).grad_fn).__name__, "
            "neuron.LIFNode().fuses_with(nn.BatchNorm2d(4)), 'neuron_fast' in sys.modules); "
            "import neuron_fast; "
            "plugged = (neuron.fast_path.lif is neuron_fast.lif_fast, "
            "type(neuron.LIFNode()(x).grad_fn).__name__, neuron.LIFNode().fuses_with(nn.BatchNorm2d(4))); "
            "print(alone, plugged)")
    root = __import__("os").path.dirname(__import__("os").path.dirname(__file__))
    out = subprocess.run([sys.executable, "-c", code], cwd=root or ".", capture_output=True, text=True)
    assert out.stdout.strip() == ("(None, 'StackBackward0', False, False) "
                                  "(True, 'LIFFunctionBackward', True)"), out.stderr


def test_importing_changes_no_process_setting():
    """Importing the model files leaves torch's global settings and the environment as
    they were (the memory policy is a function the scripts call)."""
    import subprocess
    import sys
    code = ("import os, torch; before = (dict(os.environ), torch.get_num_threads(), "
            "torch.get_default_dtype(), torch.are_deterministic_algorithms_enabled()); "
            "import neuron, neuron_fast, qkformer; "
            "after = (dict(os.environ), torch.get_num_threads(), torch.get_default_dtype(), "
            "torch.are_deterministic_algorithms_enabled()); print(before == after)")
    root = __import__("os").path.dirname(__import__("os").path.dirname(__file__))
    out = subprocess.run([sys.executable, "-c", code], cwd=root or ".", capture_output=True, text=True)
    assert out.stdout.strip() == "True", out.stderr


# ----------------------------------------------------------------------------------------
# Device settings (neuron_fast.py): the one rule train.py, evaluate.py and benchmark.py use

def test_autocast_dtype_rule(monkeypatch):
    from neuron_fast import autocast_dtype
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for amp in ("off", "auto", "bf16", "fp16"):
        assert autocast_dtype(cpu, amp) is None           # GPUs only; the caller says so
    assert autocast_dtype(cuda, "off") is None
    assert autocast_dtype(cuda, "bf16") is torch.bfloat16
    assert autocast_dtype(cuda, "fp16") is torch.float16
    asked = []

    def native_only(including_emulation=True):            # "auto" must ask for native bf16
        asked.append(including_emulation)
        return supported
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", native_only)
    supported = True                                      # Ampere and newer
    assert autocast_dtype(cuda, "auto") is torch.bfloat16
    supported = False                                     # Volta, Turing: fp16 + GradScaler
    assert autocast_dtype(cuda, "auto") is torch.float16
    assert asked == [False, False]
    with pytest.raises(ValueError, match="--amp must be one of"):
        autocast_dtype(cpu, "fp8")


def test_apply_device_settings_touches_only_cuda(monkeypatch):
    from neuron_fast import apply_device_settings
    flags = (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32,
             torch.backends.cudnn.allow_tf32)
    try:
        apply_device_settings(torch.device("cpu"), fast=True)
        apply_device_settings(torch.device("cpu"), fast=False)
        assert (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32,
                torch.backends.cudnn.allow_tf32) == flags
        # The flags themselves exist without a GPU: check what CUDA would get.
        apply_device_settings(torch.device("cuda"), fast=True)
        assert (torch.backends.cudnn.benchmark and torch.backends.cuda.matmul.allow_tf32
                and torch.backends.cudnn.allow_tf32)
        apply_device_settings(torch.device("cuda", 1), fast=False)
        assert not (torch.backends.cudnn.benchmark or torch.backends.cuda.matmul.allow_tf32
                    or torch.backends.cudnn.allow_tf32)
    finally:
        (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32,
         torch.backends.cudnn.allow_tf32) = flags


# ----------------------------------------------------------------------------------------
# Precision ("Precision" in neuron.py's docstring) and what CompiledOrEager runs

@pytest.fixture
def backend_set():
    """set_backend for one test, restored (with fresh kernel states) afterwards."""
    import neuron_fast
    previous = neuron_fast.get_backend()
    yield neuron_fast.set_backend
    neuron_fast.set_backend(previous)


def _bf16_input(seed=3, shape=(4, 3, 200)):
    torch.manual_seed(seed)
    return (torch.randn(*shape) * 1.5 + 0.7).bfloat16()


@pytest.mark.parametrize("kind", ["lif", "if", "plif"])
def test_bf16_input_computes_in_float32(kind):
    """A bf16 input (autocast) gives the spikes of its float32 value on every path, in bf16;
    the gradient comes back in bf16 and equals the float32 one rounded to bf16."""
    x = _bf16_input()
    g = torch.randn(x.shape).bfloat16()
    results = []
    for reference in (False, True):
        node = make_neuron(kind, 1.0)
        node.reference = reference
        xb = x.clone().requires_grad_()
        out = node(xb)
        gx, = torch.autograd.grad(out, xb, g)
        assert out.dtype == gx.dtype == torch.bfloat16
        results.append((out, gx))
        x32 = x.float().requires_grad_()
        out32 = make_neuron(kind, 1.0)(x32)
        g32, = torch.autograd.grad(out32, x32, g.float())
        assert torch.equal(out.float(), out32) and 0.1 < out32.mean() < 0.9
        assert torch.allclose(gx.float(), g32, rtol=2 ** -7, atol=1e-6)   # bf16: 8-bit mantissa
    assert torch.equal(results[0][0], results[1][0])


def test_lif_saves_membrane_in_the_precision_of_its_decision():
    x = _bf16_input().requires_grad_()
    out = LIFNode()(x)
    h_seq, = out.grad_fn.saved_tensors
    assert h_seq.dtype == torch.float32 and type(out.grad_fn).__name__ == "LIFFunctionBackward"


def test_fused_batch_norm_lif_under_bf16_equals_the_separate_layers():
    """Fused, BN(Y) is rounded to bf16 before the neuron, as nn.BatchNorm2d hands it over."""
    torch.manual_seed(4)
    y = (torch.randn(3, 2, 4, 6, 6) * 2).bfloat16()                    # (T, B, C, H, W)
    bn_a = nn.BatchNorm2d(4)
    bn_a.weight.data.uniform_(1, 4)
    bn_b = nn.BatchNorm2d(4)
    bn_b.load_state_dict(bn_a.state_dict())
    ya, yb = y.clone().requires_grad_(), y.clone().requires_grad_()
    fused = LIFNode()(ya, norm=bn_a)
    assert type(fused.grad_fn).__name__ == "BatchNormLIFBackward"
    plain = LIFNode()(bn_b(yb.flatten(0, 1)).unflatten(0, (3, 2)))
    assert fused.dtype == torch.bfloat16 and torch.equal(fused, plain)
    g = torch.randn(fused.shape).bfloat16()
    ga = torch.autograd.grad(fused, (ya, bn_a.weight, bn_a.bias), g)
    gb = torch.autograd.grad(plain, (yb, bn_b.weight, bn_b.bias), g)
    assert [t.dtype for t in ga] == [torch.bfloat16, torch.float32, torch.float32]
    for a, b in zip(ga, gb):
        assert torch.allclose(a.float(), b.float(), rtol=2 ** -6, atol=1e-3)


def test_long_sequences_never_go_to_the_compiler(backend_set):
    """official_quirks runs the SSA neuron over T*B steps: such sequences run eagerly
    (compiling a 256-step unrolled loop takes minutes, and again for every batch size)."""
    import neuron_fast
    backend_set("compiled")

    def no_compiler(*args):
        raise AssertionError("the compiler was asked")
    for kernel in (neuron_fast.lif_forward_kernel, neuron_fast.lif_backward_kernel,
                   neuron_fast.lif_spikes_kernel):
        kernel.compiled = no_compiler
    x = (torch.randn(256, 40) + 0.8).requires_grad_()                  # T*B = 64 * 4 steps
    out = LIFNode()(x)
    assert neuron_fast.lif_forward_kernel.used == "eager"
    out.sum().backward()
    assert neuron_fast.lif_backward_kernel.used == "eager"
    LIFNode()(x.detach())
    assert neuron_fast.lif_spikes_kernel.used == "eager"
    assert torch.equal(out, lif_reference(x.detach(), 2.0))
    assert x.shape[0] > neuron_fast.MAX_COMPILED_STEPS >= 16          # every preset's T compiles


def test_compiled_or_eager_reports_what_ran_per_device_and_dtype(backend_set):
    """`used` is "compiled" only when compiled code ran; a compiler failure for one dtype
    leaves the others compiled; under a dispatch mode nothing is handed to the compiler."""
    from torch.utils.flop_counter import FlopCounterMode
    from neuron_fast import CompiledOrEager
    backend_set("auto")
    kernel = CompiledOrEager(lambda x: x * 2)
    calls = []

    def fake_compiled(x):                # "compiles" float32, fails for bf16
        calls.append(x.dtype)
        if x.dtype == torch.bfloat16:
            raise RuntimeError("no bf16 here")
        kernel._ran_compiled = True
        return x * 2
    kernel.compiled = fake_compiled
    x = torch.ones(4, 3)
    assert torch.equal(kernel(x), x * 2) and kernel.used == "compiled"
    with pytest.warns(UserWarning, match="cpu for torch.bfloat16"):
        assert torch.equal(kernel(x.bfloat16()), x.bfloat16() * 2)
    assert kernel.used == "eager"
    assert kernel.state == {(x.device, torch.float32): "compiled", (x.device, torch.bfloat16): "eager"}
    kernel(x.bfloat16())                 # not asked again for bf16
    kernel(x)
    assert kernel.used == "compiled" and calls == [torch.float32, torch.bfloat16, torch.float32]
    with FlopCounterMode(display=False):
        kernel(x)
    assert kernel.used == "eager" and len(calls) == 3
    kernel.compiled = lambda x: x * 2   # the compiler ran it eagerly, without an error
    kernel(x)
    assert kernel.used == "eager"


def test_compiler_running_eagerly_is_reported(backend_set, monkeypatch):
    """Past its recompile limit torch.compile runs a function eagerly without an error: the
    kernel then says "eager", and keeps "compiled" for what did compile."""
    import torch._dynamo
    import neuron_fast
    backend_set("auto")
    torch._dynamo.reset()
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 1)
    try:
        x = torch.randn(3, 50) + 0.8
        LIFNode()(x)
        assert neuron_fast.lif_spikes_kernel.used == "compiled"
        LIFNode()(x.double())                       # another dtype: a second compile, refused
        assert neuron_fast.lif_spikes_kernel.used == "eager"
        assert neuron_fast.lif_spikes_kernel.state == {(x.device, torch.float32): "compiled"}
    finally:
        torch._dynamo.reset()
