"""The evaluation's ``report.html``: every measure as a table, the goal check, and the figures embedded."""
from __future__ import annotations

import html
import json
from typing import List

from .. import pages
from ..tissue import TISSUES
from .cluster_stability import STABILITY_HEAD, stability_rows
from .goals import PAPER_GAIN_PERCENT, paired_verdict
from .representations import REGISTRY
from .seed_spread import SPREAD_HEAD, spread_caption, spread_rows
from .tissue import KERNEL_HEAD, RECALL_HEAD, kernel_rows, recall_rows

_STYLE = """body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}table{border-collapse:collapse;margin:1em 0}
td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}td:first-child{text-align:left}img{max-width:100%}"""


def _text_table(rows: List[List[str]], head: List[str]) -> str:
    """A table of plain-text cells, escaped here: the row builders return text, which the README tables use too."""
    return pages.table([[html.escape(c) for c in row] for row in rows], head)


def _ci(m: dict, key: str) -> str:
    lo, hi = m[f"{key}_ci"]
    return f"{m[key]:.3f} <small>({lo:.3f}–{hi:.3f})</small>"


def ci_text(m: dict, key: str) -> str:
    """``m[key]`` with its 95 % interval ``m[key + "_ci"]``, as plain text (the report's tables and table.md)."""
    lo, hi = m[f"{key}_ci"]
    return f"{m[key]:.3f} ({lo:.3f}–{hi:.3f})"


VERSUS_COLUMNS = ("ari", "nmi", "dice", "c_index")
VERSUS_HEAD = ["other", "ARI", "NMI", "Dice", "C-index"]


def _paired(d) -> str:
    """One paired difference as a cell: rotated (or the bundle's clusters) minus the other, its 95 % CI and the
    verdict ("" when not measured)."""
    if d is None:
        return ""
    return f"{d['difference']:+.3f} ({d['ci'][0]:+.3f} to {d['ci'][1]:+.3f}) {paired_verdict(d['ci'])}"


def versus_rows(metrics: dict, key: str = "rotated_versus") -> List[List[str]]:
    """Rows of the 'rotated minus other' table (``key`` ``bundle_versus``: the bundle's own clusters minus other):
    per other representation, each metric's paired difference, its 95 % CI and the verdict (the README and the HTML
    report show the same text)."""
    rows = []
    for other, diffs in metrics.get(key, {}).items():
        rows.append([other, *(_paired(diffs.get(m)) for m in VERSUS_COLUMNS)])
    return rows


def _bundle_versus_section(metrics: dict) -> str:
    rows = versus_rows(metrics, "bundle_versus")
    if not rows:
        return ""
    return ("<h2>The bundle's own clusters (the map analyze paints) minus each other representation, paired</h2>\n"
            "<p>Rotated above is refitted on the training scans as every other representation is; the bundle's own "
            "clusters are those fitted by <code>train</code>.</p>\n"
            + _text_table(rows, VERSUS_HEAD))


def reproducibility_rows(metrics: dict) -> List[List[str]]:
    """Rows of the risk-reproducibility table: ICC with CI, and rotated minus it (paired CI and verdict)."""
    rows = []
    for name, m in metrics.get("risk_reproducibility", {}).items():
        versus = _paired(metrics.get("rotated_versus", {}).get(name, {}).get("risk_icc"))
        rows.append([name, ci_text(m, "icc"), versus])
    return rows


def redraw_rows(metrics: dict) -> List[List[str]]:
    """Rows of the outcome-redraw table: expected C-index ± SD over fresh outcome draws, and how often rotated leads."""
    redraws = metrics.get("survival_redraws", {})
    ahead = redraws.get("rotated_ahead_share", {})
    return [[name, f"{m['mean']:.3f} ± {m['sd']:.3f}", f"{100 * ahead[name]:.0f} %" if name in ahead else ""]
            for name, m in redraws.get("c_index", {}).items()]


def _redraw_section(metrics: dict, rows: List[List[str]]) -> str:
    if not rows:
        return "<p>Not a phantom cohort with true fractions and age.</p>"
    return (f"<p>The same risks, scored against {metrics['survival_redraws']['n_draws']} fresh outcomes drawn from the "
            "phantom's own hazard for the same patients: the spread one cohort's outcome draw puts on the C-index, and "
            "the share of draws in which rotated is ahead.</p>"
            + _text_table(rows, ["features", "expected C-index ± SD", "rotated ahead in"]))


def _kernel_section(metrics: dict) -> str:
    rows = kernel_rows(metrics)
    if not rows:
        return "<p>No patient scanned with a soft and a sharp kernel under otherwise equal settings.</p>"
    return (f"<p>{metrics['kernel_robustness']['n_pairs']} soft/sharp pairs; the low-attenuation cluster's share of "
            "the lung beside LAA-950 (% lung voxels below -950 HU), raw and noise-matched.</p>"
            + _text_table(rows, KERNEL_HEAD))


def readout_rows(metrics: dict) -> List[List[str]]:
    """Rows of the tissue read-out table: balanced accuracy (pooled and the worst acquisition's), each tissue's
    recall, read-out composition C-index with CI, and the cluster composition's C-index (report and README)."""
    rows = []
    for n, m in metrics.get("tissue_readout", {}).items():
        if n == "chance":
            continue
        c_index = ci_text(m, "c_index") if "c_index" in m else "–"
        rows.append([n, f"{m['balanced_accuracy']:.3f}", f"{m['balanced_accuracy_worst_acquisition']:.3f}",
                     *(f"{m['recall'][t]:.2f}" if t in m["recall"] else "–" for t in TISSUES), c_index,
                     f"{metrics['survival'][n]['c_index']:.3f}" if n in metrics.get("survival", {}) else "–"])
    return rows


READOUT_HEAD = ["tissue read-out", "tissue balanced accuracy", "worst acquisition",
                *(f"{t.replace('_', ' ')} recall" for t in TISSUES), "read-out composition C-index",
                "cluster composition C-index"]


def _spread_section(metrics: dict) -> str:
    rows = spread_rows(metrics)
    if not rows:
        return ""
    return (f"<h3>Over mixture seeds</h3><p>{html.escape(spread_caption(metrics))} Means over the held-out "
            "patients.</p>" + _text_table(rows, SPREAD_HEAD))


def render_report(metrics: dict, staged, figures: List[str]) -> str:
    """The page: ``staged.path(name)`` holds each of the ``figures`` (PNG) it embeds."""
    cons, probe_acc = metrics["consistency"], metrics["probe"]
    cons_rows = [[html.escape(n), _ci(m, "ari"), _ci(m, "nmi"), _ci(m, "dice"),
                  f"{probe_acc[n]:.3f}" if n in probe_acc else "–"] for n, m in cons.items()]
    gains = metrics["relative_gain"]
    gain_rows = [[m.upper(), f"{gains['rotated_vs_entangled_percent'][m]:+.2f} %", f"+{gains['paper_percent'][m]:.2f} %"]
                 for m in PAPER_GAIN_PERCENT]
    truth_rows = [[html.escape(n), _ci(m, "ari"), _ci(m, "nmi")] for n, m in metrics["truth_agreement"].items()]
    surv_rows = [[html.escape(n), _ci(m, "c_index"), str(len(m["features"]))] for n, m in metrics["survival"].items()]
    readout = metrics.get("tissue_readout", {})
    readout_table = readout_rows(metrics)
    repro_rows = reproducibility_rows(metrics)
    redraws = redraw_rows(metrics)
    skipped = "".join(f"<li>{html.escape(k)}: {html.escape(v)}</li>" for k, v in metrics["skipped"].items())
    figures = "".join(f"<h3>{html.escape(name[:-4].replace('_', ' '))}</h3><img alt='{name}' "
                      f"src='{pages.png_uri(staged.path(name).read_bytes())}'>" for name in figures)
    notes = "".join(f" {r.note}" for r in REGISTRY if r.note and r.name in cons)
    body = f"""<h1>LatentHarmonize evaluation</h1>
<p>Model {html.escape(metrics['model']['sha256'][:12])}; {metrics['n_eval_patients']} held-out patients
({metrics['n_eval_scans']} scans), clusters and harmonizers fitted on {metrics['n_train_scans']} training scans; K = {metrics['n_clusters']};
seed {metrics['seed']}{' (quick mode: subsampled)' if metrics['quick'] else ''}.</p>
<h2>Consistency across acquisitions (mean, 95 % bootstrap CI over patients) and acquisition probe</h2>
{pages.table(cons_rows, ['representation', 'ARI', 'NMI', 'Dice', 'probe accuracy'])}
<p>Probe chance level: {probe_acc['chance']:.3f}.{notes}</p>
<h2>Each cluster across acquisitions</h2>
<p>The matched Dice above is the unweighted mean over a map's clusters. Here, per cluster: its share of the lung, the
Dice of its masks between two acquisitions of a patient (pairs where either scan has it), and how much its share of
the lung changes between them.</p>
{_text_table(stability_rows(metrics), STABILITY_HEAD)}
<h2>Rotated over entangled: relative gain</h2>{pages.table(gain_rows, ['metric', 'this run', 'paper'])}
<h2>Agreement with the phantom truth</h2>{pages.table(truth_rows, ['representation', 'ARI', 'NMI']) if truth_rows else '<p>No truth in this cohort.</p>'}
{_spread_section(metrics)}
<h2>Tissue found by the clusters (phantom truth, worst acquisition)</h2>
<p>Emphysema recall: share of true emphysema cells in the cluster with the lowest median patch HU; the other columns:
share of each tissue outside the cluster that holds most normal lung. These cells lie inside the lung mask; the last
row gives how much of each tissue the mask holds, so a share times it is the part of all that tissue the map shows
(the goal check reads that product).</p>
{_text_table(recall_rows(metrics), RECALL_HEAD) if metrics.get('tissue_recall') else '<p>No truth in this cohort.</p>'}
<h2>Kernel-robust emphysema: soft versus sharp reconstruction of the same patient</h2>
{_kernel_section(metrics)}
<h2>Survival: cross-validated Cox C-index</h2>{pages.table(surv_rows, ['features', 'C-index (95 % CI)', 'n features']) if surv_rows else '<p>No time/event columns.</p>'}
<h2>Rotated minus each other representation, paired over the same patients (95 % bootstrap CI)</h2>
<p>"tie": the CI contains 0, so this cohort cannot tell the two apart.</p>
{_text_table(versus_rows(metrics), VERSUS_HEAD)}
{_bundle_versus_section(metrics)}
<h2>Survival over fresh outcome draws (phantom only)</h2>
{_redraw_section(metrics, redraws)}
<h2>Risk reproducibility across acquisitions</h2>
<p>One penalised Cox model per feature set, fitted on the survival patients, scores each evaluation scan on its own;
ICC(A,1) of the log risk over patients × acquisitions (1: the scanner changes nobody's risk). Paired: rotated minus
the other on the same patient resamples.</p>
{_text_table(repro_rows, ['features', 'risk ICC (95 % CI)', 'rotated minus']) if repro_rows else '<p>Not run (see below).</p>'}
<h2>Tissue read-out (phantom diagnostic)</h2>
<p>A linear classifier of the true tissue, fitted on each representation's training patches: how much tissue and
outcome information the representation holds, whatever its clusters find; per tissue, the share of its patches
read out as it, and the balanced accuracy of the acquisition where it is lowest. Chance balanced accuracy:
{readout.get('chance', {}).get('balanced_accuracy', float('nan')):.3f}.</p>
{_text_table(readout_table, READOUT_HEAD) if readout_table else '<p>No read-out: the training scans carry no truth, or it was not run (see below).</p>'}
<h2>Goal check</h2><pre>{html.escape(json.dumps(metrics['goal'], indent=1))}</pre>
{'<h2>Not run</h2><ul>' + skipped + '</ul>' if skipped else ''}
<h2>Figures</h2>{figures}
"""
    return pages.page("LatentHarmonize evaluation", _STYLE, body)
