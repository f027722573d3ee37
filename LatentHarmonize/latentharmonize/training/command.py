"""``latentharmonize train``: the command-line flags, each default read from :class:`TrainConfig`, and ``run``."""
from __future__ import annotations

from .. import options
from ..errors import InputError
from ..networks import MODEL_KINDS
from ..progress import Progress
from .config import DEFAULT_EPOCHS, TrainConfig
from .summary import format_summary
from .trainer import train

DEFAULTS = TrainConfig()


def add_arguments(parser) -> None:
    parser.add_argument("cohort", help="cohort table (CSV with image, patient, acquisition; optional mask, truth)")
    options.add_out(parser, "model bundle folder to write")
    options.add_seed(parser, default=DEFAULTS.seed)
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--epochs", type=int, default=DEFAULTS.epochs, help=f"training epochs (default {DEFAULT_EPOCHS})")
    budget.add_argument("--max-minutes", type=float, default=DEFAULTS.max_minutes,
                        help="stop training after this many minutes instead")
    parser.add_argument("--encoder", choices=sorted(MODEL_KINDS), default=DEFAULTS.encoder,
                        help=f"encoder variant (default {DEFAULTS.encoder})")
    parser.add_argument("--clusters", type=int, default=DEFAULTS.clusters,
                        help="Gaussian-mixture components, merged by the names of their HU profiles into the tissue "
                             "clusters (default: chosen by stability)")
    parser.add_argument("--n-technical", default=DEFAULTS.n_technical,
                        help="technical latent dimensions to rotate out (default auto: until the probe is at chance)")
    options.add_device(parser, default=DEFAULTS.device)
    parser.add_argument("--patches-per-patient", dest="per_patient", type=int, default=DEFAULTS.per_patient,
                        help=f"sampled lung points per patient (default {DEFAULTS.per_patient})")
    parser.add_argument("--latent-dim", type=int, default=DEFAULTS.latent_dim,
                        help=f"latent size (default {DEFAULTS.latent_dim})")
    parser.add_argument("--context-radius", type=int, default=DEFAULTS.context_radius,
                        help="lattice steps (5 mm) of neighbouring latents averaged into each one before the rotation "
                             f"and clusters (default {DEFAULTS.context_radius}: a 15 mm neighbourhood; 0: the patch "
                             "alone)")
    parser.add_argument("--low-attenuation-channel", action="store_true",
                        help="ae only: also encode and reconstruct a channel of voxels below -950 HU, so the latent "
                             "keeps emphysema (clusters match tissue better, at some cost in consistency; see "
                             "docs/training.md)")
    parser.add_argument("--calibrate", action="store_true",
                        help="calibrate each scan's HU on its own air and fat before encoding (in training and in every "
                             "analysis with this bundle), so a vendor's HU offset cannot pass for a density change")
    parser.add_argument("--densitometry", type=float, nargs="?", const=1.0, default=DEFAULTS.densitometry,
                        metavar="WEIGHT",
                        help="append each patch's HU quantiles and threshold shares to its latent before the rotation "
                             "(weight 1 when given without a value), and cluster these statistics as the rotation "
                             "harmonizes them, not the encoder's latent: clusters follow tissue, not anatomy; see "
                             "docs/training.md")
    parser.add_argument("--densitometry-smooth", dest="densitometry_smooth_mm", type=float,
                        default=DEFAULTS.densitometry_smooth_mm, metavar="MM",
                        help="with --densitometry: read the statistics from the lung blurred in-plane with this "
                             f"Gaussian SD, so a sharp kernel's extra noise does not count as emphysema (default "
                             f"{DEFAULTS.densitometry_smooth_mm:g})")
    parser.add_argument("--densitometry-smooth-total", dest="densitometry_smooth_total", action="store_true",
                        help="with --densitometry-smooth: make MM the total in-plane blur the statistics see, the "
                             "--lowpass/--lowpass-noise blur included, so every kernel's statistics see one blur "
                             "(default: MM is added on top of it)")
    parser.add_argument("--densitometry-read-z", dest="densitometry_read_z_mm", type=float,
                        default=DEFAULTS.densitometry_read_z_mm, metavar="MM",
                        help="with --densitometry: when analysing, blur each scan along z until its slices and the "
                             "blur make a through-plane SD of MM (2.5: that of 5 mm slices), so that thin and thick "
                             "scans of a patient get one map; training fits on the scans as acquired "
                             f"(default {DEFAULTS.densitometry_read_z_mm:g}: each scan as acquired)")
    parser.add_argument("--technical-weight", type=float, default=DEFAULTS.technical_weight, metavar="W",
                        help="weight of the technical coordinates, re-centred on each scan's median, in what the "
                             "clusters read (default: the candidate from 0 to 0.5 whose clusters agree best across the "
                             "training pairs; the shipped bundle fixes 0.1, see docs/training.md)")
    parser.add_argument("--lowpass", dest="lowpass_mm", type=float, default=DEFAULTS.lowpass_mm, metavar="MM",
                        help="blur every scan in-plane with this Gaussian SD on the model grid before encoding (in "
                             "training and in every analysis with this bundle), so soft and sharp kernels reach one "
                             f"resolution (default {DEFAULTS.lowpass_mm:g}; the shipped bundle uses 1)")
    parser.add_argument("--lowpass-noise", dest="lowpass_noise_hu", type=float, default=DEFAULTS.lowpass_noise_hu,
                        metavar="HU", help="raise each scan's blur from --lowpass until the noise of its flat soft "
                                           "tissue is at most this many HU, so sharp and low-dose kernels reach the "
                                           "encoder at a soft kernel's noise (default: off)")
    parser.add_argument("--second-stage", dest="second_stage", type=int, default=DEFAULTS.second_stage, metavar="K",
                        help="with --densitometry: split the raised clusters again with a K-component mixture that "
                             "also reads the unblurred HU of each patch's core (parenchyma away from vessels, airways "
                             "and the lung's edge), each patch earning a disease-like name on its own; see "
                             "docs/training.md (default: off; the shipped bundle uses 4)")
    parser.add_argument("--depth-contrast", dest="depth_contrast_hu", type=float, default=DEFAULTS.depth_contrast_hu,
                        metavar="HU", help="with --second-stage: a ground-glass-like or reticular-like patch must also "
                                           "stand this many HU above the lung at its antero-posterior depth, so the "
                                           "dense back of a lung in a small breath is not named so (default: off; "
                                           "the shipped bundle uses 50)")
    options.add_dask(parser, "sampling the cohort's patches")
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoint in OUT/.checkpoints")
    options.add_overwrite(parser, "an existing bundle in --out")
    options.add_output_style(parser, quiet=False)


def run(args) -> int:
    summary = train(args.cohort, args.out, config_from_args(args), progress=Progress(machine=args.progress_lines),
                    resume=args.resume, overwrite=args.overwrite)
    print(format_summary(summary))
    return 0


def config_from_args(args) -> TrainConfig:
    """The config of parsed ``train`` arguments (width, batch size and learning rate have no flag: defaults)."""
    return TrainConfig(
        encoder=args.encoder, seed=args.seed, epochs=args.epochs, max_minutes=args.max_minutes,
        clusters=args.clusters, n_technical=_n_technical(args.n_technical), per_patient=args.per_patient,
        latent_dim=args.latent_dim, low_attenuation_channel=args.low_attenuation_channel,
        densitometry=args.densitometry, densitometry_smooth_mm=args.densitometry_smooth_mm,
        densitometry_smooth_total=args.densitometry_smooth_total,
        densitometry_read_z_mm=args.densitometry_read_z_mm, technical_weight=args.technical_weight,
        calibrate=args.calibrate, second_stage=args.second_stage, depth_contrast_hu=args.depth_contrast_hu,
        lowpass_mm=args.lowpass_mm, lowpass_noise_hu=args.lowpass_noise_hu,
        context_radius=args.context_radius, device=args.device, scheduler=args.scheduler, workers=args.workers)


def _n_technical(value: str):
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise InputError(f"--n-technical must be 'auto' or an integer, got {value!r}.") from None
