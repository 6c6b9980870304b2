"""The spiking neuron of QKFormer: a multi-step leaky integrate-and-fire (LIF) neuron
trained with a surrogate gradient.

Reference: Zhou et al., "QKFormer: Hierarchical Spiking Transformer using Q-K
Attention", NeurIPS 2024, Appendix 6.1 (the LIF model) and 6.5 (the sigmoid surrogate
gradient, alpha = 4). The official code
uses SpikingJelly's `MultiStepLIFNode(tau=2.0, detach_reset=True)` with a hard reset
to 0 and the sigmoid surrogate (alpha = 4); this file reproduces it exactly, without
SpikingJelly.

The neuron, for a time step t (the three lines of the LIF equation in Appendix 6.1,
numbered Eq. 1-3 in this file):

    charge  H[t] = V[t-1] + (X[t] - (V[t-1] - V_reset)) / tau           (Eq. 1)
    fire    S[t] = Heaviside(H[t] - V_th)        Heaviside(0) = 1        (Eq. 2)
    reset   V[t] = H[t] * (1 - S[t]) + V_reset * S[t]                    (Eq. 3)

with tau = 2, V_reset = 0, V[-1] = 0 and V_th = 1 (0.5 for the attention neurons).
With tau=None the neuron has no leak, H[t] = V[t-1] + X[t]: the integrate-and-fire (IF)
neuron of the paper's ablation (Table 7, "LIF -> IF").
The Heaviside step has a zero derivative almost everywhere, so backpropagation
replaces it by the derivative of a smooth stand-in, sigmoid(alpha * x):

    dS/dH ~= alpha * sigmoid(alpha * (H - V_th)) * (1 - sigmoid(alpha * (H - V_th)))

"Detached reset" means the S in Eq. 3 is treated as a constant by autograd: the
gradient reaches V[t-1] only through H[t] * (1 - S[t]), never through the spike that
decided the reset. SpikingJelly's authors found this trains better; the official
QKFormer models use it.

Two implementations of the same equations live here:
  * `lif_reference`: the plain loop over time, built from ordinary tensor operations so
    autograd differentiates it. Easy to read, slow, memory hungry (autograd keeps every
    intermediate of every step).
  * `LIFFunction`: the same forward loop, with a hand-written backward over time that
    stores only what the backward needs. `LIFNode` uses it; tests check that both give
    the same spikes and the same gradients.
"""
import os
import warnings
from typing import Optional

import torch
import torch.nn as nn


def heaviside(x: torch.Tensor) -> torch.Tensor:
    """Eq. 2 without its surrogate: 1 where x >= 0 (a spike when H equals V_th), else 0."""
    return (x >= 0).to(x.dtype)


def sigmoid_surrogate_grad(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """d/dx sigmoid(alpha * x) = alpha * sigmoid(alpha x) * (1 - sigmoid(alpha x))."""
    sg = torch.sigmoid(alpha * x)
    return alpha * sg * (1.0 - sg)


class _SurrogateHeaviside(torch.autograd.Function):
    """Heaviside step forward, sigmoid derivative backward (used by the reference loop)."""

    @staticmethod
    def forward(ctx, x, alpha):
        ctx.save_for_backward(x)
        ctx.alpha = alpha
        return heaviside(x)

    @staticmethod
    def backward(ctx, grad_spike):
        (x,) = ctx.saved_tensors
        return grad_spike * sigmoid_surrogate_grad(x, ctx.alpha), None


def lif_reference(x_seq: torch.Tensor, tau: Optional[float] = 2.0, v_threshold: float = 1.0,
                  alpha: float = 4.0, v_reset: float = 0.0) -> torch.Tensor:
    """The LIF neuron as a plain loop over time (dim 0). Readable reference for `LIFNode`."""
    v = torch.full_like(x_seq[0], v_reset)                     # V[-1] = V_reset
    spikes = []
    for x in x_seq:
        if tau is None:
            h = v + x                                          # IF: charge without leak
        else:
            h = v + (x - (v - v_reset)) / tau                  # Eq. 1, charge
        s = _SurrogateHeaviside.apply(h - v_threshold, alpha)  # Eq. 2, fire
        s_const = s.detach()                                   # detached reset
        v = h * (1.0 - s_const) + v_reset * s_const            # Eq. 3, hard reset
        spikes.append(s)
    return torch.stack(spikes)


def lif_forward(x_seq: torch.Tensor, tau: Optional[float], v_threshold: float):
    """Eq. 1-3 over all steps (V_reset = 0). Returns the spikes and H, all the backward needs."""
    v = torch.zeros_like(x_seq[0])                        # V[-1] = 0
    h_seq = []
    for t in range(x_seq.shape[0]):
        # Eq. 1, written as SpikingJelly computes it (v + (x - v) / tau) so that every spike
        # decision matches the official code to the last bit. tau=None: IF, no leak.
        h = v + x_seq[t] if tau is None else v + (x_seq[t] - v) / tau
        h_seq.append(h)
        v = torch.where(h < v_threshold, h, 0.0)          # Eq. 2-3: V = H (1 - S), S = [H >= V_th]
    h_seq = torch.stack(h_seq)
    return (h_seq >= v_threshold).to(x_seq.dtype), h_seq  # Eq. 2 for all steps at once


def lif_backward(h_seq: torch.Tensor, grad_spikes: torch.Tensor, tau: Optional[float],
                 v_threshold: float, alpha: float) -> torch.Tensor:
    """Backpropagation through time of `lif_forward` (see LIFFunction)."""
    grad_v = torch.zeros_like(h_seq[0])                   # dL/dV[T-1] = 0
    grad_x = []
    for t in range(h_seq.shape[0] - 1, -1, -1):
        h = h_seq[t]
        surrogate = sigmoid_surrogate_grad(h - v_threshold, alpha)
        # (1 - S[t]) is a constant here: the detached reset.
        grad_h = grad_spikes[t] * surrogate + torch.where(h < v_threshold, grad_v, 0.0)
        if tau is None:                                   # IF: H = V + X
            grad_x.append(grad_h)
            grad_v = grad_h
        else:                                             # LIF: H = V + (X - V) / tau
            grad_x.append(grad_h / tau)
            grad_v = grad_h * (1.0 - 1.0 / tau)
    return torch.stack(grad_x[::-1])


# The two kernels above are loops of small elementwise operations: in eager PyTorch each
# line reads and writes whole tensors, so the neuron costs more than the convolutions
# around it. torch.compile fuses each loop into a single kernel (C++ with OpenMP on the
# CPU, Triton on a GPU) that reads each input once and writes each output once: about
# 8x faster on 2 CPU cores (T=4, 6M neurons). Compiling takes a while once per process
# (dynamic shapes: one kernel serves every layer), needs a C++ compiler, and is skipped
# where it fails.
_BACKEND = os.environ.get("QKFORMER_LIF", "auto")        # "auto", "compiled" or "eager"
_kernels = {}


def set_backend(name: str):
    """Choose how LIFFunction runs its kernels: "eager" (plain PyTorch), "compiled"
    (torch.compile, error if it fails) or "auto" (compiled, eager where compiling fails).
    The environment variable QKFORMER_LIF sets the default."""
    global _BACKEND
    if name not in ("auto", "compiled", "eager"):
        raise ValueError(f"LIF backend must be 'auto', 'compiled' or 'eager', got {name!r}")
    _BACKEND = name
    _kernels.clear()


def lif_kernels() -> dict:
    """The LIF kernels of the chosen backend: {"forward": ..., "backward": ..., "name": ...}."""
    if not _kernels:
        _kernels.update(forward=lif_forward, backward=lif_backward, name="eager")
        if _BACKEND != "eager":
            try:
                fwd = torch.compile(lif_forward, dynamic=True)
                bwd = torch.compile(lif_backward, dynamic=True)
                x = torch.zeros(2, 8)                     # compile now, to fail here or not at all
                bwd(fwd(x, 2.0, 1.0)[1], x, 2.0, 1.0, 4.0)
                _kernels.update(forward=fwd, backward=bwd, name="compiled")
            except Exception as e:
                if _BACKEND == "compiled":
                    raise
                warnings.warn(f"torch.compile of the LIF kernels failed ({type(e).__name__}); "
                              f"using the eager kernels (slower, same results)")
    return _kernels


def as_time_by_neurons(x: torch.Tensor) -> torch.Tensor:
    """(T, ...) -> (T, M), the one layout the kernels see, so that one compiled kernel
    serves every layer. Detached and without a view base, so torch.compile guards on
    nothing but (T, M) and does not recompile for each layer's shape."""
    return x.reshape(x.shape[0], -1).detach()


class LIFFunction(torch.autograd.Function):
    """Eq. 1-3 over all T steps in one autograd node (hard reset to V_reset = 0).

    Autograd on the reference loop records about ten tensors per step. The backward
    below needs only H[t] (for the surrogate and for 1 - S[t]), so that is all the
    forward saves; the spikes are recomputed from H in the backward.

    Backward through time, with gS[t] = dL/dS[t] arriving from the layers above and
    gV[t] = dL/dV[t] arriving from step t+1 (zero after the last step):
        dL/dH[t]   = gS[t] * surrogate'(H[t] - V_th) + gV[t] * (1 - S[t])
        dL/dX[t]   = dL/dH[t] / tau                       (from Eq. 1)
        gV[t-1]    = dL/dH[t] * (1 - 1/tau)               (from Eq. 1, V_reset = 0)
    The term (1 - S[t]) is the detached reset: the spike in Eq. 3 counts as a constant.
    """

    @staticmethod
    def forward(ctx, x_seq, tau, v_threshold, alpha):
        spikes, h_seq = lif_kernels()["forward"](as_time_by_neurons(x_seq), tau, v_threshold)
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(h_seq)
        ctx.tau, ctx.v_threshold, ctx.alpha = tau, v_threshold, alpha
        return spikes.reshape(x_seq.shape)

    @staticmethod
    def backward(ctx, grad_spikes):
        (h_seq,) = ctx.saved_tensors                       # (T, M)
        grad_x = lif_kernels()["backward"](h_seq, as_time_by_neurons(grad_spikes), ctx.tau,
                                            ctx.v_threshold, ctx.alpha)
        return grad_x.reshape(grad_spikes.shape), None, None, None


class LIFNode(nn.Module):
    """Multi-step LIF neuron (paper Appendix 6.1, Eq. 1-3 above), the "SN(.)" of every equation.

    Takes a whole sequence `x_seq` of shape (T, ...) and returns spikes (0. or 1.) of
    the same shape. The membrane potential lives only inside one call, so unlike
    SpikingJelly no `reset_net` is needed between batches.

    Args:
        tau: membrane time constant (2.0 in QKFormer); None for an IF neuron (no leak).
        v_threshold: firing threshold V_th (1.0; 0.5 for the attention neurons).
        alpha: sharpness of the sigmoid surrogate gradient (4.0, SpikingJelly's default).
        reference: use the plain autograd loop `lif_reference` instead of `LIFFunction`.
    """

    def __init__(self, tau: Optional[float] = 2.0, v_threshold: float = 1.0, alpha: float = 4.0,
                 reference: bool = False):
        super().__init__()
        if tau is not None and tau < 1.0:
            # Eq. 1 mixes V[t-1] and X[t] with weights 1 - 1/tau and 1/tau; below 1 the old
            # potential would count negatively (tau = 1: no memory, H[t] = X[t]).
            raise ValueError(f"tau must be at least 1 (or None for an IF neuron), got {tau}")
        self.tau = None if tau is None else float(tau)
        self.v_threshold, self.alpha = float(v_threshold), float(alpha)
        self.reference = reference

    def forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        if self.reference:
            return lif_reference(x_seq, self.tau, self.v_threshold, self.alpha)
        return LIFFunction.apply(x_seq, self.tau, self.v_threshold, self.alpha)

    def extra_repr(self) -> str:
        return f"tau={self.tau}, v_threshold={self.v_threshold}, alpha={self.alpha}"
