"""Does the demo cohort need more than 20x? Linear probes on random-CNN features per scale.

For every slide of the demo cohort (generated first if ``--data`` has no sheet) this reads the
lesion patches of each scale exactly as the pipeline does (``msamil_core.wsi.coords.make_grids`` on
the GeoJSON lesion mask at thumbnail size from ``msamil_core.wsi.annotations.annotation_mask``,
0.7 minimum fraction; ``Slide.read_patch`` to
``--input-size`` px), embeds them with a randomly initialised timm CNN (``msamil_core.features.encoders``,
fixed seed, global pooling) and pools them per slide and scale (mean, std, max). A standardised
multinomial logistic regression is then cross-validated (stratified, grouped by patient, repeated
with reshuffled folds) on several feature sets, and the script prints per feature set:

* balanced accuracy and macro one-vs-rest AUC on the four classes,
* accuracy on each factor (cytology: bland/atypical; architecture: alternating/zonal),
  read off the four-class predictions,
* the summed confusion matrices of the 20x-only and multi-scale probes.

The design works when 20x-only probes get cytology right but architecture at chance (balanced
accuracy near 0.5, below the 95th percentile of the same probe on shuffled architecture labels,
also printed) and the multi-scale probes get both.

Run: ``.venv/bin/python bench/demo_separability.py`` (3-5 minutes on 2 CPU cores with the
cohort already generated; ``--help`` for options).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from msamil_core.cohort.demo import ARCHITECTURES, CLASSES, CYTOLOGIES, generate_cohort
from msamil_core.features.encoders import EncoderSpec, build_encoder
from msamil_core.wsi.annotations import annotation_mask
from msamil_core.wsi.coords import make_grids
from msamil_core.wsi.geometry import SCALES
from msamil_core.wsi.slide import open_slide

THUMBNAIL_LONG_SIDE = 1024  # px, as the pipeline's thumbnail step
MIN_FRACTION = 0.7


@torch.inference_mode()
def slide_features(row, encoder, patch_size: int, input_size: int, batch_size: int) -> dict[str, np.ndarray]:
    """{scale: [N, D] float32} features of the lesion patches of one slide."""
    with open_slide(row.path, row.slide_id) as slide:
        w0, h0 = slide.dimensions
        scale = THUMBNAIL_LONG_SIDE / max(w0, h0)
        mask = annotation_mask(row.annotation, row.slide_id, (w0, h0), (round(w0 * scale), round(h0 * scale)))
        grids = make_grids(
            mask, (w0, h0), slide.mpp, patch_size=patch_size, min_fraction=MIN_FRACTION, name=row.slide_id
        )
        out = {}
        for name, grid in grids.items():
            size0 = grid.attrs["patch_size_level0"]
            if not len(grid.coords):
                raise SystemExit(f"slide {row.slide_id}: no {name} lesion patch at min fraction {MIN_FRACTION}")
            patches = np.stack([slide.read_patch(int(x), int(y), size0, input_size) for x, y in grid.coords])
            batch = torch.from_numpy(patches).permute(0, 3, 1, 2).contiguous()
            out[name] = torch.cat([encoder(b) for b in batch.split(batch_size)]).numpy()
    return out


def pooled(features: dict[str, np.ndarray], scales: tuple[str, ...], stats: tuple[str, ...]) -> np.ndarray:
    """One slide vector: the chosen statistics over patches, concatenated over scales."""
    ops = {"mean": np.mean, "std": np.std, "max": np.max}
    return np.concatenate([ops[s](features[sc], axis=0) for sc in scales for s in stats])


def probe(x: np.ndarray, y: np.ndarray, groups: np.ndarray, folds: int, repeats: int) -> dict:
    """Repeated grouped, stratified CV of a standardised logistic regression; pooled out-of-fold metrics."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score, confusion_matrix, roc_auc_score
    from sklearn.model_selection import StratifiedGroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    bacc, auc, cyto, arch = [], [], [], []
    confusion = np.zeros((len(CLASSES), len(CLASSES)), int)
    factor = {k: np.array([c.split("_")[k] for c in CLASSES]) for k in (0, 1)}
    for r in range(repeats):
        proba = np.zeros((len(y), len(CLASSES)))
        for train, test in StratifiedGroupKFold(folds, shuffle=True, random_state=r).split(x, y, groups):
            model = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=5000))
            model.fit(x[train], y[train])
            proba[np.ix_(test, model.classes_)] = model.predict_proba(x[test])
        pred = proba.argmax(axis=1)
        bacc.append(balanced_accuracy_score(y, pred))
        auc.append(roc_auc_score(y, proba, multi_class="ovr", average="macro"))
        cyto.append(balanced_accuracy_score(factor[0][y], factor[0][pred]))
        arch.append(balanced_accuracy_score(factor[1][y], factor[1][pred]))
        confusion += confusion_matrix(y, pred, labels=range(len(CLASSES)))
    return {
        "bacc": (np.mean(bacc), np.std(bacc)),
        "auc": (np.mean(auc), np.std(auc)),
        "cytology": np.mean(cyto),
        "architecture": np.mean(arch),
        "confusion": confusion,
    }


def architecture_null(x: np.ndarray, y: np.ndarray, groups: np.ndarray, folds: int, permutations: int) -> np.ndarray:
    """Architecture accuracies [permutations] of the same probe with architecture labels shuffled.

    Labels are permuted between patients of the same cytology (a patient's slides keep one
    label): the spread of what a cohort of this size gives by chance.
    """
    rng = np.random.default_rng(0)
    cyto = y // len(ARCHITECTURES)
    scores = []
    for _ in range(permutations):
        perm = y.copy()
        for c in np.unique(cyto):
            patients = np.unique(groups[cyto == c])
            arch = np.array([y[groups == p][0] % len(ARCHITECTURES) for p in patients])
            for p, a in zip(patients, rng.permutation(arch)):
                perm[groups == p] = c * len(ARCHITECTURES) + a
        scores.append(probe(x, perm, groups, folds, repeats=1)["architecture"])
    return np.asarray(scores)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="/tmp/msamil_demo", help="cohort folder; generated when it has no slides.csv")
    parser.add_argument("--n-slides", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--patch-size", type=int, default=256, help="px at each magnification, as in the config")
    parser.add_argument("--input-size", type=int, default=96, help="encoder input, px")
    parser.add_argument("--encoder", default="resnet18", help="timm model name, randomly initialised")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument(
        "--permutations", type=int, default=50, help="label shuffles for the chance level of architecture"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    sheet_path = Path(args.data) / "slides.csv"
    if not sheet_path.exists():
        start = time.perf_counter()
        generate_cohort(args.data, args.n_slides, args.seed, args.patch_size, threads=args.threads, progress=True)
        print(f"generated {args.n_slides} slides in {time.perf_counter() - start:.1f} s")
    sheet = pd.read_csv(sheet_path)

    encoder, dim = build_encoder(EncoderSpec(args.encoder, input_size=args.input_size, seed=0))
    start = time.perf_counter()
    feats = [slide_features(row, encoder, args.patch_size, args.input_size, 128) for row in sheet.itertuples()]
    counts = {s: [len(f[s]) for f in feats] for s in SCALES}
    print(
        f"{args.encoder} (random init, {dim}-d) at {args.input_size} px: "
        f"{sum(map(sum, counts.values()))} patches in {time.perf_counter() - start:.1f} s"
    )
    for s in SCALES:
        print(f"  {s}: patches per slide min {min(counts[s])}, mean {np.mean(counts[s]):.1f}, max {max(counts[s])}")

    y = sheet["label"].map(CLASSES.index).to_numpy()
    groups = sheet["patient_id"].to_numpy()
    per_class = ", ".join(f"{c} {np.sum(y == i)}" for i, c in enumerate(CLASSES))
    print(f"{len(y)} slides, {len(set(groups))} patients; per class: {per_class}")
    print(
        f"probe: logistic regression, {args.folds}-fold grouped stratified CV x {args.repeats} repeats "
        "(mean ± sd over repeats)"
    )
    print(
        f"chance: balanced accuracy {1 / len(CLASSES):.2f}, factor accuracies 0.50 "
        f"(factors: {CYTOLOGIES}, {ARCHITECTURES})\n"
    )

    settings = [
        (("20x",), ("mean",)),
        (("20x",), ("mean", "std", "max")),
        (("10x",), ("mean", "std", "max")),
        (("5x",), ("mean",)),
        (("5x",), ("mean", "std", "max")),
        (("20x", "5x"), ("mean",)),
        (("20x", "10x", "5x"), ("mean",)),
        (("20x", "10x", "5x"), ("mean", "std", "max")),
    ]
    header = f"{'features':<28} {'bal.acc':>12} {'AUC':>12} {'cytology':>9} {'architecture':>13} {'null95':>7} {'p':>5}"
    print(header + "\n" + "-" * len(header))
    confusions = {}
    for scales, stats in settings:
        x = np.stack([pooled(f, scales, stats) for f in feats])
        res = probe(x, y, groups, args.folds, args.repeats)
        null = architecture_null(x, y, groups, args.folds, args.permutations)
        name = "+".join(scales) + " " + "/".join(stats)
        confusions[name] = res["confusion"]
        print(
            f"{name:<28} {res['bacc'][0]:.2f} ± {res['bacc'][1]:.2f} {res['auc'][0]:.2f} ± {res['auc'][1]:.2f} "
            f"{res['cytology']:>9.2f} {res['architecture']:>13.2f} {np.percentile(null, 95):>7.2f} "
            f"{(1 + np.sum(null >= res['architecture'])) / (1 + len(null)):>5.2f}"
        )
    print(
        f"\nnull95, p: 95th percentile of the architecture accuracy over {args.permutations} shuffles of the "
        "architecture labels (within cytology, by patient), and the permutation p-value of the observed one"
    )
    for name in ("20x mean/std/max", "20x+10x+5x mean/std/max"):
        print(f"\nconfusion, {name} (rows true, columns predicted, summed over repeats)")
        print(pd.DataFrame(confusions[name], index=CLASSES, columns=CLASSES).to_string())


if __name__ == "__main__":
    main()
