"""The representations ``evaluate`` compares, as one registry.

Each entry is a small class that declares what it is by its base class:

- :class:`Representation`: features fitted on the training scans' latents (``entangled``, ``rotated``);
  ``bundle_clusters`` are the rotated features labelled by the bundle's own clusters instead of a refit
  (:meth:`Representation.own_clusters`);
- :class:`LatentHarmonizer`: a harmonizer fitted on the training latents and their acquisitions (ComBat, Harmony,
  LEACE);
- :class:`ImageHarmonizer`: fitted on the training scans' lung HU, applied to each CT before encoding
  (histogram matching);
- :class:`OtherEncoder`: the latent of another bundle's encoder, given on the command line (``--unoranic``);
- :class:`PatchStatistic`: no encoder, a statistic of each patch computed at encoding time (``hu_statistics``);
- :class:`LabelBaseline`: labels without clustering; compared on consistency, truth and tissue, not probed and
  given no survival profile (``hu_threshold_classes``).

``reference = True`` keeps an entry out of the goal check's baselines (rotated need not beat it); ``note`` is a
sentence the report adds under the consistency table.

Adding a baseline: write one subclass of the fitting kind (a ``name`` and its one method) and add one instance to
``REGISTRY``; encoding, clustering, every measure, the report and the summary iterate over the registry.
"""
from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from ..clusters import acquisition_covariance, fit_named_clusters
from ..densitometry import HU_STATISTIC_NAMES
from ..errors import InputError
from ..patches import lattice_hu_statistics
from ..progress import Progress
from ..two_stage import fit_two_stage_clusters, reads_core, with_core
from .consistency import by_patient, common_rows
from .encoding import CORE_STATISTICS, ScanLatents, stack
from .harmonizers import ComBatHarmonizer, HarmonyHarmonizer, HistogramMatcher, LeaceHarmonizer
from .tissue import PATCH_MEAN_HU, THRESHOLD_BASELINE, threshold_classes

Features = Callable[[ScanLatents], np.ndarray]


@dataclass
class Training:
    """What a representation is fitted on: the bundle, the encoded training scans and their fitting rows."""

    bundle: object
    scans: List[ScanLatents]
    rows: Dict[int, np.ndarray]
    seed: int

    def stack(self, source: str):
        return stack(self.scans, self.rows, source)


class Representation:
    """Features of every scan, fitted on the training latents: ``fit(training) -> f(scan) -> [n, d]``."""

    name = ""
    reference = False
    note = ""

    def fit(self, training: Training) -> Features:
        raise NotImplementedError

    def missing(self, sources: set) -> Optional[str]:
        """Why this representation cannot run on scans holding ``sources`` (None: it can)."""
        return None

    def unfit_for(self, seen: set, held_out: set) -> Optional[str]:
        """Why this representation cannot label held-out scans of the acquisitions ``held_out`` when trained on
        ``seen`` (None: it can)."""
        return None

    def own_clusters(self, training: Training):
        """The fitted clusters this representation labels scans with, if it brings its own (None: they are fitted
        on the training rows like every other representation's, :func:`assign_clusters`)."""
        return None

    def refit(self, training: Training, features, stats: Dict[str, np.ndarray], n_clusters: int, seed: int, widening):
        """Clusters fitted on this representation's training ``features`` (:func:`refit_clusters`)."""
        return refit_clusters(features, stats, n_clusters, seed, widening)


class LatentHarmonizer(Representation):
    """A harmonizer (``fit(X, batch)``, ``transform(X, batch)``) fitted on the training latents and acquisitions."""

    corrects_unseen = False  # whether it can correct an acquisition that no training scan had

    def harmonizer(self, seed: int):
        raise NotImplementedError

    def unfit_for(self, seen: set, held_out: set) -> Optional[str]:
        unseen = sorted(held_out - seen)
        if self.corrects_unseen or not unseen:
            return None
        return (f"corrects only acquisitions seen in training; {len(unseen)} held-out acquisitions are not "
                f"(e.g. {unseen[0]!r})")

    def fit(self, training: Training) -> Features:
        fitted = self.harmonizer(training.seed).fit(*training.stack("entangled"))
        return lambda s: fitted.transform(s.latents["entangled"], np.full(len(s.keys), s.acquisition))


class ImageHarmonizer(Representation):
    """Fitted on regular samples of the training scans' lung HU; each CT is encoded again after ``transform(hu,
    lung)`` (its latents are the source named like the representation)."""

    def fit_images(self, samples: List[np.ndarray], seed: int):
        raise NotImplementedError

    def fit(self, training: Training) -> Features:
        return lambda s: s.latents[self.name]


class OtherEncoder(Representation):
    """The latent of another bundle's encoder at the same lattice points; the bundle comes from ``--<option>``."""

    option = ""
    help = ""
    title = ""  # how the report names the missing bundle

    def fit(self, training: Training) -> Features:
        return lambda s: s.latents[self.name]

    def missing(self, sources: set) -> Optional[str]:
        return None if self.name in sources else f"no {self.title} bundle given (--{self.option} DIR)"


class PatchStatistic(Representation):
    """No encoder: ``statistic(hu, lung, positions, spec) -> [n, d]`` of each patch, context-averaged like the
    latents, standardised on the training rows (one scale for k-means)."""

    def statistic(self, hu, lung, positions, spec) -> np.ndarray:
        raise NotImplementedError

    def fit(self, training: Training) -> Features:
        scaler = StandardScaler().fit(training.stack(self.name)[0])
        return lambda s: scaler.transform(s.latents[self.name])


class LabelBaseline(Representation):
    """Labels each scan directly: ``labels(scan) -> [n]``; no features, no clustering, no probe, no survival."""

    def labels(self, scan: ScanLatents) -> np.ndarray:
        raise NotImplementedError


class Entangled(Representation):
    name = "entangled"

    def fit(self, training: Training) -> Features:
        return lambda s: s.latents["entangled"]


class Rotated(Representation):
    """The rotation's cluster features; with a bundle whose clusters have a second stage, each patch's core
    statistics after them, and the refit has the bundle's two stages (:mod:`latentharmonize.two_stage`)."""

    name = "rotated"

    def fit(self, training: Training) -> Features:
        rotation = training.bundle.rotation
        if reads_core(training.bundle.clusters):
            return lambda s: with_core(rotation.cluster_features(s.latents["entangled"]), s.latents[CORE_STATISTICS])
        return lambda s: rotation.cluster_features(s.latents["entangled"])

    def refit(self, training: Training, features, stats: Dict[str, np.ndarray], n_clusters: int, seed: int, widening):
        shipped = training.bundle.clusters
        if not reads_core(shipped):
            return super().refit(training, features, stats, n_clusters, seed, widening)
        return fit_two_stage_clusters(features, stats, n_clusters, shipped.n_second, seed, order_by=stats["mean_hu"],
                                      acquisition_covariance=widening, harmonized_columns=shipped.harmonized_columns,
                                      min_above_depth_hu=shipped.min_above_depth_hu)[0]


class BundleClusters(Rotated):
    """The rotated features labelled by the clusters ``train`` fitted and the bundle ships: what ``analyze`` paints.
    The ``rotated`` row refits its clusters here like every other representation's, at the evaluation's seed."""

    name = "bundle_clusters"
    reference = True
    note = ("bundle_clusters: the rotated features labelled by the bundle's own clusters (what analyze paints), not "
            "refitted here")

    def own_clusters(self, training: Training):
        return training.bundle.clusters


class ComBat(LatentHarmonizer):
    name = "combat"

    def harmonizer(self, seed: int):
        return ComBatHarmonizer()


class Harmony(LatentHarmonizer):
    name = "harmony"

    def harmonizer(self, seed: int):
        return HarmonyHarmonizer(random_state=seed)


class Leace(LatentHarmonizer):
    name = "leace"
    corrects_unseen = True  # the eraser needs no acquisition label at transform time

    def harmonizer(self, seed: int):
        return LeaceHarmonizer()


class HistogramMatching(ImageHarmonizer):
    name = "histogram_matching"

    def fit_images(self, samples: List[np.ndarray], seed: int):
        return HistogramMatcher(random_state=seed).fit(samples, [np.ones(s.shape, bool) for s in samples])


class Unoranic(OtherEncoder):
    name = "unoranic"
    option = "unoranic"
    title = "unORANIC"
    help = "bundle trained with --encoder unoranic, for the unoranic baseline"


class HuStatistics(PatchStatistic):
    name = "hu_statistics"
    reference = True
    note = ("<i>hu_statistics</i> uses no encoder: the HU quantiles and threshold shares of each patch, the "
            "reference a learned representation has to beat.")

    def statistic(self, hu, lung, positions, spec) -> np.ndarray:
        return lattice_hu_statistics(hu, lung, positions, spec)


class HuThresholdClasses(LabelBaseline):
    name = THRESHOLD_BASELINE

    def labels(self, scan: ScanLatents) -> np.ndarray:
        return threshold_classes(scan.latents[PATCH_MEAN_HU])


REGISTRY = (Entangled(), Rotated(), BundleClusters(), ComBat(), Harmony(), Leace(), HistogramMatching(), Unoranic(),
            HuStatistics(), HuThresholdClasses())
# rotated is what the goal check judges, entangled what it gains over: neither is a baseline to beat
SUBJECTS = ("entangled", "rotated")


def of_kind(kind: type) -> list:
    return [r for r in REGISTRY if isinstance(r, kind)]


def feature_names() -> List[str]:
    """Names of the clustered representations (every entry but the label baselines), in registry order."""
    return [r.name for r in REGISTRY if not isinstance(r, LabelBaseline)]


def goal_baselines(names) -> List[str]:
    """Those of ``names`` the goal check asks rotated to beat: not a subject, not a reference."""
    excluded = set(SUBJECTS) | {r.name for r in REGISTRY if r.reference}
    return [n for n in names if n not in excluded]


def patch_statistics() -> Dict[str, Callable]:
    """The patch statistics to compute at encoding time, by name (``Encoders(statistics=...)``)."""
    return {r.name: r.statistic for r in of_kind(PatchStatistic)}


def fit_image_harmonizers(samples: List[np.ndarray], seed: int) -> dict:
    return {r.name: r.fit_images(samples, seed) for r in of_kind(ImageHarmonizer)}


def fit_features(training: Training, skipped: dict, held_out_acquisitions: set = frozenset()) -> Dict[str, Features]:
    """Fit every clustered representation the training scans' sources allow and that can label scans of the
    ``held_out_acquisitions`` (ComBat and Harmony correct only acquisitions they were fitted on: on scanner settings
    held out of training they cannot run); the others are noted in ``skipped``."""
    sources = set(training.scans[0].latents)
    seen = {s.acquisition for s in training.scans}
    funcs: Dict[str, Features] = {}
    for r in REGISTRY:
        if isinstance(r, LabelBaseline):
            continue
        reason = r.missing(sources) or r.unfit_for(seen, set(held_out_acquisitions))
        if reason:
            skipped[r.name] = reason
        else:
            funcs[r.name] = r.fit(training)
    return funcs


def fit_tissue_readout(features: np.ndarray, truth: np.ndarray, seed: int):
    """Class-balanced logistic regression of the true tissue (labels > 0) on a representation's features."""
    lung = truth > 0
    if len(np.unique(truth[lung])) < 2:
        raise InputError("The training patches hold fewer than two true tissue classes; the tissue read-out needs more "
                         "(diseased) training patients.")
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, class_weight="balanced", random_state=seed))
    return model.fit(features[lung], truth[lung])


def naming_statistics(scan: ScanLatents) -> Dict[str, np.ndarray]:
    """Per point, the patch statistics cluster names are read from (``clusters.NAMING_KEYS``, and the mean HU), taken
    from the ``hu_statistics`` source: the same HU of the bundle's grid that ``train`` names its clusters from."""
    columns = dict(zip(HU_STATISTIC_NAMES, scan.latents[HuStatistics.name].T))
    return {"mean_hu": np.ravel(scan.latents[PATCH_MEAN_HU]), "median_hu": columns["q50"],
            "q25_hu": columns["q25"], "frac_below_950": columns["below_950"], "frac_above_700": columns["above_700"],
            "frac_above_300": columns["above_300"]}


def training_naming_statistics(train: List[ScanLatents], rows) -> Dict[str, np.ndarray]:
    """:func:`naming_statistics` of the training rows (``rows``: scan index -> row indices), stacked."""
    per_scan = {i: naming_statistics(train[i]) for i in rows}
    return {key: np.concatenate([per_scan[i][key][r] for i, r in rows.items()]) for key in next(iter(per_scan.values()))}


def training_acquisition_covariance(train: List[ScanLatents], features: List[np.ndarray]) -> Optional[np.ndarray]:
    """:func:`clusters.acquisition_covariance` of a representation's ``features`` of the training scans (one array
    per scan of ``train``) over the training pairs: every two acquisitions of a training patient, at the lattice
    points all its acquisitions hold (``train`` pairs points the same way). None when no patient has two."""
    of_scan = {id(s): x for s, x in zip(train, features)}
    first, second = [], []
    for scans in by_patient(train).values():
        rows = common_rows(scans)
        if len(scans) < 2 or len(rows[0]) == 0:
            continue
        features = [of_scan[id(s)][r] for s, r in zip(scans, rows)]
        for a, b in itertools.combinations(features, 2):
            first.append(a)
            second.append(b)
    return acquisition_covariance(np.concatenate(first), np.concatenate(second)) if first else None


def cluster_recipes(training: Training, names) -> Dict[str, Callable]:
    """{name: fit(features, stats, n_clusters, seed, widening) -> clusters} of those of ``names`` in the registry:
    how each representation's clusters are refitted."""
    return {r.name: functools.partial(r.refit, training) for r in REGISTRY if r.name in names}


def own_clusters(training: Training, names) -> dict:
    """{name: clusters} of those of ``names`` whose registry entry brings its own clusters."""
    brought = {r.name: r.own_clusters(training) for r in REGISTRY if r.name in names}
    return {name: clusters for name, clusters in brought.items() if clusters is not None}


def refit_clusters(features, stats: Dict[str, np.ndarray], n_clusters: int, seed: int, widening):
    """Tissue clusters fitted on one representation's training ``features`` as ``train`` fits them: ``n_clusters``
    mixture components widened by ``widening`` (its acquisition covariance), named from ``stats`` and merged by
    name."""
    return fit_named_clusters(features, stats, n_clusters, seed, order_by=stats["mean_hu"],
                              acquisition_covariance=widening)[0]


def assign_clusters(funcs: Dict[str, Features], scans: List[ScanLatents], train: List[ScanLatents], rows,
                    n_clusters: int, seed: int, progress: Progress, skipped: dict,
                    fitted: Optional[dict] = None, recipes: Optional[dict] = None) -> Dict[str, List[str]]:
    """Fit clusters per representation on the training rows as ``train`` does (``n_clusters`` mixture components,
    widened by the representation's own acquisition covariance on the training pairs, named from their patches' HU
    and merged by name; ``recipes``: {name: fit function} where a representation refits otherwise,
    :func:`cluster_recipes`) and label every scan with them; ``fitted``: {name: clusters} to label with instead of a
    fit (:func:`own_clusters`). Where the training scans carry the phantom truth, also fit the tissue read-out and
    store its labels in ``readout``. Returns {name: names of labels 1, 2, ...} where clusters keep names (two-stage)."""
    with_truth = all(s.truth is not None for s in train)
    stats = training_naming_statistics(train, rows)
    names = {}
    for k, (name, f) in enumerate(funcs.items()):
        train_features = [f(s) for s in train]
        features = np.concatenate([train_features[i][r] for i, r in rows.items()])
        clusters = (fitted or {}).get(name)
        if clusters is None:
            clusters = (recipes or {}).get(name, refit_clusters)(
                features, stats, n_clusters, seed, training_acquisition_covariance(train, train_features))
        names[name] = getattr(clusters, "names_", None)
        readout = None
        if with_truth:
            try:
                readout = fit_tissue_readout(features, np.concatenate([train[i].truth[r] for i, r in rows.items()]), seed)
            except InputError as err:
                skipped["tissue_readout"] = str(err)
        for s in scans:
            scan_features = f(s)
            s.labels[name] = np.asarray(clusters.predict(scan_features))
            if readout is not None:
                s.readout[name] = readout.predict(scan_features).astype(np.int64)
        progress(55 + 15 * (k + 1) / len(funcs), "clusters", f"{name}: {n_clusters} mixture components")
    return {name: [str(n) for n in named] for name, named in names.items() if named is not None}


def label_with_baselines(scans: List[ScanLatents]) -> List[str]:
    """Give every scan the labels of each label baseline; returns their names."""
    for r in of_kind(LabelBaseline):
        for s in scans:
            s.labels[r.name] = r.labels(s)
    return [r.name for r in of_kind(LabelBaseline)]
