"""Experiments: which slides, with which classes, train which model on which features.

An experiment (an entry of the config's ``experiments`` list, or the options of
``msamil train``) names a model and its training options (:class:`~msamil_core.training.mil.TrainConfig`)
and optionally a *task*: a mapping from the sheet's labels to the experiment's classes. The
task is how one cohort serves several problems, e.g. pretraining on all four demo classes and
fine-tuning on a two-class task (MIL-Lab's transfer setting)::

    tasks:
      architecture:
        alternating: [bland_alternating, atypical_alternating]
        zonal: [bland_zonal, atypical_zonal]

Slides whose label the task does not list are left out of that experiment. Without a task the
classes are the sheet's labels (sorted, or the config's ``classes`` order).
"""

from __future__ import annotations

import pandas as pd

from ..errors import MsamilError


def task_classes(sheet: pd.DataFrame, task: dict | None = None, classes: list[str] | None = None) -> tuple[list[str], dict[str, int]]:
    """(class names in logit order, sheet label -> class index) of an experiment.

    Args:
        sheet: the slide sheet (``label`` column).
        task: class name -> list of sheet labels; None = each label is its own class.
        classes: the label order for ``task=None``; every sheet label must be listed.

    Raises:
        MsamilError: a sheet label outside ``classes``, a task naming labels the sheet does not
            have, or a label claimed by two task classes.
    """
    labels = sorted(sheet["label"].unique())
    if task is None:
        names = list(classes) if classes else labels
        unknown = [lab for lab in labels if lab not in names]
        if unknown:
            rows = sheet.index[sheet["label"] == unknown[0]]
            raise MsamilError(
                f"slide {rows[0]!r} has label {unknown[0]!r}, which is not among the configured classes "
                f"({', '.join(names)}); fix the sheet or add the label to `classes`"
            )
        return names, {lab: names.index(lab) for lab in labels}
    mapping: dict[str, int] = {}
    names = list(task)
    for i, name in enumerate(names):
        members = task[name]
        if isinstance(members, str):
            members = [members]
        for lab in members:
            if lab in mapping:
                raise MsamilError(f"task class {name!r}: label {lab!r} already belongs to class {names[mapping[lab]]!r}")
            if lab not in labels:
                raise MsamilError(f"task class {name!r} lists label {lab!r}, which no slide in the sheet has ({', '.join(labels)})")
            mapping[lab] = i
    if len(names) < 2:
        raise MsamilError(f"a task needs at least two classes, got {names}")
    return names, mapping


def select_slides(slide_ids: list[str], sheet: pd.DataFrame, mapping: dict[str, int]) -> tuple[list[str], list[int]]:
    """The slides whose label the task maps, with their class indices."""
    keep = [s for s in slide_ids if sheet.loc[s, "label"] in mapping]
    return keep, [mapping[sheet.loc[s, "label"]] for s in keep]
