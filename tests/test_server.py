"""Feature servers: the encoder loaded once for many `msamil extract` jobs, bags bit-identical to a
job that loads it itself, and nothing lost or left behind when a server or a client is killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import server_pids
from msamil_core.cli import main
from msamil_core.wsi.coords import make_grids, write_coords
from msamil_core.wsi.slide import open_slide

ENCODER = ["--encoder", "resnet18", "--input-size", "64", "--threads", "1", "--no-progress"]


@pytest.fixture(scope="module")
def coords(tmp_path_factory) -> dict[str, Path]:
    """20x/10x/5x coordinates of CMU-1-Small-Region over the whole slide: 'small' (a third of it)
    and 'all' (long enough on one thread to be killed half-way)."""
    from conftest import shared_slide

    root = tmp_path_factory.mktemp("server-coords")
    out = {}
    with open_slide(shared_slide("CMU-1-Small-Region.svs")) as slide:
        for name, rows in (("small", 20), ("all", 60)):
            mask = np.zeros((60, 44), bool)
            mask[:rows] = True
            grids = make_grids(mask, slide.dimensions, slide.mpp, patch_size=128, name=slide.slide_id)
            for scale, grid in grids.items():
                path = root / name / f"{scale}.h5"
                write_coords(path, grid.coords, grid.attrs)
                out.setdefault(name, []).append(path)
    return out


def _args(slide, coords, out, *extra) -> list[str]:
    return ["extract", "--slide", str(slide), "--coords", *map(str, coords), "--out", str(out), *ENCODER, *extra]


def _server_log(folder: Path) -> str:
    return "".join(p.read_text() for p in sorted(folder.rglob("*.log")))


def _features(path: Path) -> torch.Tensor:
    return torch.load(path, weights_only=True)["features"]


def test_one_server_serves_many_jobs_with_the_bags_of_a_job_that_loads_the_encoder(
        tmp_path, cmu_slide, coords, feature_servers, caplog):
    caplog.set_level("INFO")
    started = _server_log(feature_servers).count("ready:")
    for i in range(3):
        assert main(_args(cmu_slide, coords["small"], tmp_path / f"server{i}.pt")) == 0
    assert main(_args(cmu_slide, coords["small"], tmp_path / "job.pt", "--no-server")) == 0
    # one server started, and it served the three jobs
    assert _server_log(feature_servers).count("ready:") == started + 1
    assert caplog.text.count("started feature server") == 1
    reference = torch.load(tmp_path / "job.pt", weights_only=True)
    for i in range(3):
        bag = torch.load(tmp_path / f"server{i}.pt", weights_only=True)
        assert torch.equal(bag["features"], reference["features"]) and torch.equal(bag["coords"], reference["coords"])
        assert bag["encoder"] == reference["encoder"] and bag["slide_digest"] == reference["slide_digest"]
    # other settings (here the readers) get a server of their own, and the same bags
    assert main(_args(cmu_slide, coords["small"], tmp_path / "readers.pt", "--workers", "2")) == 0
    assert caplog.text.count("started feature server") == 2
    assert torch.equal(_features(tmp_path / "readers.pt"), reference["features"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left


def _client(slide, coords, out, *extra) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "msamil_core", *_args(slide, coords, out, *extra)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(condition, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_a_server_killed_mid_slide_is_replaced_and_the_bag_is_the_same(tmp_path, cmu_slide, coords,
                                                                        feature_servers):
    extra = ("--batch-size", "8")  # settings of this test only: its own server
    assert main(_args(cmu_slide, coords["all"], tmp_path / "reference.pt", *extra, "--no-server")) == 0
    client, pid, _ = _client_mid_slide(cmu_slide, coords["all"], tmp_path / "bag.pt", extra, feature_servers)
    os.kill(pid, signal.SIGKILL)
    _, err = client.communicate(timeout=300)
    assert client.returncode == 0, err
    assert "went away" in err and err.count("started feature server") == 2
    assert torch.equal(_features(tmp_path / "bag.pt"), _features(tmp_path / "reference.pt"))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def _client_mid_slide(slide, coords, out, extra, folder: Path) -> tuple[subprocess.Popen, int, Path]:
    """A client (a new process) whose new server is part-way through its slide: (client, the
    server's pid, the server's log)."""
    before = set(server_pids(folder))
    client = _client(slide, coords, out, *extra)
    _wait_for(lambda: set(server_pids(folder)) - before, "the server to start")
    (pid,) = set(server_pids(folder)) - before
    _wait_for(lambda: any(f"(pid {pid}) ready" in p.read_text() for p in folder.rglob("*.log")), "the server")
    log = next(p for p in folder.rglob("*.log") if f"(pid {pid}) ready" in p.read_text())
    _wait_for(lambda: "extracting bag for" in log.read_text(), "the server to take the slide")
    time.sleep(0.5)  # part-way through the slide's patches
    return client, pid, log


def test_a_killed_client_leaves_no_bag_and_the_server_serves_on(tmp_path, cmu_slide, coords, feature_servers):
    extra = ("--batch-size", "4")
    before = set(server_pids(feature_servers))
    client, pid, log = _client_mid_slide(cmu_slide, coords["all"], tmp_path / "bag.pt", extra, feature_servers)
    client.kill()
    client.wait()
    _wait_for(lambda: "the client went away" in log.read_text(), "the server to stop the slide", timeout=30)
    assert not (tmp_path / "bag.pt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    # the same server takes the next job
    assert main(_args(cmu_slide, coords["small"], tmp_path / "next.pt", *extra)) == 0
    assert set(server_pids(feature_servers)) - before == {pid}
    assert log.read_text().count("extracting bag for") == 2


def test_new_weights_in_the_same_file_start_a_new_server(tmp_path, cmu_slide, coords, caplog):
    from safetensors.torch import save_file

    from msamil_core.features.encoders import EncoderSpec, build_encoder

    caplog.set_level("INFO")
    weights = tmp_path / "weights.safetensors"
    for seed, name in ((0, "a.pt"), (1, "b.pt")):
        model, _ = build_encoder(EncoderSpec("resnet18", input_size=64, seed=seed))
        save_file({k: v.contiguous() for k, v in model.model.state_dict().items()}, weights)
        assert main(_args(cmu_slide, coords["small"], tmp_path / name, "--weights", str(weights))) == 0
    assert caplog.text.count("started feature server") == 2 and "went away" in caplog.text
    a, b = (torch.load(tmp_path / n, weights_only=True) for n in ("a.pt", "b.pt"))
    assert a["encoder"] != b["encoder"] and not torch.equal(a["features"], b["features"])


def test_a_server_that_cannot_start_fails_the_job_in_one_line(tmp_path, cmu_slide, coords, capsys):
    assert main(_args(cmu_slide, coords["small"], tmp_path / "x.pt", "--weights", "hf-hub:nobody/nothing")) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("msamil extract: error:") and "nobody/nothing" in err, err
    assert not (tmp_path / "x.pt").exists()


def test_bad_input_fails_the_job_and_not_the_server(tmp_path, cmu_slide, coords, capsys, caplog):
    from msamil_core.wsi.coords import read_coords

    caplog.set_level("INFO")
    xy, attrs = read_coords(coords["small"][0])
    foreign = tmp_path / "foreign.h5"
    write_coords(foreign, xy, {**attrs, "level0_width": 4000, "level0_height": 3000})
    assert main(_args(cmu_slide, [foreign], tmp_path / "x.pt")) == 1
    assert "another slide" in capsys.readouterr().err
    assert main(_args(cmu_slide, coords["small"], tmp_path / "y.pt")) == 0
    assert "went away" not in caplog.text and not (tmp_path / "x.pt").exists()


def test_the_server_folder_must_be_this_users_alone(tmp_path, monkeypatch):
    from msamil_core.errors import MsamilError
    from msamil_core.features.client import server_dir

    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    (tmp_path / "msamil").mkdir(mode=0o755)
    os.chmod(tmp_path / "msamil", 0o755)
    with pytest.raises(MsamilError, match="open to others"):
        server_dir()
    os.chmod(tmp_path / "msamil", 0o700)
    assert server_dir() == tmp_path / "msamil"


def test_a_folder_too_long_for_a_socket_is_passed_over(tmp_path, monkeypatch):
    from msamil_core.features.client import MAX_FOLDER_BYTES, server_dir

    deep = tmp_path / ("x" * MAX_FOLDER_BYTES)
    deep.mkdir()
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(deep))
    monkeypatch.setenv("TMPDIR", str(deep))
    folder = server_dir()
    assert folder == Path("/tmp") / f"msamil-{os.getuid()}" and len(str(folder / ("0" * 24 + "-0.sock"))) < 108
