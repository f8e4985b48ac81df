"""Where every output lives: the results layout, in one place.

The workflow's rules (through ``rules/common.smk``), ``msamil predict``, the report and the e2e
training all take their paths from here. Paths are strings relative to the project (the folder
Snakemake runs in), so that a moved project or a copied ``results/`` finds its files where they
are; functions that build Snakemake patterns accept wildcards such as ``"{slide}"`` for names.
Standard library only: the workflow imports this while it parses.

::

    results/
      cohort/slides.csv, left_out.csv, screening_record.json, screening.json
      slides/<slide>/thumbnail.png, meta.json, tissue_mask.png, lesion_mask.png, patches.geojson
      coords/<scale>/<slide>.h5                  (patches.strategy)
      coords/<strategy>/<scale>/<slide>.h5       (any other strategy an experiment uses)
      features/<encoder key>-<hash>-<strategy>/<slide>.pt, bags.tsv
      features/e2e-<run>-fold<k>/<slide>.pt
      segmentation/checkpoint.pt, metrics.json, probabilities/
      splits/[repeat<r>/]folds.csv
      models/<experiment>/manifest.json, [repeat<r>/]fold<k>/checkpoint.pt, metrics.json, predictions.csv
      e2e/<run>/fold<k>/checkpoint.pt, k_study*.csv, k_study.png
      heatmaps/<experiment>/fold0/<slide>/, summary.csv
      predictions/<experiment>/predictions.csv, predictions.json
      report/index.html, summary.csv
      weights/<encoder key>.json
      thumbnails.tsv
"""

from __future__ import annotations

import os

RESULTS = "results"

# the files of a slide's folder
THUMBNAIL = "thumbnail.png"
META = "meta.json"
TISSUE_MASK = "tissue_mask.png"
LESION_MASK = "lesion_mask.png"
GEOJSON = "patches.geojson"
MANIFEST = "manifest.json"
CHECKPOINT = "checkpoint.pt"


def project_path(path: str | os.PathLike, project: str | os.PathLike = ".") -> str:
    """A path as records and command lines hold it: relative to the project when inside it (a
    moved project or a copied results folder stays valid), else absolute."""
    path = os.path.abspath(path)
    rel = os.path.relpath(path, os.path.abspath(project))
    return path if rel == ".." or rel.startswith(".." + os.sep) else rel


def cohort_file(name: str, results: str = RESULTS) -> str:
    """The screening's files: slides.csv, left_out.csv, screening_record.json, screening.json."""
    return f"{results}/cohort/{name}"


def slides_root(results: str = RESULTS) -> str:
    """The folder of every slide's folder."""
    return f"{results}/slides"


def slide_dir(slide: str, results: str = RESULTS) -> str:
    """A slide's thumbnail, meta.json, masks and QuPath export."""
    return f"{results}/slides/{slide}"


def slide_file(slide: str, name: str, results: str = RESULTS) -> str:
    """A file of a slide's folder (:data:`THUMBNAIL`, :data:`META`, ...)."""
    return f"{slide_dir(slide, results)}/{name}"


def coords_dir(strategy: str, main_strategy: str, results: str = RESULTS) -> str:
    """The coordinates folder of a strategy: ``coords/`` for the configured one (SPEC), else
    ``coords/<strategy>/``."""
    return f"{results}/coords" if strategy == main_strategy else f"{results}/coords/{strategy}"


def scale_file(directory: str | os.PathLike, scale: str, slide: str) -> str:
    """A slide's coordinates file of one scale in a coordinates folder."""
    return f"{directory}/{scale}/{slide}.h5"


def coords_file(slide: str, scale: str, strategy: str, main_strategy: str, results: str = RESULTS) -> str:
    return scale_file(coords_dir(strategy, main_strategy, results), scale, slide)


def feature_dir(feature_set: str, results: str = RESULTS) -> str:
    """A feature folder (``<encoder key>-<hash>-<strategy>``, or an e2e run's fold)."""
    return f"{results}/features/{feature_set}"


def bag_file(feature_set: str, slide: str, results: str = RESULTS) -> str:
    return f"{feature_dir(feature_set, results)}/{slide}.pt"


def feature_folders_index(results: str = RESULTS) -> str:
    """Which feature folder holds each encoder key's and strategy's bags (the workflow's `features` target)."""
    return f"{results}/features/folders.tsv"


def bag_index(feature_set: str, results: str = RESULTS) -> str:
    """The index of a feature folder's bags (index_bags)."""
    return f"{feature_dir(feature_set, results)}/bags.tsv"


def e2e_feature_set(run: str, fold: int | str) -> str:
    """The feature folder of an e2e run's fold-k encoder."""
    return f"e2e-{run}-fold{fold}"


def repeat_prefix(repeat: int | str) -> str:
    """"" for the first repeat (one repeat keeps the plain layout), else ``repeat<r>/``; a string
    (the workflow's ``"{repeat}"`` wildcard) stands for the prefix as it is."""
    if isinstance(repeat, str):
        return repeat
    return f"repeat{repeat}/" if repeat else ""


def folds_file(split: int | str = 0, results: str = RESULTS) -> str:
    """The folds of a split: splits/folds.csv, or splits/repeat<r>/folds.csv."""
    return f"{results}/splits/{repeat_prefix(split)}folds.csv"


def experiment_dir(experiment: str, results: str = RESULTS) -> str:
    """An experiment's folder: its manifest and repeat 0's folds."""
    return f"{results}/models/{experiment}"


def model_dir(experiment: str, repeat: int = 0, results: str = RESULTS) -> str:
    """The folder of one repeat's fold<k>/ folders."""
    return f"{experiment_dir(experiment, results)}/repeat{repeat}" if repeat else experiment_dir(experiment, results)


def fold_dir(experiment: str, fold: int | str, repeat: int | str = 0, results: str = RESULTS) -> str:
    return f"{experiment_dir(experiment, results)}/{repeat_prefix(repeat)}fold{fold}"


def fold_file(experiment: str, fold: int | str, repeat: int | str, name: str, results: str = RESULTS) -> str:
    """A file of one fold's folder (checkpoint.pt, metrics.json, predictions.csv, history.json)."""
    return f"{fold_dir(experiment, fold, repeat, results)}/{name}"


def fold_checkpoint(experiment: str, fold: int | str, repeat: int | str = 0, results: str = RESULTS) -> str:
    return fold_file(experiment, fold, repeat, CHECKPOINT, results)


def manifest_file(experiment: str, results: str = RESULTS) -> str:
    """An experiment's manifest: everything its models' inputs depend on."""
    return f"{experiment_dir(experiment, results)}/{MANIFEST}"


def e2e_dir(run: str, results: str = RESULTS) -> str:
    return f"{results}/e2e/{run}"


def e2e_checkpoint(run: str, fold: int | str, results: str = RESULTS) -> str:
    return f"{e2e_dir(run, results)}/fold{fold}/{CHECKPOINT}"


def e2e_file(run: str, name: str, results: str = RESULTS) -> str:
    """A file of an e2e run's folder (k_study.csv, k_study_summary.csv, k_study.png)."""
    return f"{e2e_dir(run, results)}/{name}"


def heatmap_dir(experiment: str, results: str = RESULTS) -> str:
    """Fold 0's heatmaps of an experiment."""
    return f"{results}/heatmaps/{experiment}/fold0"


def heatmap_file(experiment: str, name: str, results: str = RESULTS) -> str:
    return f"{heatmap_dir(experiment, results)}/{name}"


def predictions_dir(experiment: str, results: str = RESULTS) -> str:
    return f"{results}/predictions/{experiment}"


def predictions_file(experiment: str, name: str, results: str = RESULTS) -> str:
    """predictions.csv or predictions.json of an experiment's predictions on new slides."""
    return f"{predictions_dir(experiment, results)}/{name}"


def segmentation_file(name: str, results: str = RESULTS) -> str:
    """The lesion model's files: checkpoint.pt, metrics.json, probabilities/."""
    return f"{results}/segmentation/{name}"


def weights_record(key: str, results: str = RESULTS) -> str:
    """What fetch_weights fetched for the encoder ``key`` (repo, files, sha256)."""
    return f"{results}/weights/{key}.json"


def report_dir(results: str = RESULTS) -> str:
    return f"{results}/report"


def report_file(name: str, results: str = RESULTS) -> str:
    return f"{report_dir(results)}/{name}"


def thumbnail_index(results: str = RESULTS) -> str:
    """The index of every kept slide's thumbnail and meta.json (index_thumbnails)."""
    return f"{results}/thumbnails.tsv"
