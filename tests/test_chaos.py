"""The chaos bench's short run: 3 jobs killed at random moments of a small demo run, reruns
until it completes, and every result equal to an uninterrupted run's (bench/chaos.py)."""

from __future__ import annotations

import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow


def test_killed_jobs_leave_a_run_that_completes_to_the_clean_results(tmp_path, capsys):
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import chaos
    finally:
        sys.path.remove(str(REPO / "bench"))
    status = chaos.main(["--kills", "3", "--quick", "--seed", "3", "--workdir", str(tmp_path)])
    out = capsys.readouterr().out
    kills = int(out.split("kills made: ")[1].split(" ")[0])
    assert kills >= 2, out[-3000:]  # a run may complete before its last kill lands
    assert "differences: 0" in out and "leftover temporary files: 0" in out, out[-3000:]
    compared = int(out.split("files compared: ")[1].split(";")[0])
    assert compared > 50, out[-3000:]  # coordinates, bags, masks, checkpoints, metrics, predictions
    assert status == 0
