"""Survival analysis of tissue composition: Cox models, cross-validated C-index, Kaplan-Meier.

The core is library code used by ``evaluate`` and by the ``survival`` command:

- :func:`cross_validated_c_index` — penalised Cox PH (lifelines) fitted on training folds, risk
  predicted on held-out folds, Harrell's C of the out-of-fold risks with a bootstrap CI.
- :func:`hazard_ratios` — a Cox fit on all patients, hazard ratio per standard deviation with 95 % CI.
- :func:`plot_km_by_risk` — Kaplan-Meier curves of risk groups with a log-rank test.

CLI: ``latentharmonize survival COMPOSITION.csv [--clinical CLINICAL.csv] --out REPORT_DIR`` joins
the per-scan cluster fractions that ``batch`` writes (columns ``frac_<label>_<name>``) with clinical
columns (``time``, ``event``, covariates such as ``age``, ``sex``, ``fvc``) and writes
``report.html``, ``hazard_ratios.csv``, ``km.png`` and ``metrics.json``.
"""
from __future__ import annotations

import argparse
import html
import json
import re
import warnings
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np
import pandas as pd
from lifelines import CoxPHFitter, KaplanMeierFitter
from lifelines.exceptions import ConvergenceError
from lifelines.statistics import multivariate_logrank_test
from lifelines.utils import concordance_index
from matplotlib.figure import Figure
from sklearn.model_selection import KFold, StratifiedKFold

from . import options, pages
from .atomic import StagedOutput
from .errors import InputError
from .tissue import TISSUES

CLUSTER_FRACTION = re.compile(r"^frac_\d+_")   # batch's per-cluster columns, e.g. frac_3_ground_glass
DEFAULT_COVARIATES = ("age", "sex", "fvc")
OUTPUTS = ("report.html", "hazard_ratios.csv", "km.png", "metrics.json")


def percentile_ci(boots) -> list:
    """Percentile 95 % interval of bootstrap values, ignoring resamples where the statistic was undefined (NaN);
    NaN bounds when no resample gave one."""
    boots = np.asarray(boots, dtype=float)
    finite = boots[np.isfinite(boots)]
    return [float(v) for v in np.quantile(finite, [0.025, 0.975])] if finite.size else [float("nan")] * 2


def _check_survival_table(df: pd.DataFrame, features: Sequence[str], time_col: str, event_col: str) -> pd.DataFrame:
    missing = [c for c in [time_col, event_col, *features] if c not in df.columns]
    if missing:
        raise InputError(f"Survival table lacks columns {missing}; it has {list(df.columns)}.")
    if not features:
        raise InputError("No feature column to model; give composition or covariate columns.")
    data = df[[*features, time_col, event_col]].apply(pd.to_numeric, errors="coerce")
    bad = data.columns[~np.isfinite(data.to_numpy(dtype=float)).all(axis=0)].tolist()  # NaN: empty or not a number
    if bad:
        raise InputError(f"Columns {bad} hold empty, infinite or non-numeric values; fill or drop those patients "
                         "first.")
    if (data[time_col] <= 0).any():
        raise InputError(f"Column {time_col!r} must hold positive follow-up times.")
    if not set(np.unique(data[event_col])) <= {0, 1}:
        raise InputError(f"Column {event_col!r} must be 0 (censored) or 1 (event).")
    if data[event_col].sum() < 2:
        raise InputError(f"Only {int(data[event_col].sum())} events: a Cox model needs at least two.")
    return data.reset_index(drop=True)


def _fit_cox(data: pd.DataFrame, time_col: str, event_col: str, penalizer: float):

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # lifelines warns on low-variance columns; the penalty handles them
            return CoxPHFitter(penalizer=penalizer).fit(data, duration_col=time_col, event_col=event_col)
    except ConvergenceError as exc:
        raise InputError(f"The Cox model did not converge on {len(data)} patients ({str(exc).splitlines()[0]}). "
                         "Use more patients, fewer features or a larger --penalizer.") from None


def _usable_features(data: pd.DataFrame, features: Sequence[str]) -> List[str]:
    """Drop constant columns, which carry no information and break the Cox fit."""
    return [f for f in features if data[f].std() > 1e-12]


def cross_validated_risk(df: pd.DataFrame, features: Sequence[str], time_col: str = "time", event_col: str = "event",
                         n_splits: int = 5, penalizer: float = 0.1, seed: int = 0) -> np.ndarray:
    """Out-of-fold Cox log partial hazards: each patient's risk comes from a model that never saw them."""

    data = _check_survival_table(df, features, time_col, event_col)
    n_events, n_censored = int(data[event_col].sum()), int((1 - data[event_col]).sum())
    n_splits = min(n_splits, n_events)
    if n_splits < 2:
        raise InputError(f"Cross-validation needs at least two events; got {len(data)} patients, {n_events} events.")
    risk = np.zeros(len(data))
    # stratify on the event so every fold holds events, when there are enough censored patients to spread too
    splitter = StratifiedKFold if n_censored >= n_splits else KFold
    folds = splitter(n_splits=n_splits, shuffle=True, random_state=seed)
    for train, test in folds.split(data, data[event_col]):
        usable = _usable_features(data.iloc[train], features)
        if not usable:
            continue  # nothing varies in this training fold: every held-out patient gets the same risk
        cph = _fit_cox(data.iloc[train][[*usable, time_col, event_col]], time_col, event_col, penalizer)
        risk[test] = np.asarray(cph.predict_log_partial_hazard(data.iloc[test][usable])).ravel()
    return risk


def fitted_risk(df: pd.DataFrame, features: Sequence[str], new: pd.DataFrame, time_col: str = "time",
                event_col: str = "event", penalizer: float = 0.1) -> np.ndarray:
    """Cox log partial hazards of the rows of ``new`` from one penalised Cox model fitted on all of ``df``: what a
    deployed risk model says about new scans."""
    data = _check_survival_table(df, features, time_col, event_col)
    usable = _usable_features(data, features)
    if not usable:
        raise InputError(f"Every feature in {list(features)} is constant; no risk model can be fitted.")
    missing = [f for f in usable if f not in new.columns]
    if missing:
        raise InputError(f"The new rows lack the features {missing} the risk model uses.")
    cph = _fit_cox(data[[*usable, time_col, event_col]], time_col, event_col, penalizer)
    return np.asarray(cph.predict_log_partial_hazard(new[usable])).ravel()


def _bootstrap_c(time, event, risks: Sequence, n_boot: int, seed: int) -> np.ndarray:
    """Harrell's C of each risk vector on the same patient resamples: array [resamples, len(risks)].

    Resamples without one comparable pair (small cohorts) have no C to give and are left out.
    """

    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        idx = rng.integers(0, time.size, time.size)
        try:
            boots.append([concordance_index(time[idx], -risk[idx], event[idx]) for risk in risks])
        except ZeroDivisionError:
            continue
    return np.asarray(boots, dtype=float).reshape(-1, len(risks))


def c_index_with_ci(time, event, risk, n_boot: int = 1000, seed: int = 0) -> Dict[str, object]:
    """Harrell's C of risk scores (higher risk = earlier event) and a patient bootstrap 95 % CI."""

    time, event, risk = (np.asarray(v, dtype=float) for v in (time, event, risk))
    c = float(concordance_index(time, -risk, event))
    boots = _bootstrap_c(time, event, [risk], n_boot, seed)[:, 0]
    return {"c_index": c, "c_index_ci": percentile_ci(boots), "n": int(time.size), "n_events": int(event.sum())}


def c_index_difference(time, event, risk_a, risk_b, n_boot: int = 1000, seed: int = 0) -> Dict[str, object]:
    """C(a) - C(b) of two risk scores for the same patients, with a paired bootstrap 95 % CI.

    Both scores are judged on the same resamples, so the CI reflects how much the *difference* varies, which is
    narrower than comparing two separate CIs when the scores agree on most patients.
    """

    time, event, risk_a, risk_b = (np.asarray(v, dtype=float) for v in (time, event, risk_a, risk_b))
    if not (time.shape == event.shape == risk_a.shape == risk_b.shape):
        raise InputError(f"time, event and both risk scores need one value per patient; got shapes {time.shape}, "
                         f"{event.shape}, {risk_a.shape}, {risk_b.shape}.")
    diff = float(concordance_index(time, -risk_a, event) - concordance_index(time, -risk_b, event))
    boots = _bootstrap_c(time, event, [risk_a, risk_b], n_boot, seed)
    return {"difference": diff, "ci": percentile_ci(boots[:, 0] - boots[:, 1]), "n": int(time.size)}


def cross_validated_c_index(df: pd.DataFrame, features: Sequence[str], time_col: str = "time", event_col: str = "event",
                            n_splits: int = 5, penalizer: float = 0.1, seed: int = 0, n_boot: int = 1000) -> Dict[str, object]:
    """Cross-validated C-index of a penalised Cox model on ``features``, with bootstrap CI and the risks used."""
    risk = cross_validated_risk(df, features, time_col, event_col, n_splits, penalizer, seed)
    out = c_index_with_ci(df[time_col], df[event_col], risk, n_boot=n_boot, seed=seed)
    out.update({"features": list(features), "penalizer": penalizer, "n_splits": n_splits})
    return out


def hazard_ratios(df: pd.DataFrame, features: Sequence[str], time_col: str = "time", event_col: str = "event",
                  penalizer: float = 0.1) -> pd.DataFrame:
    """Hazard ratio per standard deviation of each feature (Cox fit on all patients), 95 % CI and p-value."""
    data = _check_survival_table(df, features, time_col, event_col)
    usable = _usable_features(data, features)
    if not usable:
        raise InputError(f"Every feature in {list(features)} is constant; no hazard ratio can be estimated.")
    data[usable] = (data[usable] - data[usable].mean()) / data[usable].std()
    summary = _fit_cox(data[[*usable, time_col, event_col]], time_col, event_col, penalizer).summary
    return pd.DataFrame({
        "feature": summary.index,
        "hazard_ratio_per_sd": summary["exp(coef)"].to_numpy(),
        "ci_low": summary["exp(coef) lower 95%"].to_numpy(),
        "ci_high": summary["exp(coef) upper 95%"].to_numpy(),
        "p": summary["p"].to_numpy(),
    })


def plot_km_by_risk(time, event, risk, path, n_groups: int = 2, title: str = "Kaplan-Meier by predicted risk") -> Dict[str, object]:
    """Kaplan-Meier curves of patients split at risk quantiles into ``n_groups``; PNG at ``path``.

    Returns the group sizes and the multivariate log-rank p-value.
    """

    time, event, risk = (np.asarray(v, dtype=float) for v in (time, event, risk))
    edges = np.quantile(risk, np.linspace(0, 1, n_groups + 1)[1:-1])
    group = np.searchsorted(edges, risk, side="right")
    names = ["low risk", "high risk"] if n_groups == 2 else [f"risk group {g + 1}" for g in range(n_groups)]
    fig = Figure(figsize=(5.5, 4), dpi=100)
    ax = fig.add_subplot()
    for g in range(n_groups):
        sel = group == g
        if sel.any():
            KaplanMeierFitter(label=f"{names[g]} (n={int(sel.sum())})").fit(time[sel], event[sel]).plot_survival_function(ax=ax)
    p = float(multivariate_logrank_test(time, group, event).p_value) if np.unique(group).size > 1 else float("nan")
    ax.set_title(f"{title}\nlog-rank p = {p:.3g}", fontsize=10)
    ax.set_xlabel("time")
    ax.set_ylabel("survival probability")
    fig.tight_layout()
    fig.savefig(path, format="png", metadata={"Software": None})
    return {"groups": [int((group == g).sum()) for g in range(n_groups)], "logrank_p": p}


def composition_features(table: pd.DataFrame, selection: str = "clusters") -> List[str]:
    """Feature columns of a composition table.

    ``clusters``: batch's per-cluster fractions ``frac_<label>_<name>``; ``truth``: the phantom's true
    fractions ``frac_<tissue>``; anything else: a comma-separated list of column names. The most
    abundant fraction is left out as the reference (fractions sum to 1, so one is redundant).
    """

    if selection == "clusters":
        columns = [c for c in table.columns if CLUSTER_FRACTION.match(c)]
    elif selection == "truth":
        columns = [f"frac_{t}" for t in TISSUES if f"frac_{t}" in table.columns]
    else:
        columns = [c.strip() for c in selection.split(",") if c.strip()]
        return columns
    if not columns:
        raise InputError(f"No {selection} fraction column found; the table has {list(table.columns)}. "
                         "Give --features with a comma-separated list of columns.")
    fractions = table[columns].apply(pd.to_numeric, errors="coerce")
    reference = fractions.mean().idxmax()
    return [c for c in columns if c != reference]


def patient_table(composition: pd.DataFrame, clinical: pd.DataFrame | None, features: Sequence[str],
                  acquisition: str | None = None, key: str = "patient",
                  outcome: Sequence[str] = ("time", "event")) -> pd.DataFrame:
    """One row per patient: composition features averaged over the patient's scans, joined with clinical columns.
    A patient whose rows disagree (on the ``outcome`` columns of the composition table, or on any column of the
    clinical table) is refused: which row is right cannot be guessed."""
    if key not in composition.columns:
        raise InputError(f"The composition table needs a {key!r} column to join per patient; it has {list(composition.columns)}.")
    if acquisition is not None:
        if "acquisition" not in composition.columns or not (composition["acquisition"] == acquisition).any():
            raise InputError(f"No scan with acquisition {acquisition!r} in the composition table.")
        composition = composition[composition["acquisition"] == acquisition]
    profiles = composition.groupby(key, sort=True)[list(features)].mean()
    if clinical is None:
        _refuse_conflicts(composition, key, outcome, "composition table")
        others = [c for c in composition.columns if c not in features and c != key]
        clinical = composition.groupby(key, sort=True)[others].first().reset_index()
    elif key not in clinical.columns:
        raise InputError(f"The clinical table needs a {key!r} column to join with the composition table.")
    else:
        _refuse_conflicts(clinical, key, [c for c in clinical.columns if c != key and c not in features],
                          "clinical table")
    clinical = clinical.drop(columns=[c for c in features if c in clinical.columns]).drop_duplicates(key)
    joined = profiles.reset_index().merge(clinical, on=key, how="inner")
    if joined.empty:
        raise InputError(f"No patient is in both the composition and the clinical table (joined on {key!r}).")
    return joined


def _refuse_conflicts(table: pd.DataFrame, key: str, columns: Sequence[str], what: str) -> None:
    columns = [c for c in columns if c in table.columns]
    if not columns:
        return
    conflicting = table.groupby(key, sort=True)[columns].nunique(dropna=False).gt(1)
    patients = conflicting.index[conflicting.any(axis=1)].tolist()
    if patients:
        shown = ", ".join(map(str, patients[:5])) + (" ..." if len(patients) > 5 else "")
        differing = [c for c in columns if conflicting[c].any()]
        raise InputError(f"Patient(s) {shown} appear more than once in the {what} with different {differing}; "
                         "keep one row per patient (or make the rows agree) and run again.")


def encode_covariates(table: pd.DataFrame, covariates: Sequence[str]) -> tuple:
    """Numeric design columns for the covariates: text columns (e.g. sex) become 0/1 indicator columns."""
    missing = [c for c in covariates if c not in table.columns]
    if missing:
        raise InputError(f"Clinical covariates {missing} are not in the table; it has {list(table.columns)}.")
    table = table.copy()
    columns: List[str] = []
    for c in covariates:
        if pd.api.types.is_numeric_dtype(table[c]):
            columns.append(c)
            continue
        dummies = pd.get_dummies(table[c].astype(str), prefix=c, drop_first=True, dtype=float)
        table = pd.concat([table, dummies], axis=1)
        columns.extend(dummies.columns)
    return table, columns


_STYLE = """body{font-family:sans-serif;max-width:900px;margin:2em auto;color:#222}table{border-collapse:collapse;margin:1em 0}
td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}td:first-child,th:first-child{text-align:left}"""


def _html_report(metrics: dict, hrs: pd.DataFrame, km_png: bytes) -> str:
    rows = [[html.escape(name), f"{m['c_index']:.3f}", f"{m['c_index_ci'][0]:.3f} – {m['c_index_ci'][1]:.3f}",
             str(len(m["features"]))] for name, m in metrics["models"].items()]
    hr_rows = [[html.escape(r.feature), f"{r.hazard_ratio_per_sd:.2f}", f"{r.ci_low:.2f} – {r.ci_high:.2f}", f"{r.p:.3g}"]
               for r in hrs.itertuples()]
    body = f"""<h1>Survival from lung tissue composition</h1>
<p>{metrics['n_patients']} patients, {metrics['n_events']} events. Penalised Cox proportional hazards
(penalizer {metrics['penalizer']}), {metrics['n_splits']}-fold cross-validated C-index (risk of each patient predicted by a
model that did not see them), 95 % bootstrap confidence interval over patients (seed {metrics['seed']}).</p>
<h2>Cross-validated C-index</h2>
{pages.table(rows, ["model", "C-index", "95 % CI", "features"])}
<h2>Hazard ratios (composition + clinical, all patients)</h2>
<p>Per standard deviation of each feature; composition reference: {html.escape(metrics['reference_note'])}.</p>
{pages.table(hr_rows, ["feature", "HR per SD", "95 % CI", "p"])}
<h2>Kaplan–Meier by cross-validated risk group</h2>
<img alt="Kaplan-Meier curves" src="{pages.png_uri(km_png)}" width="550">
"""
    return pages.page("LatentHarmonize survival report", _STYLE, body)


def survival_report(table: pd.DataFrame, features: Sequence[str], covariates: Sequence[str], out_dir,
                    time_col: str = "time", event_col: str = "event", penalizer: float = 0.1, n_splits: int = 5,
                    seed: int = 0, n_boot: int = 1000, overwrite: bool = False) -> dict:
    """Fit and cross-validate composition, clinical and combined Cox models; write the report files."""
    table, covariate_columns = encode_covariates(table, covariates)
    models = {"composition": list(features)}
    if covariate_columns:
        models.update({"clinical": covariate_columns, "composition+clinical": [*features, *covariate_columns]})
    results = {name: cross_validated_c_index(table, cols, time_col, event_col, n_splits, penalizer, seed, n_boot)
               for name, cols in models.items()}
    best = models["composition+clinical" if covariate_columns else "composition"]
    risk = cross_validated_risk(table, best, time_col, event_col, n_splits, penalizer, seed)
    hrs = hazard_ratios(table, best, time_col, event_col, penalizer)
    metrics = {
        "n_patients": int(len(table)), "n_events": int(table[event_col].sum()), "penalizer": penalizer,
        "n_splits": n_splits, "seed": seed, "models": results,
        "reference_note": "the most abundant fraction is left out (fractions sum to 1)",
    }
    with StagedOutput(out_dir, OUTPUTS, overwrite=overwrite) as staged:
        metrics["km"] = plot_km_by_risk(table[time_col], table[event_col], risk, staged.path("km.png"))
        hrs.to_csv(staged.path("hazard_ratios.csv"), index=False, float_format="%.6g")
        staged.path("metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
        staged.path("report.html").write_text(_html_report(metrics, hrs, staged.path("km.png").read_bytes()), encoding="utf-8")
    return metrics


def _read_csv(path, what: str) -> pd.DataFrame:
    if Path(path).exists() and not Path(path).is_file():  # stat only: reading a FIFO would wait forever
        raise InputError(f"{what} {path} is not a file (a folder, pipe or device); give a CSV file.")
    try:
        return pd.read_csv(path)
    except FileNotFoundError:
        raise InputError(f"{what} {path} does not exist.") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise InputError(f"{what} {path} is not a readable CSV table: {exc}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("composition", help="per-scan composition CSV (as written by `latentharmonize batch`)")
    parser.add_argument("--clinical", help="clinical CSV with patient, time, event and covariates; "
                                           "default: these columns are read from the composition table")
    options.add_out(parser, "report folder")
    parser.add_argument("--features", default="clusters",
                        help="'clusters' (frac_<label>_<name> columns), 'truth' (phantom frac_<tissue>), or a comma-separated column list")
    parser.add_argument("--covariates", default=None, help=f"comma-separated clinical covariates (default: those of {','.join(DEFAULT_COVARIATES)} present)")
    parser.add_argument("--acquisition", help="use only scans of this acquisition (default: average a patient's scans)")
    parser.add_argument("--time-col", default="time")
    parser.add_argument("--event-col", default="event")
    parser.add_argument("--penalizer", type=float, default=0.1, help="Cox ridge penalty (default 0.1)")
    parser.add_argument("--folds", type=int, default=5, help="cross-validation folds (default 5)")
    options.add_seed(parser)
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of the C-index CI (default 1000)")
    options.add_overwrite(parser, "existing report files")


def run(args) -> int:
    composition = _read_csv(args.composition, "Composition table")
    clinical = _read_csv(args.clinical, "Clinical table") if args.clinical else None
    features = composition_features(composition, args.features)
    if args.folds < 2:
        raise InputError(f"--folds must be at least 2 (each patient's risk comes from a model fitted on the other "
                         f"folds), got {args.folds}.")
    if not (np.isfinite(args.penalizer) and args.penalizer >= 0):
        raise InputError(f"--penalizer must be a finite number of 0 or more (a ridge penalty), got {args.penalizer}.")
    table = patient_table(composition, clinical, features, acquisition=args.acquisition,
                          outcome=(args.time_col, args.event_col))
    if args.covariates is None:
        covariates = [c for c in DEFAULT_COVARIATES if c in table.columns]
    else:
        covariates = [c.strip() for c in args.covariates.split(",") if c.strip()]
    if args.bootstrap < 1:
        raise InputError(f"--bootstrap must be at least 1, got {args.bootstrap}.")
    metrics = survival_report(table, features, covariates, args.out, args.time_col, args.event_col,
                              args.penalizer, args.folds, args.seed, args.bootstrap, args.overwrite)
    for name, m in metrics["models"].items():
        print(f"{name:22s} C-index {m['c_index']:.3f} (95% CI {m['c_index_ci'][0]:.3f}-{m['c_index_ci'][1]:.3f})")
    print(f"wrote {', '.join(OUTPUTS)} to {args.out}")
    return 0
