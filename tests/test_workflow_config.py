"""rules/workflow_config.py: what each rule runs with, read from the config.

Option strings are checked the way the rule uses them: split as the shell splits them and parsed
by the command's own argument parser, so an option the command does not know fails here too.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import shlex
import subprocess
import sys

import pytest
import yaml
from snakemake.utils import update_config, validate

from conftest import REPO
from msamil_core.cli import build_parser
from msamil_core.errors import MsamilError
from workflow_config import WorkflowConfig, encoder_folder, mpp_option

SCHEMA = str(REPO / "workflow" / "schemas" / "config.schema.yaml")
ODD_SLIDE = "cmu (1) 'x';$y é"


def _validated(config: dict) -> dict:
    validate(config, SCHEMA)  # fills the schema's defaults, as the Snakefile's validate() does
    return config


def default_config(**overlay) -> dict:
    """config/config.yaml with ``overlay`` merged on top as `--configfile` would."""
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    update_config(config, copy.deepcopy(overlay))
    return _validated(config)


def small_config(**sections) -> dict:
    """A hand-written config: one encoder, the tissue strategy, the given sections."""
    config = {
        "slides": "sheet.csv",
        "patches": {"strategy": "tissue", "patch_size": 128},
        "encoders": {"enc": {"name": "resnet18", "input_size": 32}},
        "features": {"default_encoder": "enc", "workers": 0},
        "tasks": {"two": {"A": ["a1", "a2"], "B": ["b"]}},
    }
    update_config(config, copy.deepcopy(sections))
    return _validated(config)


def parse(command: str, options: str, *required: str) -> argparse.Namespace:
    """``options`` (a rule's option string) plus the command's ``required`` arguments, parsed by
    the command's own parser."""
    return build_parser(command).parse_args([command, *required, *shlex.split(options)])


@pytest.fixture(scope="module")
def demo() -> WorkflowConfig:
    return WorkflowConfig(default_config())


def test_module_loads_without_torch_or_pandas():
    code = ("import sys; sys.path.insert(0, 'rules'); import workflow_config; "
            "print(sorted(m for m in ('torch', 'pandas', 'numpy', 'yaml') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------- the default config


def test_default_config_experiments_merge_training_defaults(demo):
    assert list(demo.experiments) == [
        "msamil_multiscale", "msamil_tissue", "msamil_random", "abmil_20x", "abmil_multiscale",
        "transmil_multiscale", "abmil_architecture_transfer", "abmil_architecture_scratch",
    ]
    first = demo.experiments["msamil_multiscale"]
    assert first["encoder"] == "resnet18_64" and first["strategy"] == "lesion"  # defaults filled in
    assert first["grad_accum"] == 4 and first["max_instances"] == 256  # from `training`
    assert first["model_args"] == {"embed_dim": 256, "mlp_ratio": 2}
    assert demo.experiments["msamil_random"]["strategy"] == "random"
    assert demo.used_strategies == ["lesion", "random", "tissue"] == demo.coord_strategies
    assert demo.uses_lesion and demo.trains_segmentation
    assert demo.heatmap_experiments == ["msamil_multiscale", "abmil_multiscale"]
    assert demo.predict_experiments == [] and demo.folds == [0, 1, 2, 3, 4]


def test_encoder_folder_is_key_plus_hash_of_the_entry(demo):
    entry = demo.config["encoders"]["resnet18_64"]
    digest = hashlib.sha1(json.dumps(entry, sort_keys=True).encode()).hexdigest()[:8]
    assert demo.encoder_dirs == {"resnet18_64": f"resnet18_64-{digest}"}
    assert demo.encoder_keys == {f"resnet18_64-{digest}": "resnet18_64"}
    assert demo.feature_set("resnet18_64", "tissue") == f"resnet18_64-{digest}-tissue"
    edited = dict(entry, input_size=32)
    assert encoder_folder("resnet18_64", edited) != demo.encoder_dirs["resnet18_64"]


def test_tissue_and_thumbnail_options(demo):
    assert shlex.split(demo.tissue_options()) == [
        "--mode", "auto", "--min-saturation", "0.05", "--dark-threshold", "0.25", "--close-radius", "2",
        "--min-object-fraction", "0.0002", "--max-hole-fraction", "0.001", "--min-tissue-fraction", "0.001",
    ]
    no_pen = WorkflowConfig(default_config(tissue={"remove_pen": False, "mode": "brightfield"}))
    args = parse("tissue", no_pen.tissue_options(), "--thumbnail", "t.png", "--out", "m.png")
    assert args.remove_pen is False and args.mode == "brightfield"
    assert shlex.split(demo.thumbnail_options()) == ["--long-side", "1024"]
    assert shlex.split(demo.thumbnail_options(0.2527)) == ["--mpp", "0.2527", "--long-side", "1024"]
    assert mpp_option(None) == "" and mpp_option(0.5) == "--mpp 0.5"


def test_demo_and_splits_and_heatmap_options(demo):
    args = parse("demo", demo.demo_options(), "--out", "d")
    assert (args.n_slides, args.seed, args.patch_size) == (30, 0, 256)
    args = parse("splits", demo.splits_options(), "--sheet", "s.csv", "--out", "f.csv")
    assert (args.folds, args.seed) == (5, 0)
    assert shlex.split(demo.heatmap_options()) == ["--top-k", "8"]


def coords_outputs(slide: str, strategies) -> dict:
    return {s: {scale: (f"results/coords/{scale}/{slide}.h5" if s == "lesion" else
                        f"results/coords/{s}/{scale}/{slide}.h5") for scale in ("20x", "10x", "5x")}
            for s in strategies}


def test_coords_options_name_every_file_by_strategy_and_scale(demo):
    from msamil_core.cli.coords import outputs

    files = coords_outputs(ODD_SLIDE, ["lesion", "random", "tissue"])
    lesion_mask = f"results/slides/{ODD_SLIDE}/lesion_mask.png"
    options = demo.coords_options(files, lesion_mask=lesion_mask)
    args = parse("coords", options, "--meta", "m.json", "--tissue-mask", "t.png")
    assert outputs(args) == files
    assert args.lesion_mask == lesion_mask
    assert (args.random_n, args.random_seed) == (64, 0)
    assert (args.patch_size, args.min_fraction, args.base_mpp) == (256, 0.7, 0.5)
    assert f"--strategy-out 'random:20x=results/coords/random/20x/{ODD_SLIDE}.h5'" not in options  # quoted whole
    assert shlex.split(options).count(f"random:20x=results/coords/random/20x/{ODD_SLIDE}.h5") == 1


def test_coords_options_leave_out_what_no_strategy_needs(demo):
    options = demo.coords_options(coords_outputs("s1", ["tissue"]))
    assert "--lesion-mask" not in options and "--random" not in options
    assert shlex.split(options)[:2] == ["--strategy-out", "tissue:20x=results/coords/tissue/20x/s1.h5"]
    with pytest.raises(ValueError, match="lesion_mask"):
        demo.coords_options(coords_outputs("s1", ["lesion"]))


def test_extract_options_write_one_named_bag_per_strategy():
    from msamil_core.cli.extract import bags

    wc = WorkflowConfig(small_config(
        encoders={"enc": {"name": "resnet18", "weights": "my weights/r18 (v2).pth", "mean": [0.5, 0.5, 0.5],
                          "std": [0.25, 0.25, 0.25], "options": {"drop_rate": 0.1, "global_pool": "avg"}}},
        features={"batch_size": 16, "fp16": True},
        experiments=[{"name": "t", "model": "abmil.base"}, {"name": "r", "model": "abmil.base", "strategy": "random"}],
    ))
    folder = wc.encoder_dirs["enc"]
    coords = coords_outputs(ODD_SLIDE, ["random", "tissue"])
    bag_files = {s: f"results/features/{folder}-{s}/{ODD_SLIDE}.pt" for s in ("random", "tissue")}
    args = parse("extract", wc.extract_options(folder, bag_files, coords, mpp=0.25), "--slide", "s.svs")
    assert bags(args) == {s: (list(coords[s].values()), bag_files[s]) for s in ("random", "tissue")}
    assert args.mpp == 0.25
    assert (args.encoder, args.weights, args.input_size, args.seed) == ("resnet18", "my weights/r18 (v2).pth", 32, 0)
    assert args.mean == [0.5] * 3 and args.std == [0.25] * 3
    assert args.encoder_arg == ["drop_rate=0.1", 'global_pool="avg"']
    assert (args.batch_size, args.workers, args.fp16) == (16, 0, True)
    e2e = parse("extract", wc.extract_e2e_options(), "--slide", "s.svs", "--coords", "a.h5", "--out", "b.pt")
    assert e2e.mpp is None and (e2e.batch_size, e2e.workers, e2e.fp16) == (16, 0, True)


def test_segment_train_options(demo):
    required = ("--sheet", "s.csv", "--thumbnails", "t.png", "--out", "c.pt")
    args = parse("segment-train", demo.segment_train_options(), *required)
    assert args.encoder == "resnet18" and args.decoder_channels == [128, 64, 32, 16, 16]
    assert (args.input_size, args.crop_size, args.epochs, args.batch_size, args.lr) == (128, 0, 8, 4, 0.002)
    assert (args.grad_accum, args.patience, args.holdout_fraction, args.seed, args.threshold) == (1, 0, 0.2, 0, 0.5)
    assert args.encoder_weights is None and args.lesion_classes is None
    assert args.ignore_classes == ["Other", "Ignore*", "Region*", "Stroma", "Immune cells", "Normal*", "Background",
                                   "Tissue"]  # the command's default: the config's null passes nothing

    custom = WorkflowConfig(default_config(segmentation={
        "grad_accum": 2, "patience": 5, "encoder_weights": "weights dir/r18.pth",
        "lesion_classes": ["Tumor", "Carcinoma*"], "ignore_classes": [], "subtract_classes": ["Exclu 'x'"]}))
    args = parse("segment-train", custom.segment_train_options(), *required)
    assert (args.grad_accum, args.patience, args.encoder_weights) == (2, 5, "weights dir/r18.pth")
    assert args.lesion_classes == ["Tumor", "Carcinoma*"] and args.ignore_classes == []
    assert args.subtract_classes == ["Exclu 'x'"]


def test_the_geojson_export_draws_the_grids_of_patches_strategy(demo):
    geojson = f"results/slides/{ODD_SLIDE}/patches.geojson"
    files = coords_outputs(ODD_SLIDE, ["lesion", "random", "tissue"])
    args = parse("coords", demo.coords_options(files, lesion_mask="l.png", geojson=geojson), "--meta", "m", "--tissue-mask", "t")
    assert (args.geojson, args.geojson_strategy, args.lesion_mask) == (geojson, "lesion", "l.png")
    # preprocess_slide (no lesion patches) passes the thumbnail, tissue and coordinates options to one command
    small = WorkflowConfig(small_config())
    options = " ".join([small.thumbnail_options(0.25), small.tissue_options(),
                        small.coords_options(coords_outputs(ODD_SLIDE, ["random", "tissue"]), geojson=geojson)])
    args = parse("preprocess", options, "--slide", "s.svs", "--thumbnail", "t.png", "--meta", "m", "--tissue-mask", "t")
    assert (args.geojson, args.geojson_strategy, args.mpp, args.patch_size) == (geojson, "tissue", 0.25, 128)
    assert not parse("coords", demo.coords_options(files, lesion_mask="l.png"), "--meta", "m", "--tissue-mask", "t").geojson


# ---------------------------------------------------------------- training


def experiment_of(options: str) -> tuple[argparse.Namespace, dict]:
    args = parse("train", options, "--features", "f", "--sheet", "s.csv", "--out", "o")
    return args, json.loads(args.experiment)


def test_train_options_resolve_init_from_and_task(demo):
    checkpoint = "results/models/abmil_multiscale/fold2/checkpoint.pt"
    args, experiment = experiment_of(demo.train_options("abmil_architecture_transfer", init_checkpoint=checkpoint))
    assert (args.val_fraction, args.split_seed, args.classes) == (0.2, 0, None)
    assert experiment["init_from"] == checkpoint
    assert experiment["task"] == {"alternating": ["bland_alternating", "atypical_alternating"],
                                  "zonal": ["bland_zonal", "atypical_zonal"]}
    assert experiment["name"] == "abmil_architecture_transfer" and experiment["strategy"] == "lesion"
    assert "encoder" not in experiment and experiment["epochs"] == 8 and experiment["patience"] == 3
    assert demo.init_experiment("abmil_architecture_transfer") == "abmil_multiscale"
    with pytest.raises(ValueError, match="init_checkpoint"):
        demo.train_options("abmil_architecture_transfer")
    _, scratch = experiment_of(demo.train_options("abmil_architecture_scratch"))
    assert "init_from" not in scratch


def test_train_options_keep_an_init_file_and_pass_classes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pre trained.pt").write_bytes(b"")
    wc = WorkflowConfig(small_config(classes=["b", "a 1"], splits={"val_fraction": 0.3, "seed": 4},
                                     experiments=[{"name": "x", "model": "abmil.base", "init_from": "pre trained.pt"}]))
    assert wc.init_experiment("x") is None
    args, experiment = experiment_of(wc.train_options("x"))
    assert experiment["init_from"] == "pre trained.pt"
    assert (args.val_fraction, args.split_seed, args.classes) == (0.3, 4, ["b", "a 1"])


# ---------------------------------------------------------------- end-to-end runs


def e2e_config(**sections) -> dict:
    return small_config(
        experiments=[{"name": "mil", "model": "abmil.base"}, {"name": "mil_r", "model": "abmil.base", "strategy": "random"}],
        e2e=[{"name": "r1", "encoder": "enc", "experiments": ["mil_r"], "folds": [0, 2], "task": "two", "k": 8,
              "k_study": [2, 4], "k_study_steps": 5}],
        **sections,
    )


def test_e2e_twins_train_on_the_configured_strategy():
    wc = WorkflowConfig(e2e_config())
    assert list(wc.experiments) == ["mil", "mil_r", "mil_r_e2e_r1"]
    twin = wc.experiments["mil_r_e2e_r1"]
    assert twin["strategy"] == "tissue" and twin["e2e"] == {"name": "r1", "frozen": "mil_r"}
    assert wc.e2e_run("mil_r_e2e_r1") == "r1" and wc.e2e_run("mil_r") is None
    assert wc.experiment_folds("mil_r_e2e_r1") == [0, 2] and wc.experiment_folds("mil") == [0, 1, 2, 3, 4]
    _, experiment = experiment_of(wc.train_options("mil_r_e2e_r1", e2e_dir="results/e2e/r1"))
    assert experiment["e2e"] == {"name": "r1", "frozen": "mil_r", "dir": "results/e2e/r1"}
    with pytest.raises(ValueError, match="e2e_dir"):
        wc.train_options("mil_r_e2e_r1")


def test_e2e_and_k_study_options():
    wc = WorkflowConfig(e2e_config(encoders={"enc": {"name": "resnet18", "weights": "w dir/r.pth"}}))
    required = ("--sheet", "s.csv", "--coords-dir", "c", "--out", "o")
    args = parse("e2e", wc.e2e_options("r1"), *required)
    assert (args.encoder, args.weights, args.input_size) == ("resnet18", "w dir/r.pth", 32)
    entry = json.loads(args.options)
    assert entry["task"] == {"A": ["a1", "a2"], "B": ["b"]}
    assert (entry["k"], entry["folds"], entry["k_study_steps"]) == (8, [0, 2], 5)
    assert args.k_study is None
    study = parse("e2e", wc.k_study_options("r1"), *required)
    assert (study.k_study, study.k_study_steps) == ([2, 4], 5)
    assert json.loads(study.options) == entry


# ---------------------------------------------------------------- prediction and report


def test_predict_options_lesion_strategy_quotes_the_checkpoint(demo):
    wc = WorkflowConfig(default_config(predict={"slides": "new.csv"}))
    checkpoint = "my models/seg ckpt.pt"
    args = parse("predict", wc.predict_options("msamil_multiscale", checkpoint), "--models", "m", "--sheet", "n.csv",
                 "--out", "o")
    assert (args.strategy, args.segmentation_checkpoint) == ("lesion", checkpoint)
    assert (args.long_side, args.patch_size, args.min_fraction, args.base_mpp) == (1024, 256, 0.7, 0.5)
    assert (args.mode, args.min_tissue_fraction, args.remove_pen) == ("auto", 0.001, True)
    assert (args.heatmaps, args.top_k) == (True, 8)
    assert (args.encoder, args.input_size, args.batch_size, args.workers) == ("resnet18", 64, 64, 0)
    assert args.random_n == 0  # the random strategy's options only for it
    assert wc.predict_experiments == ["msamil_multiscale"]


def test_predict_options_random_strategy():
    wc = WorkflowConfig(small_config(
        patches={"strategy": "random", "random_n": 32, "random_seed": 7},
        experiments=[{"name": "x", "model": "abmil.base"}], predict={"slides": "new.csv", "experiment": "x",
                                                                     "heatmaps": False}))
    args = parse("predict", wc.predict_options("x"), "--models", "m", "--slide", "s.svs", "--out", "o")
    assert (args.strategy, args.random_n, args.random_seed) == ("random", 32, 7)
    assert args.segmentation_checkpoint is None and args.heatmaps is False and args.patch_size == 128


def test_report_options(demo):
    names = list(demo.experiments)
    options = demo.report_options(
        experiment_dirs={n: f"results/models/{n}" for n in names},
        feature_dirs={n: f"results/features/f {n}" for n in names},
        heatmap_dirs={n: f"results/heatmaps/{n}/fold0" for n in demo.heatmap_experiments},
        segmentation_metrics=["results/segmentation/metrics.json"],
    )
    args = parse("report", options, "--out-dir", "r")
    assert args.experiment == [f"{n}=results/models/{n}" for n in names]
    assert args.features == [f"{n}=results/features/f {n}" for n in names]
    assert args.heatmaps == ["msamil_multiscale=results/heatmaps/msamil_multiscale/fold0",
                             "abmil_multiscale=results/heatmaps/abmil_multiscale/fold0"]
    assert args.segmentation == "results/segmentation/metrics.json"


# ---------------------------------------------------------------- bad configs


def fails(config: dict, message: str) -> None:
    with pytest.raises(MsamilError) as info:
        WorkflowConfig(config)
    assert message in str(info.value)


def test_duplicate_experiment_names_fail():
    fails(small_config(experiments=[{"name": "x", "model": "abmil.base"}, {"name": "x", "model": "clam.base"}]),
          "config: experiment name 'x' is used twice; names must be unique")


def test_unknown_encoder_fails_naming_the_configured_ones():
    fails(small_config(experiments=[{"name": "x", "model": "abmil.base", "encoder": "uni"}]),
          "config: experiment 'x' uses encoder 'uni', which is not under `encoders` (enc)")
    fails(small_config(e2e=[{"name": "r", "encoder": "uni"}]),
          "config: e2e run 'r' starts from encoder 'uni', which is not under `encoders` (enc)")


def test_unknown_task_fails():
    fails(small_config(experiments=[{"name": "x", "model": "abmil.base", "task": "three"}]),
          "config: experiment 'x' names task 'three', which is not under `tasks`")
    fails(small_config(e2e=[{"name": "r", "encoder": "enc", "task": "three"}]),
          "config: e2e run 'r' names task 'three', which is not under `tasks`")


def test_e2e_twin_name_clash_and_unknown_experiment_fail():
    experiments = [{"name": "x", "model": "abmil.base"}, {"name": "x_e2e_r", "model": "abmil.base"}]
    fails(small_config(experiments=experiments, e2e=[{"name": "r", "encoder": "enc", "experiments": ["x"]}]),
          "config: experiment name 'x_e2e_r' is taken; e2e run 'r' needs it for 'x'")
    fails(small_config(e2e=[{"name": "r", "encoder": "enc", "experiments": ["nope"]}]),
          "config: e2e run 'r' lists experiment 'nope', which is not under `experiments`")
    fails(small_config(e2e=[{"name": "r", "encoder": "enc"}, {"name": "r", "encoder": "enc"}]),
          "config: e2e run name 'r' is used twice")
    fails(small_config(e2e=[{"name": "r", "encoder": "enc", "folds": [0, 7]}]),
          "config: e2e run 'r' lists folds [0, 7], but splits.n_folds gives folds 0..4")


def test_init_from_neither_experiment_nor_file_fails(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fails(small_config(experiments=[{"name": "x", "model": "abmil.base", "init_from": "missing.pt"}]),
          "config: experiment 'x': init_from 'missing.pt' is neither an experiment nor an existing file")


def test_predict_experiment_must_exist_and_use_the_configured_strategy():
    experiments = [{"name": "x", "model": "abmil.base"}, {"name": "l", "model": "abmil.base", "strategy": "lesion"}]
    fails(small_config(experiments=experiments, predict={"slides": "n.csv", "experiment": "y"}),
          "config: predict.experiment names 'y', not under `experiments` (x, l)")
    fails(small_config(experiments=experiments, predict={"slides": "n.csv", "experiment": "l"}),
          "config: predict.experiment 'l' uses the 'lesion' patch strategy")
    # without new slides the experiment is not looked at
    assert WorkflowConfig(small_config(experiments=experiments, predict={"experiment": "y"})).predict_experiments == []


def test_lesion_strategy_needs_annotations_or_a_checkpoint():
    wc = WorkflowConfig(default_config(slides="cohort.csv"))
    with pytest.raises(MsamilError, match="lesion patch strategy needs lesion annotations .*cohort.csv"):
        wc.check_lesion_source(has_annotations=False)
    wc.check_lesion_source(has_annotations=True)
    with_model = WorkflowConfig(default_config(segmentation={"checkpoint": "seg.pt"}))
    with_model.check_lesion_source(has_annotations=False)
    assert not with_model.trains_segmentation
    WorkflowConfig(small_config()).check_lesion_source(has_annotations=False)  # tissue: no lesion masks


def test_repeats_shift_the_seed_and_pass_the_repeat():
    cfg = WorkflowConfig(small_config(training={"repeats": 3, "seed": 5}, experiments=[
        {"name": "a", "model": "abmil.base"},
        {"name": "b", "model": "abmil.base", "repeats": 1},
        {"name": "c", "model": "abmil.base", "repeat_splits": False}]))
    assert [cfg.repeats(e) for e in "abc"] == [3, 1, 3]
    first, third = cfg.experiment_options("a", repeat=0), cfg.experiment_options("a", repeat=2)
    assert (first["seed"], third["seed"], third["repeat"]) == (5, 7, 2)
    assert "repeats" not in third and "repeat_splits" not in third
    assert cfg.experiment_options("c", repeat=1)["repeat_splits"] is False
    # the first repeat trains exactly as without repeats
    assert cfg.experiment_options("b") == first | {"name": "b"}
    assert [cfg.split_repeat("a", r) for r in range(3)] == [0, 1, 2]
    assert [cfg.split_repeat("c", r) for r in range(3)] == [0, 0, 0]
    assert parse("splits", cfg.splits_options(2), "--sheet", "s.csv", "--out", "f.csv").seed == 2


def test_repeats_of_transfer_and_e2e_twins_must_fit_their_sources():
    with pytest.raises(MsamilError, match="at least as many repeats"):
        WorkflowConfig(small_config(experiments=[
            {"name": "src", "model": "abmil.base"},
            {"name": "dst", "model": "abmil.base", "init_from": "src", "repeats": 2}]))
    with pytest.raises(MsamilError, match="repeat_splits: false"):
        WorkflowConfig(small_config(
            experiments=[{"name": "m", "model": "abmil.base", "repeats": 2}],
            e2e=[{"name": "r", "encoder": "enc", "experiments": ["m"]}]))
    WorkflowConfig(small_config(
        experiments=[{"name": "m", "model": "abmil.base", "repeats": 2, "repeat_splits": False}],
        e2e=[{"name": "r", "encoder": "enc", "experiments": ["m"]}]))
