"""Pictures: the wing that draws what the core files compute.

Here: train.py's curves.png, the loss and accuracy of a run per epoch, redrawn from its
whole log.jsonl after every epoch (train_guards.finish_epoch calls it). It imports no entry
script, so that train.py and evaluate.py can both use it.
"""
from qkformer import write_atomically


def plot_curves(records, path):
    """Loss and accuracy per epoch, redrawn from the whole log into a PNG."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no window: works on servers without a display
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in records]
    evals = [r for r in records if r.get("top1") is not None]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(epochs, [r["train_loss"] for r in records], label="train loss (augmented)")
    if evals:
        ax1.plot([r["epoch"] for r in evals], [r["test_loss"] for r in evals], "o-", label="test loss")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("cross-entropy")
    ax1.legend()
    ax2.plot(epochs, [r["train_top1"] for r in records], label="train top-1 (augmented)")
    if evals:
        ax2.plot([r["epoch"] for r in evals], [r["top1"] for r in evals], "o-", label="test top-1")
        ax2.plot([r["epoch"] for r in evals], [r["top5"] for r in evals], "o-", label="test top-5")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("accuracy (%)")
    ax2.legend()
    fig.tight_layout()
    try:
        # atomically: a kill while drawing leaves the previous picture, not half a PNG
        write_atomically(path, lambda f: fig.savefig(f, format="png", dpi=100))
    finally:
        plt.close(fig)
