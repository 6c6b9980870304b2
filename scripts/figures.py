"""The project's teaching diagrams, drawn with matplotlib, for tutorial.md, the labs and slides.

    python scripts/figures.py --output DIR      # default: scratch/ (docs/ for the committed copies)

writes three PNGs at 200 dpi, quantised as `tests/test_tutorial.py --write-docs` does (to 128
colours, which that writer's 256 then keep as they are), so that what lands in docs/ is what
was looked at:
  bptt.png         one LIF neuron unrolled over T = 4 steps: the forward pass (N1)-(N3) of
                   neuron.py, the backward pass through time, where the surrogate gradient
                   replaces the Heaviside's derivative, and what has to be kept in memory.
  hierarchy.png    the stages of the CIFAR-10 and ImageNet models (SPEDS + blocks, then the
                   head), with the widths, token grids, blocks and attentions read from
                   qkformer's configuration (`stage_table`), and a SPEDS and a block opened up.
  qkta_vs_ssa.png  Q-K token attention (QKTA) next to Spikformer's SSA, on a toy head of
                   N = 8 tokens and d = 4 channels; the attention neuron is the model's own.
Nothing here is hard-coded that the model defines: sizes come from qkformer.QKFormerConfig
and its LAYOUTS, so the pictures cannot drift from the code (tests/test_figures.py checks it).
"""
import argparse
import io
import os
import sys
from typing import Dict, List

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt                                   # noqa: E402
import numpy as np                                                # noqa: E402
import torch                                                      # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Rectangle  # noqa: E402
from PIL import Image                                             # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import qkformer                                                   # noqa: E402

DPI = 200
# 128 colours rather than the writer's 256: the same look on these flat drawings (black text,
# four hues), and 7 % smaller files, which keeps hierarchy.png, dense with text, under 150 KB.
COLOURS = 128
NAMES = ("bptt.png", "hierarchy.png", "qkta_vs_ssa.png")
ATTENTION_NAMES = {"token": "QKTA", "channel": "QKCA", "ssa": "SSA"}

# One palette for the three pictures: forward in near-black, backward in red, QKFormer's own
# parts in blue, Spikformer's SSA in orange, what is kept for the backward pass in amber.
INK, BACK, BLUE, ORANGE, AMBER = "#222222", "#c62828", "#1f5fa8", "#d9731a", "#f6d77a"
PALE_BLUE, PALE_ORANGE, PALE_GREY = "#e3eefa", "#fbe9d7", "#f2f2f2"

# The style, applied per picture (plt.rc_context) so that importing this file changes nothing
STYLE = {"font.family": "DejaVu Sans", "font.size": 12, "mathtext.fontset": "dejavusans"}


# ----------------------------------------------------------------------------------------
# Saving and drawing helpers

def save(fig, path: str, colours: int = COLOURS):
    """Save at DPI as docs/ wants its pictures: quantised as `tests/test_tutorial.py
    --write-docs` does, to `colours` colours (its 256 or fewer: that writer then keeps the
    picture as it is), and with the dpi kept in the PNG (the writer's own save drops it)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, facecolor="white")
    plt.close(fig)
    buf.seek(0)
    Image.open(buf).convert("RGB").quantize(colours).save(path, optimize=True, dpi=(DPI, DPI))


def canvas(width: float, height: float, xlim: float, ylim: float):
    """A figure of width x height inches whose one axes spans it, in data units 0..xlim, 0..ylim."""
    fig = plt.figure(figsize=(width, height))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, xlim)
    ax.set_ylim(0, ylim)
    ax.axis("off")
    return fig, ax


def box(ax, x, y, w, h, text="", fc="white", ec=INK, size=12, lw=1.4, weight="normal", **kw):
    """A rounded box with its lower left corner at (x, y) and `text` in its middle."""
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0,rounding_size=0.12",
                                fc=fc, ec=ec, lw=lw, **kw))
    if text:
        ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", size=size, weight=weight)


def arrow(ax, start, end, color=INK, dashed=False, lw=1.8, rad=0.0, head=14):
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=head, color=color,
                                 lw=lw, linestyle=(0, (4, 3)) if dashed else "-",
                                 connectionstyle=f"arc3,rad={rad}", shrinkA=0, shrinkB=0))


# ----------------------------------------------------------------------------------------
# 1. Backpropagation through time

def draw_bptt(path: str, T: int = 4):
    """One LIF neuron unrolled over T steps, forward and backward (neuron.py's (N1)-(N3))."""
    config = qkformer.QKFormerConfig()                             # the official code's values
    alpha = config.surrogate_alpha
    fig, ax = canvas(13, 8.6, 17.6, 11.64)
    ax.text(8.8, 11.1, f"Backpropagation through time: one LIF neuron unrolled over T = {T} steps",
            ha="center", size=16, weight="bold")

    step = 3.0
    xs = [2.3 + step * t for t in range(T)]                       # the columns, t = 0 .. T-1
    y_x, y_h, y_fire, y_s, y_loss = 3.7, 5.6, 6.8, 8.0, 9.7
    r = 0.42                                                       # node radius
    half = step / 2

    def node(x, y, label, stored):
        ax.add_patch(plt.Circle((x, y), r, fc=AMBER if stored else "white", ec=INK, lw=1.5))
        ax.text(x, y, label, ha="center", va="center", size=13)

    box(ax, xs[0] - 0.9, y_loss - 0.38, xs[-1] - xs[0] + 1.8, 0.76,
        "the next layers  ...  loss L", fc=PALE_GREY, size=13)
    node(xs[0] - half, y_h, "$V[-1]$", False)
    ax.text(xs[0] - half, y_h - 0.62, "= 0", ha="center", va="top", size=11)
    for t, x in enumerate(xs):
        ax.text(x, y_x - 0.95, f"t = {t}", ha="center", size=12, color="#555555")
        node(x, y_x, f"$X[{t}]$", False)
        node(x, y_h, f"$H[{t}]$", True)
        node(x, y_s, f"$S[{t}]$", True)
        xv = x + half
        node(xv, y_h, f"$V[{t}]$", False)
        box(ax, x - 0.72, y_fire - 0.25, 1.44, 0.5, "Heaviside", size=10, fc="white", lw=1.0)
        # forward, solid: (N1) charge from X[t] and V[t-1]; (N2) fire; (N3) reset
        arrow(ax, (x + 0.12, y_x + r), (x + 0.12, y_h - r))
        arrow(ax, (x - half + r, y_h + 0.12), (x - r, y_h + 0.12))
        arrow(ax, (x + 0.12, y_h + r), (x + 0.12, y_fire - 0.25))
        arrow(ax, (x + 0.12, y_fire + 0.25), (x + 0.12, y_s - r))
        arrow(ax, (x + r, y_h + 0.12), (xv - r, y_h + 0.12))
        arrow(ax, (x + 0.32, y_s - 0.3), (xv - 0.22, y_h + 0.35), lw=1.2)     # S resets V
        arrow(ax, (x + 0.12, y_s + r), (x + 0.12, y_loss - 0.38))
        # backward, dashed: dL/dS from above, the surrogate, then into X[t] and back in time
        arrow(ax, (x - 0.2, y_loss - 0.38), (x - 0.2, y_s + r), BACK, True)
        arrow(ax, (x - 0.2, y_s - r), (x - 0.2, y_fire + 0.25), BACK, True)
        arrow(ax, (x - 0.2, y_fire - 0.25), (x - 0.2, y_h + r), BACK, True)
        arrow(ax, (x - 0.2, y_h - r), (x - 0.2, y_x + r), BACK, True)
        if t < T - 1:                                              # V[T-1] is used by nothing
            arrow(ax, (xv - r, y_h - 0.2), (x + r, y_h - 0.2), BACK, True)
        if t:
            arrow(ax, (x - r, y_h - 0.2), (x - half + r, y_h - 0.2), BACK, True)
    # which equation each forward arrow is, on the first column
    x = xs[0]
    ax.text(x + 0.22, (y_x + y_h) / 2, "(N1)", size=10, va="center")
    ax.text(x - half / 2, y_h + 0.3, "(N1)", size=10, ha="center")
    ax.text(x - 0.82, y_fire, "(N2)", size=10, va="center", ha="right")
    ax.text(x + half / 2, y_h + 0.3, "(N3)", size=10, ha="center")

    # on the right: where the surrogate acts, and what the backward pass needs
    xn = xs[-1] + half + 0.75
    ax.text(xn, y_fire + 0.55, "backward through Heaviside:\nits derivative is 0 almost\n"
            "everywhere, so dS/dH is\nreplaced by the surrogate\n"
            r"$\alpha\,\sigma'(\alpha(H - V_{th}))$" + ", σ = sigmoid,\n"
            f"α = {alpha:g} (the official code's)", size=11, color=BACK, va="center")
    arrow(ax, (xn - 0.1, y_fire + 0.25), (xs[-1] + 0.75, y_fire), BACK, lw=1.0, head=10)
    ax.add_patch(plt.Circle((xn + 0.2, y_x + 0.35), 0.2, fc=AMBER, ec=INK, lw=1.2))
    ax.text(xn + 0.55, y_x + 0.55, "kept for the backward\npass: H[t] and S[t] of\nevery step, so the\n"
            "activation memory grows\nlinearly with T", size=11, va="top")

    # the legend and the equations, below
    ax.text(0.4, 1.65, "forward (neuron.py):", size=11, va="center", weight="bold")
    ax.text(0.4, 1.2, "(N1) charge  H[t] = V[t−1] + (X[t] − (V[t−1] − V_reset)) / τ", size=11,
            va="center")
    ax.text(0.4, 0.75, "(N2) fire  S[t] = Heaviside(H[t] − V_th)", size=11, va="center")
    ax.text(0.4, 0.3, "(N3) reset  V[t] = H[t] (1 − S[t]) + V_reset S[t]", size=11, va="center")
    arrow(ax, (9.4, 1.65), (10.3, 1.65))
    ax.text(10.5, 1.65, "forward", size=11, va="center")
    ax.text(9.4, 1.2, f"official code: τ = {config.tau:g}, V_th = {config.v_threshold:g}, "
            "V_reset = 0;", size=11, va="center")
    ax.text(9.4, 0.75, "detached reset: no gradient through the S in (N3)", size=11, va="center")
    arrow(ax, (10.3, 0.3), (9.4, 0.3), BACK, True)
    ax.text(10.5, 0.3, "backward: right to left through time", size=11, va="center", color=BACK)
    save(fig, path)


# ----------------------------------------------------------------------------------------
# 2. The hierarchy

def stage_table(preset: str = "cifar10") -> List[Dict]:
    """The stages that hierarchy.png draws for a preset of qkformer.PRESETS, read from its
    QKFormerConfig and LAYOUTS: per stage its width, number of blocks, attention, heads,
    the SPEDS stride and the token grid after it (side x side)."""
    config = qkformer.QKFormerConfig(**qkformer.PRESETS[preset])
    side, rows = config.img_size, []
    for i, (width, blocks, attention, embed) in enumerate(zip(
            config.stage_widths, config.stage_depths, config.attention, config.layout.embeds)):
        side //= embed.stride
        rows.append(dict(stage=i + 1, width=width, blocks=blocks, attention=attention,
                         heads=config.num_heads, stride=embed.stride, grid=(side, side)))
    return rows


def _config(preset: str) -> qkformer.QKFormerConfig:
    return qkformer.QKFormerConfig(**qkformer.PRESETS[preset])


def _draw_family(ax, y, preset, title):
    """One row of hierarchy.png: the image, each stage's SPEDS and blocks, the head."""
    config, rows = _config(preset), stage_table(preset)
    ax.text(0.3, y + 2.25, title, size=14, weight="bold", va="center")
    box(ax, 0.3, y, 1.7, 1.4, f"image\n{config.in_channels}×{config.img_size}×{config.img_size}\n"
        f"× T = {config.T}", fc=PALE_GREY, size=11)
    x = 2.45
    for row in rows:
        fc, ec = (PALE_ORANGE, ORANGE) if row["attention"] == "ssa" else (PALE_BLUE, BLUE)
        ax.add_patch(Rectangle((x, y - 0.95), 4.5, 2.8, fc="white", ec="#aaaaaa", lw=1.0))
        ax.text(x + 0.12, y + 1.78, f"stage {row['stage']}", size=11, va="top", color="#555555")
        arrow(ax, (x - 0.4, y + 0.7), (x + 0.15, y + 0.7))
        stem = " + stem" if row["stage"] == 1 else ""              # stage 1 starts on the image
        box(ax, x + 0.12, y + 0.1, 1.9, 1.2, f"SPEDS{stem}\ngrid ÷ {row['stride']}", size=10.5)
        arrow(ax, (x + 2.02, y + 0.7), (x + 2.3, y + 0.7))
        name = ATTENTION_NAMES[row["attention"]]
        box(ax, x + 2.3, y + 0.1, 2.08, 1.2, f"{name} block\n× {row['blocks']}", fc=fc, ec=ec,
            size=12, weight="bold")
        h, w = row["grid"]
        ax.text(x + 2.25, y - 0.45, f"{row['width']} channels, {h}×{w} = {h * w:,} tokens",
                ha="center", va="center", size=11)
        x += 4.9
    arrow(ax, (x - 0.4, y + 0.7), (x + 0.05, y + 0.7))
    box(ax, x + 0.05, y, 2.45, 1.4, f"mean over\ntokens and T,\nLinear {config.embed_dim} → "
        f"{config.num_classes}", fc=PALE_GREY, size=11)


def draw_hierarchy(path: str):
    fig, ax = canvas(13, 8.95, 20.1, 13.85)
    ax.text(10.05, 13.35, "QKFormer's hierarchy: a SPEDS patch embedding, then blocks, per stage",
            ha="center", size=16, weight="bold")
    _draw_family(ax, 9.75, "cifar10", "CIFAR-10 (preset cifar10: D = 384, depths = 4)")
    _draw_family(ax, 5.75, "imagenet_10_384", "ImageNet (preset imagenet_10_384: QKFormer-10-384)")

    # SPEDS opened up: stage 2 of the CIFAR model, from the layout
    config = _config("cifar10")
    layout, rows = config.layout.embeds[1], stage_table("cifar10")
    cin, width = rows[0]["width"], rows[1]["width"]
    side_in, side_out = rows[0]["grid"][0], rows[1]["grid"][0]
    y0 = 0.3
    ax.add_patch(Rectangle((0.3, y0), 11.4, 3.85, fc="white", ec="#aaaaaa", lw=1.0))
    ax.text(0.45, y0 + 3.55, "SPEDS, Eq. (9): Y = F(Z) + SN(BN(W_d Z))   (CIFAR-10, stage 2)",
            size=12, weight="bold", va="center")
    box(ax, 0.5, y0 + 1.3, 1.5, 1.0, f"Z\n{cin}×{side_in}×{side_in}", fc=PALE_GREY, size=11)
    x, ym = 2.4, y0 + 2.45                                         # F's boxes, their middle
    arrow(ax, (2.0, y0 + 2.0), (x, ym))
    for j, (divisor, pool) in enumerate(layout.main):
        if j:
            arrow(ax, (x - 0.4, ym), (x, ym))
        label = f"conv 3×3, BN,\n{'max-pool, ' if pool else ''}SN → {width // divisor}"
        box(ax, x, ym - 0.45, 2.6, 0.9, label, size=10.5)
        x += 3.0
    ax.text(2.4, ym + 0.6, "F: the conv path", size=10.5, color="#555555")
    ys = y0 + 1.0                                                  # the shortcut's middle
    box(ax, 2.4, ys - 0.45, 5.6, 0.9,
        f"W_d: conv 1×1, stride {layout.shortcut_stride}, BN, SN → {width}", fc=PALE_BLUE,
        ec=BLUE, size=10.5)
    ax.text(2.4, y0 + 0.12, "the deformed shortcut (Spikformer's SPS has none)", size=10,
            color=BLUE, va="bottom")
    arrow(ax, (2.0, y0 + 1.6), (2.4, ys))
    xp, yp = 8.65, (ym + ys) / 2
    ax.add_patch(plt.Circle((xp, yp), 0.3, fc="white", ec=INK, lw=1.4))
    ax.text(xp, yp, "+", ha="center", va="center", size=16)
    arrow(ax, (8.0, ym), (xp - 0.18, yp + 0.24))
    arrow(ax, (8.0, ys), (xp - 0.18, yp - 0.24))
    arrow(ax, (xp + 0.3, yp), (9.4, yp))
    box(ax, 9.4, yp - 0.65, 2.15, 1.3, f"Y\n{width}×{side_out}×{side_out}\nvalues 0, 1, 2",
        fc=PALE_GREY, size=10.5)

    # a block opened up, Eq. (8)
    x0 = 12.0
    ax.add_patch(Rectangle((x0, y0), 7.8, 3.85, fc="white", ec="#aaaaaa", lw=1.0))
    ax.text(x0 + 0.15, y0 + 3.55, "A block, Eq. (8)", size=12, weight="bold", va="center")
    ax.text(x0 + 0.15, y0 + 3.0, "X' = X + Attn(X),   X'' = X' + MLP(X')", size=11, va="center")
    yb = y0 + 1.35
    box(ax, x0 + 0.15, yb, 0.8, 0.8, "X", fc=PALE_GREY, size=12)
    box(ax, x0 + 1.45, yb, 2.1, 0.8, "QKTA or SSA", fc=PALE_BLUE, ec=BLUE, size=10.5)
    ax.add_patch(plt.Circle((x0 + 4.0, yb + 0.4), 0.25, fc="white", ec=INK, lw=1.4))
    ax.text(x0 + 4.0, yb + 0.4, "+", ha="center", va="center", size=14)
    box(ax, x0 + 4.6, yb, 2.2, 0.8, "MLP", size=11)
    ax.add_patch(plt.Circle((x0 + 7.25, yb + 0.4), 0.25, fc="white", ec=INK, lw=1.4))
    ax.text(x0 + 7.25, yb + 0.4, "+", ha="center", va="center", size=14)
    arrow(ax, (x0 + 0.95, yb + 0.4), (x0 + 1.45, yb + 0.4))
    arrow(ax, (x0 + 3.55, yb + 0.4), (x0 + 3.75, yb + 0.4))
    arrow(ax, (x0 + 4.25, yb + 0.4), (x0 + 4.6, yb + 0.4))
    arrow(ax, (x0 + 6.8, yb + 0.4), (x0 + 7.0, yb + 0.4))
    arrow(ax, (x0 + 1.2, yb + 0.4), (x0 + 4.0, yb + 0.65), rad=-0.45, lw=1.3)
    arrow(ax, (x0 + 4.3, yb + 0.4), (x0 + 7.25, yb + 0.65), rad=-0.4, lw=1.3)
    ax.text(x0 + 5.7, yb - 0.3, f"two 1×1 conv-BN-SN,\nD → {config.mlp_ratio:g}D → D "
            "(D: the stage's width)", ha="center", va="top", size=10)
    ax.text(x0 + 0.15, y0 + 0.12, "the sums carry spike counts (0, 1, 2, ...)", size=10,
            color="#555555", va="bottom")
    save(fig, path)


# ----------------------------------------------------------------------------------------
# 3. QKTA next to SSA

def toy_attention(n: int = 8, d: int = 4, seed: int = 703, rate: float = 0.5) -> Dict[str, np.ndarray]:
    """The numbers qkta_vs_ssa.png shows: one head, one time step (t = 0), N = n tokens of
    d channels, random spikes; the attention neurons are the model's own (QKFormerConfig's
    attention neuron: threshold 0.5, tau = 2, the official code's), run as neuron.py's
    reference loop. Rows are tokens (N, d), as in the paper. The seed is one where A_t drops
    two tokens and SSA's neuron fires at t = 0 (a count of 8 or more): both steps visible."""
    config = qkformer.QKFormerConfig()
    sn = config.make_neuron(attention=True)
    sn.reference = True                                            # the plain loop: no compiling
    rng = np.random.default_rng(seed)
    q, k, v = ((rng.random((n, d)) < rate).astype(np.float32) for _ in range(3))   # (N, d) each

    def fire(x):                                                   # one time step: (1, ...) in
        return sn(torch.from_numpy(x)[None])[0].numpy()

    row_sum = q.sum(axis=1, keepdims=True)                         # (N, 1)  Q summed over channels
    a_t = fire(row_sum)                                            # (N, 1)  Eq. (6): A_t
    qk = q @ k.T                                                   # (N, N)  Q K^T
    qkv = qk @ v                                                   # (N, d)  Q K^T V
    scale = qkformer.SpikingSelfAttention(d, 1).scale              # the official code's 0.125
    return dict(q=q, k=k, v=v, row_sum=row_sum, a_t=a_t, masked=a_t * k, qk=qk, qkv=qkv,
                scale=scale, ssa=fire(qkv * scale))                # SN(Q K^T V s), Eq. (4)


def _matrix(ax, x, top, values, kind, shade=BLUE):
    """Draw `values` (rows, cols) with its upper left corner at (x, top), one unit per entry:
    kind "spike": 1 filled, 0 white; "count": grey by value, the number written in."""
    rows, cols = values.shape
    peak = max(float(values.max()), 1.0)
    for i in range(rows):
        for j in range(cols):
            value = float(values[i, j])
            if kind == "spike":
                fc = shade if value else "white"
            else:
                fc = (1 - 0.45 * value / peak,) * 3
            ax.add_patch(Rectangle((x + j, top - i - 1), 1, 1, fc=fc, ec="#999999", lw=0.6))
            if kind == "count":
                ax.text(x + j + 0.5, top - i - 0.5, f"{value:g}", ha="center", va="center",
                        size=10)
    ax.add_patch(Rectangle((x, top - rows), cols, rows, fc="none", ec=INK, lw=1.4))


def draw_qkta_vs_ssa(path: str):
    toy = toy_attention()
    n, d = toy["q"].shape
    rows = stage_table("cifar10")
    fig, ax = canvas(15.3, 8.4, 51, 28)
    bottom = 7.0                                                   # the matrices' lower edge
    top = bottom + n

    def label(x, text, y=top + 0.35, **kw):
        ax.text(x, y, text, ha="center", va="bottom", size=12, **kw)

    def shape(x, text, y=bottom - 0.35):
        ax.text(x, y, text, ha="center", va="top", size=11, color="#444444")

    def between(x0, x1, text="", y=bottom + n / 2):
        arrow(ax, (x0 + 0.15, y), (x1 - 0.15, y))
        if text:
            ax.text((x0 + x1) / 2, y + 0.35, text, ha="center", va="bottom", size=10.5)

    # Left: QKTA
    ax.text(11.5, 27.0, "Q-K token attention (QKTA)", ha="center", size=15, weight="bold",
            color=BLUE)
    ax.text(11.5, 26.0, "QKFormer, Section 3.2, Eq. (5)-(7)", ha="center", size=11.5)
    for i, line in enumerate([
            "Eq. (5)   Q = SN(BN(X W_Q)),   K = SN(BN(X W_K))",
            "Eq. (6)   $A_t$ = SN(sum of Q over the channels),",
            "              X' = $A_t$ ⊗ K   (a mask on the tokens of K)",
            "Eq. (7)   X'' = SN(BN(Linear(X')))",
            "no V, no N × N map, no scale"]):
        ax.text(0.8, 23.0 - 1.1 * i, line, size=11.5, va="center")
    xq, xsum, xa, xk, xm = 1.3, 7.6, 10.7, 13.1, 18.7              # Q, row sum, A_t, K, X'
    _matrix(ax, xq, top, toy["q"], "spike")
    label(xq + d / 2, "Q")
    shape(xq + d / 2, "N × d")
    ax.text(xq - 0.25, bottom + n / 2, "N tokens", rotation=90, ha="right", va="center", size=11)
    ax.text(xq + d / 2, top + 1.2, "d channels", ha="center", va="bottom", size=11)
    between(xq + d, xsum, "row\nsum")
    _matrix(ax, xsum, top, toy["row_sum"], "count")
    shape(xsum + 0.5, "N × 1")
    between(xsum + 1, xa, "SN")
    _matrix(ax, xa, top, toy["a_t"], "spike")
    label(xa + 0.5, "$A_t$")
    shape(xa + 0.5, "N × 1")
    ax.text((xa + 1 + xk) / 2, bottom + n / 2, "⊗", ha="center", va="center", size=18)
    _matrix(ax, xk, top, toy["k"], "spike")
    label(xk + d / 2, "K")
    shape(xk + d / 2, "N × d")
    ax.text((xk + d + xm) / 2, bottom + n / 2, "=", ha="center", va="center", size=18)
    _matrix(ax, xm, top, toy["masked"], "spike")
    for i in np.flatnonzero(toy["a_t"][:, 0] == 0):                # the tokens A_t drops
        ax.add_patch(Rectangle((xm, top - i - 1), d, 1, fc="#dddddd", ec="#999999", lw=0.6,
                               hatch="////"))
    label(xm + d / 2, "X'")
    shape(xm + d / 2, "N × d")
    ax.text(11.5, 4.55, "each of the N·d spikes is touched once (one sum, one AND):",
            ha="center", size=11.5, va="center")
    ax.text(11.5, 3.55, "time O(N d),  extra memory N values ($A_t$)", ha="center", size=13,
            weight="bold", va="center", color=BLUE)

    ax.plot([24.2, 24.2], [3.0, 27.6], color="#bbbbbb", lw=1.0)

    # Right: SSA, drawn as matrix products: each factor sits left of / above its product
    ax.text(38.0, 27.0, "Spikformer's spiking self-attention (SSA)", ha="center", size=15,
            weight="bold", color=ORANGE)
    ax.text(38.0, 26.0, "QKFormer, Section 3.1, Eq. (3)-(4)", ha="center", size=11.5)
    ax.text(25.2, 23.0, "Eq. (3)   Q, K, V = SN(BN(X W))", size=11.5, va="center")
    ax.text(25.2, 21.9, f"Eq. (4)   SN($QK^TV$ × {toy['scale']:g})", size=11.5, va="center")
    ax.text(25.2, 20.6, f"{toy['scale']:g}: the official\ncode's scale", size=10.5, va="top",
            color="#444444")
    xq, xqk, xo, xs = 25.4, 30.4, 39.4, 45.6
    _matrix(ax, xq, top, toy["q"], "spike", ORANGE)
    label(xq + d / 2, "Q")
    shape(xq + d / 2, "N × d")
    _matrix(ax, xqk, top + 1 + d, toy["k"].T, "spike", ORANGE)
    ax.text(xqk - 0.3, top + 1 + d / 2, "$K^T$", ha="right", va="center", size=12)
    shape(xqk + n / 2, "d × N", y=top + 0.9)
    _matrix(ax, xqk, top, toy["qk"], "count")
    shape(xqk + n / 2, "$QK^T$:  N × N")
    _matrix(ax, xo, top + 1 + n, toy["v"], "spike", ORANGE)
    ax.text(xo - 0.3, top + 1 + n / 2, "V", ha="right", va="center", size=12)
    shape(xo + d / 2, "N × d", y=top + 0.9)
    _matrix(ax, xo, top, toy["qkv"], "count")
    shape(xo + d / 2, "$QK^TV$: N × d")
    between(xo + d, xs, f"× {toy['scale']:g}\nSN")
    _matrix(ax, xs, top, toy["ssa"], "spike", ORANGE)
    shape(xs + d / 2, "N × d")
    ax.text(38.0, 4.55, "the N × N map $QK^T$ is built (Spikformer's order):",
            ha="center", size=11.5, va="center")
    ax.text(38.0, 3.55, "time O(N² d),  memory N × N per head", ha="center", size=13,
            weight="bold", va="center", color=ORANGE)

    stage1, stage3 = rows[0], rows[-1]
    n1, d1 = stage1["grid"][0] * stage1["grid"][1], stage1["width"] // stage1["heads"]
    n3 = stage3["grid"][0] * stage3["grid"][1]
    notes = [f"Drawn: one head, one time step (t = 0), N = {n} tokens, d = {d} channels; spikes "
             "coloured, counts in grey, the tokens $A_t$ drops hatched.",
             "Without a softmax, $Q(K^TV)$ gives the same with a d × d map in O(N d²): the order "
             "qkformer.SpikingSelfAttention uses.",
             f"CIFAR-10 model, stage 1 (N = {n1:,}, d = {stage1['width']}/{stage1['heads']} = {d1}):"
             f" $A_t$ has {n1:,} entries per head, $QK^T$ would have {n1 * n1:,}; SSA is used "
             f"only in stage {stage3['stage']} (N = {n3})."]
    for i, line in enumerate(notes):
        ax.text(25.5, 2.25 - 0.95 * i, line, ha="center", va="center", size=10.5)
    save(fig, path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="scratch", help="folder for the PNGs (default: scratch)")
    args = parser.parse_args(argv)
    os.makedirs(args.output, exist_ok=True)
    for name, draw in zip(NAMES, (draw_bptt, draw_hierarchy, draw_qkta_vs_ssa)):
        file = os.path.join(args.output, name)
        with plt.rc_context(STYLE):
            draw(file)
        print(f"{file}: {os.path.getsize(file) / 1024:.0f} KB")


if __name__ == "__main__":
    main()
