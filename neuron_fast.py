"""The speed machinery of the spiking neurons (neuron.py): the same numbers, faster and in
less memory; and the process-wide device settings of the entry scripts.

Reference: Zhou et al., "QKFormer: Hierarchical Spiking Transformer using Q-K
Attention", NeurIPS 2024, Appendix 6.1 (the LIF model) and 6.5 (the sigmoid surrogate
gradient). neuron.py states the model, (N1)-(N3), and runs it as plain loops over time
that autograd differentiates (`neuron.lif_reference`, `neuron.plif_reference`). This file
extends neuron.py and computes the same numbers:

  * the loops as kernels of whole tensors with hand-written backward passes, which store
    only what the backward needs (H[t]; the spikes are recomputed from it): LIFFunction /
    `lif_fast` and PLIFFunction / `plif_fast`;
  * CompiledOrEager, which runs such a kernel torch.compile'd (one fused kernel per loop)
    or eagerly (`set_backend`); TimeByNeurons, the (T, M) layout the kernels see;
  * batch norm fused into the LIF neuron for training (BatchNormLIF, `batch_norm_lif`);
  * the device settings train.py, evaluate.py and benchmark.py share (AMP_CHOICES,
    `autocast_dtype`, `apply_device_settings`, `add_device_arguments`) and
    `apply_memory_policy`.

How the neurons reach it: importing this file fills `neuron.fast_path` (at its end), and
from then on every neuron built without reference=True runs `lif_fast`, `plif_fast` and,
in training with a batch norm, `batch_norm_lif`. qkformer.py imports it, so every model
has the fast path; neuron.py alone runs the reference loops.

"The same" means: on one device, the fast path gives exactly the reference loop's spikes
(tested in float32 and float64, on the CPU and on CUDA) and its gradients up to float
rounding (the hand-written backward adds in another order). Across devices, and between
compiled and eager code, the arithmetic may be ordered or fused differently (a GPU does a
multiply-add in one rounding), so H can differ in its last bit and a spike can flip where
H lies that close to V_th: rare in float32, not seen in float64 in the tests. Precision
follows neuron.py's one rule ("Precision" in its docstring): float32 at least inside, the
spikes and the input's gradient in the input's dtype.
"""
import argparse
import ctypes
import os
import sys
import warnings
from typing import Optional

import torch
import torch.nn as nn
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

import neuron
from neuron import LIFNode, compute_dtype, sigmoid_surrogate_grad


# ----------------------------------------------------------------------------------------
# The LIF loops as kernels of whole tensors: forward, spikes only, backward through time

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
# Where torch.compile cannot build kernels for want of a working C++ compiler (inductor writes
# the CPU kernels in C++; many laptops have none), the kernels run eagerly, and BUILD_NOTE says
# why, once, in one line. Without any compiler, nothing more is tried on that device. "1.5x":
# a step's CPU time eager against compiled, 1.3-1.6x (`python scripts/eager_cost.py`, README).
_NO_COMPILER = set()                                     # device types without one ("cpu")
_SAID = set()                                            # the reasons already said
BUILD_NOTE = ("note: torch.compile cannot build the fused kernels of the spiking neurons ({reason}), "
              "so they run as plain PyTorch: the same spikes, each step about 1.5x as long. A C++ compiler "
              "builds them: g++ or clang on Linux; on macOS Xcode's clang (xcode-select --install) "
              "and OpenMP (brew install libomp); on Windows Visual Studio's C++ tools (cl), in its "
              "Developer Command Prompt")

# The compiler unrolls the loop over time: its work grows with T, and each new T is a new
# kernel. Sequences longer than this always run eagerly. 16 is the largest T of the presets
# (the DVS models'); longer ones come from official_quirks, whose SSA neuron runs over
# T*B steps (T*B = 256 took 100 s to compile on a CPU, and again for every new batch size).
MAX_COMPILED_STEPS = 16


def set_backend(name: str):
    """Choose how the kernels of this file run: "eager" (plain PyTorch), "compiled"
    (torch.compile, error if it fails) or "auto" (the default: compiled, eager where
    compiling fails). Either way, sequences of more than MAX_COMPILED_STEPS steps and calls
    under a dispatch mode (FlopCounterMode) run eagerly. All give the same spikes."""
    global _BACKEND
    if name not in ("auto", "compiled", "eager"):
        raise ValueError(f"LIF backend must be 'auto', 'compiled' or 'eager', got {name!r}")
    _BACKEND = name
    _NO_COMPILER.clear()
    _SAID.clear()
    for kernel in _KERNELS:
        kernel.reset()


def get_backend() -> str:
    """The backend set_backend chose ("auto", "compiled" or "eager")."""
    return _BACKEND


def build_failure(error: BaseException) -> Optional[str]:
    """Why torch.compile could not build C++ kernels, if that is why it failed: inductor's
    InvalidCxxCompiler ("no C++ compiler found") or CppCompileError (the compiler failed,
    e.g. macOS without OpenMP), wherever they lie in the chain of errors (torch wraps them,
    in InductorError and others); None for any other failure."""
    seen = set()
    while error is not None and id(error) not in seen:
        name = type(error).__name__
        if name == "InvalidCxxCompiler":
            return "no C++ compiler found"
        if name == "CppCompileError":
            return "the C++ compiler failed"
        seen.add(id(error))
        error = getattr(error, "inner_exception", None) or error.__cause__ or error.__context__
    return None


class CompiledOrEager:
    """A function of whole tensors (time first), run as one torch.compile'd kernel or
    eagerly, as the backend says (see set_backend).

    Compiled and eager compute the same spikes (exactly, in every dtype: both follow the
    precision rule of neuron.py); gradients agree up to float rounding, because the compiler
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
        if (_BACKEND == "eager" or x.shape[0] > MAX_COMPILED_STEPS or x.device.type in _NO_COMPILER
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
            reason = build_failure(e)
            if reason is None:
                warnings.warn(f"torch.compile of {self.fn.__name__} failed on {x.device.type} "
                              f"for {x.dtype} ({type(e).__name__}); running it eagerly there "
                              f"(slower, same spikes)")
            elif reason not in _SAID:               # the same for every kernel: said once
                _SAID.add(reason)
                print(BUILD_NOTE.format(reason=reason), file=sys.stderr, flush=True)
            if reason == "no C++ compiler found":   # nothing will compile here: no more tries
                _NO_COMPILER.add(x.device.type)
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
    dtype it was computed in (float32 for a bf16 input, see "Precision" in neuron.py), so
    that the backward sees the very spikes the forward decided.

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


def _auto_device(name: str) -> str:
    """--device with "auto" resolved: "cuda" when PyTorch sees a GPU, else "cpu"."""
    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


def add_device_arguments(parser, defaults: bool = True):
    """Define --device, --amp and --tf32 on `parser` (an ArgumentParser or an argument
    group): the one definition train.py, evaluate.py and benchmark.py share. Their values
    go to `autocast_dtype` (--amp) and `apply_device_settings` (--tf32).

    defaults=True (evaluate.py, benchmark.py): --device auto, resolved while parsing to
    "cuda" when PyTorch sees a GPU, else "cpu"; --amp off; --tf32 on.
    defaults=False (train.py): every default None and --device kept as written ("auto"
    too), for train.py to fill from its layered settings (recipe, saved run, command line)
    and to resolve per process (each DDP process takes its own GPU).
    """
    # train.py's runs can be resumed, on another machine too: its device is never saved.
    resumed = "" if defaults else "; chosen anew by each invocation, also on --resume"
    parser.add_argument(
        "--device", type=_auto_device if defaults else str, default="auto" if defaults else None,
        help=f"auto, cpu, cuda or cuda:N (default auto: CUDA when PyTorch sees a GPU){resumed}")
    parser.add_argument(
        "--amp", nargs="?", const="auto", choices=AMP_CHOICES, default="off" if defaults else None,
        help="mixed precision on a GPU (default off): --amp alone picks bf16 where the GPU "
             "computes it natively (Ampere and newer), else fp16 (trained with a grad scaler)")
    parser.add_argument(
        "--tf32", action=argparse.BooleanOptionalAction, default=True if defaults else None,
        help="GPU: TF32 matrix products and cuDNN's autotuned convolutions (default on: "
             "faster, not bit-reproducible); --no-tf32 for bit-stable float32 arithmetic")


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
    glibc only: where there is no libc.so.6 (macOS, Windows, musl) return_freed_memory does
    nothing, and the process keeps its C library's own policy.
    """
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    if not return_freed_memory:
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, int(threshold))                         # M_MMAP_THRESHOLD = -3
    except (OSError, AttributeError):
        pass


# ----------------------------------------------------------------------------------------
# The plug: from here on, every neuron of neuron.py built without reference=True runs the
# fast path above (see `neuron.fast_path`, the one place the neurons look for it).

neuron.fast_path.lif = lif_fast
neuron.fast_path.plif = plif_fast
neuron.fast_path.batch_norm_lif = batch_norm_lif
