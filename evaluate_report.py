"""The report evaluate.py prints: metrics.json's numbers as tables a person reads (accuracy,
the firing rate of every spiking layer and per stage, the paper's Table 4, and the energy of
Appendix 6.6 row by row). A wing of evaluate.py, which computes every number; this file only
formats them, so that what is printed and what metrics.json holds cannot disagree. It also
holds the output folder those numbers go to (output_folder, write_metrics): named after the
run, locked while an evaluation writes there, metrics.json written atomically.

Reference: Zhou et al., "QKFormer: Hierarchical Spiking Transformer using Q-K Attention",
NeurIPS 2024 (arXiv:2403.16552): Table 4 (Section 4.3), Eq. (19)-(21) (Appendix 6.6).
Imports of ours: checkpoints (atomic files, folder locks), nothing that computes.
"""
import contextlib
import json
import os

from checkpoints import lock_folder, output_folder_problem, remove_temporaries, write_text_atomically

# Temporary files of a killed evaluation (checkpoints.write_atomically's names): removed by
# the next one in the folder, which holds its lock.
STALE_TEMPORARY = ("metrics.json.*.tmp", "*.png.*.tmp")


def default_output(checkpoint: str) -> str:
    """eval/<the checkpoint's folder>-<its file name without extension>: runs/a/best.pt ->
    eval/a-best. The best.pt of every run has the same name; its folder tells the runs apart,
    and the stem best.pt from last.pt of one run."""
    path = os.path.abspath(checkpoint)
    folder, stem = os.path.basename(os.path.dirname(path)), os.path.splitext(os.path.basename(path))[0]
    return os.path.join("eval", f"{folder}-{stem}" if folder else stem)


@contextlib.contextmanager
def output_folder(output, checkpoint: str):
    """The output folder (--output, else default_output), created and locked (<out>/.lock,
    checkpoints.lock_folder) while the evaluation runs: a second evaluate.py, or a train.py,
    on the same folder is refused before it computes anything. Yields its path."""
    out = output or default_output(checkpoint)
    problem = output_folder_problem(out)  # a file, or a symbolic link to nowhere
    if problem:
        raise ValueError(f"--output {out} {problem}: choose another --output")
    os.makedirs(out, exist_ok=True)
    lock = lock_folder(out, "output folder", "evaluate.py")
    if lock is None:
        raise ValueError(f"another process is writing to {out} (an evaluate.py or a train.py holds "
                         f"{os.path.join(out, '.lock')}): wait for it to end, or choose another --output")
    try:
        remove_temporaries(out, STALE_TEMPORARY)             # nobody else writes here: we hold the lock
        say_replaced(out, checkpoint)
        yield out
    finally:
        lock.close()


def say_replaced(out: str, checkpoint: str):
    """A note when `out` holds the results of another checkpoint, which this evaluation replaces."""
    try:
        with open(os.path.join(out, "metrics.json")) as f:
            before = json.load(f).get("checkpoint")
    except (OSError, ValueError, AttributeError):            # none, unreadable, or not ours
        return
    if before and before != os.path.abspath(checkpoint):
        print(f"note: {out} holds the results of {before}; this evaluation of "
              f"{os.path.abspath(checkpoint)} replaces them")


def write_metrics(out: str, metrics: dict):
    """metrics.json, last (it marks a finished evaluation), atomically: a kill or a full disk
    leaves the previous file whole, or none, never half of one. Then says what was written."""
    path = os.path.join(out, "metrics.json")
    try:
        write_text_atomically(path, json.dumps(metrics, indent=1))
    except OSError as e:
        kept = "the previous one is kept" if os.path.exists(path) else "none was written"
        raise ValueError(f"cannot write {path} ({e.strerror or e}; a full disk?): nothing half-written, "
                         f"{kept}") from None
    print(f"\nwrote {out}/metrics.json" + "".join(f", {os.path.basename(p)}" for p in metrics["pictures"]))


def print_report(metrics: dict):
    """Print one evaluation's report; `metrics` is what evaluate.run_evaluation writes into
    metrics.json (the pictures' entries included, when it drew any)."""
    print_accuracy(metrics)
    print_firing_rates(metrics)
    print_energy(metrics["energy"])
    if metrics.get("picture_images"):
        print(f"\npictures of {', '.join(metrics['picture_images']['titles'])}")
        if metrics["picture_images"]["note"]:              # another order than the official file
            print(f"note: {metrics['picture_images']['note']}")


def print_accuracy(metrics: dict):
    """What was evaluated and how well: top-1, top-k (k = 5, or fewer classes), the loss."""
    flips = ", each also mirrored (--flip-test)" if metrics.get("flip_test") else ""
    print(f"\n{metrics['dataset']}: {metrics['images']} test images{flips}, T = {metrics['T']}")
    print(f"top-1 {metrics['top1']:.2f} %   top-{metrics['top5_k']} {metrics['top5']:.2f} %   "
          f"loss {metrics['loss']:.4f}")
    # Said with every result it affects: such a number is not comparable to another batch size.
    if metrics["official_quirks"]:
        print("official_quirks on (an official checkpoint): the stage-3 SSA neuron runs over "
              "time x batch as in the official code, so results depend on --batch-size and on "
              "the order of the test images (the official repository's issue 14: HST-10-384 "
              "78.73 % at batch 32, 74.20 % at batch 1)")


def print_firing_rates(metrics: dict):
    """Every spiking layer's firing rate, in network order; per stage; and, for models with
    Q-K token attention, the rows of the paper's Table 4 with one column per stage."""
    print("\nFiring rate of every spiking layer (spikes per neuron per time step):")
    for name, r in metrics["firing_rates"].items():
        print(f"  {name:<44} {r:.4f}")
    print("per stage: " + ", ".join(f"{s} {r:.4f}" for s, r in metrics["stage_firing_rates"].items()))
    if metrics["table4"]:
        stages = list(metrics["table4"])
        print("\nAs the paper's Table 4:" + "".join(f"{s:>10}" for s in stages))
        for row in metrics["table4"][stages[0]]:
            print(f"  {row:<20}" + "".join(f"{metrics['table4'][s][row]:>10.4f}" for s in stages))


def print_energy(e: dict):
    """The energy per image (evaluate.energy_report): one row per counted operation, in the
    order the network runs them, so a reader can check any row's arithmetic (MACs x input fr
    x T = SOPs), then the totals of Eq. (20) and (21)."""
    print(f"\nEnergy per image (Appendix 6.6): E_MAC = {e['E_MAC_pJ']} pJ, E_AC = {e['E_AC_pJ']} pJ")
    print(f"  {'layer':<52}{'kind':>5}{'MACs (T=1)':>14}{'input fr':>10}{'MACs or SOPs':>15}{'uJ':>9}")
    for r in e["layers"]:
        rate = "" if r["input_rate"] is None else f"{r['input_rate']:.4f}"   # None: never called
        print(f"  {r['name']:<52}{r['kind']:>5}{r['macs']:>14,.0f}{rate:>10}{r['ops']:>15,.0f}"
              f"{r['energy_pJ'] * 1e-6:>9.3f}")
    print(f"  MAC layers (real-valued input): {', '.join(e['mac_layers']) or 'none (event counts)'}; "
          f"every other row is AC.")
    print(f"  SNN: {e['SOPs']:,.0f} SOPs + {e['MACs_first_layer']:,} MACs -> E = {e['E_snn_mJ']:.4f} mJ")
    print(f"  ANN of the same shape: {e['ANN_MACs']:,} MACs -> E = {e['E_ann_mJ']:.4f} mJ "
          f"({e['ann_over_snn']:.1f} x the SNN)")
