"""Cohort analysis on a Dask distributed cluster; CLI ``batch``.

Every scan of a cohort table is analysed by :func:`latentharmonize.analyze_command.analyze` in a Dask task, into
``OUT/<patient>/<acquisition>/``. The run is resumable and fault tolerant:

* a scan whose ``analysis.json`` records the same input SHA-256 and model SHA-256 is skipped;
* a scan that raises is recorded in ``OUT/failures.csv`` and the others go on;
* a worker that dies mid-scan is replaced and Dask reruns its tasks elsewhere; since analyze publishes its
  files atomically and the client builds ``OUT/composition.csv`` from the per-scan folders (one cohort row,
  one folder), every scan appears exactly once.

``OUT/composition.csv`` has one row per analysed scan: the cohort's own columns as written in the cohort CSV,
``output_dir`` (relative to OUT), ``lung_volume_ml``, the whole lung's densitometry (``lung_<column>`` of the scan's
``densitometry.csv``) and one ``frac_<label>_<name>`` column per tissue cluster (fraction of the whole lung, 0..1).
Input, model and output paths must be visible to every worker (a shared file system when the cluster spans
machines).
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import pandas as pd
import psutil
from distributed import Client, LocalCluster, as_completed

from . import options
from .analyze_command import analyze
from .atomic import STAGING_PREFIX, atomic_write_text
from .bundle import default_bundle_path, load_bundle
from .cohort import read_cohort
from .densitometry import COLUMNS as DENSITOMETRY_COLUMNS
from .errors import InputError
from .io import image_sha256
from .patches import encode_dense, resolve_device
from .progress import Progress
from .scans import load_scan

FRACTION_PREFIX = "frac_"
FAILURE_COLUMNS = ["patient", "acquisition", "image", "error_type", "message"]
COMPOSITION_NAME = "composition.csv"
DENSITOMETRY_NAME = "densitometry.csv"
# the whole lung's densitometry in the cohort table, as lung_<column> (an older analysis lacks the matched two: empty)
LUNG_DENSITOMETRY = tuple(f"lung_{c}" for c in DENSITOMETRY_COLUMNS if c not in ("region", "volume_ml"))
FAILURES_NAME = "failures.csv"
SCAN_RECORD = "analysis.json"
MEMORY_PER_WORKER_GB = 4.0  # peak memory of one full-size analyze on CPU, rounded up

AnalyzeFn = Callable[..., object]


@dataclass(frozen=True)
class ScanTask:
    """One row of the cohort: what to analyse and where its outputs go."""

    index: int
    patient: str
    acquisition: str
    image: str
    mask: Optional[str]
    out_dir: str


@dataclass(frozen=True)
class ScanOutcome:
    """What happened to one scan: ``analyzed``, ``skipped`` (already done) or ``failed``."""

    index: int
    status: str
    seconds: float = 0.0
    error_type: str = ""
    message: str = ""


@dataclass
class BatchSummary:
    out_dir: Path
    n_scans: int
    analyzed: int
    skipped: int
    failed: int
    seconds: float
    composition_csv: Path
    failures_csv: Path
    outcomes: list = field(default_factory=list, repr=False)

    @property
    def scans_per_minute(self) -> float:
        return 60.0 * self.analyzed / self.seconds if self.seconds > 0 else float("nan")

    def describe(self) -> str:
        return (f"{self.n_scans} scans: {self.analyzed} analysed, {self.skipped} already done, "
                f"{self.failed} failed, in {self.seconds:.1f} s")


# ---------------------------------------------------------------- planning

def safe_name(text: str) -> str:
    """A folder or column name fragment: keep letters, digits, '.', '-', '_', replace the rest with '_'."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", str(text).strip()).strip("._")
    return name or "_"


def scan_dir(out_dir, patient: str, acquisition: str) -> Path:
    return Path(out_dir) / safe_name(patient) / safe_name(acquisition)


def read_cohort_tables(cohort_csv) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Return (validated cohort with resolved paths, the same rows exactly as written in the CSV)."""
    cohort = read_cohort(cohort_csv).reset_index(drop=True)
    raw = pd.read_csv(cohort_csv, dtype=str, keep_default_na=False, skipinitialspace=True)
    raw.columns = [str(c).strip() for c in raw.columns]
    if len(raw) != len(cohort):
        raise InputError(f"{cohort_csv}: cohort validation kept {len(cohort)} of {len(raw)} rows; fix the table.")
    return cohort, raw


def plan_scans(cohort: pd.DataFrame, out_dir) -> list[ScanTask]:
    """One task per cohort row; refuses two rows that would write into the same folder."""
    tasks, seen = [], {}
    has_mask = "mask" in cohort.columns
    for i, row in cohort.iterrows():
        patient, acquisition = str(row["patient"]), str(row["acquisition"])
        target = scan_dir(out_dir, patient, acquisition)
        if target in seen:
            raise InputError(
                f"Cohort rows {seen[target] + 2} and {i + 2} both map to {target} (patient {patient!r}, "
                f"acquisition {acquisition!r}); each patient/acquisition pair must be unique.")
        seen[target] = i
        mask = row["mask"] if has_mask and isinstance(row["mask"], str) and row["mask"] else None
        tasks.append(ScanTask(int(i), patient, acquisition, str(row["image"]), mask, str(target)))
    return tasks


# ---------------------------------------------------------------- per scan (runs on a worker)

def mask_source(mask: Optional[str]) -> str:
    """How analyze records the lung mask it used in analysis.json."""
    return "automatic" if mask is None else str(mask)


def is_finished(out_dir, input_sha256: str, model_sha256: str, mask: Optional[str] = None,
                with_report: bool = False) -> bool:
    """True when ``out_dir`` holds a complete analysis of this input, by this model, with this lung mask (and,
    if ``with_report``, its QC report)."""
    try:
        record = json.loads((Path(out_dir) / SCAN_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    outputs = record.get("outputs") or {}
    return (record.get("input_sha256") == input_sha256 and record.get("model_sha256") == model_sha256
            and record.get("mask") == mask_source(mask) and COMPOSITION_NAME in outputs.values()
            and (not with_report or "report" in outputs)
            and all((Path(out_dir) / name).is_file() for name in outputs.values()))


def remove_stale_staging(out_dir) -> None:
    """Delete hidden staging folders that a worker killed while writing left in a scan folder."""
    for stale in Path(out_dir).glob(f"{STAGING_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)


def process_scan(task: ScanTask, model: Optional[str], model_sha256: str, device: str = "auto",
                 write_report: bool = True, analyze_fn: Optional[AnalyzeFn] = None) -> ScanOutcome:
    """Analyse one scan unless already done; errors become a ``failed`` outcome instead of stopping the batch."""
    t0 = time.perf_counter()
    try:
        if is_finished(task.out_dir, image_sha256(task.image), model_sha256, task.mask, write_report):
            return ScanOutcome(task.index, "skipped", time.perf_counter() - t0)
        analyze_fn = analyze_fn or analyze
        # Dask runs a scan's task again only once its previous worker is gone, so leftovers are not in use;
        # overwrite: whatever is in the folder is stale, or half-published by a killed worker.
        remove_stale_staging(task.out_dir)
        analyze_fn(task.image, task.out_dir, model=model, mask=task.mask, device=device, overwrite=True,
                   write_report=write_report)
        return ScanOutcome(task.index, "analyzed", time.perf_counter() - t0)
    except Exception as exc:  # noqa: BLE001 - any scan error is recorded, the batch goes on
        return ScanOutcome(task.index, "failed", time.perf_counter() - t0, type(exc).__name__, _one_line(exc))


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


# ---------------------------------------------------------------- Dask

def default_workers(threads_per_worker: int = 1, memory_per_worker_gb: float = MEMORY_PER_WORKER_GB) -> int:
    """Worker processes that fit this machine: limited by CPU cores and by memory for one scan each."""
    cores = os.cpu_count() or 1
    memory_gb = psutil.virtual_memory().total / 2**30
    return max(1, min(cores // max(1, threads_per_worker), int(memory_gb // memory_per_worker_gb)))


@contextlib.contextmanager
def dask_client(scheduler: Optional[str] = None, workers: Optional[int] = None, threads_per_worker: int = 1,
                timeout: str = "30s") -> Iterator["distributed.Client"]:  # noqa: F821
    """A client on an existing scheduler (``tcp://host:port``, connecting within ``timeout``) or on a local
    cluster of worker processes."""
    if scheduler:
        try:
            client = Client(scheduler, timeout=timeout)
        except OSError as exc:
            raise InputError(f"Cannot reach the Dask scheduler at {scheduler}: {exc}. Check --scheduler "
                             f"(tcp://host:port) and that the scheduler is running.") from exc
        with client:
            yield client
        return
    if workers is not None and workers < 1 or threads_per_worker < 1:
        raise InputError("--workers and --threads-per-worker must be at least 1.")
    n_workers = workers or default_workers(threads_per_worker)
    # preload: a worker imports this module, and with it the analysis stack, before it joins, so no task waits on a
    # cold (re)started worker, and a worker restarted after a crash only takes work once ready.
    with LocalCluster(n_workers=n_workers, threads_per_worker=threads_per_worker, processes=True,
                      dashboard_address=":0", silence_logs=logging.ERROR, preload=[__name__]) as cluster, \
            Client(cluster) as client:
        yield client


def client_session(client=None, scheduler: Optional[str] = None, workers: Optional[int] = None,
                   threads_per_worker: int = 1):
    """Context manager yielding ``client`` as given (left open), else a new client from :func:`dask_client`."""
    if client is not None:
        return contextlib.nullcontext(client)
    return dask_client(scheduler, workers, threads_per_worker)


def run_scans(client, tasks: list[ScanTask], model: Optional[str], model_sha256: str, device: str = "auto",
              write_report: bool = True, analyze_fn: Optional[AnalyzeFn] = None,
              progress: Optional[Progress] = None) -> list[ScanOutcome]:
    """Submit one task per scan and collect the outcomes as they finish (order of ``tasks``).

    A task whose workers keep dying (Dask gives up after ``distributed.scheduler.allowed-failures`` retries)
    comes back as a ``failed`` outcome with error type ``KilledWorker``.
    """
    run_id = uuid.uuid4().hex[:8]
    pending = {client.submit(process_scan, task, model, model_sha256, device, write_report, analyze_fn,
                             key=f"latentharmonize-scan-{run_id}-{task.index}", pure=False): task for task in tasks}
    outcomes: dict[int, ScanOutcome] = {}
    try:
        for future in as_completed(list(pending)):
            task = pending.pop(future)  # released once collected: a worker lost later costs no recomputation
            try:
                outcome = future.result()
            except Exception as exc:  # noqa: BLE001 - e.g. KilledWorker: record it, keep collecting
                outcome = ScanOutcome(task.index, "failed", 0.0, type(exc).__name__, _one_line(exc))
            outcomes[task.index] = outcome
            if progress is not None:
                progress(100.0 * len(outcomes) / len(tasks), "batch",
                         f"{len(outcomes)}/{len(tasks)} {task.patient}/{task.acquisition} {outcome.status}")
    finally:
        client.cancel(list(pending))  # interrupted: stop the scans not started yet
    return [outcomes[t.index] for t in tasks]


# ---------------------------------------------------------------- aggregation (on the client)

def fraction_column(label: int, name: str) -> str:
    return f"{FRACTION_PREFIX}{int(label)}_{safe_name(name).lower()}"


def scan_profile(out_dir) -> dict:
    """One scan's row: lung volume, the whole lung's densitometry and fraction of the whole lung per cluster, from
    its composition.csv and densitometry.csv."""
    table = pd.read_csv(Path(out_dir) / COMPOSITION_NAME)
    whole = table[table["region"] == "whole"].sort_values("label")
    profile = {"lung_volume_ml": round(float(whole["volume_ml"].sum()), 3)}
    path = Path(out_dir) / DENSITOMETRY_NAME
    whole_lung = pd.read_csv(path).set_index("region").loc["whole"] if path.exists() else pd.Series(dtype=float)
    for column in LUNG_DENSITOMETRY:
        profile[column] = float(whole_lung.get(column[len("lung_"):], float("nan")))
    for row in whole.itertuples(index=False):
        profile[fraction_column(row.label, row.name)] = float(row.fraction)
    return profile


def aggregate_compositions(raw_cohort: pd.DataFrame, tasks: list[ScanTask], outcomes: list[ScanOutcome],
                           out_dir) -> pd.DataFrame:
    """One row per scan that is analysed (now or before): cohort columns, output folder, lung profile."""
    rows = []
    for task, outcome in zip(tasks, outcomes):
        if outcome.status == "failed":
            continue
        row = raw_cohort.iloc[task.index].to_dict()
        row["output_dir"] = Path(task.out_dir).relative_to(out_dir).as_posix()
        row.update(scan_profile(task.out_dir))
        rows.append(row)
    columns = list(raw_cohort.columns) + ["output_dir", "lung_volume_ml", *LUNG_DENSITOMETRY]
    table = pd.DataFrame(rows, columns=None if rows else columns)
    fractions = sorted((c for c in table.columns if c.startswith(FRACTION_PREFIX) and c not in raw_cohort.columns),
                       key=lambda c: int(c.split("_")[1]))
    # A cluster absent from a scan covers none of its lung.
    table[fractions] = table[fractions].fillna(0.0)
    return table[columns + fractions]


def failures_table(raw_cohort: pd.DataFrame, tasks: list[ScanTask], outcomes: list[ScanOutcome]) -> pd.DataFrame:
    rows = [{"patient": t.patient, "acquisition": t.acquisition, "image": raw_cohort.iloc[t.index]["image"],
             "error_type": o.error_type, "message": o.message}
            for t, o in zip(tasks, outcomes) if o.status == "failed"]
    return pd.DataFrame(rows, columns=FAILURE_COLUMNS)


@functools.lru_cache(maxsize=2)
def _worker_bundle(model: str):
    """The bundle loaded once per worker process (and verified then), not once per scan."""
    return load_bundle(model)


def _encode_scan(row: pd.Series, model: str, device: str):
    """Worker side: one scan on the model grid, densely encoded by the bundle's encoder as training encodes it
    (whole-lung patches), for refitting the rotation or the clusters."""
    bundle = _worker_bundle(model)
    scan = load_scan(row, bundle.spec)
    torch_device = resolve_device(device)
    return encode_dense(bundle.encoder(torch_device), scan.hu, scan.lung, scan.grid, bundle.spec, torch_device)


def encode_cohort(cohort_csv, model=None, device: str = "auto", client=None, scheduler: Optional[str] = None,
                  workers: Optional[int] = None, progress: Optional[Progress] = None) -> dict:
    """Dense latents of every scan of a cohort, one Dask task per scan: ``{(patient, acquisition): DenseLatents}``.

    Each worker reads its scan, finds the lungs (or reads the ``mask`` column), resamples onto the model grid and
    encodes every valid patch with the bundle's encoder (``patches.encode_dense``); only latents travel back.
    """
    model_path, _ = model_identity(model)
    cohort = read_cohort(cohort_csv)
    keys = list(zip(cohort["patient"].astype(str), cohort["acquisition"].astype(str)))
    with client_session(client, scheduler, workers) as active:
        futures = [active.submit(_encode_scan, row, model_path, device, pure=False) for _, row in cohort.iterrows()]
        latents = {}
        for n, (key, future) in enumerate(zip(keys, futures)):
            latents[key] = future.result()
            if progress is not None:
                progress(100.0 * (n + 1) / len(keys), "encode", f"{key[0]}/{key[1]}: {len(latents[key].latents)} patches")
    return latents


# ---------------------------------------------------------------- entry points

def model_identity(model=None) -> tuple[str, str]:
    """(bundle folder, bundle SHA-256); ``None`` means the default bundle. Loads once to verify it."""
    path = Path(model) if model is not None else Path(default_bundle_path())
    return str(path.resolve()), load_bundle(path).sha256


def run_batch(cohort_csv, out_dir, model=None, scheduler: Optional[str] = None, workers: Optional[int] = None,
              threads_per_worker: int = 1, device: str = "auto", write_report: bool = True, client=None,
              analyze_fn: Optional[AnalyzeFn] = None, progress: Optional[Progress] = None) -> BatchSummary:
    """Analyse every scan of ``cohort_csv`` into ``out_dir`` on Dask; write composition.csv and failures.csv.

    ``client``: an existing ``distributed.Client`` (otherwise one is made from ``scheduler``/``workers``).
    ``write_report``: also write each scan's QC pictures, surfaces and report.html (as analyze does).
    ``analyze_fn`` replaces :func:`latentharmonize.analyze_command.analyze` (same signature), e.g. for tests.
    """
    out_dir = Path(out_dir).resolve()
    cohort, raw = read_cohort_tables(cohort_csv)
    tasks = plan_scans(cohort, out_dir)
    model_path, model_sha = model_identity(model)
    t0 = time.perf_counter()
    with client_session(client, scheduler, workers, threads_per_worker) as active:
        outcomes = run_scans(active, tasks, model_path, model_sha, device, write_report, analyze_fn, progress)
    seconds = time.perf_counter() - t0
    composition = aggregate_compositions(raw, tasks, outcomes, out_dir)
    failures = failures_table(raw, tasks, outcomes)
    composition_csv, failures_csv = out_dir / COMPOSITION_NAME, out_dir / FAILURES_NAME
    atomic_write_text(composition_csv, composition.to_csv(index=False))
    atomic_write_text(failures_csv, failures.to_csv(index=False))
    count = {s: sum(o.status == s for o in outcomes) for s in ("analyzed", "skipped", "failed")}
    return BatchSummary(out_dir, len(tasks), count["analyzed"], count["skipped"], count["failed"], seconds,
                        composition_csv, failures_csv, outcomes)


def add_arguments(parser) -> None:
    parser.add_argument("cohort", help="cohort CSV (columns image, patient, acquisition, optional mask, ...)")
    options.add_out(parser, "output folder: <patient>/<acquisition>/ per scan, composition.csv (one row per scan) "
                            "and failures.csv")
    options.add_model(parser)
    options.add_dask(parser, "the scans")
    parser.add_argument("--threads-per-worker", type=int, default=1,
                        help="scans analysed at once per worker process (default 1)")
    options.add_device(parser)
    options.add_no_report(parser)
    options.add_output_style(parser, quiet=False)


def run(args) -> int:
    progress = Progress(machine=args.progress_lines)
    summary = run_batch(args.cohort, args.out, model=args.model, scheduler=args.scheduler, workers=args.workers,
                        threads_per_worker=args.threads_per_worker, device=args.device,
                        write_report=args.write_report, progress=progress)
    print(summary.describe())
    print(f"composition: {summary.composition_csv}")
    if summary.failed:
        print(f"failures: {summary.failures_csv}")
    return 1 if summary.failed else 0
