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
import ctypes
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


def lif_charge(x_seq: torch.Tensor, tau: Optional[float], v_threshold: float) -> list:
    """Eq. 1-3 over all steps (V_reset = 0): the list of H[t], one tensor per step."""
    v = torch.zeros_like(x_seq[0])                        # V[-1] = 0
    h_steps = []
    for t in range(x_seq.shape[0]):
        # Eq. 1, written as SpikingJelly computes it (v + (x - v) / tau) so that every spike
        # decision matches the official code to the last bit. tau=None: IF, no leak.
        h = v + x_seq[t] if tau is None else v + (x_seq[t] - v) / tau
        h_steps.append(h)
        v = torch.where(h < v_threshold, h, 0.0)          # Eq. 2-3: V = H (1 - S), S = [H >= V_th]
    return h_steps


def lif_forward(x_seq: torch.Tensor, tau: Optional[float], v_threshold: float):
    """The spikes (Eq. 2) and H over all steps: all the backward needs."""
    h_steps = lif_charge(x_seq, tau, v_threshold)
    return lif_fire(h_steps, v_threshold, x_seq.dtype), torch.stack(h_steps)


def lif_fire(h_steps, v_threshold: float, dtype: torch.dtype) -> torch.Tensor:
    """Eq. 2 for every step: S[t] = 1 where H[t] >= V_th."""
    return torch.stack([(h >= v_threshold).to(dtype) for h in h_steps])


def lif_spikes(x_seq: torch.Tensor, tau: Optional[float], v_threshold: float) -> torch.Tensor:
    """Spikes only, when no backward follows (inference): compiled, H is never written."""
    return lif_fire(lif_charge(x_seq, tau, v_threshold), v_threshold, x_seq.dtype)


def lif_backward_steps(h_steps, grad_spikes: torch.Tensor, tau: Optional[float],
                       v_threshold: float, alpha: float) -> list:
    """Backpropagation through time of Eq. 1-3 (see LIFFunction): dL/dX[t], one per step."""
    grad_v = torch.zeros_like(h_steps[0])                 # dL/dV[T-1] = 0
    grad_x = []
    for t in range(len(h_steps) - 1, -1, -1):
        h = h_steps[t]
        surrogate = sigmoid_surrogate_grad(h - v_threshold, alpha)
        # (1 - S[t]) is a constant here: the detached reset.
        grad_h = grad_spikes[t] * surrogate + torch.where(h < v_threshold, grad_v, 0.0)
        if tau is None:                                   # IF: H = V + X
            grad_x.append(grad_h)
            grad_v = grad_h
        else:                                             # LIF: H = V + (X - V) / tau
            grad_x.append(grad_h / tau)
            grad_v = grad_h * (1.0 - 1.0 / tau)
    return grad_x[::-1]


def lif_backward(h_seq: torch.Tensor, grad_spikes: torch.Tensor, tau: Optional[float],
                 v_threshold: float, alpha: float) -> torch.Tensor:
    """`lif_backward_steps` with H given as one (T, ...) tensor and dL/dX returned as one."""
    return torch.stack(lif_backward_steps(list(h_seq), grad_spikes, tau, v_threshold, alpha))


# The kernels above are loops of small elementwise operations: in eager PyTorch each line
# reads and writes whole tensors, so the neuron costs more than the convolutions around
# it. torch.compile fuses each loop into a single kernel (C++ with OpenMP on the CPU,
# Triton on a GPU) that reads each input once and writes each output once: about 8x
# faster on 2 CPU cores (T=4, 6M neurons). Compiling takes a while once per process
# (dynamic shapes: one kernel serves every layer), needs a C++ compiler, and is skipped
# where it fails. qkformer.py fuses batch norm into the same kernels the same way.
_BACKEND = os.environ.get("QKFORMER_LIF", "auto")        # "auto", "compiled" or "eager"
_FUSED = []                                              # every Fused, to reset on set_backend


def set_backend(name: str):
    """Choose how the Fused kernels run: "eager" (plain PyTorch), "compiled" (torch.compile,
    error if it fails) or "auto" (compiled, eager where compiling fails). The environment
    variable QKFORMER_LIF sets the default."""
    global _BACKEND
    if name not in ("auto", "compiled", "eager"):
        raise ValueError(f"LIF backend must be 'auto', 'compiled' or 'eager', got {name!r}")
    _BACKEND = name
    for kernel in _FUSED:
        kernel.compiled, kernel.used = None, None


class Fused:
    """A function of whole tensors, run as one torch.compile'd kernel or eagerly, as the
    backend says (see set_backend). Both give the same results; `used` tells which ran."""

    def __init__(self, fn):
        self.fn, self.compiled, self.used = fn, None, None
        _FUSED.append(self)

    def __call__(self, *args):
        if _BACKEND == "eager" or self.used == "eager":
            self.used = "eager"
            return self.fn(*args)
        if self.compiled is None:
            self.compiled = torch.compile(self.fn, dynamic=True)
        if self.used == "compiled":                      # compiled and ran before: no fallback
            return self.compiled(*args)
        try:                                             # the first call compiles
            out = self.compiled(*args)
        except Exception as e:
            if _BACKEND == "compiled":
                raise
            warnings.warn(f"torch.compile of {self.fn.__name__} failed ({type(e).__name__}); "
                          f"running it eagerly (slower, same results)")
            self.used = "eager"
            return self.fn(*args)
        self.used = "compiled"
        return out


lif_forward_kernel = Fused(lif_forward)
lif_spikes_kernel = Fused(lif_spikes)
lif_backward_kernel = Fused(lif_backward)


class TimeByNeurons:
    """How a (T, ...) tensor is laid out as (T, M) for the kernels, and back.

    The kernels see one layout only, (T, M) with the M neurons of a step side by side,
    so that one compiled kernel serves every layer (torch.compile guards on nothing but
    T and M, and does not recompile for each layer's shape). The neurons are taken in the
    order they lie in memory: for the channels-last activations of `qkformer.py` that is
    (T, B, H, W, C), not (T, B, C, H, W), and flattening in memory order is free where
    flattening in index order would copy. The neuron is elementwise over M, so the order
    of the neurons does not change any result.
    """

    def __init__(self, x: torch.Tensor):
        # Dim 0 (time) stays first; the others from the largest stride to the smallest.
        self.order = [0] + sorted(range(1, x.dim()), key=lambda d: -x.stride(d))
        self.inverse = [self.order.index(d) for d in range(x.dim())]
        self.shape = tuple(x.shape[d] for d in self.order)

    def flatten(self, x: torch.Tensor) -> torch.Tensor:
        """(T, ...) -> (T, M): a view when x has the layout this was made from. Detached and
        without a view base, so torch.compile guards on (T, M) only."""
        return x.permute(self.order).reshape(self.shape[0], -1).detach()

    def unflatten(self, y: torch.Tensor) -> torch.Tensor:
        """(T, M) -> (T, ...) with the shape and memory layout of the original tensor."""
        return y.reshape(self.shape).permute(self.inverse)


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
        layout = TimeByNeurons(x_seq)
        if ctx.needs_input_grad[0]:
            spikes, h_seq = lif_forward_kernel(layout.flatten(x_seq), tau, v_threshold)
            ctx.save_for_backward(h_seq)
        else:
            spikes = lif_spikes_kernel(layout.flatten(x_seq), tau, v_threshold)
        ctx.layout, ctx.tau, ctx.v_threshold, ctx.alpha = layout, tau, v_threshold, alpha
        return layout.unflatten(spikes)

    @staticmethod
    def backward(ctx, grad_spikes):
        (h_seq,) = ctx.saved_tensors                       # (T, M)
        # The incoming gradient may have another layout than x_seq: flatten it in x_seq's
        # neuron order (a copy only then), so that it lines up with h_seq.
        grad_x = lif_backward_kernel(h_seq, ctx.layout.flatten(grad_spikes), ctx.tau,
                                     ctx.v_threshold, ctx.alpha)
        return ctx.layout.unflatten(grad_x), None, None, None


class SpikingNeuron(nn.Module):
    """What every spiking neuron of this project is: a module that maps a whole input
    sequence (T, ...) to spikes (0. or 1.) of the same shape. Tools find neurons by this
    class (firing-rate hooks, energy counts), so a new neuron type is counted as one."""


class LIFNode(SpikingNeuron):
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


# ----------------------------------------------------------------------------------------
# Process-wide memory settings for training on a CPU (called by the entry scripts' main())

def apply_memory_policy(return_freed_memory: bool, threshold: int = 8 << 20):
    """Set how this process allocates CPU memory. Call it first thing in main(), before any
    tensor exists: PyTorch reads its huge-page setting once, at its first allocation.

    * Large tensors on 2 MiB pages ("transparent huge pages", THP_MEM_ALLOC_ENABLE): each
      page fault then brings in 512 times more memory when a training step allocates its
      activations. Always on.
    * return_freed_memory: make glibc hand large freed blocks straight back to the operating
      system (Linux). Each training step allocates and frees a whole step's activations.
      glibc's malloc raises its mmap threshold each time a large block is freed (up to
      32 MiB), after which large tensors come from the heap, where freed memory stays with
      the process and fragments: the resident memory then grows to well above what is ever
      alive at once. Fixing the threshold keeps every tensor of `threshold` bytes or more in
      a mapping of its own, returned to the system when freed. The price is a page fault for
      every page of such a tensor each time it is allocated; smaller tensors, many and
      short-lived, stay on the heap, where their memory is reused without faults.

    Measured on 2 cores, cifar10 model, batch 16, T=4, 40 training steps (`python
    benchmark.py --model cifar10 --batch-size 16 --T 4 --device cpu --phases train --steps
    40`, then with --no-low-memory): 8 MiB (the default here) 7.5 images/s, peak 2.3 GB;
    glibc's default 7.4 images/s, 2.6 GB, and more where batch shapes vary (a last, smaller
    batch, evaluations in between). Every tensor from 128 KiB on (threshold=128 << 10 in
    the same benchmark) cost a quarter of the speed: 5.9-6.5 images/s, 1.9 GB.
    Harmless elsewhere: on other C libraries the mallopt call does nothing.
    """
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    if not return_freed_memory:
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, int(threshold))                         # M_MMAP_THRESHOLD = -3
    except (OSError, AttributeError):
        pass
