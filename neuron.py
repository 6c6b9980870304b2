"""The spiking neurons of QKFormer: leaky integrate-and-fire (LIF) and its two variants,
trained with a surrogate gradient.

Reference: Zhou et al., "QKFormer: Hierarchical Spiking Transformer using Q-K
Attention", NeurIPS 2024, Appendix 6.1 (the LIF model) and 6.5 (the sigmoid surrogate
gradient). Appendix 6.1 gives the equations but no values: tau = 2, V_th = 1 and 0.5 for
the attention neurons are the official code's (SpikingJelly's
`MultiStepLIFNode(tau=2.0, detach_reset=True)`, hard reset to 0). alpha = 4 is both the
paper's (Appendix 6.5: "we select the Sigmoid function sigma(x) as the surrogate function
with alpha=4") and the official code's. This file reproduces the official neuron exactly,
without SpikingJelly.

The neuron, for a time step t: the three lines the paper prints as one equation in
Appendix 6.1, labelled (N1)-(N3) here so that they are not mistaken for the paper's
Eq. (1)-(3), which are about attention:

    charge  H[t] = V[t-1] + (X[t] - (V[t-1] - V_reset)) / tau           (N1)
    fire    S[t] = Heaviside(H[t] - V_th)        Heaviside(0) = 1        (N2)
    reset   V[t] = H[t] * (1 - S[t]) + V_reset * S[t]                    (N3)

with V_reset = 0 and V[-1] = 0. The three kinds of neuron (`NEURONS`) differ in (N1) only:
    "lif"   LIFNode             tau fixed (official code: 2)
    "if"    IFNode              no leak, H[t] = V[t-1] + X[t]: Table 7's "LIF -> IF" ablation
    "plif"  ParametricLIFNode   1/tau = sigmoid(w), w learned, one per layer (Fang et al.,
                                ICCV 2021, "Incorporating Learnable Membrane Time Constant";
                                Table 7's "LIF -> PLIF")

The Heaviside step has a zero derivative almost everywhere, so backpropagation
replaces it by the derivative of a smooth stand-in, sigmoid(alpha * x):

    dS/dH ~= alpha * sigmoid(alpha * (H - V_th)) * (1 - sigmoid(alpha * (H - V_th)))

"Detached reset" means the S in (N3) is treated as a constant by autograd: the gradient
reaches V[t-1] only through H[t] * (1 - S[t]), never through the spike that decided the
reset. SpikingJelly's authors found this trains better; the official QKFormer models use it.

The file has two parts.
  1. The neurons, readable (a first reading stops after `make_neuron`): `lif_reference`
     is (N1)-(N3) as a plain loop over time that autograd differentiates; the neuron
     classes call it, or the fast path of part 2, which computes the same numbers.
  2. Speed machinery: the same loops with hand-written backward passes that store only
     what the backward needs, run as torch.compile'd kernels; batch norm fused into the
     neuron for training; the process's device and memory settings. Tests check that
     part 2 gives the same spikes and gradients as part 1.

Precision, one rule for every path (reference loops, eager and compiled kernels, training
and evaluation, the fused batch norm, the attention neurons): the neuron computes in
float32 at least. A bf16 or fp16 input (what autocast gives) is widened to float32; the
membrane potential, the spike decision and the backward pass are float32; the spikes (0
and 1, exact in every dtype) and the input's gradient come back in the input's dtype.
float32 and float64 inputs are computed in their own dtype, without a copy.
"The same" below means: on one device, the fast path gives exactly the reference loop's
spikes (tested in float32 and float64, on the CPU and on CUDA) and its gradients up to
float rounding (the hand-written backward adds in another order). Across devices, and
between compiled and eager code, the arithmetic may be ordered or fused differently (a
GPU does a multiply-add in one rounding), so H can differ in its last bit and a spike can
flip where H lies that close to V_th: rare in float32, not seen in float64 in the tests.
"""
import ctypes
import math
import os
import warnings
from typing import Optional

import torch
import torch.nn as nn
from torch.utils._python_dispatch import is_in_torch_dispatch_mode


# ========================================================================================
# Part 1: the neurons

def heaviside(x: torch.Tensor) -> torch.Tensor:
    """(N2) without its surrogate: 1 where x >= 0 (a spike when H equals V_th), else 0."""
    return (x >= 0).to(x.dtype)


def sigmoid_surrogate_grad(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """d/dx sigmoid(alpha * x) = alpha * sigmoid(alpha x) * (1 - sigmoid(alpha x))."""
    sg = torch.sigmoid(alpha * x)
    return alpha * sg * (1.0 - sg)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the neuron computes in for inputs of `dtype`: float32 at least (bf16 and
    fp16, what autocast gives, widen to float32; float32 and float64 stay as they are).
    See "Precision" in the docstring of the file."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class _SurrogateHeaviside(torch.autograd.Function):
    """Heaviside step forward, sigmoid derivative backward (used by the reference loops)."""

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
    """(N1)-(N3) as a plain loop over time (dim 0); tau=None is the IF neuron (no leak).
    Computes in float32 at least, returns spikes in x_seq's dtype (see "Precision")."""
    dtype = x_seq.dtype
    x_seq = x_seq.to(compute_dtype(dtype))                     # bf16/fp16 -> fp32, else as is
    v = torch.full_like(x_seq[0], v_reset)                     # V[-1] = V_reset
    spikes = []
    for x in x_seq:
        if tau is None:
            h = v + x                                          # (N1) without leak: IF
        else:
            h = v + (x - (v - v_reset)) / tau                  # (N1) charge
        s = _SurrogateHeaviside.apply(h - v_threshold, alpha)  # (N2) fire
        s_const = s.detach()                                   # detached reset
        v = h * (1.0 - s_const) + v_reset * s_const            # (N3) hard reset
        spikes.append(s)
    return torch.stack(spikes).to(dtype)


def plif_reference(x_seq: torch.Tensor, w: torch.Tensor, v_threshold: float = 1.0,
                   alpha: float = 4.0) -> torch.Tensor:
    """The parametric LIF neuron as a plain loop: (N1) with 1/tau = sigmoid(w), written as
    SpikingJelly's ParametricLIFNode computes it; (N2) and (N3) as in `lif_reference`.
    Autograd differentiates it for x_seq and for w. Precision as `lif_reference`."""
    dtype = x_seq.dtype
    x_seq = x_seq.to(compute_dtype(dtype))                     # bf16/fp16 -> fp32, else as is
    decay = torch.sigmoid(w).to(x_seq.dtype)                   # 1/tau, between 0 and 1
    v = torch.zeros_like(x_seq[0])                             # V[-1] = V_reset = 0
    spikes = []
    for x in x_seq:
        h = v + (x - v) * decay                                # (N1) charge
        s = _SurrogateHeaviside.apply(h - v_threshold, alpha)  # (N2) fire
        v = h * (1.0 - s.detach())                             # (N3) detached hard reset
        spikes.append(s)
    return torch.stack(spikes).to(dtype)


class SpikingNeuron(nn.Module):
    """What every spiking neuron of this project is: a module that maps a whole input
    sequence (T, ...) to spikes (0. or 1.) of the same shape, the "SN(.)" of the paper's
    equations. Tools find neurons by this class (firing-rate hooks, energy counts), so a
    new neuron type is counted as one. A subclass defines `spikes(x_seq)`.

    forward(x_seq, norm=None) returns SN(x_seq), or SN(norm(x_seq)) when a per-image layer
    `norm` (the batch norm of `qkformer.ConvBNLIF`) is given: norm sees the T*B images of
    x_seq (T, B, C, H, W) as one batch. Passing the batch norm to the neuron lets a neuron
    that can (LIFNode, IFNode) run batch norm and itself as one fused step in training
    (`batch_norm_lif`, part 2: the same numbers, less memory), while the neuron's forward
    hooks fire on every path. What a forward hook on a neuron sees:
        output      the spikes, shaped as x_seq: (T, B, ...) in qkformer.py (the one
                    exception: with official_quirks, the SSA's last neuron runs over T*B
                    steps, (T*B, C, H, W));
        input[0]    the x_seq passed in: the membrane input itself, or, when `norm` is
                    given, the input of the norm (the convolution's output). norm is a
                    keyword argument: a hook registered with with_kwargs=True sees it.
    The norm's own hooks fire only when it runs as a layer: a norm with hooks is never fused.
    """

    def forward(self, x_seq: torch.Tensor, norm: Optional[nn.Module] = None) -> torch.Tensor:
        if norm is None:
            return self.spikes(x_seq)
        if torch.is_grad_enabled() and x_seq.dim() == 5 and self.fuses_with(norm):
            return batch_norm_lif(x_seq, norm, self)           # part 2: same numbers, less memory
        y = norm(x_seq.flatten(0, 1))                          # (T*B, C, H, W)
        return self.spikes(y.unflatten(0, x_seq.shape[:2]))   # (T, B, C, H, W)

    def spikes(self, x_seq: torch.Tensor) -> torch.Tensor:
        """The neuron's dynamics over all T steps: input (T, ...) -> spikes (T, ...)."""
        raise NotImplementedError(f"{type(self).__name__} must define spikes(x_seq)")

    def fuses_with(self, norm: nn.Module) -> bool:
        """Whether this neuron can run `norm` and itself as one fused step (none can here)."""
        return False


def _check(tau: Optional[float], v_threshold: float, alpha: float):
    """Clear errors for settings the equations do not allow."""
    if tau is not None and not tau >= 1.0:
        # (N1) mixes V[t-1] and X[t] with weights 1 - 1/tau and 1/tau; below 1 the old
        # potential would count negatively (tau = 1: no memory, H[t] = X[t]).
        raise ValueError(f"tau must be at least 1 (or None for an IF neuron), got {tau}")
    if not v_threshold > 0:
        raise ValueError(f"v_threshold must be positive, got {v_threshold}")
    if not alpha > 0:
        raise ValueError(f"the surrogate's alpha must be positive, got {alpha}")


class LIFNode(SpikingNeuron):
    """Multi-step LIF neuron, paper Appendix 6.1. For every step t, with V[-1] = 0:

        H[t] = V[t-1] + (X[t] - V[t-1]) / tau        (N1) charge
        S[t] = Heaviside(H[t] - V_th)                (N2) fire (sigmoid surrogate gradient)
        V[t] = H[t] * (1 - S[t])                     (N3) hard reset to 0, detached

    `spikes` runs them: `lif_reference` is this loop, line by line. The membrane potential
    lives only inside one call, so unlike SpikingJelly no `reset_net` is needed between
    batches.

    Args:
        tau: membrane time constant (official code: 2.0); None for an IF neuron (no leak).
        v_threshold: firing threshold V_th (official code: 1.0; 0.5 for attention neurons).
        alpha: sharpness of the sigmoid surrogate gradient (the paper's Appendix 6.5 and the
            official code: 4.0).
        reference: run the autograd loop `lif_reference` instead of the fast path
            `lif_fast` (part 2), which computes the same spikes and gradients.
    """

    def __init__(self, tau: Optional[float] = 2.0, v_threshold: float = 1.0, alpha: float = 4.0,
                 reference: bool = False):
        super().__init__()
        _check(tau, v_threshold, alpha)
        self.tau = None if tau is None else float(tau)
        self.v_threshold, self.alpha = float(v_threshold), float(alpha)
        self.reference = reference

    def spikes(self, x_seq: torch.Tensor) -> torch.Tensor:
        if self.reference:
            return lif_reference(x_seq, self.tau, self.v_threshold, self.alpha)
        return lif_fast(x_seq, self.tau, self.v_threshold, self.alpha)

    def fuses_with(self, norm: nn.Module) -> bool:
        # Only the plain dynamics (a subclass that redefines `spikes` is always run as
        # written) and a plain affine batch norm without hooks of its own.
        return (not self.reference and type(self).spikes is LIFNode.spikes
                and type(norm) is nn.BatchNorm2d and norm.affine
                and not norm._forward_hooks and not norm._forward_pre_hooks)

    def extra_repr(self) -> str:
        return f"tau={self.tau}, v_threshold={self.v_threshold}, alpha={self.alpha}"


class IFNode(LIFNode):
    """Integrate-and-fire neuron: (N1) without leak, H[t] = V[t-1] + X[t]; (N2), (N3) as LIF.
    The "LIF -> IF" ablation of the paper's Table 7. It is a LIFNode with tau = None."""

    def __init__(self, v_threshold: float = 1.0, alpha: float = 4.0, reference: bool = False):
        super().__init__(tau=None, v_threshold=v_threshold, alpha=alpha, reference=reference)


class ParametricLIFNode(SpikingNeuron):
    """Parametric LIF neuron (PLIF; Fang et al., ICCV 2021): (N1) with a learnable time
    constant, 1/tau = sigmoid(w), one scalar w per neuron layer, trained with the network;
    initialised so that tau = `tau` (w = -log(tau - 1): w = 0 for tau = 2). The "LIF ->
    PLIF" ablation of the paper's Table 7. `plif_reference` is its plain loop; the fast
    path `plif_fast` (part 2) computes the same spikes and gradients (for x and w) with a
    hand-written backward, run eagerly; there is no fused batch norm for it.
    """

    def __init__(self, tau: float = 2.0, v_threshold: float = 1.0, alpha: float = 4.0,
                 reference: bool = False):
        super().__init__()
        if not tau > 1.0:                                      # 1/tau = sigmoid(w) < 1
            raise ValueError(f"a PLIF neuron's initial tau must be greater than 1, got {tau}")
        _check(tau, v_threshold, alpha)
        self.w = nn.Parameter(torch.tensor(-math.log(tau - 1.0)))
        self.v_threshold, self.alpha = float(v_threshold), float(alpha)
        self.reference = reference

    @property
    def tau(self) -> float:
        """The current time constant, 1 / sigmoid(w)."""
        return 1.0 / torch.sigmoid(self.w.detach()).item()

    def spikes(self, x_seq: torch.Tensor) -> torch.Tensor:
        if self.reference:
            return plif_reference(x_seq, self.w, self.v_threshold, self.alpha)
        return plif_fast(x_seq, self.w, self.v_threshold, self.alpha)

    def extra_repr(self) -> str:
        return f"tau={self.tau:.4g} (learned), v_threshold={self.v_threshold}, alpha={self.alpha}"


NEURONS = {"lif": LIFNode, "if": IFNode, "plif": ParametricLIFNode}


def make_neuron(kind: str, v_threshold: float, tau: float = 2.0, alpha: float = 4.0) -> SpikingNeuron:
    """The one factory of the model's neurons: a neuron of kind `kind` (a key of NEURONS).
    tau is the fixed time constant of "lif", the initial one of "plif"; "if" has none."""
    if kind not in NEURONS:
        raise ValueError(f"unknown neuron {kind!r}; choose one of {sorted(NEURONS)}")
    if kind == "if":
        return IFNode(v_threshold=v_threshold, alpha=alpha)
    return NEURONS[kind](tau=tau, v_threshold=v_threshold, alpha=alpha)


# ========================================================================================
# Part 2: speed machinery. A first reading can stop here: everything below computes the
# same numbers as part 1 (the tests check it), only faster and in less memory.
#
# Contents: the LIF loops as kernels of whole tensors (forward, spikes only, backward
# through time); CompiledOrEager, which runs such a kernel torch.compile'd or eagerly
# (set_backend); TimeByNeurons, the (T, M) layout the kernels see; LIFFunction / lif_fast
# and PLIFFunction / plif_fast, the autograd nodes with hand-written backward passes; the
# fused batch norm + LIF of training (BatchNormLIF, batch_norm_lif); the device settings
# (autocast_dtype, apply_device_settings); apply_memory_policy.
# ========================================================================================

def lif_membrane(x_seq: torch.Tensor, tau: Optional[float], v_threshold: float) -> list:
    """Run (N1)-(N3) over all steps (V_reset = 0): the list of H[t], the membrane potential
    before each reset, one tensor per step, in compute_dtype; the spikes follow from it
    by (N2)."""
    x_seq = x_seq.to(compute_dtype(x_seq.dtype))          # no copy for float32 and float64
    v = torch.zeros_like(x_seq[0])                        # V[-1] = 0
    h_steps = []
    for t in range(x_seq.shape[0]):
        # (N1), written as SpikingJelly computes it (v + (x - v) / tau) so that every spike
        # decision matches the official code to the last bit. tau=None: IF, no leak.
        h = v + x_seq[t] if tau is None else v + (x_seq[t] - v) / tau
        h_steps.append(h)
        v = torch.where(h < v_threshold, h, 0.0)          # (N2)-(N3): V = H (1 - S), S = [H >= V_th]
    return h_steps


def lif_fire(h_steps, v_threshold: float, dtype: torch.dtype) -> torch.Tensor:
    """(N2) for every step: S[t] = 1 where H[t] >= V_th, in `dtype` (the input's)."""
    return torch.stack([(h >= v_threshold).to(dtype) for h in h_steps])


def lif_forward(x_seq: torch.Tensor, tau: Optional[float], v_threshold: float):
    """The spikes (N2), in x_seq's dtype, and H over all steps, in compute_dtype (the
    precision the spikes were decided in): all the backward needs."""
    h_steps = lif_membrane(x_seq, tau, v_threshold)
    return lif_fire(h_steps, v_threshold, x_seq.dtype), torch.stack(h_steps)


def lif_spikes(x_seq: torch.Tensor, tau: Optional[float], v_threshold: float) -> torch.Tensor:
    """Spikes only, when no backward follows (inference): compiled, H is never written."""
    return lif_fire(lif_membrane(x_seq, tau, v_threshold), v_threshold, x_seq.dtype)


def lif_backward_steps(h_steps, grad_spikes: torch.Tensor, tau: Optional[float],
                       v_threshold: float, alpha: float) -> list:
    """Backpropagation through time of (N1)-(N3) (see LIFFunction): dL/dX[t], one per step,
    in H's dtype (a bf16 grad_spikes widens to it)."""
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
    """`lif_backward_steps` with H given as one (T, ...) tensor and dL/dX returned as one,
    in grad_spikes' dtype (= the input's: the cast is part of the kernel)."""
    grad_x = lif_backward_steps(list(h_seq), grad_spikes, tau, v_threshold, alpha)
    return torch.stack(grad_x).to(grad_spikes.dtype)


# The kernels above are loops of small elementwise operations: in eager PyTorch each line
# reads and writes whole tensors, so the neuron costs more than the convolutions around
# it. torch.compile fuses each loop into a single kernel (C++ with OpenMP on the CPU,
# Triton on a GPU) that reads each input once and writes each output once. Compiling
# takes a while once per process (tens of seconds; dynamic shapes: one kernel serves every
# layer), needs a C++ compiler, and is skipped where it fails. For short sessions
# (a tutorial, quick experiments) set_backend("eager") skips it: the same spikes.
# The environment variable QKFORMER_LIF, when set, gives the starting backend (the test
# suite sets it to "eager" for its many short processes); nobody needs it otherwise.
_BACKEND = os.environ.get("QKFORMER_LIF", "auto")        # "auto", "compiled" or "eager"
_KERNELS = []                                            # every CompiledOrEager, for set_backend

# The compiler unrolls the loop over time: its work grows with T, and each new T is a new
# kernel. Sequences longer than this always run eagerly. 16 is the largest T of the presets
# (the DVS models'); longer ones come from official_quirks, whose SSA neuron runs over
# T*B steps (T*B = 256 took 100 s to compile on a CPU, and again for every new batch size).
MAX_COMPILED_STEPS = 16


def set_backend(name: str):
    """Choose how the kernels of part 2 run: "eager" (plain PyTorch), "compiled"
    (torch.compile, error if it fails) or "auto" (the default: compiled, eager where
    compiling fails). Either way, sequences of more than MAX_COMPILED_STEPS steps and calls
    under a dispatch mode (FlopCounterMode) run eagerly. All give the same spikes."""
    global _BACKEND
    if name not in ("auto", "compiled", "eager"):
        raise ValueError(f"LIF backend must be 'auto', 'compiled' or 'eager', got {name!r}")
    _BACKEND = name
    for kernel in _KERNELS:
        kernel.reset()


def get_backend() -> str:
    """The backend set_backend chose ("auto", "compiled" or "eager")."""
    return _BACKEND


class CompiledOrEager:
    """A function of whole tensors (time first), run as one torch.compile'd kernel or
    eagerly, as the backend says (see set_backend).

    Compiled and eager compute the same spikes (exactly, in every dtype: both follow the
    precision rule of the file); gradients agree up to float rounding, because the compiler
    may reorder the arithmetic. Whether compiling works is kept per (device, dtype) in
    `state`: a compiler that fails for CUDA leaves the CPU compiled. `used` tells what ran
    at the last call, "compiled" only if the compiled code itself ran: torch.compile can
    also run a function eagerly without an error (its recompile limit, or frames it
    decided to skip), which counts as "eager" here.
    """

    def __init__(self, fn):
        self.fn = fn
        self.reset()
        _KERNELS.append(self)

    def reset(self):
        self.compiled, self.used, self.state = None, None, {}
        self._ran_compiled = False

    def _compiler(self, graph, example_inputs):
        """torch.compile's backend: inductor (the default backend), with a note each time
        the compiled code runs."""
        from torch._inductor.compile_fx import compile_fx
        inner = compile_fx(graph, example_inputs)

        def run(*args):
            self._ran_compiled = True
            return inner(*args)
        run._boxed_call = getattr(inner, "_boxed_call", False)   # same calling convention
        return run

    def _eager(self, args):
        self.used = "eager"
        return self.fn(*args)

    def __call__(self, *args):
        x = args[0]
        key = (x.device, x.dtype)
        if (_BACKEND == "eager" or x.shape[0] > MAX_COMPILED_STEPS
                or self.state.get(key) == "eager" or torch.compiler.is_compiling()):
            return self._eager(args)
        # Under a dispatch mode (FlopCounterMode, ...) the compiler would mark the function
        # as one to skip for good, and every later call would run eagerly.
        if is_in_torch_dispatch_mode():
            return self._eager(args)
        if self.compiled is None:
            self.compiled = torch.compile(self.fn, dynamic=True, backend=self._compiler)
        self._ran_compiled = False
        try:
            out = self.compiled(*args)
        except torch.OutOfMemoryError:
            raise
        except Exception as e:
            if _BACKEND == "compiled":
                raise
            warnings.warn(f"torch.compile of {self.fn.__name__} failed on {x.device.type} "
                          f"for {x.dtype} ({type(e).__name__}); running it eagerly there "
                          f"(slower, same spikes)")
            self.state[key] = "eager"
            return self._eager(args)
        self.used = "compiled" if self._ran_compiled else "eager"
        if self.used == "compiled":
            self.state[key] = "compiled"
        return out


lif_forward_kernel = CompiledOrEager(lif_forward)
lif_spikes_kernel = CompiledOrEager(lif_spikes)
lif_backward_kernel = CompiledOrEager(lif_backward)


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
    """(N1)-(N3) over all T steps in one autograd node (hard reset to V_reset = 0).

    Autograd on the reference loop records about ten tensors per step. The backward
    below needs only H[t] (for the surrogate and for 1 - S[t]), so that is all the
    forward saves; the spikes are recomputed from H in the backward. H is saved in the
    dtype it was computed in (float32 for a bf16 input, see "Precision"), so that the
    backward sees the very spikes the forward decided.

    Backward through time, with gS[t] = dL/dS[t] arriving from the layers above and
    gV[t] = dL/dV[t] arriving from step t+1 (zero after the last step):
        dL/dH[t]   = gS[t] * surrogate'(H[t] - V_th) + gV[t] * (1 - S[t])
        dL/dX[t]   = dL/dH[t] / tau                       (from N1)
        gV[t-1]    = dL/dH[t] * (1 - 1/tau)               (from N1, V_reset = 0)
    The term (1 - S[t]) is the detached reset: the spike in (N3) counts as a constant.
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


def lif_fast(x_seq: torch.Tensor, tau: Optional[float], v_threshold: float,
             alpha: float) -> torch.Tensor:
    """The same spikes and gradients as `lif_reference`, through LIFFunction."""
    return LIFFunction.apply(x_seq, tau, v_threshold, alpha)


def plif_forward(x_seq: torch.Tensor, decay: torch.Tensor, v_threshold: float):
    """PLIF's (N1)-(N3) over all steps, 1/tau = decay (in compute_dtype): the spikes, in
    x_seq's dtype, and H, in compute_dtype, for the backward."""
    dtype = x_seq.dtype
    x_seq = x_seq.to(compute_dtype(dtype))
    v = torch.zeros_like(x_seq[0])
    h_steps = []
    for t in range(x_seq.shape[0]):
        h = v + (x_seq[t] - v) * decay                    # (N1), as plif_reference
        h_steps.append(h)
        v = torch.where(h < v_threshold, h, 0.0)          # (N2)-(N3)
    return lif_fire(h_steps, v_threshold, dtype), torch.stack(h_steps)


def plif_backward(x_seq: torch.Tensor, h_seq: torch.Tensor, grad_spikes: torch.Tensor,
                  decay: torch.Tensor, v_threshold: float, alpha: float):
    """Backpropagation through time of PLIF (see PLIFFunction): dL/dX, in x_seq's dtype,
    and dL/d(decay), computed in H's dtype."""
    grad_v = torch.zeros_like(h_seq[0])                   # dL/dV[T-1] = 0
    grad_decay = torch.zeros((), dtype=h_seq.dtype, device=h_seq.device)
    grad_x = []
    for t in range(h_seq.shape[0] - 1, -1, -1):
        h = h_seq[t]
        grad_h = (grad_spikes[t] * sigmoid_surrogate_grad(h - v_threshold, alpha)
                  + torch.where(h < v_threshold, grad_v, 0.0))
        v_prev = torch.where(h_seq[t - 1] < v_threshold, h_seq[t - 1], 0.0) if t > 0 \
            else torch.zeros_like(h)                      # V[t-1] = H[t-1] (1 - S[t-1])
        grad_decay = grad_decay + (grad_h * (x_seq[t] - v_prev)).sum()   # dH/d(decay) = X - V
        grad_x.append(grad_h * decay)
        grad_v = grad_h * (1.0 - decay)
    return torch.stack(grad_x[::-1]).to(x_seq.dtype), grad_decay


class PLIFFunction(torch.autograd.Function):
    """PLIF over all T steps in one autograd node; saves X and H only.

    As LIFFunction, with 1/tau = d (decay) a tensor: H[t] = V[t-1] + (X[t] - V[t-1]) d, so
        dL/dX[t] = dL/dH[t] d,   gV[t-1] = dL/dH[t] (1 - d),
        dL/dd    = sum over t and neurons of dL/dH[t] (X[t] - V[t-1]).
    Autograd carries dL/dd on to w through d = sigmoid(w). Runs eagerly (not compiled).
    """

    @staticmethod
    def forward(ctx, x_seq, decay, v_threshold, alpha):
        x_flat = x_seq.reshape(x_seq.shape[0], -1).detach()        # (T, M)
        spikes, h_seq = plif_forward(x_flat, decay.detach(), v_threshold)
        ctx.save_for_backward(x_flat, h_seq, decay)
        ctx.v_threshold, ctx.alpha, ctx.shape = v_threshold, alpha, x_seq.shape
        return spikes.reshape(x_seq.shape)

    @staticmethod
    def backward(ctx, grad_spikes):
        x_flat, h_seq, decay = ctx.saved_tensors
        grad_x, grad_decay = plif_backward(x_flat, h_seq, grad_spikes.reshape(h_seq.shape),
                                           decay, ctx.v_threshold, ctx.alpha)
        return grad_x.reshape(ctx.shape), grad_decay.to(decay.dtype), None, None


def plif_fast(x_seq: torch.Tensor, w: torch.Tensor, v_threshold: float,
              alpha: float) -> torch.Tensor:
    """The same spikes and gradients as `plif_reference`, through PLIFFunction."""
    decay = torch.sigmoid(w).to(compute_dtype(x_seq.dtype))
    return PLIFFunction.apply(x_seq, decay, v_threshold, alpha)


# ----------------------------------------------------------------------------------------
# Batch norm and neuron fused, for training (SpikingNeuron.forward with norm=batch norm)

def bn_affine(y: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """BN(Y) as the per-channel affine map y * scale + shift (the form PyTorch's own CPU
    batch norm computes), in float32 at least, rounded to Y's dtype: what nn.BatchNorm2d
    hands to the neuron when the two run as separate layers (under autocast: bf16/fp16)."""
    return (y * scale + shift).to(y.dtype)


def bn_lif_forward(y: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                   tau: Optional[float], v_threshold: float) -> torch.Tensor:
    """SN(BN(Y)) for Y of shape (T, P, C): `bn_affine`, then (N1)-(N3)."""
    return lif_fire(lif_membrane(bn_affine(y, scale, shift), tau, v_threshold), v_threshold, y.dtype)


def bn_lif_backward(y, grad_spikes, mean, invstd, scale, shift, tau: Optional[float],
                    v_threshold: float, alpha: float, batch_stats: bool):
    """Gradients of `bn_lif_forward` for Y, gamma and beta, recomputing BN(Y) and H from Y.

    With xhat = (y - mean) * invstd and g = dL/dBN(Y) from the neuron's backward:
        dL/dbeta = sum g,   dL/dgamma = sum g * xhat              (sums over T and P)
        dL/dY = gamma * invstd * (g - mean(g) - xhat * mean(g * xhat))   batch statistics
        dL/dY = gamma * invstd * g                                        running statistics
    The two extra terms of the first line are the gradient through the batch mean and
    variance, which depend on Y. Computed in float32 at least; dL/dY is returned in Y's
    dtype, dL/dgamma and dL/dbeta in the parameters' (scale's).
    """
    h_steps = lif_membrane(bn_affine(y, scale, shift), tau, v_threshold)
    g = lif_backward_steps(h_steps, grad_spikes, tau, v_threshold, alpha)   # T tensors (P, C)
    xhat = [(y[t] - mean) * invstd for t in range(len(g))]
    grad_shift = sum(g).sum(dim=0)                         # over the steps, then over P
    grad_weight = sum(g_t * x_t for g_t, x_t in zip(g, xhat)).sum(dim=0)
    if batch_stats:
        n = y.shape[0] * y.shape[1]
        g = [g_t - grad_shift / n - x_t * (grad_weight / n) for g_t, x_t in zip(g, xhat)]
    grad_y = torch.stack([g_t * scale for g_t in g]).to(y.dtype)
    return grad_y, grad_weight.to(scale.dtype), grad_shift.to(scale.dtype)


bn_lif_forward_kernel = CompiledOrEager(bn_lif_forward)
bn_lif_backward_kernel = CompiledOrEager(bn_lif_backward)


def batch_norm_statistics(bn: nn.BatchNorm2d, y: torch.Tensor):
    """The mean and (biased) variance `bn` normalises y with, and whether they are the
    batch's; in training, updates the running statistics exactly as nn.BatchNorm2d does."""
    if not bn.training and bn.running_mean is not None:
        return bn.running_mean, bn.running_var, False
    if bn.running_mean is None:                                  # track_running_stats=False
        var, mean = torch.var_mean(y.to(compute_dtype(y.dtype)), dim=(0, 2, 3), correction=0)
        return mean, var, True
    bn.num_batches_tracked.add_(1)
    momentum = 1.0 / bn.num_batches_tracked.item() if bn.momentum is None else bn.momentum
    mean, var = torch.batch_norm_update_stats(y, bn.running_mean, bn.running_var, momentum)
    return mean, var, True


class BatchNormLIF(torch.autograd.Function):
    """SN(BN(Y)) as one autograd node that saves only Y, the convolution's output.

    Separately, batch norm and neuron would each read and write whole tensors, and
    autograd would keep both Y (for batch norm's backward) and the membrane potentials H
    (for the neuron's). Here the forward is one kernel (Y in, spikes out, after the
    per-channel statistics), and the backward recomputes BN(Y) and H from Y inside its own
    kernel: the same numbers, a third less activation memory, and far fewer passes over
    memory than the separate layers.

    The kernels see Y as (T, P, C), P = B*H*W: the channels-last layout the convolutions
    of qkformer.py produce, so the reshapes below are free.
    """

    @staticmethod
    def forward(ctx, y, weight, bias, bn: nn.BatchNorm2d, lif: LIFNode, T: int):
        TB, C, H, W = y.shape
        mean, var, batch_stats = batch_norm_statistics(bn, y)
        invstd = 1.0 / torch.sqrt(var + bn.eps)
        scale = weight * invstd
        shift = bias - mean * scale
        y = y.reshape(T, TB // T, C, H, W).permute(0, 1, 3, 4, 2).reshape(T, -1, C)  # (T, P, C)
        spikes = bn_lif_forward_kernel(y.detach(), scale, shift, lif.tau, lif.v_threshold)
        ctx.save_for_backward(y, mean, invstd, scale, shift)
        ctx.lif, ctx.batch_stats, ctx.shape = lif, batch_stats, (T, TB // T, C, H, W)
        return spikes.reshape(T, TB // T, H, W, C).permute(0, 1, 4, 2, 3)  # (T, B, C, H, W)

    @staticmethod
    def backward(ctx, grad_spikes):
        y, mean, invstd, scale, shift = ctx.saved_tensors
        T, B, C, H, W = ctx.shape
        lif = ctx.lif
        grad_spikes = grad_spikes.permute(0, 1, 3, 4, 2).reshape(T, -1, C)  # (T, P, C)
        grad_y, grad_weight, grad_bias = bn_lif_backward_kernel(
            y, grad_spikes, mean, invstd, scale, shift, lif.tau, lif.v_threshold, lif.alpha,
            ctx.batch_stats)                                     # (T, P, C), (C,), (C,)
        grad_y = grad_y.reshape(T, B, H, W, C).permute(0, 1, 4, 2, 3).reshape(T * B, C, H, W)
        return grad_y, grad_weight, grad_bias, None, None, None


def batch_norm_lif(x_seq: torch.Tensor, bn: nn.BatchNorm2d, lif: LIFNode) -> torch.Tensor:
    """SN(BN(x_seq)) for x_seq (T, B, C, H, W), through BatchNormLIF: the same spikes,
    gradients and running statistics as bn, then lif, run one after the other."""
    T = x_seq.shape[0]
    return BatchNormLIF.apply(x_seq.flatten(0, 1), bn.weight, bn.bias, bn, lif, T)


# ----------------------------------------------------------------------------------------
# Process-wide device settings: mixed precision and the GPU's fast paths (called by the
# entry scripts, so that train.py, evaluate.py and benchmark.py follow one rule)

AMP_CHOICES = ("off", "auto", "bf16", "fp16")


def autocast_dtype(device: torch.device, amp: str) -> Optional[torch.dtype]:
    """The dtype torch.autocast should use on `device` for the --amp choice `amp`, or None
    for no autocast.

        "off"    None everywhere.
        "bf16"   torch.bfloat16 on a GPU.
        "fp16"   torch.float16 on a GPU; it needs a torch.amp.GradScaler in training (fp16's
                 narrow range rounds small gradients to zero without loss scaling).
        "auto"   bf16 where the GPU computes it natively (compute capability 8.0 and newer:
                 Ampere, Hopper, ...; ROCm), else fp16. Older GPUs emulate bf16 slowly.
    On any device other than CUDA the answer is None for every choice: mixed precision is
    used on GPUs only (the CPU's bf16 autocast is slower than fp32 on most CPUs and not
    what the official runs used). A caller that was asked for something else tells the
    user that it was ignored (`amp != "off" and autocast_dtype(...) is None`).
    """
    if amp not in AMP_CHOICES:
        raise ValueError(f"--amp must be one of {', '.join(AMP_CHOICES)}, got {amp!r}")
    if amp == "off" or device.type != "cuda":
        return None
    if amp == "auto":
        # device.index None: the current device (an int keeps torch.cuda.device from
        # initialising CUDA just to resolve it).
        with torch.cuda.device(-1 if device.index is None else device.index):
            native = torch.cuda.is_bf16_supported(including_emulation=False)
        amp = "bf16" if native else "fp16"
    return torch.bfloat16 if amp == "bf16" else torch.float16


def apply_device_settings(device: torch.device, fast: bool = True):
    """The GPU's fast but not bit-stable settings, on (fast=True, for training, evaluation
    and benchmarks) or off (fast=False, for comparisons that must be reproducible to the
    bit, such as parity tests against the CPU). On CUDA:
      * torch.backends.cudnn.benchmark: cuDNN times its convolution algorithms at the first
        call of each shape and keeps the fastest; results may differ in the last bits from
        run to run.
      * TF32 for float32 matrix products and convolutions (Ampere and newer; the flags have
        no effect on older GPUs): a 10-bit mantissa in the products, fp32 accumulation.
    Process-wide; nothing happens for other devices (the CPU has no such settings).
    """
    if device.type != "cuda":
        return
    torch.backends.cudnn.benchmark = fast
    torch.backends.cuda.matmul.allow_tf32 = fast
    torch.backends.cudnn.allow_tf32 = fast


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
