"""Cohort analysis on a real local Dask cluster (2 worker processes, 1 thread each) with the real ``analyze``, on
a tiny phantom cohort (2 patients x 2 acquisitions, small geometry): complete aggregate, resume, failures,
a worker killed mid-scan, distributed training samples and dense encoding, benchmark."""
from __future__ import annotations

import functools
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import cloudpickle
import numpy as np
import pandas as pd
import pytest

from latentharmonize import batch, bench
from latentharmonize.analyze_command import analyze
from latentharmonize.cli import main as cli_main
from latentharmonize.errors import InputError

ACQUISITIONS = ["a_soft_thin", "c_sharp_thick"]

# The worker-killing analyze below is defined in this test module, which workers cannot import: ship it by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def cohort_csv(tmp_path_factory) -> Path:
    from latentharmonize.phantom import generate_cohort

    folder = tmp_path_factory.mktemp("cohort")
    generate_cohort(folder, 2, seed=0, acquisitions=ACQUISITIONS)
    return folder / "cohort.csv"


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory, cohort_csv) -> Path:
    """A tiny untrained bundle: seeded narrow encoder, rotation on a made-up split, 3 clusters of one scan's patches."""
    from latentharmonize.bundle import ModelBundle, save_bundle
    from latentharmonize.cohort import read_cohort
    from latentharmonize.clusters import TissueClusters
    from latentharmonize.networks import build_model
    from latentharmonize.patches import PatchSpec, encode_dense
    from latentharmonize.rotation import LatentRotation
    from latentharmonize.scans import load_scan

    scan = load_scan(read_cohort(cohort_csv).iloc[0], PatchSpec())
    model = build_model("ae", seed=0, width=8, latent_dim=8)
    dense = encode_dense(model, scan.hu, scan.lung, scan.grid, PatchSpec())
    rows = np.sort(np.random.default_rng(0).choice(len(dense.latents), size=1500, replace=False))
    latents, split = dense.latents[rows], np.where(dense.positions[rows, 2] % 2 == 0, "a", "b")
    rotation = LatentRotation(n_technical=1, method="labels", random_state=0).fit(latents, split)
    clusters = TissueClusters(n_clusters=3, random_state=0).fit(rotation.biological(latents))
    bundle = ModelBundle.create(name="batch-test", encoder_config=model.config, encoder_state=model.state_dict(),
                                spec=PatchSpec(), rotation=rotation, clusters=clusters,
                                names=["low attenuation", "normal", "ground glass"], created="2026-01-01")
    return save_bundle(bundle, tmp_path_factory.mktemp("bundle") / "tiny")


@pytest.fixture(scope="module")
def client():
    """A real local cluster: 2 worker processes, 1 thread each."""
    with batch.dask_client(workers=2, threads_per_worker=1) as c:
        assert len(c.scheduler_info()["workers"]) == 2
        yield c


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, cohort_csv, bundle_dir, client):
    out = tmp_path_factory.mktemp("batch")
    summary = batch.run_batch(cohort_csv, out, model=bundle_dir, device="cpu", write_report=False, client=client)
    return out, summary


def scan_files(out: Path) -> dict:
    return {p: p.stat().st_mtime_ns for p in out.glob("*/*/*") if p.is_file()}


def test_aggregate_has_one_row_per_scan_with_the_cohort_columns(first_run, cohort_csv):
    out, summary = first_run
    assert (summary.n_scans, summary.analyzed, summary.skipped, summary.failed) == (4, 4, 0, 0)
    raw = pd.read_csv(cohort_csv, dtype=str, keep_default_na=False)
    table = pd.read_csv(out / "composition.csv", dtype=str, keep_default_na=False)
    assert table[list(raw.columns)].equals(raw)  # cohort columns kept verbatim, rows in cohort order
    fractions = [c for c in table.columns if c.startswith("frac_") and c not in raw.columns]
    assert fractions == ["frac_1_low_attenuation", "frac_2_normal", "frac_3_ground_glass",
                         "frac_200_vessels", "frac_201_airways"]  # analyze adds the vessels and airways
    values = table[fractions].astype(float)
    assert np.allclose(values.sum(axis=1), 1.0, atol=1e-6) and (values.values >= 0).all()
    assert (table["lung_volume_ml"].astype(float) > 100).all()
    assert list(table.columns[len(raw.columns):len(raw.columns) + 8]) == [
        "output_dir", "lung_volume_ml", "lung_laa950_pct", "lung_haa700_250_pct", "lung_mld_hu", "lung_perc15_hu",
        "lung_laa950_matched_pct", "lung_perc15_matched_hu"]
    for row in table.itertuples():
        per_scan = pd.read_csv(out / row.output_dir / "composition.csv")
        whole = per_scan[per_scan["region"] == "whole"].set_index("label")["fraction"]
        assert float(row.frac_2_normal) == pytest.approx(whole.get(2, 0.0))
        densitometry = pd.read_csv(out / row.output_dir / "densitometry.csv").set_index("region").loc["whole"]
        assert float(row.lung_perc15_matched_hu) == densitometry["perc15_matched_hu"]
        assert float(row.lung_laa950_pct) == pytest.approx(densitometry["laa950_pct"])
    assert pd.read_csv(out / "failures.csv").empty
    assert not list(out.glob("*/*/.latentharmonize-staging-*"))


def test_rerun_skips_every_finished_scan(first_run, cohort_csv, bundle_dir, client):
    out, _ = first_run
    before, table = scan_files(out), (out / "composition.csv").read_bytes()
    summary = batch.run_batch(cohort_csv, out, model=bundle_dir, device="cpu", write_report=False, client=client)
    assert (summary.analyzed, summary.skipped, summary.failed) == (0, 4, 0)
    assert scan_files(out) == before
    assert (out / "composition.csv").read_bytes() == table


def test_cli_on_an_existing_scheduler(first_run, cohort_csv, bundle_dir, client, capsys):
    out, _ = first_run
    code = cli_main(["batch", str(cohort_csv), "--out", str(out), "--model", str(bundle_dir), "--device", "cpu",
                     "--scheduler", client.scheduler.address, "--no-report"])
    assert code == 0
    assert "4 scans: 0 analysed, 4 already done, 0 failed" in capsys.readouterr().out


def test_a_changed_scan_is_analysed_again(tmp_path, cohort_csv, bundle_dir, client):
    from latentharmonize.cohort import read_cohort

    one = tmp_path / "one.csv"
    read_cohort(cohort_csv).head(1).to_csv(one, index=False)  # absolute paths
    out = tmp_path / "out"
    batch.run_batch(one, out, model=bundle_dir, device="cpu", write_report=False, client=client)
    record_path = next(out.glob("*/*/analysis.json"))
    record = json.loads(record_path.read_text())
    record["input_sha256"] = "0" * 64  # as if the scan file had been replaced since
    record_path.write_text(json.dumps(record))
    summary = batch.run_batch(one, out, model=bundle_dir, device="cpu", write_report=False, client=client)
    assert (summary.analyzed, summary.skipped) == (1, 0)


def test_a_corrupt_scan_is_recorded_and_the_others_succeed(first_run, cohort_csv, bundle_dir, client):
    out, _ = first_run
    folder = cohort_csv.parent
    (folder / "broken.nrrd").write_bytes(b"NRRD0004\nthis is not an image\n")
    table = pd.read_csv(cohort_csv, dtype=str, keep_default_na=False)
    extra = table.iloc[[0]].assign(image="broken.nrrd", patient="P009")
    with_broken = folder / "with_broken.csv"
    pd.concat([table, extra]).to_csv(with_broken, index=False)
    summary = batch.run_batch(with_broken, out, model=bundle_dir, device="cpu", write_report=False, client=client)
    assert (summary.skipped, summary.failed) == (4, 1)
    failures = pd.read_csv(out / "failures.csv")
    assert failures[["patient", "acquisition", "image", "error_type"]].values.tolist() == [
        ["P009", ACQUISITIONS[0], "broken.nrrd", "InputError"]]
    assert "broken.nrrd" in failures["message"][0]
    assert pd.read_csv(out / "composition.csv")["patient"].tolist() == ["P000", "P000", "P001", "P001"]


def test_finished_means_same_input_model_mask_and_every_output_present(tmp_path):
    outputs = {"composition_csv": "composition.csv", "record": "analysis.json", "labels": "x_clusters.nrrd"}
    record = {"input_sha256": "in", "model_sha256": "model", "mask": "automatic", "outputs": outputs}
    (tmp_path / "analysis.json").write_text(json.dumps(record))
    (tmp_path / "composition.csv").write_text("region\n")
    assert not batch.is_finished(tmp_path, "in", "model")  # x_clusters.nrrd never published
    (tmp_path / "x_clusters.nrrd").write_bytes(b"")
    assert batch.is_finished(tmp_path, "in", "model")
    assert not batch.is_finished(tmp_path, "other input", "model")
    assert not batch.is_finished(tmp_path, "in", "other model")
    assert not batch.is_finished(tmp_path, "in", "model", mask="/data/mask.nrrd")
    assert not batch.is_finished(tmp_path, "in", "model", with_report=True)  # analysed without its QC report
    assert not batch.is_finished(tmp_path / "missing", "in", "model")


def test_colliding_output_folders_are_refused(tmp_path):
    cohort = pd.DataFrame({"patient": ["P 1", "P_1"], "acquisition": ["a", "a"], "image": ["x", "y"]})
    with pytest.raises(InputError, match="both map to"):
        batch.plan_scans(cohort, tmp_path)


def test_unreachable_scheduler_is_a_clear_error():
    with pytest.raises(InputError, match="Cannot reach the Dask scheduler"):
        with batch.dask_client("tcp://127.0.0.1:9", timeout="1s"):
            pass


def test_training_samples_match_the_serial_path(cohort_csv, client):
    from latentharmonize.patches import PatchSpec
    from latentharmonize.training.distributed import sample_cohort_patches
    from latentharmonize.training.config import TrainConfig
    from latentharmonize.training.samples import load_cohort_samples

    config, spec = TrainConfig(per_patient=30, seed=3), PatchSpec()
    serial, _ = load_cohort_samples(cohort_csv, config, spec)
    parallel, cohort = sample_cohort_patches(cohort_csv, config, spec, client=client)
    assert len(cohort) == 4 and len(parallel) == len(serial) == 30 * 4
    for name in ("patches", "patient", "acquisition", "point", "scan", "keys", "truth"):
        assert np.array_equal(getattr(parallel, name), getattr(serial, name)), name


def test_encode_cohort_gives_each_scan_its_dense_latents(cohort_csv, bundle_dir, client):
    from latentharmonize.bundle import load_bundle
    from latentharmonize.cohort import read_cohort
    from latentharmonize.patches import encode_dense
    from latentharmonize.scans import load_scan

    latents = batch.encode_cohort(cohort_csv, bundle_dir, device="cpu", client=client)
    assert list(latents) == [(p, a) for p in ("P000", "P001") for a in ACQUISITIONS]
    bundle = load_bundle(bundle_dir)
    scan = load_scan(read_cohort(cohort_csv).iloc[3], bundle.spec)
    expected = encode_dense(bundle.encoder("cpu"), scan.hu, scan.lung, scan.grid, bundle.spec, "cpu")
    got = latents[("P001", ACQUISITIONS[1])]
    assert np.array_equal(got.positions, expected.positions)
    assert np.allclose(got.latents, expected.latents, atol=1e-5)


def killable_analyze(control: str, victim: str, ct_path, out_dir, **kwargs):
    """Real analyze that logs each attempt; the first attempt on ``victim`` parks so the test can kill its worker."""
    control = Path(control)
    with open(control / "attempts.log", "a") as log:
        log.write(f"{ct_path} {os.getpid()} {time.time():.2f}\n")
    if str(ct_path) == victim and not (control / "killed").exists():
        half_written = Path(out_dir) / ".latentharmonize-staging-killed"  # as if killed while publishing
        half_written.mkdir(parents=True)
        (half_written / "partial.nrrd").write_bytes(b"NRRD")
        (control / "victim.tmp").write_text(str(os.getpid()))
        os.replace(control / "victim.tmp", control / "victim.pid")
        time.sleep(300)
    return analyze(ct_path, out_dir, **kwargs)


def test_a_worker_killed_mid_scan_loses_and_duplicates_nothing(tmp_path, cohort_csv, bundle_dir, client):
    from latentharmonize.cohort import read_cohort

    victim = read_cohort(cohort_csv)["image"][1]
    control = tmp_path / "control"
    control.mkdir()

    def kill_the_victims_worker():
        pid_file = control / "victim.pid"
        deadline = time.monotonic() + 120
        while not pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        (control / "killed").touch()
        os.kill(int(pid_file.read_text()), signal.SIGKILL)

    killer = threading.Thread(target=kill_the_victims_worker, daemon=True)
    killer.start()
    out = tmp_path / "out"
    summary = batch.run_batch(cohort_csv, out, model=bundle_dir, device="cpu", write_report=False, client=client,
                              analyze_fn=functools.partial(killable_analyze, str(control), victim))
    killer.join(timeout=5)
    attempts = [line.split() for line in (control / "attempts.log").read_text().splitlines()]
    victim_pids = [pid for path, pid, _ in attempts if path == victim]
    assert len(victim_pids) == 2 and victim_pids[0] != victim_pids[1]  # rerun on another worker process
    assert (summary.analyzed, summary.failed) == (4, 0)
    table = pd.read_csv(out / "composition.csv", dtype=str)
    assert sorted(zip(table["patient"], table["acquisition"])) == sorted(
        (p, a) for p in ("P000", "P001") for a in ACQUISITIONS)
    assert len(list(out.glob("*/*/analysis.json"))) == 4
    assert not list(out.glob("*/*/.latentharmonize-staging-*"))  # the killed worker's leftovers are gone


@pytest.mark.slow  # starts its own cluster: ~20 s of worker start-up on 2 busy cores
def test_benchmark_reports_scans_per_minute(cohort_csv, bundle_dir, tmp_path, capsys):
    figures = bench.batch_benchmark(workers=(1,), model=bundle_dir, cohort_csv=cohort_csv, workdir=tmp_path)
    assert figures["n_scans"] == 4 and figures["cohort"] == "cohort"
    rate = figures["by_workers"][1]["scans_per_minute"]
    assert rate == pytest.approx(60 * 4 / figures["by_workers"][1]["seconds"], rel=0.02) and figures["speedup"] == 1.0
    assert "1 worker(s): 4 scans" in capsys.readouterr().out
