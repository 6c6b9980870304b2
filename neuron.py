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

This file is the neurons, readable: `lif_reference` is (N1)-(N3) as a plain loop over
time that autograd differentiates, and the neuron classes run it. neuron_fast.py, when
imported (qkformer.py imports it), gives them a fast path that computes the same numbers
(same spikes; gradients up to float rounding) with hand-written backward passes, compiled
kernels and batch norm fused into the neuron; see `fast_path` below. Tests check that it
matches the loops here.

Precision, one rule for every path (reference loops, eager and compiled kernels, training
and evaluation, the fused batch norm, the attention neurons): the neuron computes in
float32 at least. A bf16 or fp16 input (what autocast gives) is widened to float32; the
membrane potential, the spike decision and the backward pass are float32; the spikes (0
and 1, exact in every dtype) and the input's gradient come back in the input's dtype.
float32 and float64 inputs are computed in their own dtype, without a copy.
"""
import math
from types import SimpleNamespace
from typing import Optional

import torch
import torch.nn as nn


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


# The fast path, the one place the neurons look for it: empty here, so that neuron.py alone
# runs the loops above. Importing neuron_fast.py (qkformer.py does) fills it with
# neuron_fast.lif_fast, plif_fast and batch_norm_lif: the same numbers as the loops, faster
# and in less memory. A neuron built with reference=True keeps to the loops regardless.
fast_path = SimpleNamespace(lif=None, plif=None, batch_norm_lif=None)


class SpikingNeuron(nn.Module):
    """What every spiking neuron of this project is: a module that maps a whole input
    sequence (T, ...) to spikes (0. or 1.) of the same shape, the "SN(.)" of the paper's
    equations. Tools find neurons by this class (firing-rate hooks, energy counts), so a
    new neuron type is counted as one. A subclass defines `spikes(x_seq)`.

    forward(x_seq, norm=None) returns SN(x_seq), or SN(norm(x_seq)) when a per-image layer
    `norm` (the batch norm of `qkformer.ConvBNLIF`) is given: norm sees the T*B images of
    x_seq (T, B, C, H, W) as one batch. Passing the batch norm to the neuron lets a neuron
    that can (LIFNode, IFNode) run batch norm and itself as one fused step in training
    (`fast_path.batch_norm_lif`: the same numbers, less memory), while the neuron's forward
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
            return fast_path.batch_norm_lif(x_seq, norm, self)  # same numbers, less memory
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
        reference: always run the autograd loop `lif_reference`, never the fast path
            (`fast_path.lif`, neuron_fast.lif_fast: the same spikes and gradients), nor
            the fused batch norm.
    """

    def __init__(self, tau: Optional[float] = 2.0, v_threshold: float = 1.0, alpha: float = 4.0,
                 reference: bool = False):
        super().__init__()
        _check(tau, v_threshold, alpha)
        self.tau = None if tau is None else float(tau)
        self.v_threshold, self.alpha = float(v_threshold), float(alpha)
        self.reference = reference

    def spikes(self, x_seq: torch.Tensor) -> torch.Tensor:
        if self.reference or fast_path.lif is None:
            return lif_reference(x_seq, self.tau, self.v_threshold, self.alpha)
        return fast_path.lif(x_seq, self.tau, self.v_threshold, self.alpha)

    def fuses_with(self, norm: nn.Module) -> bool:
        # Only with the fast path loaded, the plain dynamics (a subclass that redefines
        # `spikes` is always run as written) and a plain affine batch norm without hooks.
        return (not self.reference and fast_path.batch_norm_lif is not None
                and type(self).spikes is LIFNode.spikes
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
    path (`fast_path.plif`, neuron_fast.plif_fast) computes the same spikes and gradients
    (for x and w) with a hand-written backward, run eagerly; there is no fused batch norm
    for it. reference=True: always the plain loop.
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
        if self.reference or fast_path.plif is None:
            return plif_reference(x_seq, self.w, self.v_threshold, self.alpha)
        return fast_path.plif(x_seq, self.w, self.v_threshold, self.alpha)

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

