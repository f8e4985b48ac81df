"""The fast subset of bench/mil_unit_tests.py (Raff & Holt's algorithmic unit tests): each test's
data tells the MIL rule from its shortcut, and a model trains and is scored through the bench."""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest
import torch

from conftest import REPO
from msamil_core.evaluation.metrics import roc

spec = importlib.util.spec_from_file_location("mil_unit_tests", REPO / "bench" / "mil_unit_tests.py")
bench = importlib.util.module_from_spec(spec)
sys.modules["mil_unit_tests"] = bench  # dataclasses look their module up there
spec.loader.exec_module(bench)

C = bench.CONCEPTS


def _present(x: torch.Tensor, concept: str) -> float:
    """The bag's largest value along a concept's direction (an instance-level max: standard MIL)."""
    return float(x[:, C[concept]].max())


def _count(x: torch.Tensor, concept: str) -> float:
    return float((x[:, C[concept]] > 1.5).sum())


# (MIL rule, shortcut) per test, as bag scores
RULES = {
    "single_concept": (lambda x: _present(x, "P"), lambda x: -_present(x, "N")),
    "threshold_poison": (lambda x: min(_present(x, "A"), _present(x, "B")), lambda x: -_present(x, "Z")),
    "false_frequency": (lambda x: min(_present(x, "A"), _present(x, "B")), lambda x: _count(x, "A")),
}


def _auc(bags, rule) -> float:
    return roc(bags.labels == 1, np.array([rule(x) for x in bags.features]))[2]


@pytest.mark.parametrize("test", bench.TESTS)
def test_the_mil_rule_passes_and_the_shortcut_fails(test):
    mil_rule, shortcut = RULES[test]
    train, held_out = bench.make_bags(test, "train", 200, 0), bench.make_bags(test, "test", 200, 0)
    assert _auc(train, mil_rule) > 0.95 and _auc(held_out, mil_rule) > 0.95
    assert _auc(train, shortcut) > 0.75  # the shortcut fits the training bags ...
    assert _auc(held_out, shortcut) < 0.3  # ... and is turned against the model at test time
    assert bench.verdict(_auc(held_out, mil_rule)) == "pass" and bench.verdict(_auc(held_out, shortcut)) == "fail"
    assert bench.verdict(0.9, worst=0.3) == "partial"


def test_bags_are_seeded_and_balanced():
    a, b = bench.make_bags("false_frequency", "test", 20, 3), bench.make_bags("false_frequency", "test", 20, 3)
    assert all(torch.equal(x, y) for x, y in zip(a.features, b.features)) and a.labels.sum() == 10
    assert all(16 <= len(x) <= 32 and x.shape[1] == bench.DIM for x in a.features)


def test_a_model_trains_and_is_scored():
    train_auc, test_auc = bench.run_test("meanmil.base", "single_concept", seed=0, epochs=3, n_train=32, n_eval=32)
    assert 0.0 <= test_auc <= 1.0 and train_auc > 0.6  # it learns the training distribution


def test_the_positive_control_passes_the_single_concept_test():
    """mi-Net obeys the standard MIL assumption by construction, so it must learn the MIL rule
    here (the bench's defaults, one repeat): a failing cell of another model is then the model's."""
    train_auc, test_auc = bench.run_test("minet.base", "single_concept", seed=0, epochs=5, n_train=48, n_eval=64)
    assert train_auc > 0.95 and bench.verdict(test_auc) == "pass"
