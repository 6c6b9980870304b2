"""QKFormer: Q-K attention, the SPEDS patch embedding and the hierarchical spiking
transformer, in plain PyTorch.

Reference: Zhou et al., "QKFormer: Hierarchical Spiking Transformer using Q-K
Attention", NeurIPS 2024 (arXiv:2403.16552); official code github.com/zhouchenlin2096/QKFormer.
Spiking self-attention (SSA) comes from Zhou et al., "Spikformer: When Spiking Neural
Network Meets Transformer", ICLR 2023. The spiking neurons are in neuron.py; checkpoint
files, this project's and the official released weights, in checkpoints.py.

Read it top to bottom, next to the paper (section and equation numbers of arXiv v2):
  QKFormerConfig       the configuration: sizes, attention per stage, the neuron's settings
  ConvBNLIF            the building brick: conv -> batch norm -> (max-pool) -> spiking neuron
  SpikeAttention       what every attention is (and how it reports its operations on spikes)
  QKAttention          Section 3.2, Eq. (5)-(7): Q-K token attention (QKTA) and channel attention (QKCA)
  SpikingSelfAttention Section 3.1, Eq. (3)-(4): Spikformer's SSA, used in the last stage
  ATTENTIONS           the table of attentions a stage can use
  SpikingMLP, QKFormerBlock   Section 3.4, Eq. (8): X = X + Attn(X); X = X + MLP(X)
  LAYOUTS, SPEDS       Section 3.5, Eq. (9): spiking patch embedding with deformed shortcut,
                       as the official model families (CIFAR, ImageNet, DVS) lay it out
  QKFormer             Section 3.4 / Figure 2: three stages of widths D/4, D/2, D (DVS: two)
  PRESETS, create_model, fold_batchnorm, predict   the presets, inference folding, flips
  _check_config        last: why a configuration cannot be built, said before building it

Every tensor inside the network is indexed (T, B, C, H, W): time steps, batch,
channels, height, width; N = H * W is the number of tokens. Layers without memory
(conv, batch norm) see the T*B images as one big batch; the spiking neurons see the time
axis. In memory the activations are channels-last, (T, B, H, W, C): the layout oneDNN's
CPU convolutions work in (a 1x1 convolution, the paper's "Linear", is then one matrix
product with no reordering), measured about 2x faster for the 1x1 layers of stage 1 and
1.4x for the 3x3 ones than the default (T, B, C, H, W). Indexing, shapes and results are
the same either way; only the strides differ.
"""
import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

import neuron_fast  # noqa: F401  (plugs the fast path into neuron.fast_path: same numbers, less memory)
from neuron import NEURONS, SpikingNeuron, make_neuron


# ----------------------------------------------------------------------------------------
# The configuration

@dataclass
class QKFormerConfig:
    """Everything needed to rebuild a model (it is stored in every checkpoint).

    family:      "cifar", "imagenet" or "dvs": the stages and patch embeddings of one of the
                 official code's model families (LAYOUTS, with SPEDS below).
    embed_dim:   D, the width of the last stage; CIFAR and ImageNet have three stages of
                 D/4, D/2, D channels, DVS two of D/2, D.
    depths:      total number of blocks, as the official code counts them. CIFAR: 1, 1 and
                 depths-2 blocks per stage; ImageNet: 1, 2 and depths-3 (so "QKFormer-10-384"
                 has 1 + 2 + 7 blocks); DVS: 1 and depths-1 (the official models: depths=2).
    num_heads:   heads of every attention layer (the official code uses one value for all stages).
    attention:   the attention of each stage, a key of ATTENTIONS: "token" (QKTA), "channel"
                 (QKCA) or "ssa". None: the paper's model, "token" in every stage but the last
                 and "ssa" there, e.g. ("token", "token", "ssa"); the others rerun its ablation.
    official_quirks: reproduce the official code's batch-mixing SSA neuron (see
                 `SpikingSelfAttention`); needed to match the released checkpoints exactly.
    speds:       True: every patch embedding has Eq. (9)'s deformed shortcut (the paper's
                 model). False: F alone, without shortcut: the "w/o SPEDS" rows of Table 5's
                 ablation, in our reading (the paper shows no code for it).
    The spiking neurons (neuron.py; every neuron of the model is built by `make_neuron`):
    neuron:      a key of neuron.NEURONS: "lif" (the paper's), "if" (integrate-and-fire, no
                 leak) or "plif" (parametric LIF, a learned tau): Table 7's ablation.
    tau:         the membrane time constant of "lif"; the initial one of "plif" (official code: 2).
    v_threshold: the firing threshold of every neuron but the attention's (official code: 1).
    attn_v_threshold: the threshold of the attention neurons, A_t, A_c and SSA's (official code: 0.5).
    surrogate_alpha: the sharpness of the sigmoid surrogate gradient (the paper's Appendix 6.5
                 and the official code: 4).
    """
    family: str = "cifar"
    num_classes: int = 10
    img_size: int = 32
    in_channels: int = 3
    embed_dim: int = 384
    depths: int = 4
    num_heads: int = 8
    mlp_ratio: float = 4.0
    T: int = 4
    attention: Optional[Tuple[str, ...]] = None
    official_quirks: bool = False
    speds: bool = True
    neuron: str = "lif"
    tau: float = 2.0
    v_threshold: float = 1.0
    attn_v_threshold: float = 0.5
    surrogate_alpha: float = 4.0

    def __post_init__(self):
        if self.family not in LAYOUTS:
            raise ValueError(f"family must be one of {tuple(LAYOUTS)}, got {self.family!r}")
        if self.attention is None:                      # the paper's model
            self.attention = ("token",) * (len(self.layout.widths) - 1) + ("ssa",)
        self.attention = tuple(self.attention)  # a list after a round trip through JSON
        _check_config(self)                     # at the end of this file: a clear error, not a crash later

    def make_neuron(self, attention: bool = False) -> SpikingNeuron:
        """A spiking neuron of this model (through neuron.make_neuron, the one factory);
        attention=True: an attention neuron, with threshold attn_v_threshold."""
        threshold = self.attn_v_threshold if attention else self.v_threshold
        return make_neuron(self.neuron, threshold, tau=self.tau, alpha=self.surrogate_alpha)

    @property
    def layout(self) -> "FamilyLayout":
        return LAYOUTS[self.family]

    @property
    def stage_widths(self) -> Tuple[int, ...]:
        return tuple(self.embed_dim // w for w in self.layout.widths)

    @property
    def stage_depths(self) -> Tuple[int, ...]:
        early = self.layout.early_depths
        return (*early, self.depths - sum(early))

    @property
    def downsampling(self) -> int:
        """Total stride of the patch embeddings (CIFAR 1*2*2, ImageNet 4*2*2, DVS 8*2)."""
        return math.prod(embed.stride for embed in self.layout.embeds)


# ----------------------------------------------------------------------------------------
# The building brick

class ConvBNLIF(nn.Module):
    """SN(MaxPool(BN(Conv(X)))), the unit every equation of the paper is made of.

    Convolution and batch norm see the T*B images as one batch; the spiking neuron SN
    (`config.neuron`, LIF in the paper) then runs over the time axis. A kernel of 1 is the
    paper's "Linear" layer applied to every token. The max-pool, when present, sits between
    batch norm and the neuron, as in the official code, so the pool picks the largest
    membrane input rather than or-ing spikes.

    Without a pool the neuron is handed the batch norm (`lif(y, norm=bn)`): in training,
    a LIF or IF neuron runs both as one fused step that keeps only the convolution's output
    (neuron_fast.py): the same numbers with less memory. The neuron is called as a module on
    every path, so forward hooks on it see every call (neuron.SpikingNeuron says what they get).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1,
                 stride: int = 1, bias: bool = False, pool: bool = False,
                 config: Optional[QKFormerConfig] = None):
        super().__init__()
        config = config or QKFormerConfig()
        # A strided 1x1 convolution (the SPEDS shortcuts) reads only every stride-th pixel, so
        # it runs as that subsampling followed by a 1x1 convolution of stride 1: the same
        # numbers and weights. Written so because PyTorch 2.13's oneDNN, on CPUs without
        # AVX-512, computes wrong weight gradients (and can corrupt memory) for strided 1x1
        # convolutions of channels-last inputs with fewer than 8 channels (a test checks it).
        self.subsample = stride if kernel_size == 1 else 1
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride // self.subsample,
                              padding=kernel_size // 2, bias=bias)
        self.bn = nn.BatchNorm2d(out_channels)
        self.pool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1) if pool else nn.Identity()
        self.lif = config.make_neuron()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T, B = x.shape[:2]
        # (T*B, C, H, W), stored channels-last (see the top of this file): a no-op after the
        # first layer, whose input is the image.
        x = x.flatten(0, 1).contiguous(memory_format=torch.channels_last)
        if self.subsample > 1:
            x = x[:, :, ::self.subsample, ::self.subsample]      # (T*B, C, H/s, W/s)
        y = self.conv(x)                                         # (T*B, C', H', W')
        if isinstance(self.pool, nn.Identity):
            return self.lif(y.unflatten(0, (T, B)), norm=self.bn)   # (T, B, C', H', W')
        y = self.pool(self.bn(y))                                # (T*B, C', H'/2, W'/2)
        return self.lif(y.unflatten(0, (T, B)))                  # (T, B, C', H'/2, W'/2)


# ----------------------------------------------------------------------------------------
# Attention (Section 3.2 and 3.1)

Firing = Callable[[SpikingNeuron], Tuple[float, float]]


class SpikeAttention(nn.Module):
    """What every attention of this file is: a module (T, B, C, H, W) -> (T, B, C, H, W)
    that also reports the operations on spikes it does itself, for the energy estimate
    (paper Appendix 6.6, Eq. (19)-(21); evaluate.py turns them into SOPs).

    synaptic_ops(firing) returns one (label, MACs, input firing rate) per operation on
    spikes the module does itself (matrix products, sums), not those of its conv/linear
    children, which the energy count handles: MACs per image and time step as if every
    input were a spike, and the firing rate of the spikes that drive it. `firing(neuron)`,
    given by the energy count, returns (firing rate, neurons per image and time step)
    recorded for one of this module's own neurons. A new attention that does not say what
    it computes fails loudly instead of being counted as free.
    """

    def synaptic_ops(self, firing: Firing) -> List[Tuple[str, float, float]]:
        raise NotImplementedError(f"{type(self).__name__} must define synaptic_ops(firing) "
                                  f"for the energy estimate (see SpikeAttention)")


class QKAttention(SpikeAttention):
    """Spike-form Q-K attention, Section 3.2: Eq. (5)-(7) for QKTA, and the QKCA variant.

        Q = SN(BN(X W_Q)),  K = SN(BN(X W_K))                       binary, (T, B, C, N)
        QKTA: A_t = SN(sum of Q over the channels of a head)         one value per token, Eq. (6)
        QKCA: A_c = SN(sum of Q over the tokens)                     one value per channel
        X' = A (*) K                                                 a mask on K, broadcast
        X'' = SN(BN(Linear(X')))                                    Eq. (7)

    Cost: the sums and the mask touch each of the N*C spikes once, so the work and memory
    grow linearly with N, where SSA (below) builds d x d or N x N products. (Table 1 of the
    paper gives QKTA time O(D) and space O(N): in our reading, it counts the sum over the
    channels as D additions of whole token rows; see tutorial.md, section 3.) There is no V,
    no softmax and no scale: the binary vector A itself says which tokens (or channels)
    matter.

    The attention neuron: with the official code's tau = 2 and threshold 0.5
    (`attn_v_threshold`) and a sum of spikes as input (an integer x >= 0), its potential
    after a reset stays in [0, 0.5), so H = (V + x) / 2 reaches 0.5 exactly when x >= 1:
    A is 1 where at least one spike of Q falls into the sum, at every step, whatever came
    before. A memoryless OR over the head's channels (QKTA) or over the tokens (QKCA); our
    observation, checked in tutorial.md, section 3.
    """

    def __init__(self, dim: int, num_heads: int, mode: str = "token",
                 config: Optional[QKFormerConfig] = None):
        super().__init__()
        if mode not in ("token", "channel"):
            raise ValueError(f"QKAttention mode must be 'token' or 'channel', got {mode!r}")
        config = config or QKFormerConfig()
        self.num_heads, self.mode = num_heads, mode
        self.q = ConvBNLIF(dim, dim, config=config)
        self.k = ConvBNLIF(dim, dim, config=config)
        self.attn_lif = config.make_neuron(attention=True)
        self.proj = ConvBNLIF(dim, dim, bias=True, config=config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T, B, C, H, W = x.shape
        heads = (T, B, self.num_heads, C // self.num_heads, H * W)
        q = self.q(x).reshape(heads)                                # (T, B, h, C/h, N)
        k = self.k(x).reshape(heads)                                # (T, B, h, C/h, N)
        if self.mode == "token":  # sums in q's dtype: CUDA's autocast would make them float32
            attn = self.attn_lif(q.sum(dim=3, keepdim=True, dtype=q.dtype))  # (T, B, h, 1, N)   A_t
        else:  # (a count of spikes: the decision x >= 1 is exact in bf16 and fp16 alike)
            attn = self.attn_lif(q.sum(dim=4, keepdim=True, dtype=q.dtype))  # (T, B, h, C/h, 1) A_c
        x = (attn * k).reshape(T, B, C, H, W)                       # X' = A (*) K
        return self.proj(x)                                         # X'' = SN(BN(Linear(X')))

    def synaptic_ops(self, firing: Firing) -> List[Tuple[str, float, float]]:
        """The sum of Q adds each of its N*C inputs once. The mask A (*) K is a logical
        AND of two spikes: no accumulate, counted 0 (Appendix 6.6)."""
        rate_q, neurons_q = firing(self.q.lif)                      # neurons_q = N*C
        return [("sum of Q", neurons_q, rate_q)]


class SpikingSelfAttention(SpikeAttention):
    """Spikformer's spiking self-attention (SSA), Section 3.1, Eq. (3)-(4); QKFormer's stage 3.

        Q, K, V = SN(BN(X W_Q)), SN(BN(X W_K)), SN(BN(X W_V))       binary, per head (N, d)
        SSA = SN(Q K^T V * s)
        X'' = SN(BN(Linear(SSA)))

    Eq. (4) says only that "s is a scaling factor"; s = 0.125 and the attention threshold 0.5
    (`attn_v_threshold`) are the official code's.
    There is no softmax, so the product is associative: Q (K^T V) can be computed right to
    left, a d x d product per head, with cost O(N d^2) (the paper: VSA and SSA "have
    O(N^2 d) or O(N d^2) computational complexity"). Spikformer's code forms the N x N map
    Q K^T first (`complexity.ExplicitSSA`): that quadratic memory is what Table 1 counts and
    the paper's reason for SSA in the last stage only, where N is smallest; the official
    QKFormer code, like this class, computes Q (K^T V) and forms no N x N map.

    The official code's quirk (its issue 14): its last neuron runs over the tensor
    flattened to (T*B, C, N), so SpikingJelly takes T*B as the time axis. The membrane
    of sample b then carries into sample b+1 (and from the last sample of step t into the
    first of step t+1): a sample's output depends on the other samples in its batch.
    The paper describes a neuron that runs over time, per sample, which is what this
    class does by default. `official_quirks=True` reproduces the official behaviour
    exactly; the released checkpoints were trained with it.
    """

    def __init__(self, dim: int, num_heads: int, official_quirks: bool = False,
                 config: Optional[QKFormerConfig] = None):
        super().__init__()
        config = config or QKFormerConfig()
        self.num_heads, self.official_quirks = num_heads, official_quirks
        self.scale = 0.125                                          # the official code's
        self.q = ConvBNLIF(dim, dim, config=config)
        self.k = ConvBNLIF(dim, dim, config=config)
        self.v = ConvBNLIF(dim, dim, config=config)
        self.attn_lif = config.make_neuron(attention=True)
        self.proj = ConvBNLIF(dim, dim, bias=True, config=config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T, B, C, H, W = x.shape
        heads = (T, B, self.num_heads, C // self.num_heads, H * W)
        q = self.q(x).reshape(heads)                                # (T, B, h, d, N)
        k = self.k(x).reshape(heads)                                # (T, B, h, d, N)
        v = self.v(x).reshape(heads)                                # (T, B, h, d, N)
        # With tokens along the last axis, K^T V is k @ v^T. Q (K^T V) is formed token-major,
        # (N, d) per head, the channels-last layout of every other activation here.
        kv = k @ v.transpose(-2, -1)                                # (T, B, h, d, d)  K^T V
        x = (q.transpose(-2, -1) @ kv) * self.scale                 # (T, B, h, N, d)  Q K^T V s
        x = x.transpose(-2, -1)                                     # (T, B, h, d, N)
        x = self.attn_lif(x.reshape(T, B, C, H, W))                 # (T, B, C, H, W)
        if self.official_quirks:
            y = self.proj.bn(self.proj.conv(x.flatten(0, 1)))       # (T*B, C, H, W)
            return self.proj.lif(y).reshape(T, B, C, H, W)          # time axis = T*B: the quirk
        return self.proj(x)

    def synaptic_ops(self, firing: Firing) -> List[Tuple[str, float, float]]:
        """K^T V: each spike of K adds a row of V (N*C*d MACs per image and step); Q (K^T V):
        each spike of Q adds a row of K^T V (N*C*d MACs). d = C / heads."""
        rate_k, neurons_k = firing(self.k.lif)                      # N*C
        rate_q, neurons_q = firing(self.q.lif)                      # N*C
        d = self.q.conv.out_channels // self.num_heads
        return [("K^T V", neurons_k * d, rate_k), ("Q (K^T V)", neurons_q * d, rate_q)]


# The attentions a stage can use (QKFormerConfig.attention): name -> constructor
# (dim, num_heads, config) -> SpikeAttention. The one place that lists them.
ATTENTIONS: Dict[str, Callable[[int, int, QKFormerConfig], SpikeAttention]] = {
    "token": lambda dim, num_heads, config: QKAttention(dim, num_heads, "token", config),
    "channel": lambda dim, num_heads, config: QKAttention(dim, num_heads, "channel", config),
    "ssa": lambda dim, num_heads, config: SpikingSelfAttention(dim, num_heads,
                                                               config.official_quirks, config),
}


# ----------------------------------------------------------------------------------------
# The block (Section 3.4)

class SpikingMLP(nn.Module):
    """The spiking MLP of every block, Section 3.4: two 1x1 conv-BN-SN layers, C -> ratio*C -> C."""

    def __init__(self, dim: int, hidden: int, config: Optional[QKFormerConfig] = None):
        super().__init__()
        self.fc1 = ConvBNLIF(dim, hidden, bias=True, config=config)
        self.fc2 = ConvBNLIF(hidden, dim, bias=True, config=config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x))


class QKFormerBlock(nn.Module):
    """A QKFormer block (Q-K attention) or Spikformer block (SSA), Section 3.4, Eq. (8):

        X' = X + Attn(X)
        X'' = X' + MLP(X')

    The sums of spikes are small integers (0, 1, 2, ...), not spikes: the residual stream
    carries counts, and each layer's neurons turn them back into spikes.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, attention: str,
                 config: Optional[QKFormerConfig] = None):
        super().__init__()
        config = config or QKFormerConfig()
        if attention not in ATTENTIONS:
            raise ValueError(f"unknown attention {attention!r}; choose one of {sorted(ATTENTIONS)}")
        self.attn = ATTENTIONS[attention](dim, num_heads, config)
        self.mlp = SpikingMLP(dim, int(dim * mlp_ratio), config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(x)
        return x + self.mlp(x)


# ----------------------------------------------------------------------------------------
# Patch embedding (Section 3.5)

class SPEDS(nn.Module):
    """Spiking Patch Embedding with Deformed Shortcut, Section 3.5. The paper's Eq. (9),
    Y = F(X, {W_i}) + SN(W_d X), has no batch norm in the shortcut; the official code has
    one, and so does this class:

        Y = F(Z) + SN(BN(Conv1x1_stride(Z)))

    F is two conv-BN-LIF layers that change the width and downsample with a max-pool;
    the "deformed" shortcut W_d is a strided 1x1 conv ("1 x 1 kernel and stride > 1") with
    the official code's BN and a neuron, so that the two branches meet at the same shape.
    Z is the input, or, for the first embedding, the output of a stem on the image
    (Z = SN(BN(Conv3x3(image)))). The sum of two spike tensors is the block's output
    (values 0, 1 or 2). Where the max-pools sit differs between the official families:
    LAYOUTS, below. A stem of one layer is that ConvBNLIF, of several an nn.Sequential.

    With shortcut=None it is Y = F(Z) alone: the ablation "without SPEDS" (Table 5;
    QKFormerConfig.speds=False).
    """

    def __init__(self, stem: Optional[nn.Module], main: nn.Sequential,
                 shortcut: Optional[ConvBNLIF]):
        super().__init__()
        self.stem = stem if stem is not None else nn.Identity()
        self.main, self.shortcut = main, shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.stem(x)
        if self.shortcut is None:
            return self.main(z)
        return self.main(z) + self.shortcut(z)


@dataclass(frozen=True)
class EmbedLayout:
    """One SPEDS patch embedding (Section 3.5) as an official model family builds it.

    stem, main: the 3x3 conv-BN-SN layers before the shortcut branches off (the stem) and
                those of F (see `SPEDS`), each as (output width as a divisor of the stage's
                width, whether a max-pool sits between batch norm and neuron).
    The shortcut's stride is that of F's max-pools, so that the two branches meet.
    """
    stem: Tuple[Tuple[int, bool], ...]
    main: Tuple[Tuple[int, bool], ...]

    @property
    def stride(self) -> int:
        """How much the embedding shrinks the token grid."""
        return 2 ** sum(pool for _, pool in self.stem + self.main)

    @property
    def shortcut_stride(self) -> int:
        return 2 ** sum(pool for _, pool in self.main)


@dataclass(frozen=True)
class FamilyLayout:
    """What QKFormerConfig.family decides: the stages of one official model family.

    widths:       the width of each stage as a divisor of D (embed_dim): (4, 2, 1) is D/4, D/2, D.
    early_depths: the blocks of every stage but the last; the last has the rest of `depths`.
    embeds:       the SPEDS patch embedding of each stage.
    """
    widths: Tuple[int, ...]
    early_depths: Tuple[int, ...]
    embeds: Tuple[EmbedLayout, ...]


# Where each official family puts the layers and max-pools of SPEDS (build_speds reads it):
#   CIFAR    stage 1: stem, F = [conv]                   no downsampling (32x32 tokens)
#            stage 2, 3: F = [conv, conv + pool]         stride 2
#   ImageNet stage 1: stem + pool, F = [conv + pool, conv]   stride 4 (224 -> 56)
#            stage 2, 3: F = [conv + pool, conv]         stride 2
#   DVS      stage 1: stem = [conv, conv + pool], F = [conv + pool, conv + pool]   stride 8 (16x16 tokens)
#            (widths D/16, D/8 | D/4, D/2; the shortcut starts after the stem, stride 4)
#            stage 2: F = [conv, conv + pool]            stride 2
# DVS models have two stages, D/2 (QKTA) and D (SSA), on 128x128 event frames. Official code:
# cifar10/, cifar100/ model.py; imagenet/qkformer.py; cifar10-dvs/, dvs128-gesture/ model.py.
_LATER_CIFAR = EmbedLayout(stem=(), main=((1, False), (1, True)))
_LATER_IMAGENET = EmbedLayout(stem=(), main=((1, True), (1, False)))
LAYOUTS: Dict[str, FamilyLayout] = {
    "cifar": FamilyLayout(widths=(4, 2, 1), early_depths=(1, 1), embeds=(
        EmbedLayout(stem=((2, False),), main=((1, False),)), _LATER_CIFAR, _LATER_CIFAR)),
    "imagenet": FamilyLayout(widths=(4, 2, 1), early_depths=(1, 2), embeds=(
        EmbedLayout(stem=((2, True),), main=((1, True), (1, False))), _LATER_IMAGENET, _LATER_IMAGENET)),
    "dvs": FamilyLayout(widths=(2, 1), early_depths=(1,), embeds=(
        EmbedLayout(stem=((8, False), (4, True)), main=((2, True), (1, True))),
        EmbedLayout(stem=(), main=((1, False), (1, True))))),
}


def build_speds(config: QKFormerConfig, stage: int, in_channels: int, width: int) -> SPEDS:
    """The SPEDS of `stage` as config.family's layout describes it (LAYOUTS, `EmbedLayout`);
    `in_channels` is the image's channels for stage 0, else the previous stage's width."""
    spec = config.layout.embeds[stage]

    def chain(layers, cin):                                    # 3x3 ConvBNLIFs, one after another
        units = []
        for divisor, pool in layers:
            units.append(ConvBNLIF(cin, width // divisor, 3, pool=pool, config=config))
            cin = width // divisor
        return units, cin

    stem, z_channels = chain(spec.stem, in_channels)
    main, _ = chain(spec.main, z_channels)
    shortcut = (ConvBNLIF(z_channels, width, 1, stride=spec.shortcut_stride, config=config)
                if config.speds else None)
    stem = None if not stem else stem[0] if len(stem) == 1 else nn.Sequential(*stem)
    return SPEDS(stem, nn.Sequential(*main), shortcut)


# ----------------------------------------------------------------------------------------
# The hierarchical network (Section 3.4, Figure 2)

class Stage(nn.Module):
    """One stage of the hierarchy (Section 3.4, Figure 2): a SPEDS, then its blocks."""

    def __init__(self, embed: SPEDS, blocks: nn.ModuleList):
        super().__init__()
        self.embed, self.blocks = embed, blocks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return x


class QKFormer(nn.Module):
    """The hierarchical spiking transformer, Section 3.4 and Figure 2.

    Three stages of widths D/4, D/2, D (the DVS family: two, D/2 and D). Each halves the
    token grid (the ImageNet stage 1 quarters it, the DVS one shrinks it 8x), so the early
    stages work on many narrow tokens with Q-K attention, whose cost is linear in N, and the
    last stage on few wide tokens with SSA.

    Input: an image batch (B, C, H, W) is repeated over T time steps ("direct encoding":
    the first conv layer turns pixels into currents and its neurons into spikes), or a
    sequence (T, B, C, H, W) already over time (event data) is used as it is.
    Output: the head reads the features averaged over tokens and over time, i.e. firing
    rates, which is how a spike train becomes a real-valued prediction.
    """

    def __init__(self, config: QKFormerConfig):
        super().__init__()
        self.config = config
        stages, in_channels = [], config.in_channels
        for i, (width, depth, attention) in enumerate(
                zip(config.stage_widths, config.stage_depths, config.attention)):
            blocks = nn.ModuleList(
                QKFormerBlock(width, config.num_heads, config.mlp_ratio, attention, config)
                for _ in range(depth))
            stages.append(Stage(build_speds(config, i, in_channels, width), blocks))
            in_channels = width
        self.stages = nn.ModuleList(stages)
        self.head = nn.Linear(config.embed_dim, config.num_classes)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module):
        # As the official models (timm's ViT init): only linear layers are re-initialised;
        # convolutions and batch norm keep PyTorch's defaults. The truncation bounds are
        # absolute (-2, 2), as in timm, so at std 0.02 they are never reached.
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02, a=-2.0, b=2.0)
            nn.init.zeros_(m.bias)

    def set_official_quirks(self, on: bool = True):
        """Switch the official code's batch-mixing SSA neuron on or off (see SpikingSelfAttention)."""
        self.config.official_quirks = on
        for m in self.modules():
            if isinstance(m, SpikingSelfAttention):
                m.official_quirks = on

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Check the input and give it a time axis: (B, C, H, W) -> (T, B, C, H, W)."""
        cfg = self.config
        if x.dim() not in (4, 5):
            raise ValueError(f"expected images (B, C, H, W) or a sequence (T, B, C, H, W), "
                             f"got a tensor of shape {tuple(x.shape)}")
        C, H, W = x.shape[-3:]
        if C != cfg.in_channels:
            raise ValueError(f"expected {cfg.in_channels} input channels, got {C} "
                             f"(input shape {tuple(x.shape)})")
        if H % cfg.downsampling or W % cfg.downsampling:
            raise ValueError(f"input size {H}x{W} cannot be divided by the patch embeddings: "
                             f"height and width must be multiples of {cfg.downsampling}")
        if x.dim() == 4:
            x = x.unsqueeze(0).repeat(cfg.T, 1, 1, 1, 1)           # (T, B, C, H, W)
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Spike counts of the last stage averaged over tokens: (T, B, D)."""
        x = self.encode(x)
        for stage in self.stages:
            x = stage(x)
        return x.flatten(3).mean(3)                                 # (T, B, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x).mean(0))          # (B, num_classes)


# ----------------------------------------------------------------------------------------
# Presets

# What the models of a family share (mlp_ratio 4: the official models but the CIFAR10-DVS one).
_CIFAR = dict(family="cifar", img_size=32, mlp_ratio=4.0)
_IMAGENET = dict(family="imagenet", num_classes=1000, img_size=224, mlp_ratio=4.0)
_DVS = dict(family="dvs", img_size=128, in_channels=2, embed_dim=256, depths=2, num_heads=16, T=16)
PRESETS = {
    # Narrow and shallow, for CPUs and courses: trains on CIFAR-10 on a laptop.
    "tiny": dict(**_CIFAR, num_classes=10, embed_dim=128, depths=3, num_heads=4, T=2),
    # The model of train.py's --recipe cpu and --recipe lab: CIFAR images through the ImageNet
    # family's layout, whose first embedding downsamples by 4 (tokens 8x8, 4x4, 2x2; the CIFAR
    # layout keeps 32x32 tokens in stage 1). Each image costs a few times less on a CPU.
    "small": dict(family="imagenet", num_classes=10, img_size=32, embed_dim=128, depths=4,
                  num_heads=4, mlp_ratio=4.0, T=2),                          # 608,730
    # The official models. Parameter counts (checked by the tests) equal the released ones.
    "cifar10": dict(**_CIFAR, num_classes=10, embed_dim=384, depths=4, num_heads=8, T=4),     # 6,706,234
    "cifar100": dict(**_CIFAR, num_classes=100, embed_dim=384, depths=4, num_heads=8, T=4),   # 6,740,884
    "imagenet_10_384": dict(**_IMAGENET, embed_dim=384, depths=10, num_heads=6, T=4),        # 16,473,688
    "imagenet_10_512": dict(**_IMAGENET, embed_dim=512, depths=10, num_heads=8, T=4),        # 29,079,336
    "imagenet_10_768": dict(**_IMAGENET, embed_dim=768, depths=10, num_heads=12, T=4),       # 64,962,760
    # Event cameras: input (T, B, 2, 128, 128), frames of event counts per polarity (data_events.py).
    "cifar10dvs": dict(**_DVS, num_classes=10, mlp_ratio=1.0),                               # 1,504,138
    "dvs128gesture": dict(**_DVS, num_classes=11, mlp_ratio=4.0),                            # 1,999,371
}


def create_model(name: str = "cifar10", **overrides) -> QKFormer:
    """A QKFormer from a preset in PRESETS, with any QKFormerConfig field overridden."""
    if name not in PRESETS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(PRESETS)}")
    fields = QKFormerConfig.__dataclass_fields__
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ValueError(f"unknown model setting(s) {unknown}; valid ones: {sorted(fields)}")
    return QKFormer(QKFormerConfig(**{**PRESETS[name], **overrides}))


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold every batch norm into the convolution before it, for inference (in place).

    In eval mode BN(y) = (y - mean) / sqrt(var + eps) * gamma + beta is a fixed affine map
    per channel, so it can be merged into the convolution's weights and bias: one pass
    over each activation map fewer. Exact up to rounding (the max-pool comes after the
    batch norm, so it sees the same values). The model is for inference only afterwards.
    """
    if model.training:
        raise ValueError("fold_batchnorm needs a model in eval mode (batch statistics change in training)")
    for m in model.modules():
        if isinstance(m, ConvBNLIF) and isinstance(m.bn, nn.BatchNorm2d):
            conv, bn = m.conv, m.bn
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)          # (C',)
            bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
            conv.weight.mul_(scale.reshape(-1, 1, 1, 1))
            conv.bias = nn.Parameter((bias - bn.running_mean) * scale + bn.bias)
            m.bn = nn.Identity()
    return model


def predict(model: nn.Module, x: torch.Tensor, flip: bool = False) -> torch.Tensor:
    """The model's logits (B, num_classes) for the input x, whose last axis is the image width.

    flip: test-time augmentation (ours; the paper reports single-view accuracy). The logits
    are averaged with those of the mirrored input x.flip(-1). A model trained with random
    horizontal flips has seen both views, and the two predictions err partly independently:
    their mean is more often right, at the price of a second forward pass (twice the time and
    the energy per image). train.py's --flip-test and evaluate.py's --flip-test use it.
    """
    logits = model(x)
    if flip:
        logits = (logits + model(x.flip(-1))) / 2
    return logits


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------
# Checking a configuration (QKFormerConfig.__post_init__): not the paper

def _check_config(config: QKFormerConfig):
    """Raise ValueError, naming the setting, for a configuration whose model cannot be built:
    said at once, rather than as a failed reshape somewhere inside the network."""
    layout, family = config.layout, config.family
    for name in ("num_classes", "img_size", "in_channels", "embed_dim", "num_heads", "T"):
        value = getattr(config, name)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    _check_neuron(config)
    if config.mlp_ratio <= 0:
        raise ValueError(f"mlp_ratio must be positive, got {config.mlp_ratio}")
    if len(config.attention) != len(layout.widths) or any(a not in ATTENTIONS for a in config.attention):
        raise ValueError(f"attention must name one of {tuple(ATTENTIONS)} for each of the "
                         f"{len(layout.widths)} stages of the {family} family, got {config.attention!r}")
    if min(config.stage_depths) < 1:
        raise ValueError(f"depths={config.depths} leaves a stage without blocks: the {family} "
                         f"family needs depths >= {sum(layout.early_depths) + 1}")
    # the narrowest layer: stage 1's first convolution (CIFAR, ImageNet: D/8; DVS: D/16)
    narrowest = max(w * d for w, e in zip(layout.widths, layout.embeds) for d, _ in e.stem + e.main)
    if config.embed_dim % narrowest:
        raise ValueError(f"embed_dim must be divisible by {narrowest} (the {family} family's "
                         f"narrowest layer has D/{narrowest} channels), got {config.embed_dim}")
    if any(width % config.num_heads for width in config.stage_widths):
        first = layout.widths[0]
        raise ValueError(f"the stage widths {config.stage_widths} must be divisible by "
                         f"num_heads={config.num_heads}; choose embed_dim divisible by "
                         f"{first} * num_heads = {first * config.num_heads}")
    if config.img_size % config.downsampling:
        raise ValueError(f"img_size={config.img_size} cannot be divided by the {family} "
                         f"patch embeddings: it must be a multiple of {config.downsampling}")


def _check_neuron(config: QKFormerConfig):
    """The neuron's settings: a known kind, numbers (stored as floats), a tau the kind allows."""
    if config.neuron not in NEURONS:
        raise ValueError(f"neuron must be one of {sorted(NEURONS)}, got {config.neuron!r}")
    for name in ("tau", "v_threshold", "attn_v_threshold", "surrogate_alpha"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{name} must be a number, got {value!r}")
        if name != "tau" and value <= 0:
            raise ValueError(f"{name} must be positive, got {float(value)}")
        setattr(config, name, float(value))
    if config.tau < 1 or (config.neuron == "plif" and config.tau == 1):
        least = "greater than 1" if config.neuron == "plif" else "at least 1"
        raise ValueError(f"tau must be {least} for neuron={config.neuron!r}, got {config.tau}")
