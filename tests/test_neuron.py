"""The LIF neuron (neuron.py) against its equations, Eq. (1)-(3) of the paper."""
import functools

import torch
import pytest

from neuron import LIFNode, LIFFunction, lif_reference, sigmoid_surrogate_grad

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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compiled_kernels_equal_reference(dtype):
    """The torch.compile'd kernels (the default outside the tests) give the same spikes and
    gradients as the plain loop."""
    import neuron
    previous = neuron._BACKEND
    neuron.set_backend("compiled")
    try:
        torch.manual_seed(2)
        x = (torch.randn(4, 3, 50, dtype=dtype) * 1.5 + 0.7).requires_grad_()
        x_ref = x.detach().clone().requires_grad_()
        grad_out = torch.randn(4, 3, 50, dtype=dtype)
        for threshold in (1.0, 0.5):
            fast = LIFNode(v_threshold=threshold)(x)
            ref = lif_reference(x_ref, 2.0, threshold, 4.0)
            assert neuron.lif_forward_kernel.used == "compiled"
            assert torch.equal(fast, ref)
            gx, = torch.autograd.grad(fast, x, grad_out)
            gr, = torch.autograd.grad(ref, x_ref, grad_out)
            tol = 1e-12 if dtype == torch.float64 else 1e-5
            assert torch.allclose(gx, gr, rtol=tol, atol=tol)
    finally:
        neuron.set_backend(previous)


def test_backend_choice():
    import neuron
    with pytest.raises(ValueError, match="backend"):
        neuron.set_backend("cuda-magic")


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
