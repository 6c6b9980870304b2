"""The report evaluate.py prints: metrics.json's numbers as tables a person reads (accuracy,
the firing rate of every spiking layer and per stage, the paper's Table 4, and the energy of
Appendix 6.6 row by row). A wing of evaluate.py, which computes every number; this file only
formats them, so that what is printed and what metrics.json holds cannot disagree.

Reference: Zhou et al., "QKFormer: Hierarchical Spiking Transformer using Q-K Attention",
NeurIPS 2024 (arXiv:2403.16552): Table 4 (Section 4.3), Eq. (19)-(21) (Appendix 6.6).
Imports nothing of ours.
"""


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
