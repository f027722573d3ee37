"""``latentharmonize evaluate`` on the command line: its flags, the run, and the plain-text summary it prints."""
from __future__ import annotations

import argparse

from .. import options
from ..progress import Progress
from .evaluate import evaluate
from .goals import PAPER_GAIN_PERCENT
from .representations import OtherEncoder, of_kind
from .survival_comparison import SURVIVAL_ONLY


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("cohort", help="evaluation cohort CSV (patients NOT used in training)")
    options.add_model(parser)
    options.add_out(parser, "output folder for metrics.json, report.html and figures")
    parser.add_argument("--train-cohort", help="training cohort CSV the baselines and clusters are fitted on "
                                              "(default: the cohort recorded in the bundle)")
    for r in of_kind(OtherEncoder):
        parser.add_argument(f"--{r.option}", help=r.help)
    parser.add_argument("--survival-cohort", help="cohort CSV with time and event whose patients the survival "
                                                 "comparison uses (default: the training and evaluation patients)")
    options.add_seed(parser)
    parser.add_argument("--quick", action="store_true", help="subsample patients and latents (smoke test, minutes)")
    options.add_device(parser, default="cpu")
    options.add_overwrite(parser)
    options.add_output_style(parser, quiet=False)


def run(args) -> int:
    bundles = {r.name: getattr(args, r.option) for r in of_kind(OtherEncoder) if getattr(args, r.option)}
    metrics = evaluate(args.cohort, args.out, model=args.model, train_cohort=args.train_cohort, bundles=bundles,
                       seed=args.seed, quick=args.quick, overwrite=args.overwrite, device=args.device,
                       progress=Progress(machine=args.progress_lines), survival_cohort=args.survival_cohort)
    print(format_summary(metrics))
    return 0


def format_summary(metrics: dict) -> str:
    """A plain-text table of the headline numbers (what the README carries)."""
    lines = [f"{'representation':20s} {'ARI':>6s} {'NMI':>6s} {'Dice':>6s} {'probe':>6s} {'C-index':>8s}"]
    for n, m in metrics["consistency"].items():
        c = metrics["survival"].get(n, {}).get("c_index", float("nan"))
        p = metrics["probe"].get(n, float("nan"))
        lines.append(f"{n:20s} {m['ari']:6.3f} {m['nmi']:6.3f} {m['dice']:6.3f} {p:6.3f} {c:8.3f}")
    lines.append(f"{'chance (probe)':20s} {'':6s} {'':6s} {'':6s} {metrics['probe']['chance']:6.3f}")
    for k in SURVIVAL_ONLY:
        if k in metrics["survival"]:
            lines.append(f"{k:20s} {'':6s} {'':6s} {'':6s} {'':6s} {metrics['survival'][k]['c_index']:8.3f}")
    ahead = metrics.get("survival_redraws", {}).get("rotated_ahead_share", {})
    if ahead:
        lines.append(f"rotated C-index ahead over {metrics['survival_redraws']['n_draws']} outcome draws: "
                     + ", ".join(f"of {n} {100 * v:.0f} %" for n, v in ahead.items()))
    icc = metrics.get("risk_reproducibility", {})
    if icc:
        lines.append("risk ICC across acquisitions: " + ", ".join(f"{n} {m['icc']:.3f}" for n, m in icc.items()))
    spread = metrics.get("seed_spread", {})
    if spread:
        lines.append("truth ARI over mixture seeds (mean): " + ", ".join(
            f"{n} {m['truth_ari_mean']:.3f}" for n, m in spread.items() if n != "rotated_ahead"))
    g = metrics["relative_gain"]["rotated_vs_entangled_percent"]
    lines.append("rotated vs entangled: " + ", ".join(f"{m.upper()} {g[m]:+.2f} % (paper +{PAPER_GAIN_PERCENT[m]:.2f} %)"
                                                      for m in PAPER_GAIN_PERCENT))
    return "\n".join(lines)
