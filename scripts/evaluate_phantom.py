"""Reproduce the README's evaluation table on the project's phantom.

Steps: take the model bundle (default: the bundled default model) and regenerate the phantom cohort it was trained
on from the seed and size in its manifest (if there is no bundle, generate a training cohort and train one); generate
a held-out test cohort from another seed (patients never seen in training) and a multi-site survival cohort
from a third (each patient scanned once, under a randomly drawn acquisition); train an unORANIC bundle on the training
cohort for that baseline; run ``latentharmonize evaluate``, and copy
``metrics.json``, the figures and a Markdown table into ``--out`` (default ``docs/results``).

    .venv/bin/python scripts/evaluate_phantom.py --work /tmp/lh-eval
    .venv/bin/python scripts/evaluate_phantom.py --work /tmp/lh-eval --quick     # smoke run, minutes

With ``--drawn-settings`` the cohorts draw each scan's kernel, dose, thickness and calibration from continuous ranges
(``latentharmonize.phantom.SETTING_RANGES``): training patients from the ``train`` ranges, test and survival patients
from the ``heldout`` ones, which do not overlap; a bundle is then trained here on that training cohort with the
shipped default's options (or ``--model`` with ``--train-cohort``).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from latentharmonize.errors import LatentHarmonizeError
from latentharmonize.evaluation.command import format_summary
from latentharmonize.evaluation.cluster_stability import STABILITY_HEAD, stability_rows
from latentharmonize.evaluation.evaluate import FIGURES, evaluate
from latentharmonize.evaluation.goals import PAPER_GAIN_PERCENT
from latentharmonize.evaluation.report import (READOUT_HEAD, ci_text, readout_rows, redraw_rows, reproducibility_rows,
                                                versus_rows)
from latentharmonize.evaluation.seed_spread import SPREAD_HEAD, spread_rows
from latentharmonize.evaluation.survival_comparison import SURVIVAL_ONLY
from latentharmonize.evaluation.tissue import KERNEL_HEAD, RECALL_HEAD, kernel_rows, recall_rows
from latentharmonize.progress import Progress

REPO = Path(__file__).resolve().parents[1]
TEST_SEED_OFFSET = 1000  # test patients come from another seed than any training cohort
SURVIVAL_SEED_OFFSET = 2000  # and the survival cohort from a third


def _cohort(folder: Path, n_patients: int, seed: int, per_patient: int | None = None, drawn: str | None = None) -> Path:
    from latentharmonize.phantom import generate_cohort

    csv = folder / "cohort.csv"
    if not csv.exists():
        generate_cohort(folder, n_patients=n_patients, seed=seed, acquisitions_per_patient=per_patient,
                        drawn_settings=drawn)
    return csv


def _bundle_training_cohort(model, folder: Path) -> Path:
    """Regenerate the phantom cohort a bundle was trained on, from the seed and size its manifest records."""
    from latentharmonize.bundle import load_bundle

    training = load_bundle(model).manifest["training"]
    if "seed" not in training or "n_patients" not in training:
        raise SystemExit(f"The bundle {model} does not record its training seed and size; give --train-cohort.")
    return _cohort(folder, int(training["n_patients"]), int(training["seed"]))


def _bundle(path: Path, cohort_csv: Path, encoder: str, epochs: int | None, seed: int, progress, **options) -> Path:
    from latentharmonize.training import TrainConfig, train

    if not (path / "manifest.json").exists():
        train(cohort_csv, path, TrainConfig(seed=seed, epochs=epochs, encoder=encoder, **options), progress=progress)
    return path


def _default_options() -> dict:
    """The recipe of the shipped default bundle, so that a bundle trained here is of its kind."""
    from latentharmonize.bundle import default_bundle_path, load_bundle
    from latentharmonize.training.summary import recipe_options

    return recipe_options(load_bundle(default_bundle_path()))


def markdown_table(metrics: dict) -> str:
    """The README tables: consistency (with CIs), truth ARI, probe and C-index per representation, gains vs paper,
    rotated (and the bundle's own clusters) minus every other representation paired over patients, and the tissue
    read-out where there is one."""
    cons, probe, surv, truth = metrics["consistency"], metrics["probe"], metrics["survival"], metrics["truth_agreement"]
    lines = ["| representation | ARI | NMI | Dice | ARI vs truth | acquisition probe | survival C-index |",
             "|---|---|---|---|---|---|---|"]
    for name, m in cons.items():
        c_index = f"{surv[name]['c_index']:.3f}" if name in surv else "–"
        truth_ari = f"{truth[name]['ari']:.3f}" if name in truth else "–"
        probe_acc = f"{probe[name]:.3f}" if name in probe else "–"
        consistency = " | ".join(ci_text(m, k) for k in ("ari", "nmi", "dice"))
        lines.append(f"| {name} | {consistency} | {truth_ari} | {probe_acc} | {c_index} |")
    lines.append(f"| chance | | | | | {probe['chance']:.3f} | |")
    for name in SURVIVAL_ONLY:
        if name in surv:
            lines.append(f"| {name} | | | | | | {surv[name]['c_index']:.3f} |")
    gains = metrics["relative_gain"]["rotated_vs_entangled_percent"]
    lines += ["", "| rotated vs entangled | ARI | NMI | Dice |", "|---|---|---|---|",
              "| this phantom | " + " | ".join(f"{gains[m]:+.2f} %" for m in PAPER_GAIN_PERCENT) + " |",
              "| paper (Pan et al. 2025) | " + " | ".join(f"+{PAPER_GAIN_PERCENT[m]:.2f} %" for m in PAPER_GAIN_PERCENT) + " |"]
    for head, rows in ((SPREAD_HEAD, spread_rows(metrics)), (RECALL_HEAD, recall_rows(metrics)),
                       (KERNEL_HEAD, kernel_rows(metrics)), (STABILITY_HEAD, stability_rows(metrics))):
        if rows:
            lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines += ["", "| rotated minus | ARI | NMI | Dice | survival C-index |", "|---|---|---|---|---|"]
    lines += ["| " + " | ".join(row) + " |" for row in versus_rows(metrics)]
    bundle = versus_rows(metrics, "bundle_versus")
    if bundle:
        lines += ["", "| bundle's own clusters minus | ARI | NMI | Dice | survival C-index |", "|---|---|---|---|---|"]
        lines += ["| " + " | ".join(row) + " |" for row in bundle]
    repro = reproducibility_rows(metrics)
    if repro:
        lines += ["", "| risk reproducibility | risk ICC across acquisitions | rotated minus |", "|---|---|---|"]
        lines += ["| " + " | ".join(row) + " |" for row in repro]
    redraws = redraw_rows(metrics)
    if redraws:
        lines += ["", f"| over {metrics['survival_redraws']['n_draws']} fresh outcome draws | expected C-index ± SD | rotated ahead in |",
                  "|---|---|---|"]
        lines += ["| " + " | ".join(row) + " |" for row in redraws]
    readout = metrics.get("tissue_readout", {})
    if readout:
        lines += ["", "| " + " | ".join(READOUT_HEAD) + " |", "|" + "---|" * len(READOUT_HEAD)]
        lines += ["| " + " | ".join(row) + " |" for row in readout_rows(metrics)]
        lines.append(f"| chance | {readout['chance']['balanced_accuracy']:.3f} |" + " |" * (len(READOUT_HEAD) - 2))
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="scratch folder for cohorts, bundles and the run")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "results", help="where metrics.json and figures go")
    parser.add_argument("--model", type=Path, help="bundle to evaluate (default: the bundled default model)")
    parser.add_argument("--train-cohort", type=Path,
                        help="training cohort CSV (default: regenerate the bundle's own phantom training cohort)")
    parser.add_argument("--train-patients", type=int, default=10, help="training patients when a bundle is trained here")
    parser.add_argument("--test-patients", type=int, default=20)
    parser.add_argument("--survival-patients", type=int, default=960,
                        help="patients of the multi-site survival cohort, each scanned once under a random "
                             "acquisition (0: survival on the training and test patients instead)")
    parser.add_argument("--unoranic-epochs", type=int, default=None, help="epochs of the unORANIC baseline (default: those of the evaluated bundle)")
    parser.add_argument("--no-unoranic", action="store_true", help="skip the unORANIC baseline")
    parser.add_argument("--drawn-settings", action="store_true",
                        help="train on scans drawn from the train setting ranges, test and survival on held-out ranges")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    progress = Progress()
    try:
        from latentharmonize.bundle import default_bundle_path, load_bundle

        held = "heldout" if args.drawn_settings else None
        model = args.model or (args.work / "model" if args.drawn_settings else default_bundle_path())
        if args.drawn_settings and not (Path(model) / "manifest.json").exists():
            seed, epochs = args.seed, None
            train_csv = args.train_cohort or _cohort(args.work / "train", args.train_patients, seed, drawn="train")
            model = _bundle(Path(model), train_csv, "ae", None, seed, progress, **_default_options())
        elif args.drawn_settings:
            if args.train_cohort is None:
                raise SystemExit("--drawn-settings with an existing --model needs its --train-cohort.")
            train_csv = args.train_cohort
            trained = load_bundle(model).manifest["training"]
            seed, epochs = int(trained.get("seed", args.seed)), trained.get("epochs")
        elif (Path(model) / "manifest.json").exists():
            train_csv = args.train_cohort or _bundle_training_cohort(model, args.work / "train")
            trained = load_bundle(model).manifest["training"]
            seed, epochs = int(trained.get("seed", args.seed)), trained.get("epochs")
        else:
            seed, epochs = args.seed, None
            train_csv = args.train_cohort or _cohort(args.work / "train", args.train_patients, seed)
            print(f"No bundle at {model}: training one on {train_csv}")
            model = _bundle(args.work / "model", train_csv, "ae", None, seed, progress, **_default_options())
        test_csv = _cohort(args.work / "test", args.test_patients, seed + TEST_SEED_OFFSET, drawn=held)
        unoranic = None if args.no_unoranic else _bundle(args.work / "unoranic", train_csv, "unoranic",
                                                         args.unoranic_epochs or epochs, seed, progress)
        survival_csv = None
        if args.survival_patients > 0:
            survival_csv = _cohort(args.work / f"survival{args.survival_patients}", args.survival_patients,
                                   seed + SURVIVAL_SEED_OFFSET, per_patient=1, drawn=held)
        metrics = evaluate(test_csv, args.work / "eval", model=model, train_cohort=train_csv,
                           bundles={"unoranic": unoranic} if unoranic else None, seed=args.seed, quick=args.quick,
                           overwrite=True, progress=progress, survival_cohort=survival_csv)
    except LatentHarmonizeError as err:
        print(f"evaluate_phantom: error: {err}", file=sys.stderr)
        return err.exit_code
    args.out.mkdir(parents=True, exist_ok=True)
    for name in ["metrics.json", *FIGURES]:
        if (args.work / "eval" / name).exists():
            shutil.copyfile(args.work / "eval" / name, args.out / name)
    table = markdown_table(metrics)
    (args.out / "table.md").write_text(table)
    print(format_summary(metrics))
    print(table)
    print(json.dumps(metrics["goal"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
