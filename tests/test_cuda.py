"""Code paths only a GPU runs: the neuron kernels and the fused batch norm + LIF on CUDA
(Triton when compiled) against the reference loops on the CPU. Skipped without CUDA."""
import pytest
import torch
import torch.nn as nn

import neuron
from neuron import LIFNode, ParametricLIFNode, SpikingNeuron, lif_reference, plif_reference
from qkformer import create_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(params=["eager", "compiled"])
def backend(request):
    previous = neuron.get_backend()
    neuron.set_backend(request.param)
    yield request.param
    neuron.set_backend(previous)


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
        assert neuron.lif_forward_kernel.used == "compiled"
    gx, = torch.autograd.grad(fast, xc, grad.cuda())
    gr, = torch.autograd.grad(ref, xr, grad)
    assert torch.allclose(gx.cpu(), gr, rtol=1e-12, atol=1e-14)


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
    ga = torch.autograd.grad(fused, (xa, bn_a.weight, bn_a.bias), grad)
    gb = torch.autograd.grad(plain, (xb, bn_b.weight, bn_b.bias), grad)
    for a, b in zip(ga, gb):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)
    assert torch.allclose(bn_a.running_var, bn_b.running_var, rtol=0, atol=1e-15)


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
