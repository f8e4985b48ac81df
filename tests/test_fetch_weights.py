"""`msamil fetch-weights` against a local stand-in for the Hugging Face Hub.

A tiny HTTP server started by the test answers as the hub does (HEAD/GET
``/<org>/<repo>/resolve/<revision>/<file>`` with ``X-Repo-Commit`` and ``ETag`` headers; 404 with
``X-Error-Code: EntryNotFound`` for a file the repo lacks; 401 with ``X-Error-Code: GatedRepo`` for a
gated repo without access). ``msamil`` runs as a subprocess with ``HF_ENDPOINT`` pointing there, so
the real huggingface_hub client, its cache layout and its error types are exercised; nothing
reaches the internet.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

COMMIT = "fedcba9876543210fedcba9876543210fedcba98"


class FakeHub(BaseHTTPRequestHandler):
    files: dict[str, dict[str, bytes]] = {}  # repo id -> file name -> bytes
    gated: set[str] = set()
    requests: list[str] = []

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _answer(self, body: bool) -> None:
        FakeHub.requests.append(f"{self.command} {self.path}")
        parts = self.path.split("?")[0].strip("/").split("/")
        if len(parts) < 5 or parts[2] != "resolve":
            self.send_response(404)
            self.send_header("X-Error-Code", "RepoNotFound")
            self.end_headers()
            return
        repo, name = "/".join(parts[:2]), "/".join(parts[4:])
        if repo in self.gated:
            self.send_response(401)
            self.send_header("X-Error-Code", "GatedRepo")
            self.send_header("X-Error-Message", f"Access to model {repo} is restricted.")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = self.files.get(repo, {}).get(name)
        if data is None:
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound" if repo in self.files else "RepoNotFound")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def do_HEAD(self):
        self._answer(body=False)

    def do_GET(self):
        self._answer(body=True)


@pytest.fixture
def fake_hub():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    FakeHub.files, FakeHub.gated, FakeHub.requests = {}, set(), []
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def msamil(args: list[str], env_extra: dict[str, str], cache: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update({"HF_HUB_CACHE": str(cache), "HF_HUB_DISABLE_TELEMETRY": "1", **env_extra,
                "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])})
    cmd = [sys.executable, "-c", "import sys; from msamil_core.cli import main; sys.exit(main())", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def test_gated_repo_without_access_fails_in_one_line(tmp_path, fake_hub):
    FakeHub.gated.add("MahmoodLab/UNI")
    run = msamil(["fetch-weights", "uni_v1"], {"HF_ENDPOINT": fake_hub}, tmp_path / "cache")
    assert run.returncode == 1
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith("msamil fetch-weights: error: MahmoodLab/UNI: gated model")
    assert "accept the licence on https://huggingface.co/MahmoodLab/UNI" in lines[0] and "HF_TOKEN" in lines[0]
    assert any("/MahmoodLab/UNI/resolve/main/pytorch_model.bin" in r for r in FakeHub.requests)


def test_without_a_network_fetch_fails_at_once_in_one_line(tmp_path):
    """No hub to reach (a port nothing listens on): one try, one line that says so, and no word of
    HF_HUB_OFFLINE, which is not set."""
    import socket
    import time

    with socket.socket() as s:  # a free port, closed again: connections are refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    run = msamil(["fetch-weights", "uni_v1"], {"HF_ENDPOINT": f"http://127.0.0.1:{port}"}, tmp_path / "cache")
    assert run.returncode == 1 and time.monotonic() - start < 20
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, run.stderr
    assert "cannot be reached" in lines[0] and f"127.0.0.1:{port}" in lines[0] and "HF_HUB_OFFLINE" not in lines[0]


def test_fetch_fills_the_cache_once_then_extraction_reads_it_offline(tmp_path, fake_hub):
    from msamil_core.features.encoders import EncoderSpec, build_encoder, encoder_id
    import timm

    backbone = timm.create_model("resnet50", pretrained=False)  # the published layout: with its classifier
    buf = io.BytesIO()
    torch.save(backbone.state_dict(), buf)
    # the repo publishes pytorch_model.bin only: model.safetensors (looked for first) answers 404
    FakeHub.files["timm/resnet50.tv_in1k"] = {"pytorch_model.bin": buf.getvalue(), "config.json": b"{}"}
    cache = tmp_path / "cache"
    record = tmp_path / "weights" / "r50.json"
    run = msamil(["fetch-weights", "resnet50_trunc", "--record", str(record)], {"HF_ENDPOINT": fake_hub}, cache)
    assert run.returncode == 0, run.stderr
    fetched = json.loads(record.read_text())
    file = Path(fetched["file"])
    assert file.name == "pytorch_model.bin" and f"snapshots/{COMMIT}" in str(file) and file.is_symlink()
    assert (cache / "models--timm--resnet50.tv_in1k" / "refs" / "main").read_text() == COMMIT
    assert (file.parent / "config.json").is_file()
    assert fetched["sha256"] == hashlib.sha256(buf.getvalue()).hexdigest()

    # offline now: the cache answers, the hub is not asked again
    asked = len(FakeHub.requests)
    run = msamil(["fetch-weights", "resnet50_trunc"], {"HF_ENDPOINT": fake_hub, "HF_HUB_OFFLINE": "1"}, cache)
    assert run.returncode == 0, run.stderr
    assert len(FakeHub.requests) == asked

    import huggingface_hub.constants as constants

    old = constants.HF_HUB_CACHE, constants.HF_HUB_OFFLINE
    constants.HF_HUB_CACHE, constants.HF_HUB_OFFLINE = str(cache), True
    try:
        spec = EncoderSpec("resnet50_trunc", weights="hf-hub:timm/resnet50.tv_in1k")
        encoder, dim = build_encoder(spec)
        assert dim == 1024
        assert encoder_id(spec).startswith("resnet50_trunc-")
        assert torch.equal(encoder.model.backbone.layer3[0].conv1.weight, backbone.layer3[0].conv1.weight)
    finally:
        constants.HF_HUB_CACHE, constants.HF_HUB_OFFLINE = old


def test_local_dir_and_unknown_repo(tmp_path, fake_hub):
    FakeHub.files["owkin/phikon"] = {"pytorch_model.bin": b"not really weights", "config.json": b"{}"}
    run = msamil(["fetch-weights", "phikon", "--local-dir", str(tmp_path / "phikon")], {"HF_ENDPOINT": fake_hub},
                 tmp_path / "cache")
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "phikon" / "pytorch_model.bin").read_bytes() == b"not really weights"
    assert (tmp_path / "phikon" / "config.json").is_file()

    run = msamil(["fetch-weights", "--encoder", "resnet18", "--weights", "hf-hub:nobody/nothing"],
                 {"HF_ENDPOINT": fake_hub}, tmp_path / "cache")
    assert run.returncode == 1 and "nobody/nothing: not found" in run.stderr
    assert len([line for line in run.stderr.splitlines() if line.strip()]) == 1


@pytest.mark.slow
def test_workflow_fetches_hub_weights_once_before_extraction(tmp_path):
    """Dry run: one fetch_weights job for a hub encoder, ahead of every extraction job, whose input
    it is; a local weights file is an input of extraction itself."""
    import re

    from conftest import REPO, shared_slide

    sheet = tmp_path / "sheet.csv"
    sheet.write_text("slide_id,path,label,patient_id\n"
                     f"cmu,{shared_slide('CMU-1-Small-Region.svs')},a,p1\n"
                     f"dapi,{shared_slide('test3-DAPI-2-(387).ndpi')},b,p2\n")
    local = tmp_path / "r50.safetensors"
    local.write_bytes(b"weights")
    (tmp_path / "hub.yaml").write_text(
        "patches: {patch_size: 256, min_fraction: 0.4, strategy: tissue}\nexport_geojson: false\n"
        "experiments:\n  - {name: e, model: abmil.base}\n  - {name: f, model: abmil.base, encoder: r50}\n"
        "encoders:\n  uni: {name: uni_v1, weights: 'hf-hub:MahmoodLab/UNI'}\n"
        f"  r50: {{name: resnet50_trunc, weights: '{local}', input_size: 64}}\n"
        "features: {default_encoder: uni}\n")
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    run = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(tmp_path),
                          "--cores", "1", "-n", "--until", "extract_features", "--configfile", "hub.yaml",
                          "--config", f"slides={sheet}"], capture_output=True, text=True, env=env, cwd=tmp_path,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    jobs = {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", run.stdout.split("Job stats:")[-1], re.M)}
    assert jobs["fetch_weights"] == 1 and jobs["extract_features"] == 4
    # a rule's block; a group's jobs are indented in a dry run
    blocks = re.split(r"\n\s*(?:local)?rule ", run.stdout)
    extract = [b for b in blocks if b.startswith("extract_features:")]
    uni = [b for b in extract if "/uni-" in b]
    r50 = [b for b in extract if "/r50-" in b]
    assert len(uni) == 2 and all("results/weights/uni.json" in b.split("output:")[0] for b in uni)
    assert len(r50) == 2 and all(str(local) in b.split("output:")[0] for b in r50)
    fetch = next(b for b in blocks if b.startswith("fetch_weights:"))
    assert "output: results/weights/uni.json" in fetch
