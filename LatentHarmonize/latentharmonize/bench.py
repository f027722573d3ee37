"""``latentharmonize bench``: how fast and how lean ``analyze`` is, on a phantom scan made for the purpose.

``analyze`` runs in a child process exactly as a user would run it (``python -m latentharmonize analyze``), so the
wall time includes start-up and the peak resident memory is that of the analysis alone. Per-stage times come from
the run's ``analysis.json``. Then a resident ``latentharmonize worker`` (what the Slicer module keeps running) is
sent the module's own request for the same scan four times: an uncompressed NRRD copy, as the module hands a volume
over (``slicer_bridge.volumes.write_input_volume``; a gzip-compressed scan takes about 0.4 s longer to read), and no
report, which the module builds on demand. The three requests after the first, with the libraries and the model
already loaded, are the warm times; their median is set beside the one-shot (cold) time, and a worker started with
``--preload`` answers its very first request warm. Then, in this process, the dense fully-convolutional encoding is
compared with the naive path that cuts out and encodes every patch separately, on the same model-grid volume; the
naive path is time-boxed and, when it would take longer, extrapolated from the patches it did encode (the output
says so).
"""
from __future__ import annotations

import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import SimpleITK as sitk
import torch

from . import options
from .analyze_command import LAPS, input_name
from .atomic import atomic_write_text
from .batch import dask_client, run_batch
from .bundle import load_bundle
from .errors import InputError, LatentHarmonizeError
from .io import read_ct
from .patches import encode_dense, encode_patches_naive, model_grid_hu, resolve_device, valid_centres
from .phantom import DEFAULT_ACQUISITIONS, acquire, generate_cohort, make_patient
from .structures import parenchyma, segment_structures
from .slicer_bridge.backend import worker_request
from .worker_protocol import parse_result_line

NAIVE_TIME_BOX_S = 8.0
PRELOAD_WAIT_S = 10.0  # between opening the Slicer module and clicking Analyze: picking the volume, at the least
TARGET_WALL_S = 10.0  # issue 19: a fresh analyze of the full-size phantom on the 2-core CPU
TARGET_WARM_S = 3.0  # and a warm request to the resident worker
WARM_REQUESTS = 3  # warm requests timed after the first: one on a shared machine is as noisy as its neighbours
TARGET_RSS_GB = 3.0


def make_scan(path, full: bool, seed: int = 0) -> dict:
    """Write one phantom acquisition to ``path``; returns its size, spacing and generation time."""
    t0 = time.perf_counter()
    image = acquire(make_patient(0, seed, full=full), DEFAULT_ACQUISITIONS[0])
    sitk.WriteImage(image, str(path), True, 1)
    return {"size": list(image.GetSize()), "spacing": [round(s, 3) for s in image.GetSpacing()],
            "seconds": round(time.perf_counter() - t0, 2)}


def as_slicer_hands_it_over(scan, path) -> Path:
    """``scan`` written to ``path`` as the Slicer module gives the worker a volume: an uncompressed NRRD scratch copy."""
    sitk.WriteImage(read_ct(scan), str(path), False)
    return Path(path)


def run_analyze_child(scan, out_dir, model=None, device: str = "auto", report: bool = True) -> dict:
    """Run ``analyze`` in a child process; wall time, peak RSS (GB) and the run record it wrote."""
    command = [sys.executable, "-m", "latentharmonize", "analyze", str(scan), "--out", str(out_dir),
               "--device", device, "--overwrite", "--quiet"] + ([] if report else ["--no-report"])
    if model:
        command += ["--model", str(model)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"analyze failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    record = json.loads((Path(out_dir) / "analysis.json").read_text(encoding="utf-8"))
    return {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "load_average": round(os.getloadavg()[0], 1),
            "peak_rss_gb": round(after.ru_maxrss / 1024 ** 2, 3),  # largest child so far (Linux: kB)
            "record": record}


def run_worker_child(scan, out_dir, model=None, device: str = "auto", requests: int = 2,
                     preload_wait_s: float | None = None) -> dict:
    """Start ``latentharmonize worker`` in a child process and send it ``requests`` analyses of ``scan``, one after
    another, each into its own folder, as the Slicer module's request line
    (``slicer_bridge.backend.worker_request``: no QC pictures or report, which the module builds on demand). Wall
    time of each, from sending the request to its result line; the first also counts the worker's start-up, unless
    ``preload_wait_s`` is given: then the worker is started with ``--preload`` (as the Slicer module starts it when
    the module is opened) and the first request is sent that many seconds later, like a user who picks a volume
    before clicking Analyze. Returns the first time, the later (warm) ones and their median, and the last run's
    record."""
    command = [sys.executable, "-m", "latentharmonize", "worker"]
    if preload_wait_s is not None:
        command += ["--preload", str(model or "default"), "--preload-device", device]
    walls = []
    with tempfile.TemporaryFile("w+") as errors:
        started = time.perf_counter()
        process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errors, text=True)
        try:
            if preload_wait_s is not None:
                time.sleep(preload_wait_s)
                started = time.perf_counter()
            for n in range(1, requests + 1):
                if n > 1:
                    started = time.perf_counter()
                process.stdin.write(worker_request(scan, Path(out_dir) / f"request-{n}", model_dir=model, device=device))
                process.stdin.flush()
                result = next((r for r in map(parse_result_line, process.stdout) if r is not None), None)
                if result is None or not result.ok:
                    errors.seek(0)
                    raise RuntimeError(f"worker request {n} failed: {result.error if result else errors.read()[-2000:]}")
                walls.append(time.perf_counter() - started)
        finally:
            process.stdin.close()
            process.wait(timeout=60)
    record = json.loads((Path(out_dir) / f"request-{requests}" / "analysis.json").read_text(encoding="utf-8"))
    warm = [round(w, 2) for w in walls[1:]]
    return {"first_s": round(walls[0], 2), "warm_runs_s": warm,
            "warm_s": round(statistics.median(walls[1:]), 2) if warm else None, "record": record}


def compare_naive(scan, lungs_path, model=None, device: str = "auto", time_box_s: float = NAIVE_TIME_BOX_S) -> dict:
    """Dense vs patch-by-patch encoding of the same model-grid volume (naive path time-boxed, extrapolated): the
    parenchyma ``analyze`` encodes, on its calibrated model grid."""
    bundle = load_bundle(model)
    spec, dev = bundle.spec, resolve_device(device)
    ct, lungs = read_ct(scan), sitk.ReadImage(str(lungs_path))
    hu, lung, grid, _ = model_grid_hu(ct, lungs, spec)
    lung = parenchyma(lung, segment_structures(hu, lung, grid.spacing, grid.scan_slices))
    encoder = bundle.encoder(dev)
    dense, dense_s, dense_cpu = _timed(encode_dense, encoder, hu, lung, grid, spec, dev)
    total = int(valid_centres(lung, spec).sum())
    limit = 64
    while True:  # double the subset until the time box is spent or every patch is done
        _, naive_s, naive_cpu = _timed(encode_patches_naive, encoder, hu, lung, grid, spec, dev, batch_size=1,
                                       limit=limit)
        if limit >= total or naive_s * 2 > time_box_s:
            break
        limit *= 2
    scale = total / min(limit, total)
    return {"patches": len(dense.latents), "dense_s": round(dense_s, 3), "dense_cpu_s": round(dense_cpu, 3),
            "dense_patches_per_s": round(len(dense.latents) / dense_s, 1),
            "naive_patches_measured": min(limit, total), "naive_s_measured": round(naive_s, 3),
            "naive_s_for_all": round(naive_s * scale, 2), "naive_cpu_s_for_all": round(naive_cpu * scale, 2),
            "naive_extrapolated": limit < total,
            "speedup": round(naive_s * scale / dense_s, 1), "speedup_cpu": round(naive_cpu * scale / dense_cpu, 1)}


def _timed(fn, *args, **kwargs) -> tuple:
    """``fn(*args, **kwargs)`` with its wall and CPU (all threads of this process) seconds."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - wall, time.process_time() - cpu


def machine() -> dict:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "memory_gb": round(psutil.virtual_memory().total / 1024 ** 3, 1), "gpu": gpu,
            "torch_threads": torch.get_num_threads()}


def benchmark(full: bool = False, device: str = "auto", model=None, workdir=None, seed: int = 0, scan=None,
              report: bool = True) -> dict:
    """Time ``analyze`` on a phantom scan made for the purpose (or on ``scan``) and compare dense with naive
    encoding. Returns the figures."""
    with tempfile.TemporaryDirectory(prefix="lh-bench-", dir=workdir) as tmp:
        out = Path(tmp) / "out"
        figures = {"machine": machine()}
        if scan is None:
            scan = Path(tmp) / "bench_scan.nrrd"
            figures["scan"] = make_scan(scan, full, seed)
        figures["analyze"] = run_analyze_child(scan, out, model, device, report)
        figures["analyze"]["report"] = report
        handed_over = as_slicer_hands_it_over(scan, Path(tmp) / "slicer_scratch.nrrd")
        figures["worker"] = run_worker_child(handed_over, Path(tmp) / "worker", model, device,
                                             requests=1 + WARM_REQUESTS)
        figures["worker"]["cold_over_warm"] = round(figures["analyze"]["wall_s"] / figures["worker"]["warm_s"], 1)
        figures["preloaded"] = run_worker_child(handed_over, Path(tmp) / "preloaded", model, device,
                                                requests=1, preload_wait_s=PRELOAD_WAIT_S)
        record = figures["analyze"]["record"]
        figures.setdefault("scan", {"size": record["ct"]["size"], "spacing": record["ct"]["spacing"]})
        figures["encoding"] = compare_naive(scan, out / f"{input_name(scan)}_lungs.nrrd", model, device)
    return figures


# ----------------------------------------------------------------------------- batch on Dask

def phantom_benchmark_cohort(folder, n_scans: int, seed: int = 0, full: bool = False) -> Path:
    """Write a phantom cohort with at least ``n_scans`` scans and a ``bench.csv`` listing exactly ``n_scans``."""
    if n_scans < 1:
        raise InputError(f"n_scans must be at least 1, got {n_scans}.")
    folder = Path(folder)
    table = generate_cohort(folder, math.ceil(n_scans / len(DEFAULT_ACQUISITIONS)), seed, full=full)
    atomic_write_text(folder / "bench.csv", table.head(n_scans).to_csv(index=False))
    return folder / "bench.csv"


def batch_benchmark(n_scans: int = 4, workers=(1, 2), model=None, cohort_csv=None, full: bool = False, seed: int = 0,
                    device: str = "cpu", write_report: bool = False, workdir=None, verbose: bool = True) -> dict:
    """Scans per minute of ``latentharmonize batch`` on local clusters of 1, 2, ... worker processes (1 thread each).

    The cohort is ``cohort_csv`` (all its scans) or the first ``n_scans`` scans of a new phantom cohort. Each worker count gets a
    fresh cluster whose workers import the analysis stack before the clock starts; the time covers submitting every
    scan to the last result (model loading, reading, analysis, writing), not cluster start-up, which is reported
    apart. Returns ``{"n_scans", "cohort", "by_workers": {workers: {"seconds", "scans_per_minute",
    "startup_s"}}, "speedup"}`` (speedup: scans per minute with the most workers over the fewest).
    """
    if not workers or any(int(w) < 1 for w in workers):
        raise InputError(f"workers must list worker counts of at least 1, got {workers!r}.")
    cohort_csv_given = cohort_csv is not None
    with tempfile.TemporaryDirectory(prefix="latentharmonize-bench-", dir=workdir) as tmp:
        cohort_csv = cohort_csv or phantom_benchmark_cohort(Path(tmp) / "cohort", n_scans, seed, full)
        by_workers = {}
        for n_workers in workers:
            t0 = time.perf_counter()
            with dask_client(workers=n_workers) as client:  # workers preload the analysis stack
                startup = time.perf_counter() - t0
                summary = run_batch(cohort_csv, Path(tmp) / f"out-{n_workers}", model=model, device=device,
                                    write_report=write_report, client=client)
            if summary.failed:
                first = next(o for o in summary.outcomes if o.status == "failed")
                raise LatentHarmonizeError(f"Benchmark scan failed ({first.error_type}: {first.message}); "
                                           "fix it with `latentharmonize analyze` on that scan first.")
            by_workers[int(n_workers)] = {"seconds": round(summary.seconds, 2),
                                          "scans_per_minute": round(summary.scans_per_minute, 2),
                                          "startup_s": round(startup, 2)}
            if verbose:
                print(f"batch benchmark: {n_workers} worker(s): {summary.analyzed} scans in {summary.seconds:.1f} s "
                      f"= {summary.scans_per_minute:.2f} scans/min (cluster start-up {startup:.1f} s)", flush=True)
    rates = [by_workers[w]["scans_per_minute"] for w in sorted(by_workers)]
    source = "cohort" if cohort_csv_given else ("full phantom" if full else "small phantom")
    return {"n_scans": int(summary.n_scans), "cohort": source, "by_workers": by_workers,
            "speedup": round(rates[-1] / rates[0], 2) if rates[0] > 0 else float("nan")}


def _in_pipeline_order(timings: dict) -> list:
    """(stage, seconds) pairs in the order analyze runs them (analysis.json stores keys sorted)."""
    order = [*LAPS, "total"]
    return sorted(timings.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order))


def format_report(figures: dict) -> str:
    """Human-readable summary of :func:`benchmark` figures."""
    m, scan, run, enc = figures["machine"], figures["scan"], figures["analyze"], figures["encoding"]
    warm = figures["worker"]
    record = run["record"]
    lines = [f"machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB RAM, GPU: {m['gpu'] or 'none'}, "
             f"device used: {record['device']}",
             f"scan: {'x'.join(map(str, scan['size']))} voxels, spacing {scan['spacing']} mm "
             + (f"(phantom made in {scan['seconds']} s)" if scan.get("seconds") else "(given scan)"),
             f"analyze{'' if run.get('report', True) else ' --no-report'} (separate process, incl. start-up): {run['wall_s']:.1f} s wall (target <= {TARGET_WALL_S:g} s), "
             f"{run['cpu_s']:.1f} s CPU, load average {run['load_average']} on {m['cores']} cores; "
             f"peak RSS {run['peak_rss_gb']:.2f} GB (target <= {TARGET_RSS_GB:g} GB)",
             "CPU s per stage: " + "  ".join(f"{k} {v:.2f}" for k, v in _in_pipeline_order(record["cpu_s"])),
             "wall s per stage: " + "  ".join(f"{k} {v:.2f}" for k, v in _in_pipeline_order(record["timings_s"]))
             + f"  (the rest, {run['wall_s'] - record['timings_s']['total']:.1f} s, is Python start-up before the "
               "first lap: importing PyTorch, scikit-learn and the backend)",
             "resident worker (latentharmonize worker, sent the Slicer module's request: the uncompressed copy the "
             "module hands over, no report, which the module builds on demand): first request "
             f"{warm['first_s']:.1f} s (start-up included), then warm "
             + " / ".join(f"{w:.1f}" for w in warm["warm_runs_s"])
             + f" s, median {warm['warm_s']:.1f} s (target <= {TARGET_WARM_S:g} s); separate analyze / warm = "
             f"{warm['cold_over_warm']:.1f}x",
             f"preloaded worker (started with --preload, as when the Slicer module opens; first request sent "
             f"{PRELOAD_WAIT_S:g} s later): first request {figures['preloaded']['first_s']:.1f} s",
             "last warm request's wall s per stage: "
             + "  ".join(f"{k} {v:.2f}" for k, v in _in_pipeline_order(warm["record"]["timings_s"])),
             f"encoding: {enc['patches']} patches, dense {enc['dense_s']:.2f} s = {enc['dense_patches_per_s']:.0f} "
             f"patches/s; naive patch-by-patch {enc['naive_s_for_all']:.1f} s "
             + (f"(extrapolated from {enc['naive_patches_measured']} patches in {enc['naive_s_measured']:.1f} s) "
                if enc["naive_extrapolated"] else "")
             + f"-> dense is {enc['speedup']:.0f}x faster ({enc['speedup_cpu']:.0f}x in CPU time)"]
    if "batch" in figures:
        rates = "; ".join(f"{w} worker(s) {v['scans_per_minute']:.1f} scans/min"
                          for w, v in figures["batch"]["by_workers"].items())
        lines.append(f"batch ({figures['batch']['n_scans']} scans): {rates}; speedup {figures['batch']['speedup']:.2f}x")
    return "\n".join(lines)


def add_arguments(parser) -> None:
    parser.add_argument("--full", action="store_true",
                        help="full-size phantom (512x512x~300, the size the targets refer to); default: small, quick")
    options.add_device(parser)
    options.add_model(parser)
    parser.add_argument("--batch", action="store_true", help="also benchmark cohort analysis on Dask (bench.batch_benchmark)")
    parser.add_argument("--scan", default=None, help="benchmark on this CT instead of a phantom scan")
    options.add_no_report(parser)
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    parser.add_argument("--workdir", default=None,
                        help="where to put the temporary phantom and outputs (created if missing)")


def run(args) -> int:
    if args.workdir:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)  # like --out elsewhere: a missing folder is made
    figures = benchmark(full=args.full, device=args.device, model=args.model, workdir=args.workdir, scan=args.scan,
                        report=args.write_report)
    if args.batch:
        figures["batch"] = batch_benchmark(n_scans=4, workers=(1, 2), model=args.model, full=args.full,
                                           device=args.device, workdir=args.workdir, verbose=False)
    print(format_report(figures))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1, sort_keys=True, default=str) + "\n", encoding="utf-8")
    return 0
