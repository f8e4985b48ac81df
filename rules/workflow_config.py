"""The workflow's config, interpreted: experiments, feature sets, e2e runs and each rule's options.

It lives beside the rules it serves (it is wiring: rule names, their options and checks; the
package ``msamil_core`` computes and knows nothing of the workflow). ``rules/common.smk`` builds
one :class:`WorkflowConfig` at parse time from the config Snakemake
validated (schema defaults filled in) and takes from it every command-line option a rule passes
to ``msamil``, as a ready, shell-quoted string. Where files are laid out stays decided in
``common.smk``: a method that needs paths (coordinates files, bags, masks, checkpoints) takes
them as arguments. Errors in the config raise :class:`~msamil_core.errors.MsamilError` naming the
key; ``common.smk`` turns them into Snakemake's one-line ``WorkflowError``.

Imported while Snakemake parses the workflow, so only the standard library is used here.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
from typing import Mapping, Sequence

from msamil_core.errors import MsamilError
from msamil_core.hub import is_hub_ref

SCALES = ("20x", "10x", "5x")
STRATEGIES = ("lesion", "tissue", "random")


def encoder_folder(key: str, spec: Mapping) -> str:
    """An encoder's feature folder name: its config key plus a short hash of its entry, so an
    edited encoder writes new features and never mixes with the old ones."""
    digest = hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:8]
    return f"{key}-{digest}"


def weights_record(key: str) -> str:
    """The file fetch_weights writes for the encoder ``key`` (what was fetched, its sha256)."""
    return f"results/weights/{key}.json"


def feature_set_name(encoder_dir: str, strategy: str) -> str:
    """A feature folder name: the encoder folder (:func:`encoder_folder`) and the patch strategy."""
    return f"{encoder_dir}-{strategy}"


def e2e_twin(experiment: str, run: str) -> str:
    """The name of ``experiment`` retrained on the features of the e2e run ``run``."""
    return f"{experiment}_e2e_{run}"


def _args(*items) -> str:
    """One shell-quoted string of arguments (numbers as ``str`` writes them)."""
    for item in items:
        if item is None or isinstance(item, bool):  # a missing value would shift the arguments
            raise TypeError(f"option value {item!r} in {items}")
    return shlex.join(str(item) for item in items)


def _flags(section: Mapping, *keys: str) -> list:
    """``--key value`` (lists: ``--key v1 v2 ...``) for each key of a config section."""
    out = []
    for key in keys:
        value = section[key]
        out += [f"--{key.replace('_', '-')}", *(value if isinstance(value, list) else [value])]
    return out


def _joined(*parts: str) -> str:
    """Already quoted option strings, joined (empty ones dropped)."""
    return " ".join(part for part in parts if part)


def mpp_option(mpp: float | None) -> str:
    """``--mpp X`` (level-0 µm/px from the sheet), or nothing when the slide file's value is used."""
    return "" if mpp is None else _args("--mpp", repr(float(mpp)))


class WorkflowConfig:
    """The validated config of one workflow run, read once (and checked) at construction.

    Attributes:
        config: the config dict.
        strategy: ``patches.strategy``, the patch selection of ``results/coords/{scale}/``.
        encoder_dirs: encoder key -> feature folder name (:func:`encoder_folder`).
        encoder_keys: the reverse of ``encoder_dirs``.
        e2e_runs: e2e run name -> its config entry.
        experiments: experiment name -> its options (``training`` defaults, then the entry, with
            ``encoder`` and ``strategy`` filled in); each experiment an e2e run lists has a twin
            (:func:`e2e_twin`) on the configured strategy, with ``e2e`` = {"name", "frozen"}.
        used_strategies: the strategies experiments use (sorted; ``[strategy]`` without experiments).
        coord_strategies: the strategies whose coordinates are made per slide: tissue and random
            always, lesion when ``strategy`` or an experiment is lesion. Cheap to make, and kept
            independent of which experiments use them, so that editing the experiment list never
            changes (and reruns) a slide's coordinates job or the extraction that reads them.
        folds: the fold indices, ``0 .. splits.n_folds - 1``.
        heatmap_experiments: the ``heatmaps.experiments`` that are configured experiments.
        predict_experiments: ``[predict.experiment]`` when ``predict.slides`` is set, else ``[]``.
    """

    def __init__(self, config: Mapping):
        self.config = config
        self.strategy = config["patches"]["strategy"]
        self.encoder_dirs = {key: encoder_folder(key, spec) for key, spec in config["encoders"].items()}
        self.encoder_keys = {folder: key for key, folder in self.encoder_dirs.items()}
        self.e2e_runs = self._e2e_runs()
        self.experiments = self._experiments()
        self.used_strategies = sorted({options["strategy"] for options in self.experiments.values()}) or [self.strategy]
        self.coord_strategies = sorted({"tissue", "random"} | {"lesion"} & {self.strategy, *self.used_strategies})
        self.folds = list(range(config["splits"]["n_folds"]))
        self._check_repeats()
        for run in self.e2e_runs:
            self.e2e_folds(run)
        # Listed experiments the config does not define are skipped: the default list names demo
        # experiments, and a config with other experiments should not have to clear it.
        self.heatmap_experiments = [e for e in config["heatmaps"]["experiments"] if e in self.experiments]
        self.predict_experiments = self._predict_experiments()

    # ------------------------------------------------------------------ reading the config

    def _encoder_error(self, what: str, key) -> MsamilError:
        return MsamilError(
            f"config: {what} {key!r}, which is not under `encoders` "
            f"({', '.join(self.config['encoders']) or 'none defined'})"
        )

    def _e2e_runs(self) -> dict[str, dict]:
        runs = {}
        for entry in self.config["e2e"]:
            name = entry["name"]
            if name in runs:
                raise MsamilError(f"config: e2e run name {name!r} is used twice; names must be unique")
            if entry["encoder"] not in self.config["encoders"]:
                raise self._encoder_error(f"e2e run {name!r} starts from encoder", entry["encoder"])
            task = entry.get("task")
            if task is not None and task not in self.config["tasks"]:
                raise MsamilError(f"config: e2e run {name!r} names task {task!r}, which is not under `tasks`")
            runs[name] = entry
        return runs

    def _experiments(self) -> dict[str, dict]:
        config = self.config
        experiments = {}
        default_encoder = config["features"].get("default_encoder")
        for entry in config["experiments"]:
            name = entry["name"]
            if name in experiments:
                raise MsamilError(f"config: experiment name {name!r} is used twice; names must be unique")
            options = {**config["training"], **entry}
            options["encoder"] = options.get("encoder", default_encoder)
            options["strategy"] = options.get("strategy", self.strategy)
            if options["encoder"] not in config["encoders"]:
                raise self._encoder_error(f"experiment {name!r} uses encoder", options["encoder"])
            task = options.get("task")
            if task is not None and task not in config["tasks"]:
                raise MsamilError(f"config: experiment {name!r} names task {task!r}, which is not under `tasks`")
            experiments[name] = options
        for run, entry in self.e2e_runs.items():
            for frozen in entry.get("experiments", []):
                if frozen not in experiments:
                    raise MsamilError(
                        f"config: e2e run {run!r} lists experiment {frozen!r}, which is not under `experiments`"
                    )
                twin = e2e_twin(frozen, run)
                if twin in experiments:
                    raise MsamilError(
                        f"config: experiment name {twin!r} is taken; e2e run {run!r} needs it for {frozen!r}"
                    )
                # e2e runs sample and re-extract the configured strategy's patches
                experiments[twin] = {**experiments[frozen], "name": twin, "strategy": self.strategy,
                                     "e2e": {"name": run, "frozen": frozen}}
        for name, options in experiments.items():
            source = options.get("init_from")
            if source and source not in experiments and not os.path.exists(source) and not is_hub_ref(str(source)):
                raise MsamilError(
                    f"config: experiment {name!r}: init_from {source!r} is neither an experiment nor an existing file"
                )
        return experiments

    def _predict_experiments(self) -> list[str]:
        predict = self.config["predict"]
        if not predict["slides"]:
            return []
        name = predict["experiment"]
        if name not in self.experiments:
            raise MsamilError(
                f"config: predict.experiment names {name!r}, not under `experiments` "
                f"({', '.join(self.experiments) or 'none defined'})"
            )
        if self.experiments[name]["strategy"] != self.strategy:
            raise MsamilError(
                f"config: predict.experiment {name!r} uses the {self.experiments[name]['strategy']!r} patch strategy; "
                f"predict reuses the per-slide outputs of patches.strategy ({self.strategy!r}): name an experiment on it"
            )
        return [name]

    # ------------------------------------------------------------------ derived facts

    def feature_set(self, encoder: str, strategy: str) -> str:
        """Feature folder name of an encoder key and a patch-selection strategy."""
        return feature_set_name(self.encoder_dirs[encoder], strategy)

    def e2e_run(self, experiment: str) -> str | None:
        """The e2e run whose tuned features an e2e twin trains on; None for other experiments."""
        e2e = self.experiments[experiment].get("e2e")
        return e2e["name"] if e2e else None

    def experiment_feature_set(self, experiment: str) -> str:
        """The feature folder name of a (not e2e) experiment: its encoder's, of its strategy."""
        options = self.experiments[experiment]
        return self.feature_set(options["encoder"], options["strategy"])

    def e2e_folds(self, run: str) -> list[int]:
        """The folds an e2e run trains (its `folds`, default all)."""
        folds = self.e2e_runs[run].get("folds") or self.folds
        if any(k not in self.folds for k in folds):
            raise MsamilError(
                f"config: e2e run {run!r} lists folds {folds}, but splits.n_folds gives folds 0..{self.folds[-1]}"
            )
        return folds

    def experiment_folds(self, experiment: str) -> list[int]:
        """All folds, or for an e2e twin the folds of its run."""
        run = self.e2e_run(experiment)
        return self.e2e_folds(run) if run else self.folds

    def repeats(self, experiment: str) -> int:
        """How many times the experiment's k-fold run is repeated (``repeats``, default 1)."""
        return int(self.experiments[experiment].get("repeats", 1))

    def split_repeat(self, experiment: str, repeat: int) -> int:
        """Which split a repeat trains on: ``repeat`` itself, or 0 (every repeat on the first
        split, seeds differing) with ``repeat_splits: false``."""
        return repeat if self.experiments[experiment].get("repeat_splits", True) else 0

    def _check_repeats(self) -> None:
        """A transfer experiment needs its source's checkpoint of every repeat on the same split;
        an e2e twin trains on the encoders tuned on the first split's folds."""
        for name in self.experiments:
            source = self.init_experiment(name)
            if source and (self.repeats(source) < self.repeats(name) or any(
                    self.split_repeat(source, r) != self.split_repeat(name, r) for r in range(self.repeats(name)))):
                raise MsamilError(
                    f"config: experiment {name!r} starts from {source!r}, which needs at least as many repeats "
                    f"({self.repeats(name)}) and the same repeat_splits"
                )
            if self.e2e_run(name) and any(self.split_repeat(name, r) for r in range(self.repeats(name))):
                raise MsamilError(
                    f"config: e2e twin {name!r} has {self.repeats(name)} repeats on different splits, but the e2e run's "
                    "encoders are tuned on the first split's folds: set repeat_splits: false"
                )

    def init_experiment(self, experiment: str) -> str | None:
        """The experiment whose checkpoint (of the same fold) an experiment starts from, if any."""
        source = self.experiments[experiment].get("init_from")
        return source if source in self.experiments else None

    @property
    def uses_lesion(self) -> bool:
        """Whether any coordinates select on lesion masks."""
        return "lesion" in self.coord_strategies

    @property
    def trains_segmentation(self) -> bool:
        """Whether the workflow trains the lesion model (no ``segmentation.checkpoint`` given)."""
        return self.uses_lesion and not self.config["segmentation"]["checkpoint"]

    def check_lesion_source(self, has_annotations: bool) -> None:
        """Fail when lesion masks are needed but neither annotations nor a trained model exist."""
        if self.uses_lesion and not self.config["segmentation"]["checkpoint"] and not has_annotations:
            raise MsamilError(
                f"config: the lesion patch strategy needs lesion annotations in the sheet's `annotation` column "
                f"({self.config['slides']} has none) or a trained model in segmentation.checkpoint; "
                "or set patches.strategy: tissue"
            )

    def experiment_options(self, experiment: str, init_checkpoint: str | None = None,
                           e2e_dir: str | None = None, repeat: int = 0) -> dict:
        """The options ``msamil train --experiment`` gets for one repeat: the experiment's,
        for repeat r > 0 ``seed`` plus r and ``repeat`` = r, ``repeat_splits`` when it is false
        and there are repeats (the report pairs runs by them), without ``repeats`` and its encoder,
        with ``init_from`` naming an experiment replaced by ``init_checkpoint`` (that experiment's
        checkpoint of the fold), the task's label mapping written out, and for an e2e twin
        ``e2e.dir`` = ``e2e_dir`` (its run's folder, where the report finds the K study)."""
        options = dict(self.experiments[experiment])
        options.pop("repeats", None)
        if options.pop("repeat_splits", True) is False and self.repeats(experiment) > 1:
            options["repeat_splits"] = False
        if repeat:  # the first repeat trains exactly as without repeats (and reuses such models)
            options.update(seed=options.get("seed", 0) + repeat, repeat=repeat)
        if self.init_experiment(experiment):
            if init_checkpoint is None:
                raise ValueError(f"experiment {experiment!r} starts from another experiment: give init_checkpoint")
            options["init_from"] = init_checkpoint
        if options.get("e2e"):
            if e2e_dir is None:
                raise ValueError(f"experiment {experiment!r} is an e2e twin: give e2e_dir")
            options["e2e"] = {**options["e2e"], "dir": e2e_dir}
        if options.get("task"):
            options["task"] = self.config["tasks"][options["task"]]
        options.pop("encoder", None)
        return options

    # ------------------------------------------------------------------ options shared by rules

    def encoder_options(self, key: str) -> str:
        """The encoder options of ``msamil extract`` / ``e2e`` / ``predict`` for the encoder ``key``."""
        spec = self.config["encoders"][key]
        opts = ["--encoder", spec["name"], "--seed", spec.get("seed", 0)]
        if spec.get("input_size"):  # else the preset's (224 for other names)
            opts += ["--input-size", spec["input_size"]]
        if spec.get("weights"):
            opts += ["--weights", spec["weights"]]
        for name in ("mean", "std"):
            if spec.get(name):
                opts += [f"--{name}", *spec[name]]
        for name, value in (spec.get("options") or {}).items():
            opts += ["--encoder-arg", f"{name}={json.dumps(value)}"]
        return _args(*opts)

    def hub_encoders(self) -> list[str]:
        """Encoder keys whose weights are ``hf-hub:`` references: fetched once by fetch_weights."""
        return [k for k, spec in self.config["encoders"].items() if is_hub_ref(str(spec.get("weights") or ""))]

    def weights_inputs(self, key: str) -> list[str]:
        """What extraction with encoder ``key`` reads besides the slide: the local weights file or
        folder, or the record fetch_weights writes for hub weights; [] for random initialisation."""
        weights = self.config["encoders"][key].get("weights")
        if not weights:
            return []
        return [weights_record(key)] if is_hub_ref(str(weights)) else [str(weights)]

    def fetch_weights_options(self, key: str) -> str:
        """``msamil fetch-weights`` (fetch_weights) for the encoder ``key``."""
        spec = self.config["encoders"][key]
        return _args("--encoder", spec["name"], "--weights", spec["weights"])

    def extract_runtime_options(self, precision: bool = True) -> str:
        """Batch size and readers (they do not change the features) and, with ``precision``,
        :meth:`precision_options`."""
        f = self.config["features"]
        return _joined(_args("--batch-size", f["batch_size"], "--workers", f["workers"]),
                       self.precision_options() if precision else "")

    def precision_options(self) -> str:
        """``--fp16`` when features are stored as float16 (it changes the bags)."""
        return "--fp16" if self.config["features"]["fp16"] else ""

    def screen_options(self) -> str:
        """``msamil screen`` (screen_slides): the policy, and the thumbnail and tissue settings the
        screening judges a slide with (the same decision the per-slide steps make)."""
        s = self.config["screening"]
        return _joined(_args("--long-side", self.config["thumbnail"]["long_side"], "--max-left-out", s["max_left_out"],
                             *([] if s["leave_out"] else ["--no-leave-out"])), self.tissue_options())

    def screen_settings(self):
        """(ScreenSettings, ScreenPolicy) of ``msamil screen`` with this config (screen_options)."""
        from msamil_core.cohort.screening import ScreenPolicy, ScreenSettings
        from msamil_core.wsi.tissue import TissueParams

        t, s = self.config["tissue"], self.config["screening"]
        tissue = TissueParams(**{k: t[k] for k in ("mode", "min_saturation", "remove_pen", "dark_threshold",
                                                   "close_radius", "min_object_fraction", "max_hole_fraction")})
        settings = ScreenSettings(self.config["thumbnail"]["long_side"], tissue, t["min_tissue_fraction"])
        return settings, ScreenPolicy(s["leave_out"], s["max_left_out"])

    def screen_record(self, sheet) -> dict:
        """The record (msamil screen --record) a screening of ``sheet`` with this config writes."""
        from msamil_core.cohort.screening import screening_record

        return screening_record(sheet, *self.screen_settings())

    def tissue_options(self) -> str:
        """``msamil tissue`` options (``msamil preprocess`` in preprocess_slide): the config's
        `tissue` section."""
        t = self.config["tissue"]
        return _args(*_flags(t, "mode", "min_saturation", "dark_threshold", "close_radius", "min_object_fraction",
                             "max_hole_fraction", "min_tissue_fraction"), *([] if t["remove_pen"] else ["--no-pen-removal"]))

    def patch_options(self) -> str:
        return _args(*_flags(self.config["patches"], "patch_size", "min_fraction", "base_mpp"))

    def random_options(self) -> str:
        p = self.config["patches"]
        return _args("--random", p["random_n"], "--random-seed", p["random_seed"])

    def fold_options(self) -> str:
        """How ``msamil train`` and ``e2e`` split folds (validation part) and order classes."""
        s = self.config["splits"]
        classes = self.config["classes"]
        return _args("--val-fraction", s["val_fraction"], "--split-seed", s["seed"], *(["--classes", *classes] if classes else []))

    # ------------------------------------------------------------------ one method per rule

    def demo_options(self) -> str:
        """``msamil demo`` (make_demo_cohort)."""
        d = self.config["demo"]
        return _args("--n-slides", d["n_slides"], "--seed", d["seed"], "--patch-size", self.config["patches"]["patch_size"])

    def thumbnail_options(self, mpp: float | None = None) -> str:
        """``msamil thumbnail`` options (``msamil preprocess`` in preprocess_slide); ``mpp`` is the
        sheet's value (None: the file's)."""
        return _joined(mpp_option(mpp), _args("--long-side", self.config["thumbnail"]["long_side"]))

    def coords_options(self, outputs: Mapping[str, Mapping[str, str]], lesion_mask: str | None = None,
                       geojson: str | None = None) -> str:
        """``msamil coords`` (make_patch_coordinates) writing ``outputs`` = {strategy: {scale: H5}}:
        one ``--strategy-out STRATEGY:SCALE=H5`` per file, the lesion mask when a strategy is
        lesion, the random strategy's settings when one is random, and the patch grid; with
        ``geojson``, the QuPath export of the masks and the ``patches.strategy`` grids there."""
        opts = []
        if "lesion" in outputs:
            if lesion_mask is None:
                raise ValueError("the lesion strategy selects on a lesion mask: give lesion_mask")
            opts += ["--lesion-mask", lesion_mask]
        if geojson:
            opts += ["--geojson", geojson, "--geojson-strategy", self.strategy]
        for strategy in sorted(outputs):
            if strategy not in STRATEGIES:
                raise ValueError(f"unknown patch strategy {strategy!r}")
            opts += [item for scale, path in outputs[strategy].items()
                     for item in ("--strategy-out", f"{strategy}:{scale}={path}")]
        return _joined(_args(*opts), self.random_options() if "random" in outputs else "", self.patch_options())

    def extract_options(self, encoder_dir: str, bags: Mapping[str, str],
                        coords: Mapping[str, Mapping[str, str]], mpp: float | None = None,
                        precision: bool = True) -> str:
        """``msamil extract`` (extract_features) for the encoder folder ``encoder_dir``
        (``<key>-<hash>``): one ``--bag STRATEGY=PT`` per bag in ``bags`` = {strategy: PT} and its
        coordinates ``--bag-coords STRATEGY=H5`` from ``coords`` = {strategy: {scale: H5}};
        ``precision=False`` leaves :meth:`precision_options` to the caller."""
        opts = []
        for strategy, bag in bags.items():
            opts += ["--bag", f"{strategy}={bag}"]
            opts += [item for path in coords[strategy].values() for item in ("--bag-coords", f"{strategy}={path}")]
        return _joined(mpp_option(mpp), _args(*opts), self.encoder_options(self.encoder_keys[encoder_dir]),
                       self.extract_runtime_options(precision))

    def coords_settings(self) -> str:
        """What a slide's coordinates depend on besides its masks: the grid and the random draw
        (the make_patch_coordinates param its rerun-trigger compares)."""
        return _joined(self.patch_options(), self.random_options())

    def extract_settings(self, mpp: float | None = None) -> str:
        """What a bag depends on besides the encoder (named by its folder) and the coordinates:
        the sheet's mpp and the stored precision (the extract_features param its rerun-trigger
        compares)."""
        return _joined(mpp_option(mpp), self.precision_options())

    def extract_e2e_options(self, mpp: float | None = None) -> str:
        """``msamil extract --encoder-checkpoint`` (extract_e2e_features): the runtime options."""
        return _joined(mpp_option(mpp), self.extract_runtime_options())

    def segment_train_options(self) -> str:
        """``msamil segment-train`` (train_segmentation): the config's `segmentation` section."""
        seg = self.config["segmentation"]
        opts = _flags(seg, "encoder", "decoder_channels", "input_size", "crop_size", "epochs", "batch_size", "lr",
                      "grad_accum", "patience", "holdout_fraction", "seed", "threshold")
        if seg["encoder_weights"]:
            opts += ["--encoder-weights", seg["encoder_weights"]]
        for key in ("lesion_classes", "ignore_classes", "subtract_classes"):
            if seg[key] is not None:
                opts += [f"--{key.replace('_', '-')}", *seg[key]]
        return _args(*opts)

    def splits_options(self, repeat: int = 0) -> str:
        """``msamil splits`` (make_splits) of a repeat's split: seed ``splits.seed + repeat``."""
        return _args("--folds", self.config["splits"]["n_folds"], "--seed", self.config["splits"]["seed"] + repeat)

    def train_options(self, experiment: str, init_checkpoint: str | None = None, e2e_dir: str | None = None,
                      repeat: int = 0) -> str:
        """``msamil train`` (train_fold): folds, classes and ``--experiment`` JSON
        (:meth:`experiment_options`)."""
        options = self.experiment_options(experiment, init_checkpoint, e2e_dir, repeat)
        return _joined(self.fold_options(), _args("--experiment", json.dumps(options, sort_keys=True)))

    def heatmap_options(self) -> str:
        """``msamil heatmap`` (draw_heatmaps)."""
        return _args("--top-k", self.config["heatmaps"]["top_k"])

    def predict_options(self, experiment: str, segmentation_checkpoint: str | None = None) -> str:
        """``msamil predict`` (predict_slides): the preprocessing the experiment was trained with
        (the config's; ``segmentation_checkpoint`` is the lesion model when the strategy is
        lesion), heatmaps, and the experiment's encoder."""
        strategy = self.experiments[experiment]["strategy"]
        opts = [_args("--long-side", self.config["thumbnail"]["long_side"]), self.tissue_options(),
                self.patch_options(), _args("--strategy", strategy)]
        if strategy == "random":
            opts.append(self.random_options())
        if strategy == "lesion":
            if segmentation_checkpoint is None:
                raise ValueError("the lesion strategy needs the lesion model: give segmentation_checkpoint")
            opts.append(_args("--segmentation-checkpoint", segmentation_checkpoint))
        if self.config["predict"]["heatmaps"]:
            opts.append(_args("--heatmaps", "--top-k", self.config["heatmaps"]["top_k"]))
        opts += [self.encoder_options(self.experiments[experiment]["encoder"]), self.extract_runtime_options()]
        return _joined(*opts)

    def e2e_options(self, run: str) -> str:
        """``msamil e2e`` (train_e2e): folds, classes, the starting encoder and the run's entry
        (``--options`` JSON, its task's label mapping written out)."""
        entry = dict(self.e2e_runs[run])
        if entry.get("task"):
            entry["task"] = self.config["tasks"][entry["task"]]
        return _joined(self.fold_options(), self.encoder_options(entry["encoder"]),
                       _args("--options", json.dumps(entry, sort_keys=True)))

    def k_study_options(self, run: str) -> str:
        """``msamil e2e --k-study`` (run_k_study): :meth:`e2e_options` and the K values."""
        entry = self.e2e_runs[run]
        if not entry.get("k_study"):
            raise ValueError(f"e2e run {run!r} has no k_study")
        return _joined(self.e2e_options(run),
                       _args("--k-study", *entry["k_study"], "--k-study-steps", entry["k_study_steps"]))

    def report_options(self, experiment_dirs: Mapping[str, str], feature_dirs: Mapping[str, str],
                       heatmap_dirs: Mapping[str, str], segmentation_metrics: Sequence[str] = (),
                       left_out: str | None = None) -> str:
        """``msamil report`` (make_report): each experiment's folder and features (by name, every
        experiment), the segmentation metrics, the heatmap folders of ``heatmap_experiments`` and
        the screening's left-out table."""
        opts = []
        for name in self.experiments:
            opts += ["--experiment", f"{name}={experiment_dirs[name]}", "--features", f"{name}={feature_dirs[name]}"]
        for path in segmentation_metrics:
            opts += ["--segmentation", path]
        for name in self.heatmap_experiments:
            opts += ["--heatmaps", f"{name}={heatmap_dirs[name]}"]
        if left_out:
            opts += ["--left-out", left_out]
        return _args(*opts)
