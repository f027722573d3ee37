"""Survival core on synthetic cohorts with a known hazard, and the `survival` command."""
from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from latentharmonize.cli import main
from latentharmonize.errors import InputError
from latentharmonize.densitometry import lung_hu_indices
from latentharmonize.survival import (composition_features, cross_validated_c_index, fitted_risk, hazard_ratios,
                                      patient_table)


def _cohort(n=160, seed=0):
    """Hazard rises with `risk` (log HR 1.2 per unit); `noise` is unrelated; ~25 % censored."""
    rng = np.random.default_rng(seed)
    risk, noise = rng.normal(size=n), rng.normal(size=n)
    event_time = rng.exponential(1.0 / np.exp(1.2 * risk))
    censor_time = rng.exponential(3.0, size=n)
    return pd.DataFrame({"risk": risk, "noise": noise, "time": np.minimum(event_time, censor_time),
                         "event": (event_time <= censor_time).astype(int)})


def test_c_index_high_for_true_covariate_and_chance_for_noise():
    df = _cohort()
    true = cross_validated_c_index(df, ["risk"], n_boot=200, seed=1)
    noise = cross_validated_c_index(df, ["noise"], n_boot=200, seed=1)
    assert true["c_index"] > 0.7
    assert true["c_index_ci"][0] < true["c_index"] < true["c_index_ci"][1]
    assert abs(noise["c_index"] - 0.5) < 0.1
    assert true == cross_validated_c_index(df, ["risk"], n_boot=200, seed=1)  # seeded


def test_hazard_ratio_direction():
    df = _cohort()
    df["protective"] = -df["risk"] + np.random.default_rng(3).normal(scale=0.3, size=len(df))
    hrs = hazard_ratios(df, ["risk", "noise"]).set_index("feature")
    assert hrs.loc["risk", "ci_low"] > 1.0
    assert hrs.loc["noise", "ci_low"] < 1.0 < hrs.loc["noise", "ci_high"]
    assert hazard_ratios(df, ["protective"]).iloc[0]["ci_high"] < 1.0


def test_fitted_risk_scores_new_rows_with_the_fitted_model():
    df = _cohort()
    new = pd.DataFrame({"risk": [-1.0, 0.0, 2.0], "noise": [5.0, -5.0, 0.0]})
    risk = fitted_risk(df, ["risk"], new)
    assert risk[0] < risk[1] < risk[2]  # higher covariate, higher hazard
    assert risk[2] - risk[1] == pytest.approx(2 * (risk[1] - risk[0]))  # linear in the covariate
    with pytest.raises(InputError, match="lack the features"):
        fitted_risk(df, ["risk", "noise"], new.drop(columns=["noise"]))
    with pytest.raises(InputError, match="constant"):
        fitted_risk(df.assign(flat=1.0), ["flat"], new.assign(flat=1.0))


def test_survival_table_is_validated():
    df = _cohort(30)
    with pytest.raises(InputError, match="lacks columns"):
        cross_validated_c_index(df, ["fvc"])
    df.loc[3, "time"] = -1.0
    with pytest.raises(InputError, match="positive"):
        cross_validated_c_index(df, ["risk"])


def test_lung_hu_indices_hand_computed():
    hu = np.array([[-1000, -960, -900, -800, -600, 0]], dtype=np.int16)
    lung = np.array([[1, 1, 1, 1, 1, 0]], dtype=np.uint8)
    f = lung_hu_indices(sitk.GetImageFromArray(hu), sitk.GetImageFromArray(lung))
    assert f["laa950"] == pytest.approx(40.0)
    assert f["haa700"] == pytest.approx(20.0)
    assert f["mld"] == pytest.approx(np.mean([-1000, -960, -900, -800, -600]))
    assert f["perc15"] == pytest.approx(np.percentile([-1000, -960, -900, -800, -600], 15))


def _composition(df, seed=0):
    """Two scans per patient; a sicker patient has more of cluster 2 (fibrosis), plus truth columns."""
    rng = np.random.default_rng(seed)
    rows = []
    for i, r in df.iterrows():
        fib = 1 / (1 + np.exp(-r["risk"])) * 0.4
        for acq in ("soft", "sharp"):
            f2 = np.clip(fib + rng.normal(scale=0.02), 0, 1)
            f3 = 0.1 + rng.normal(scale=0.01)
            rows.append({"patient": f"p{i:03d}", "acquisition": acq, "image": f"p{i}/{acq}.nrrd",
                         "frac_1_normal": 1 - f2 - f3, "frac_2_fibrosis": f2, "frac_3_other": f3,
                         "frac_normal": 1 - fib, "frac_reticulation": fib})
    return pd.DataFrame(rows)


def test_patient_table_joins_and_averages_scans():
    df = _cohort(20)
    comp = _composition(df)
    clinical = pd.DataFrame({"patient": [f"p{i:03d}" for i in range(20)], "time": df["time"], "event": df["event"],
                             "sex": np.where(np.arange(20) % 2, "F", "M")})
    features = composition_features(comp)
    assert features == ["frac_2_fibrosis", "frac_3_other"]  # normal, the most abundant, is the reference
    assert composition_features(comp, "truth") == ["frac_reticulation"]
    table = patient_table(comp, clinical, features)
    assert len(table) == 20
    p0 = comp[comp.patient == "p000"]["frac_2_fibrosis"].mean()
    assert table.set_index("patient").loc["p000", "frac_2_fibrosis"] == pytest.approx(p0)


def test_survival_cli_writes_report(tmp_path):
    df = _cohort(80, seed=4)
    comp = _composition(df)
    comp.to_csv(tmp_path / "composition.csv", index=False)
    clinical = pd.DataFrame({"patient": [f"p{i:03d}" for i in range(80)], "time": df["time"], "event": df["event"],
                             "age": np.random.default_rng(5).normal(65, 8, 80), "sex": np.where(np.arange(80) % 2, "F", "M")})
    clinical.to_csv(tmp_path / "clinical.csv", index=False)
    out = tmp_path / "report"
    args = [str(tmp_path / "composition.csv"), "--clinical", str(tmp_path / "clinical.csv"), "--out", str(out),
            "--bootstrap", "100"]
    assert main(["survival", *args]) == 0
    for name in ("report.html", "hazard_ratios.csv", "km.png", "metrics.json"):
        assert (out / name).stat().st_size > 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["models"]) == {"composition", "clinical", "composition+clinical"}
    assert metrics["models"]["composition"]["c_index"] > 0.65
    hrs = pd.read_csv(out / "hazard_ratios.csv").set_index("feature")
    assert hrs.loc["frac_2_fibrosis", "hazard_ratio_per_sd"] > 1.0
    assert "sex_M" in hrs.index
    assert (out / "km.png").read_bytes()[:4] == b"\x89PNG"
    assert "data:image/png;base64," in (out / "report.html").read_text()
    assert main(["survival", *args]) == 2  # refuses to overwrite without --overwrite


def test_c_index_ci_skips_resamples_without_a_comparable_pair():
    from latentharmonize.survival import c_index_with_ci

    # one event, at the longest time: many resamples hold no pair where the earlier patient had the event
    time, event, risk = [1.0, 2.0, 3.0, 4.0], [0, 0, 0, 1], [0.1, 0.2, 0.3, 0.4]
    with pytest.raises(ZeroDivisionError):
        c_index_with_ci(time, event, risk, n_boot=0)  # the point estimate itself has no pair either
    time, event = [1.0, 2.0, 3.0, 4.0, 5.0], [1, 0, 0, 0, 1]
    out = c_index_with_ci(time, event, [0.5, 0.1, 0.2, 0.3, 0.4], n_boot=200, seed=0)
    assert out["c_index"] == 1.0 and out["n_events"] == 2
    assert out["c_index_ci"][0] <= out["c_index_ci"][1] <= 1.0


def test_c_index_difference_is_paired():
    from latentharmonize.survival import c_index_difference, c_index_with_ci

    rng = np.random.default_rng(0)
    time = rng.exponential(5.0, 80)
    event = (rng.random(80) < 0.7).astype(float)
    good = -time + rng.normal(0, 2.0, 80)
    noisy = good + rng.normal(0, 0.5, 80)  # nearly the same ranking as good
    out = c_index_difference(time, event, good, noisy, n_boot=300, seed=1)
    separate = [c_index_with_ci(time, event, r, n_boot=300, seed=1) for r in (good, noisy)]
    assert out["difference"] == pytest.approx(separate[0]["c_index"] - separate[1]["c_index"])
    assert out["ci"][0] <= out["difference"] <= out["ci"][1]
    # the paired CI is much narrower than either score's own CI: the patients they share cancel
    assert out["ci"][1] - out["ci"][0] < 0.5 * (separate[0]["c_index_ci"][1] - separate[0]["c_index_ci"][0])
    assert c_index_difference(time, event, good, good, n_boot=50)["ci"] == [0.0, 0.0]
    with pytest.raises(InputError, match="one value per patient"):
        c_index_difference(time, event, good, good[:-1])


# ----------------------------------------------------------------------------- hostile cohort tables (issue 21)
def _cli_files(tmp_path, n=40, edit=None):
    df = _cohort(n, seed=4)
    comp = _composition(df)
    clinical = pd.DataFrame({"patient": [f"p{i:03d}" for i in range(n)], "time": df["time"], "event": df["event"]})
    if edit is not None:
        clinical = edit(clinical)
    comp.to_csv(tmp_path / "composition.csv", index=False)
    clinical.to_csv(tmp_path / "clinical.csv", index=False)
    return [str(tmp_path / "composition.csv"), "--clinical", str(tmp_path / "clinical.csv"), "--out",
            str(tmp_path / "report"), "--bootstrap", "10"]


def _with_infinite_time(clinical):
    clinical.loc[3, "time"] = np.inf
    return clinical


def _with_conflicting_duplicate(clinical):
    twin = clinical.iloc[[5]].assign(time=clinical["time"].iloc[5] + 7.0)
    return pd.concat([clinical, twin], ignore_index=True)


@pytest.mark.parametrize("edit, extra, words", [
    (_with_infinite_time, [], "infinite"),
    (_with_conflicting_duplicate, [], r"p005 appear more than once in the clinical table with different \['time'\]"),
    (None, ["--folds", "1"], "--folds must be at least 2"),
    (None, ["--penalizer", "-1"], "--penalizer must be a finite number of 0 or more"),
    (None, ["--penalizer", "nan"], "--penalizer must be a finite number of 0 or more"),
])
def test_hostile_survival_inputs_are_refused(tmp_path, capsys, edit, extra, words):
    assert main(["survival", *_cli_files(tmp_path, edit=edit), *extra]) == 2
    err = capsys.readouterr().err
    assert re.search(words, err) and "Traceback" not in err
    assert not (tmp_path / "report").exists()


def test_scans_of_one_patient_with_different_outcomes_are_refused():
    df = _cohort(20)
    comp = _composition(df)
    comp["time"], comp["event"] = 1.0 + np.arange(len(comp)), 1  # the two scans of a patient disagree on the time
    with pytest.raises(InputError, match="more than once in the composition table"):
        patient_table(comp, None, composition_features(comp))


def test_a_pipe_as_the_composition_table_is_refused_without_hanging(tmp_path, capsys):
    import os

    import threading

    os.mkfifo(tmp_path / "composition.csv")
    codes = []
    run = threading.Thread(target=lambda: codes.append(main(["survival", str(tmp_path / "composition.csv"), "--out",
                                                             str(tmp_path / "report")])), daemon=True)
    run.start()
    run.join(30)
    assert codes == [2], "refused at once, not waiting for a writer"
    assert "is not a file" in capsys.readouterr().err
