"""rules/workflow_config.py: what each rule runs with, read from the config.

Option strings are checked the way the rule uses them: split as the shell splits them and parsed
by the command's own argument parser, then turned back into settings as the command does, so an
option the command does not know, or a value it would read differently, fails here too.
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
from snakemake.utils import update_config

from conftest import REPO
from msamil_core.cli import build_parser
from msamil_core.cli.options import from_args, given
from msamil_core.errors import MsamilError
from msamil_core.settings import (E2EConfig, EncoderSettings, FeatureSettings, PatchSettings, SegmentationSettings,
                                  SplitSettings, ThumbnailSettings, TissueSettings, TrainConfig, with_demo)
from workflow_config import WorkflowConfig, encoder_folder, mpp_option

ODD_SLIDE = "cmu (1) 'x';$y é"
DEMO_LABELS = ["atypical_alternating", "atypical_zonal", "bland_alternating", "bland_zonal"]


def default_config(**overlay) -> dict:
    """config/config.yaml with config/demo.yaml filling what it leaves unset (the demo sheet's
    run) and ``overlay`` merged on top as `--configfile` would."""
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    update_config(config, copy.deepcopy(overlay))
    return with_demo(config, yaml.safe_load((REPO / "config" / "demo.yaml").read_text()))


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
    return config


def parse(command: str, options: str, *required: str) -> argparse.Namespace:
    """``options`` (a rule's option string) plus the command's ``required`` arguments, parsed by
    the command's own parser."""
    return build_parser(command).parse_args([command, *required, *shlex.split(options)])


@pytest.fixture(scope="module")
def demo() -> WorkflowConfig:
    return WorkflowConfig(default_config(), labels=DEMO_LABELS, has_annotations=True)


def test_module_loads_without_torch_or_pandas():
    code = ("import sys; sys.path.insert(0, 'rules'); import workflow_config; "
            "print(sorted(m for m in ('torch', 'pandas', 'numpy', 'yaml') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------- the default config


def test_demo_experiments_merge_training_defaults(demo):
    assert list(demo.experiments) == [
        "msamil_multiscale", "msamil_tissue", "msamil_random", "abmil_20x", "abmil_multiscale",
        "transmil_multiscale", "abmil_architecture_transfer", "abmil_architecture_scratch",
    ]
    first = demo.experiments["msamil_multiscale"]
    assert first.encoder == "resnet18_64" and first.strategy == "lesion"  # defaults filled in; auto -> lesion
    assert first.grad_accum == 4 and first.max_instances == 256  # from `training`
    assert first.model_args == {"embed_dim": 256, "mlp_ratio": 2}
    assert demo.experiments["msamil_random"].strategy == "random"
    assert demo.used_strategies == ["lesion", "random", "tissue"] == demo.coord_strategies
    assert demo.uses_lesion and demo.trains_segmentation
    assert demo.heatmap_experiments == ["msamil_multiscale", "abmil_multiscale"]
    assert demo.predict_experiments == [] and demo.folds == [0, 1, 2, 3, 4]


def test_a_users_sheet_trains_on_its_own_labels_never_the_demos(tmp_path):
    """Without experiments in the config, a user's sheet gets the default experiments on its own
    labels (no task), and the demo's task is nowhere; naming the demo's task fails at once."""
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text()) | {"slides": "mine.csv"}
    wc = WorkflowConfig(config, labels=["normal", "tumour"], has_annotations=False)
    assert list(wc.experiments) == ["msamil_multiscale", "abmil_multiscale"]
    assert all(e.task is None for e in wc.experiments.values()) and wc.settings.tasks is None
    assert wc.strategy == "tissue" and not wc.uses_lesion  # auto without annotations
    assert any("sheet's own labels (normal, tumour)" in n for n in wc.notes)
    assert wc.heatmap_experiments == ["msamil_multiscale"]
    with pytest.raises(MsamilError, match="task 'architecture' class 'alternating' names label 'bland_alternating', "
                                          "which no slide of the sheet has"):
        WorkflowConfig(default_config(slides="mine.csv"), labels=["normal", "tumour"])


def test_encoder_folder_is_key_plus_hash_of_the_settings(demo):
    entry = demo.settings.encoders["resnet18_64"]
    digest = hashlib.sha1(json.dumps(entry.to_dict(), sort_keys=True).encode()).hexdigest()[:8]
    assert demo.encoder_dirs == {"resnet18_64": f"resnet18_64-{digest}"}
    assert demo.encoder_keys == {f"resnet18_64-{digest}": "resnet18_64"}
    assert demo.feature_set("resnet18_64", "tissue") == f"resnet18_64-{digest}-tissue"
    assert encoder_folder("resnet18_64", entry.replace(input_size=32)) != demo.encoder_dirs["resnet18_64"]


def test_tissue_and_thumbnail_options_give_the_commands_the_configs_settings(demo):
    args = parse("tissue", demo.tissue_options(), "--thumbnail", "t.png", "--out", "m.png")
    assert from_args(args, TissueSettings) == demo.settings.tissue
    no_pen = WorkflowConfig(default_config(tissue={"remove_pen": False, "mode": "brightfield"}), labels=DEMO_LABELS)
    args = parse("tissue", no_pen.tissue_options(), "--thumbnail", "t.png", "--out", "m.png")
    assert from_args(args, TissueSettings) == no_pen.settings.tissue
    assert no_pen.settings.tissue.remove_pen is False and no_pen.settings.tissue.mode == "brightfield"
    assert shlex.split(demo.thumbnail_options()) == ["--long-side", "1024"]
    assert shlex.split(demo.thumbnail_options(0.2527)) == ["--mpp", "0.2527", "--long-side", "1024"]
    assert mpp_option(None) == "" and mpp_option(0.5) == "--mpp 0.5"


def test_demo_and_splits_and_heatmap_options(demo):
    args = parse("demo", demo.demo_options(), "--out", "d")
    assert (from_args(args, PatchSettings).patch_size, given(args, SplitSettings)) == (256, {})
    assert given(args, type(demo.settings.demo)) == {"n_slides": 30, "seed": 0}
    args = parse("splits", demo.splits_options(), "--sheet", "s.csv", "--out", "f.csv")
    assert (from_args(args, SplitSettings).n_folds, from_args(args, SplitSettings).seed) == (5, 0)
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
    assert from_args(args, PatchSettings).replace(strategy="auto") == demo.settings.patches
    assert f"--strategy-out 'random:20x=results/coords/random/20x/{ODD_SLIDE}.h5'" not in options  # quoted whole
    assert shlex.split(options).count(f"random:20x=results/coords/random/20x/{ODD_SLIDE}.h5") == 1


def test_coords_options_leave_out_what_no_strategy_needs(demo):
    options = demo.coords_options(coords_outputs("s1", ["tissue"]))
    assert "--lesion-mask" not in options
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
    assert from_args(args, EncoderSettings) == wc.settings.encoders["enc"]
    assert from_args(args, FeatureSettings).replace(default_encoder="enc") == wc.settings.features
    e2e = parse("extract", wc.extract_e2e_options(), "--slide", "s.svs", "--coords", "a.h5", "--out", "b.pt")
    assert e2e.mpp is None and from_args(e2e, FeatureSettings).replace(default_encoder="enc") == wc.settings.features


def test_segment_train_options_give_the_whole_segmentation_section(demo):
    required = ("--sheet", "s.csv", "--thumbnails", "t.png", "--out", "c.pt")
    args = parse("segment-train", demo.segment_train_options(), *required)
    assert from_args(args, SegmentationSettings) == demo.settings.segmentation
    custom = WorkflowConfig(default_config(segmentation={
        "grad_accum": 2, "patience": 5, "encoder_weights": "weights dir/r18.pth",
        "lesion_classes": ["Tumor", "Carcinoma*"], "ignore_classes": [], "subtract_classes": ["Exclu 'x'"]}),
        labels=DEMO_LABELS)
    args = parse("segment-train", custom.segment_train_options(), *required)
    assert from_args(args, SegmentationSettings) == custom.settings.segmentation
    assert custom.settings.segmentation.ignore_classes == [] and custom.settings.segmentation.grad_accum == 2


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
    assert (args.geojson, args.geojson_strategy, args.mpp) == (geojson, "tissue", 0.25)
    assert from_args(args, PatchSettings).patch_size == 128
    assert not parse("coords", demo.coords_options(files, lesion_mask="l.png"), "--meta", "m", "--tissue-mask", "t").geojson


# ---------------------------------------------------------------- training


def train_args(options: str) -> argparse.Namespace:
    return parse("train", options, "--features", "f", "--sheet", "s.csv", "--out", "o")


def test_train_options_resolve_init_from_and_task(demo):
    from msamil_core.cli.train import train_config

    checkpoint = "results/models/abmil_multiscale/fold2/checkpoint.pt"
    args = train_args(demo.train_options("abmil_architecture_transfer", init_checkpoint=checkpoint))
    from msamil_core.cli.options import classes_option

    assert from_args(args, SplitSettings) == demo.settings.splits and classes_option(args) is None
    cfg = train_config(args)
    assert cfg == demo.train_config("abmil_architecture_transfer", checkpoint)
    assert cfg.init_from == checkpoint and cfg.epochs == 8 and cfg.patience == 3
    assert json.loads(args.task) == {"alternating": ["bland_alternating", "atypical_alternating"],
                                     "zonal": ["bland_zonal", "atypical_zonal"]}
    assert demo.init_experiment("abmil_architecture_transfer") == "abmil_multiscale"
    with pytest.raises(ValueError, match="init_checkpoint"):
        demo.train_options("abmil_architecture_transfer")
    scratch = train_args(demo.train_options("abmil_architecture_scratch"))
    assert train_config(scratch).init_from is None
    # report-only relations never reach training: editing them retrains nothing
    relations = WorkflowConfig(default_config(experiments=[
        {"name": "msamil_multiscale", "model": "msamil.base", "model_args": {"embed_dim": 256, "mlp_ratio": 2}},
        {"name": "b", "model": "msamil.base", "model_args": {"embed_dim": 256, "mlp_ratio": 2},
         "ablation_of": "msamil_multiscale"}]), labels=DEMO_LABELS)
    assert relations.train_options("b") == relations.train_options("msamil_multiscale")


def test_train_options_keep_an_init_file_and_pass_classes(tmp_path, monkeypatch):
    from msamil_core.cli.options import classes_option
    from msamil_core.cli.train import train_config

    monkeypatch.chdir(tmp_path)
    (tmp_path / "pre trained.pt").write_bytes(b"")
    wc = WorkflowConfig(small_config(classes=["b", "a 1"], splits={"val_fraction": 0.3, "seed": 4},
                                     experiments=[{"name": "x", "model": "abmil.base", "init_from": "pre trained.pt"}]))
    assert wc.init_experiment("x") is None
    args = train_args(wc.train_options("x"))
    assert train_config(args).init_from == "pre trained.pt"
    assert from_args(args, SplitSettings).replace(n_folds=5) == wc.settings.splits
    assert classes_option(args) == ["b", "a 1"]


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
    assert wc.experiments["mil_r_e2e_r1"].strategy == "tissue" and wc.twins == {"mil_r_e2e_r1": ("r1", "mil_r")}
    assert wc.e2e_run("mil_r_e2e_r1") == "r1" and wc.e2e_run("mil_r") is None
    assert wc.experiment_folds("mil_r_e2e_r1") == [0, 2] and wc.experiment_folds("mil") == [0, 1, 2, 3, 4]
    assert wc.experiment_feature_set("mil_r_e2e_r1", 2) == "e2e-r1-fold2"
    relations = wc.manifest_settings("mil_r_e2e_r1")["relations"]
    assert relations["e2e"] == {"run": "r1", "frozen": "mil_r", "dir": "results/e2e/r1"}


def test_e2e_and_k_study_options():
    from msamil_core.cli.e2e import e2e_config as parsed

    wc = WorkflowConfig(e2e_config(encoders={"enc": {"name": "resnet18", "weights": "w dir/r.pth"}}))
    required = ("--sheet", "s.csv", "--coords-dir", "c", "--out", "o")
    args = parse("e2e", wc.e2e_options("r1"), *required)
    assert from_args(args, EncoderSettings) == wc.settings.encoders["enc"]
    assert json.loads(args.task) == {"A": ["a1", "a2"], "B": ["b"]}
    assert parsed(args) == wc.e2e_runs["r1"].e2e_config().replace(k_study=None, k_study_steps=E2EConfig().k_study_steps)
    assert parsed(args).k_study is None  # training, not the K study
    study = parse("e2e", wc.k_study_options("r1"), *required)
    assert (parsed(study).k_study, parsed(study).k_study_steps) == ([2, 4], 5)


# ---------------------------------------------------------------- prediction, manifest and report


def test_predict_options_leave_the_models_inputs_to_the_manifest(demo):
    wc = WorkflowConfig(default_config(predict={"slides": "new.csv"}), labels=DEMO_LABELS, has_annotations=True)
    args = parse("predict", wc.predict_options(), "--models", "m", "--sheet", "n.csv", "--out", "o")
    for cls in (ThumbnailSettings, TissueSettings, PatchSettings, EncoderSettings):
        assert given(args, cls) == {}, cls  # every per-slide setting comes from the manifest
    from msamil_core.settings import HeatmapSettings

    assert args.heatmaps and from_args(args, HeatmapSettings).top_k == 8
    assert (from_args(args, FeatureSettings).batch_size, from_args(args, FeatureSettings).workers) == (64, "auto")
    assert wc.predict_experiments == ["msamil_multiscale"]


def test_manifest_settings_state_what_the_inputs_depend_on(demo):
    settings = demo.manifest_settings("abmil_architecture_transfer", "results/segmentation/checkpoint.pt")
    assert settings["patches"] == demo.settings.patches.replace(strategy="lesion").to_dict()
    assert settings["tissue"] == demo.settings.tissue.to_dict() and settings["thumbnail"] == {"long_side": 1024}
    assert settings["segmentation"]["checkpoint"] == "results/segmentation/checkpoint.pt"
    assert settings["encoder"] == {"key": "resnet18_64", **demo.settings.encoders["resnet18_64"].to_dict()}
    assert settings["task"]["name"] == "architecture" and settings["training"]["model"] == "abmil.base"
    assert settings["relations"]["init_from"] == {"experiment": "abmil_multiscale"}
    tissue = demo.manifest_settings("msamil_tissue")
    assert tissue["segmentation"] is None and tissue["patches"]["strategy"] == "tissue"


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


def fails(config: dict, message: str, **kwargs) -> None:
    with pytest.raises(MsamilError) as info:
        WorkflowConfig(config, **kwargs)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_duplicate_experiment_names_fail():
    fails(small_config(experiments=[{"name": "x", "model": "abmil.base"}, {"name": "x", "model": "clam_sb.base"}]),
          "config: experiment name 'x' is used twice; names must be unique")


def test_unknown_encoder_fails_naming_the_configured_ones():
    fails(small_config(experiments=[{"name": "x", "model": "abmil.base", "encoder": "ecn"}]),
          "config: experiment 'x' uses encoder 'ecn', which is not under `encoders`; did you mean 'enc'? (enc)")
    fails(small_config(e2e=[{"name": "r", "encoder": "uni"}]),
          "config: e2e run 'r' starts from encoder 'uni', which is not under `encoders` (enc)")


def test_unknown_task_fails():
    fails(small_config(experiments=[{"name": "x", "model": "abmil.base", "task": "tow"}]),
          "config: experiment 'x' names task 'tow', which is not under `tasks`; did you mean 'two'? (two)")
    fails(small_config(e2e=[{"name": "r", "encoder": "enc", "task": "three"}]),
          "config: e2e run 'r' names task 'three', which is not under `tasks` (two)")


def test_misspelt_values_fail_at_once_with_the_closest_name():
    fails(small_config(experiments=[{"name": "x", "model": "abmill.base"}]),
          "config: experiment 'x' model 'abmill.base' is not a registered MIL model; did you mean 'abmil.base'?")
    fails(small_config(encoders={"enc": {"name": "resnet50_trunk"}}),
          "config: encoder 'enc' name 'resnet50_trunk' is not a patch encoder")
    fails(small_config(encoders={"enc": {"name": "resnet50_trunk"}}), "did you mean 'resnet50_trunc'?")
    fails(small_config(patches={"strategy": "tisue"}),
          "config: patches.strategy must be one of auto, lesion, tissue, random, got 'tisue'; did you mean 'tissue'?")
    fails(small_config(experiments=[{"name": "x", "model": "abmil.base", "scales": ["20x", "50x"]}]),
          "config: experiments[x].scales[1] must be one of 20x, 10x, 5x, got '50x'")
    fails(small_config(experiments=[{"name": "x", "model": "abmil.base", "ablation_of": "y"}]),
          "config: experiment 'x': ablation_of 'y' is not under `experiments`")
    fails(small_config(tasks={"two": {"A": ["a1"], "B": ["bb"]}}),
          "config: task 'two' class 'B' names label 'bb', which no slide of the sheet has; did you mean 'b'?",
          labels=["a1", "b"])


def test_a_misspelt_key_fails_in_one_line_with_the_closest_key():
    fails(small_config(patches={"patch_sise": 3}), "config: unknown key `patches.patch_sise`; did you mean 'patch_size'?")
    fails(small_config(experiments=[{"name": "x", "model": "abmil.base", "epoch": 3}]),
          "config: unknown key `experiments[x].epoch`; did you mean 'epochs'?")
    fails(small_config(trainig={"epochs": 3}), "config: unknown key `trainig`; did you mean 'training'?")


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


def test_predict_experiment_must_exist_and_not_be_an_e2e_twin():
    experiments = [{"name": "x", "model": "abmil.base"}, {"name": "l", "model": "abmil.base", "strategy": "random"}]
    fails(small_config(experiments=experiments, predict={"slides": "n.csv", "experiment": "y"}),
          "config: predict.experiment names 'y', not under `experiments` (x, l)")
    wc = WorkflowConfig(small_config(experiments=experiments, predict={"slides": "n.csv", "experiment": "l"}))
    assert wc.predict_experiments == ["l"]  # any strategy: its manifest says which
    fails(e2e_config(predict={"slides": "n.csv", "experiment": "mil_r_e2e_r1"}), "is an e2e twin")
    # without new slides the experiment is not looked at
    assert WorkflowConfig(small_config(experiments=experiments, predict={"experiment": "y"})).predict_experiments == []


def test_lesion_strategy_needs_annotations_or_a_checkpoint():
    wc = WorkflowConfig(default_config(slides="cohort.csv", patches={"strategy": "lesion"}))
    with pytest.raises(MsamilError, match="lesion patch strategy needs lesion annotations .*cohort.csv"):
        wc.check_lesion_source(has_annotations=False)
    wc.check_lesion_source(has_annotations=True)
    with_model = WorkflowConfig(default_config(segmentation={"checkpoint": "seg.pt"}))
    with_model.check_lesion_source(has_annotations=False)
    assert not with_model.trains_segmentation and with_model.strategy == "lesion"  # auto with a model: lesion
    WorkflowConfig(small_config()).check_lesion_source(has_annotations=False)  # tissue: no lesion masks


def test_repeats_shift_the_seed_and_pass_the_repeat():
    cfg = WorkflowConfig(small_config(training={"repeats": 3, "seed": 5}, experiments=[
        {"name": "a", "model": "abmil.base"},
        {"name": "b", "model": "abmil.base", "repeats": 1},
        {"name": "c", "model": "abmil.base", "repeat_splits": False}]))
    assert [cfg.repeats(e) for e in "abc"] == [3, 1, 3]
    first, third = cfg.train_config("a", repeat=0), cfg.train_config("a", repeat=2)
    assert (first.seed, third.seed, third.repeat) == (5, 7, 2)
    assert cfg.manifest_settings("c")["relations"]["repeat_splits"] is False
    # the first repeat trains exactly as without repeats
    assert cfg.train_config("b") == first
    assert [cfg.split_repeat("a", r) for r in range(3)] == [0, 1, 2]
    assert [cfg.split_repeat("c", r) for r in range(3)] == [0, 0, 0]
    args = parse("splits", cfg.splits_options(2), "--sheet", "s.csv", "--out", "f.csv")
    assert from_args(args, SplitSettings).seed == 2


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


def test_train_config_of_an_experiment_is_what_msamil_train_runs(demo):
    """The workflow's TrainConfig of an experiment round-trips through `msamil train`'s parser."""
    from msamil_core.cli.train import train_config

    for name in demo.experiments:
        init = "x.pt" if demo.init_experiment(name) else None
        assert train_config(train_args(demo.train_options(name, init))) == demo.train_config(name, init)
        assert isinstance(demo.train_config(name, init), TrainConfig)
