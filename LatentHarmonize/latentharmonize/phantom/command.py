"""``latentharmonize phantom``: write a phantom cohort, or only the sample scan (``--sample``)."""
from __future__ import annotations

import time
from pathlib import Path

from .. import options
from ..errors import InputError
from ..progress import Progress
from .cohort import generate_cohort
from .sample import write_sample
from .settings import DEFAULT_ACQUISITIONS, SETTING_RANGES


def add_arguments(parser) -> None:
    parser.add_argument("outdir", nargs="?", help="output folder for the cohort (created if missing)")
    parser.add_argument("--sample", metavar="OUT.nrrd", default=None,
                        help="write only the sample scan (one full-size chest CT with mixed disease, the 3D Slicer "
                             "module's sample data) to this file, instead of a cohort")
    parser.add_argument("--patients", type=int, default=4, help="number of patients (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; same seed, same cohort (default 0)")
    parser.add_argument("--acquisitions", nargs="+", metavar="NAME", default=None,
                        help="acquisitions to simulate (default all: "
                             + ", ".join(a.name for a in DEFAULT_ACQUISITIONS) + ")")
    parser.add_argument("--acquisitions-per-patient", type=int, default=None, metavar="N",
                        help="scan each patient under only N of the acquisitions, drawn with the seed "
                             "(a multi-site cohort; default: every patient under all of them)")
    parser.add_argument("--drawn-settings", choices=sorted(SETTING_RANGES), default=None,
                        help="draw each patient's acquisitions (a soft/sharp pair, then independent draws) from "
                             "continuous ranges of kernel, dose, thickness and calibration; the train and heldout "
                             "ranges do not overlap (default: the named acquisitions)")
    parser.add_argument("--full", action="store_true",
                        help="full-size scans (512 x 512 x 300, 0.7 mm in-plane) instead of the small 192 x 192 x 112")
    options.add_overwrite(parser, "files already in the output folder")
    options.add_output_style(parser)


def run(args) -> int:
    if (args.outdir is None) == (args.sample is None):
        raise InputError("Give an output folder for a cohort, or --sample OUT.nrrd for the sample scan: one of the two.")
    if args.sample is not None:
        written = write_sample(args.sample, overwrite=args.overwrite)
        if not args.quiet:
            print(written)
        return 0
    progress = Progress(machine=args.progress_lines, quiet=args.quiet)
    t0 = time.perf_counter()
    table = generate_cohort(args.outdir, args.patients, args.seed, acquisitions=args.acquisitions, full=args.full,
                            overwrite=args.overwrite, progress=progress,
                            acquisitions_per_patient=args.acquisitions_per_patient, drawn_settings=args.drawn_settings)
    if not args.quiet and not args.progress_lines:
        print(f"{len(table)} scans of {args.patients} patients in {time.perf_counter() - t0:.1f} s; "
              f"table: {Path(args.outdir) / 'cohort.csv'}")
    return 0
