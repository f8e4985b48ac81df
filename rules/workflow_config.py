"""The workflow's config, interpreted: experiments, feature sets, e2e runs and each rule's options.

It lives beside the rules it serves (it is wiring: rule names, their options and checks; the
package ``msamil_core`` computes and knows nothing of the workflow). ``rules/common.smk`` builds
one :class:`WorkflowConfig` at parse time from the checked settings
(:func:`msamil_core.settings.load_config`) and takes from it every command-line option a rule
passes to ``msamil``, as a ready, shell-quoted string made from the settings themselves
(:func:`msamil_core.settings.cli_args`), so a rule passes exactly the settings the config holds
under the options the command declares for them. Where files are laid out is
:mod:`msamil_core.layout`'s. Errors in the config raise :class:`~msamil_core.errors.MsamilError`
naming the key; ``common.smk`` turns them into Snakemake's one-line ``WorkflowError``.

Imported while Snakemake parses the workflow, so only the standard library is used here.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
from typing import Mapping, Sequence

from msamil_core import layout
from msamil_core.errors import MsamilError
from msamil_core.hub import is_hub_ref
from msamil_core.settings import (SCALES, STRATEGIES, Config, E2ESettings, EncoderSettings, ExperimentSettings,
                                  did_you_mean, load_config, shell_args)

#: The experiments a sheet gets when the config names none: MsaMIL-Net's IAAM and ABMIL on all
#: three scales, with the sheet's own labels as classes.
DEFAULT_EXPERIMENTS = ({"name": "msamil_multiscale", "model": "msamil.base", "scales": list(SCALES)},
                       {"name": "abmil_multiscale", "model": "abmil.base", "scales": list(SCALES)})


def encoder_folder(key: str, spec: EncoderSettings) -> str:
    """An encoder's feature folder name: its config key plus a short hash of its settings, so an
    edited encoder writes new features and never mixes with the old ones."""
    digest = hashlib.sha1(json.dumps(spec.to_dict(), sort_keys=True).encode()).hexdigest()[:8]
    return f"{key}-{digest}"


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


def _joined(*parts: str) -> str:
    """Already quoted option strings, joined (empty ones dropped)."""
    return " ".join(part for part in parts if part)


def mpp_option(mpp: float | None) -> str:
    """``--mpp X`` (level-0 µm/px from the sheet), or nothing when the slide file's value is used."""
    return "" if mpp is None else _args("--mpp", repr(float(mpp)))


class WorkflowConfig:
    """The checked config of one workflow run, interpreted once (and checked) at construction.

    Args:
        config: the config mapping (Snakemake's ``config``) or its :class:`~msamil_core.settings.Config`.
        labels: the sheet's labels; with them, every label a task names must be among them.
        has_annotations: whether the sheet has lesion annotations (``patches.strategy: auto``
            and the lesion strategy's check read it).

    Attributes:
        settings: the :class:`~msamil_core.settings.Config`.
        strategy: ``patches.strategy`` resolved (``auto``: lesion when the sheet has annotations or
            ``segmentation.checkpoint`` is set, else tissue): the patches of ``results/coords/{scale}/``.
        encoder_dirs: encoder key -> feature folder name (:func:`encoder_folder`).
        encoder_keys: the reverse of ``encoder_dirs``.
        e2e_runs: e2e run name -> its :class:`~msamil_core.settings.E2ESettings`.
        experiments: experiment name -> its :class:`~msamil_core.settings.ExperimentSettings`
            (``training`` defaults, then the entry, with ``encoder`` and ``strategy`` filled in);
            each experiment an e2e run lists has a twin (:func:`e2e_twin`) on the configured
            strategy, listed in ``twins``.
        twins: e2e twin name -> (run, frozen experiment).
        used_strategies: the strategies experiments use (sorted; ``[strategy]`` without experiments).
        coord_strategies: the strategies whose coordinates are made per slide: tissue and random
            always, lesion when ``strategy`` or an experiment is lesion. Cheap to make, and kept
            independent of which experiments use them, so that editing the experiment list never
            changes (and reruns) a slide's coordinates job or the extraction that reads them.
        folds: the fold indices, ``0 .. splits.n_folds - 1``.
        heatmap_experiments: the experiments whose fold-0 model is drawn.
        predict_experiments: the experiment that classifies ``predict.slides`` ([] without them).
        notes: what the config left to the workflow to decide, for the log.
    """

    def __init__(self, config: Mapping | Config, labels: Sequence[str] | None = None, has_annotations: bool = False):
        self.settings = config if isinstance(config, Config) else load_config(dict(config))
        s = self.settings
        self.labels = sorted(labels) if labels is not None else None
        self.notes: list[str] = []
        self.strategy = s.patches.resolved_strategy(has_annotations or bool(s.segmentation.checkpoint))
        if s.patches.strategy == "auto":
            self.notes.append(f"patches.strategy auto: {self.strategy} patches (the sheet "
                              f"{'has' if has_annotations else 'has no'} annotations"
                              f"{', segmentation.checkpoint is set' if s.segmentation.checkpoint else ''})")
        self.encoder_dirs = {key: encoder_folder(key, spec) for key, spec in s.encoders.items()}
        self.encoder_keys = {folder: key for key, folder in self.encoder_dirs.items()}
        self._check_names()
        self._check_tasks()
        self.e2e_runs = self._e2e_runs()
        self.twins: dict[str, tuple[str, str]] = {}
        self.experiments = self._experiments()
        self.used_strategies = sorted({e.strategy for e in self.experiments.values()}) or [self.strategy]
        self.coord_strategies = sorted({"tissue", "random"} | {"lesion"} & {self.strategy, *self.used_strategies})
        self.folds = list(range(s.splits.n_folds))
        self._check_repeats()
        for run in self.e2e_runs:
            self.e2e_folds(run)
        self.heatmap_experiments = self._heatmap_experiments()
        self.predict_experiments = self._predict_experiments()

    # ------------------------------------------------------------------ reading the config

    def _check_names(self) -> None:
        """MIL models and encoders are looked up before any job runs, with the closest valid name."""
        from msamil_core.names import check_encoder_name, check_mil_model

        for key, spec in self.settings.encoders.items():
            check_encoder_name(spec.name, f"config: encoder {key!r}")
        for entry in self.settings.experiments or []:
            check_mil_model(entry.model, f"config: experiment {entry.name!r}")
        for entry in self.settings.e2e:
            check_mil_model(entry.model, f"config: e2e run {entry.name!r}")

    def _check_tasks(self) -> None:
        """Every label a task names is a label of the sheet (a user's sheet never runs a task it
        cannot fill, e.g. the demo's)."""
        if self.labels is None:
            return
        for name, classes in (self.settings.tasks or {}).items():
            for cls, members in classes.items():
                for label in members:
                    if label not in self.labels:
                        raise MsamilError(
                            f"config: task {name!r} class {cls!r} names label {label!r}, which no slide of the sheet "
                            f"has{did_you_mean(label, self.labels)} (the sheet's labels: {', '.join(self.labels)})")

    def _encoder_error(self, what: str, key) -> MsamilError:
        return MsamilError(
            f"config: {what} {key!r}, which is not under `encoders`{did_you_mean(key, self.settings.encoders)} "
            f"({', '.join(self.settings.encoders) or 'none defined'})"
        )

    def _task_error(self, what: str, task) -> MsamilError:
        tasks = self.settings.tasks or {}
        return MsamilError(f"config: {what} names task {task!r}, which is not under `tasks`{did_you_mean(task, tasks)} "
                           f"({', '.join(tasks) or 'none defined'})")

    def _e2e_runs(self) -> dict[str, E2ESettings]:
        runs = {}
        for entry in self.settings.e2e:
            name = entry.name
            if name in runs:
                raise MsamilError(f"config: e2e run name {name!r} is used twice; names must be unique")
            if entry.encoder not in self.settings.encoders:
                raise self._encoder_error(f"e2e run {name!r} starts from encoder", entry.encoder)
            if entry.task is not None and entry.task not in (self.settings.tasks or {}):
                raise self._task_error(f"e2e run {name!r}", entry.task)
            runs[name] = entry
        return runs

    def _experiments(self) -> dict[str, ExperimentSettings]:
        s = self.settings
        entries = s.experiments
        if entries is None:
            base = s.training.to_dict()
            entries = [ExperimentSettings.from_config({**base, **entry}, f"experiments[{entry['name']}]")
                       for entry in DEFAULT_EXPERIMENTS]
            labels = f" ({', '.join(self.labels)})" if self.labels is not None else ""
            self.notes.append(f"experiments: none configured; training {' and '.join(e.name for e in entries)} on the "
                              f"sheet's own labels{labels}")
        experiments: dict[str, ExperimentSettings] = {}
        for entry in entries:
            name = entry.name
            if name in experiments:
                raise MsamilError(f"config: experiment name {name!r} is used twice; names must be unique")
            strategy = entry.strategy or s.patches.strategy
            entry = entry.replace(encoder=entry.encoder or s.features.default_encoder,
                                  strategy=self.strategy if strategy == "auto" else strategy)
            if entry.encoder not in s.encoders:
                raise self._encoder_error(f"experiment {name!r} uses encoder", entry.encoder)
            if entry.task is not None and entry.task not in (s.tasks or {}):
                raise self._task_error(f"experiment {name!r}", entry.task)
            experiments[name] = entry
        for run, entry in self.e2e_runs.items():
            for frozen in entry.experiments:
                if frozen not in experiments:
                    raise MsamilError(f"config: e2e run {run!r} lists experiment {frozen!r}, which is not under "
                                      f"`experiments`{did_you_mean(frozen, experiments)}")
                twin = e2e_twin(frozen, run)
                if twin in experiments:
                    raise MsamilError(f"config: experiment name {twin!r} is taken; e2e run {run!r} needs it for "
                                      f"{frozen!r}")
                # e2e runs sample and re-extract the configured strategy's patches
                experiments[twin] = experiments[frozen].replace(name=twin, strategy=self.strategy)
                self.twins[twin] = (run, frozen)
        for name, entry in experiments.items():
            source = entry.init_from
            if source and source not in experiments and not os.path.exists(source) and not is_hub_ref(str(source)):
                raise MsamilError(f"config: experiment {name!r}: init_from {source!r} is neither an experiment"
                                  f"{did_you_mean(source, experiments)} nor an existing file")
            if entry.ablation_of is not None and entry.ablation_of not in experiments:
                raise MsamilError(f"config: experiment {name!r}: ablation_of {entry.ablation_of!r} is not under "
                                  f"`experiments`{did_you_mean(entry.ablation_of, experiments)}")
        return experiments

    def _heatmap_experiments(self) -> list[str]:
        listed = self.settings.heatmaps.experiments
        if listed is None:  # the first experiment's
            return list(self.experiments)[:1]
        unknown = [e for e in listed if e not in self.experiments]
        if unknown:
            raise MsamilError(f"config: heatmaps.experiments names {unknown[0]!r}, which is not under "
                              f"`experiments`{did_you_mean(unknown[0], self.experiments)}")
        return list(listed)

    def _predict_experiments(self) -> list[str]:
        predict = self.settings.predict
        if not predict.slides:
            return []
        name = predict.experiment or next(iter(self.experiments), None)
        if name not in self.experiments:
            raise MsamilError(
                f"config: predict.experiment names {name!r}, not under `experiments`{did_you_mean(name, self.experiments)} "
                f"({', '.join(self.experiments) or 'none defined'})"
            )
        if name in self.twins:
            raise MsamilError(f"config: predict.experiment {name!r} is an e2e twin: each of its folds reads features "
                              "of its own tuned encoder, which predict does not run; name another experiment")
        return [name]

    # ------------------------------------------------------------------ derived facts

    def feature_set(self, encoder: str, strategy: str) -> str:
        """Feature folder name of an encoder key and a patch-selection strategy."""
        return feature_set_name(self.encoder_dirs[encoder], strategy)

    def e2e_run(self, experiment: str) -> str | None:
        """The e2e run whose tuned features an e2e twin trains on; None for other experiments."""
        return self.twins.get(experiment, (None, None))[0]

    def experiment_feature_set(self, experiment: str, fold: int = 0) -> str:
        """The feature folder name of an experiment: its encoder's, of its strategy; for an e2e
        twin the features of the encoder tuned on that fold's training slides."""
        run = self.e2e_run(experiment)
        if run:
            return layout.e2e_feature_set(run, fold)
        options = self.experiments[experiment]
        return self.feature_set(options.encoder, options.strategy)

    def e2e_folds(self, run: str) -> list[int]:
        """The folds an e2e run trains (its `folds`, default all)."""
        folds = self.e2e_runs[run].folds or self.folds
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
        """How many times the experiment's k-fold run is repeated (``repeats``)."""
        return self.experiments[experiment].repeats

    def split_repeat(self, experiment: str, repeat: int) -> int:
        """Which split a repeat trains on: ``repeat`` itself, or 0 (every repeat on the first
        split, seeds differing) with ``repeat_splits: false``."""
        return repeat if self.experiments[experiment].repeat_splits else 0

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
        source = self.experiments[experiment].init_from
        return source if source in self.experiments else None

    @property
    def uses_lesion(self) -> bool:
        """Whether any coordinates select on lesion masks."""
        return "lesion" in self.coord_strategies

    @property
    def trains_segmentation(self) -> bool:
        """Whether the workflow trains the lesion model (no ``segmentation.checkpoint`` given)."""
        return self.uses_lesion and not self.settings.segmentation.checkpoint

    def check_lesion_source(self, has_annotations: bool) -> None:
        """Fail when lesion masks are needed but neither annotations nor a trained model exist."""
        if self.uses_lesion and not self.settings.segmentation.checkpoint and not has_annotations:
            raise MsamilError(
                f"config: the lesion patch strategy needs lesion annotations in the sheet's `annotation` column "
                f"({self.settings.slides} has none) or a trained model in segmentation.checkpoint; "
                "or set patches.strategy: tissue"
            )

    def train_config(self, experiment: str, init_checkpoint: str | None = None, repeat: int = 0):
        """What ``msamil train`` runs for one repeat of an experiment: its training settings, for
        repeat r > 0 with ``seed`` plus r (the first repeat trains exactly as without repeats),
        with ``init_from`` naming an experiment replaced by ``init_checkpoint`` (that experiment's
        checkpoint of the fold)."""
        entry = self.experiments[experiment]
        changes = {"repeat": repeat, "seed": entry.seed + repeat}
        if self.init_experiment(experiment):
            if init_checkpoint is None:
                raise ValueError(f"experiment {experiment!r} starts from another experiment: give init_checkpoint")
            changes["init_from"] = init_checkpoint
        return entry.train_config(**changes)

    def task_mapping(self, task: str | None) -> dict | None:
        """A task's mapping of class names to sheet labels (None: the sheet's labels)."""
        return None if task is None else (self.settings.tasks or {})[task]

    # ------------------------------------------------------------------ options shared by rules

    def encoder_options(self, key: str) -> str:
        """The encoder options of ``msamil extract`` / ``e2e`` for the encoder ``key``."""
        return shell_args(self.settings.encoders[key])

    def hub_encoders(self) -> list[str]:
        """Encoder keys whose weights are ``hf-hub:`` references: fetched once by fetch_weights."""
        return [k for k, spec in self.settings.encoders.items() if is_hub_ref(str(spec.weights or ""))]

    def weights_inputs(self, key: str) -> list[str]:
        """What extraction with encoder ``key`` reads besides the slide: the local weights file or
        folder, or the record fetch_weights writes for hub weights; [] for random initialisation."""
        weights = self.settings.encoders[key].weights
        if not weights:
            return []
        return [layout.weights_record(key)] if is_hub_ref(str(weights)) else [str(weights)]

    def fetch_weights_options(self, key: str) -> str:
        """``msamil fetch-weights`` (fetch_weights) for the encoder ``key``."""
        spec = self.settings.encoders[key]
        return _args("--encoder", spec.name, "--weights", spec.weights)

    def extract_runtime_options(self, precision: bool = True, server: bool = True) -> str:
        """Batch size and readers (they do not change the features), with ``server`` the feature
        server's settings, and with ``precision`` :meth:`precision_options`."""
        runtime = ["batch_size", "workers"] + (["server", "server_idle"] if server else [])
        return _joined(shell_args(self.settings.features, only=runtime),
                       self.precision_options() if precision else "")

    def precision_options(self) -> str:
        """``--fp16`` or ``--no-fp16``: the stored precision, and ``--gpu-decode`` when set (both
        change the bags)."""
        return _joined(shell_args(self.settings.features, only=["fp16"]),
                       "--gpu-decode" if self.settings.features.gpu_decode else "")

    def screen_options(self) -> str:
        """``msamil screen`` (screen_slides): the policy, and the thumbnail and tissue settings the
        screening judges a slide with (the same decision the per-slide steps make)."""
        s = self.settings
        return _joined(shell_args(s.screening), shell_args(s.thumbnail), self.tissue_options())

    def left_out_options(self) -> str:
        """``msamil left-out`` (list_left_out): the screening's policy, applied to every slide left out."""
        return shell_args(self.settings.screening)

    def screen_settings(self):
        """(ScreenSettings, ScreeningSettings) of ``msamil screen`` with this config (screen_options)."""
        from msamil_core.cohort.screening import ScreenSettings

        return ScreenSettings(self.settings.thumbnail, self.settings.tissue), self.settings.screening

    def screen_record(self, sheet) -> dict:
        """The record (msamil screen --record) a screening of ``sheet`` with this config writes."""
        from msamil_core.cohort.screening import screening_record

        return screening_record(sheet, *self.screen_settings())

    def tissue_options(self) -> str:
        """``msamil tissue`` options (``msamil preprocess`` in preprocess_slide): the `tissue` section."""
        return shell_args(self.settings.tissue)

    def patch_options(self) -> str:
        """The patch grid and the random draw (the `patches` section but the strategy, which the
        coordinates files name one by one)."""
        return shell_args(self.settings.patches, exclude=("strategy",))

    def fold_options(self) -> str:
        """How ``msamil train`` and ``e2e`` split folds (validation part) and order classes."""
        s = self.settings
        return _joined(shell_args(s.splits, only=["val_fraction", "seed"]), shell_args(s, only=["classes"]))

    # ------------------------------------------------------------------ one method per rule

    def demo_options(self) -> str:
        """``msamil demo`` (make_demo_cohort)."""
        return _joined(shell_args(self.settings.demo), shell_args(self.settings.patches, only=["patch_size"]))

    def thumbnail_options(self, mpp: float | None = None) -> str:
        """``msamil thumbnail`` options (``msamil preprocess`` in preprocess_slide); ``mpp`` is the
        sheet's value (None: the file's)."""
        return _joined(mpp_option(mpp), shell_args(self.settings.thumbnail))

    def coords_options(self, outputs: Mapping[str, Mapping[str, str]], lesion_mask: str | None = None,
                       geojson: str | None = None) -> str:
        """``msamil coords`` (make_patch_coordinates) writing ``outputs`` = {strategy: {scale: H5}}:
        one ``--strategy-out STRATEGY:SCALE=H5`` per file, the lesion mask when a strategy is
        lesion, and the patch grid; with ``geojson``, the QuPath export of the masks and the
        ``patches.strategy`` grids there."""
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
        return _joined(_args(*opts), self.patch_options())

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
        return self.patch_options()

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
        return shell_args(self.settings.segmentation)

    def splits_options(self, repeat: int = 0) -> str:
        """``msamil splits`` (make_splits) of a repeat's split: seed ``splits.seed + repeat``."""
        s = self.settings.splits
        return shell_args(s.replace(seed=s.seed + repeat), only=["n_folds", "seed"])

    def train_options(self, experiment: str, init_checkpoint: str | None = None, repeat: int = 0) -> str:
        """``msamil train`` (train_fold): folds, classes, the experiment's task and its training
        settings (:meth:`train_config`)."""
        entry = self.experiments[experiment]
        task = self.task_mapping(entry.task)
        return _joined(self.fold_options(), shell_args(self.train_config(experiment, init_checkpoint, repeat)),
                       _args("--task", json.dumps(task, sort_keys=True)) if task else "")

    def heatmap_options(self) -> str:
        """``msamil heatmap`` (draw_heatmaps)."""
        return shell_args(self.settings.heatmaps)

    def predict_options(self) -> str:
        """``msamil predict`` (predict_slides): heatmaps and how to compute. Everything the models'
        inputs depend on comes from the experiment's manifest, not from here."""
        opts = [self.extract_runtime_options(precision=False, server=False),
                shell_args(self.settings.predict, only=["min_patches"])]
        if self.settings.predict.heatmaps:
            opts.append(_joined("--heatmaps", self.heatmap_options()))
        return _joined(*opts)

    def e2e_options(self, run: str) -> str:
        """``msamil e2e`` (train_e2e): folds, classes, the starting encoder, the run's training
        settings and its task."""
        entry = self.e2e_runs[run]
        task = self.task_mapping(entry.task)
        return _joined(self.fold_options(), self.encoder_options(entry.encoder),
                       shell_args(entry.e2e_config(), exclude=("k_study", "k_study_steps")),
                       _args("--task", json.dumps(task, sort_keys=True)) if task else "")

    def k_study_options(self, run: str) -> str:
        """``msamil e2e --k-study`` (run_k_study): :meth:`e2e_options` and the K values."""
        entry = self.e2e_runs[run]
        if not entry.k_study:
            raise ValueError(f"e2e run {run!r} has no k_study")
        return _joined(self.e2e_options(run), shell_args(entry, only=["k_study", "k_study_steps"]))

    def manifest_settings(self, experiment: str, segmentation_checkpoint: str | None = None) -> dict:
        """What an experiment's manifest states besides what its checkpoints record (``msamil
        manifest --settings``): the settings its models' inputs depend on (thumbnail, tissue,
        patches with the strategy it used, the lesion model, the encoder, the stored precision,
        the scales, task and splits), its training settings, and the relations the report draws
        (ablation of, transfer source, e2e run, repeats, learning-curve share)."""
        from msamil_core.manifest import settings_record

        s = self.settings
        entry = self.experiments[experiment]
        run, frozen = self.twins.get(experiment, (None, None))
        source = entry.init_from
        return settings_record(
            experiment, thumbnail=s.thumbnail, tissue=s.tissue, patches=s.patches.replace(strategy=entry.strategy),
            encoder_key=entry.encoder, encoder=s.encoders[entry.encoder], fp16=s.features.fp16,
            feature_folder=self.experiment_feature_set(experiment), splits=s.splits, training=entry.train_config(),
            segmentation_checkpoint=segmentation_checkpoint,
            task=entry.task, task_classes=self.task_mapping(entry.task),
            relations={
                "ablation_of": entry.ablation_of,
                "init_from": ({"experiment": source} if source in self.experiments
                              else {"file": source} if source else None),
                "e2e": {"run": run, "frozen": frozen, "dir": layout.e2e_dir(run)} if run else None,
                "repeats": entry.repeats, "repeat_splits": entry.repeat_splits,
            })

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
