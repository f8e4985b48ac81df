"""Shared test fixtures: the real slides in ../shared/data and small slides made on the fly."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "rules"))  # rules/workflow_config.py, which tests import as `workflow_config`
SHARED_DATA = Path(os.environ.get("MSAMIL_SHARED_DATA", REPO.parent / "shared" / "data"))
SLIDES = SHARED_DATA / "slides"


@pytest.fixture(scope="session", autouse=True)
def names_cache(tmp_path_factory):
    """The cache of MIL model and encoder names (msamil_core.names) in a folder of this test run,
    shared by its workflow runs (one `list-models` subprocess per run), never the user's."""
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-cache"))


@pytest.fixture(scope="session", autouse=True)
def feature_servers():
    """The feature servers this test run starts (msamil_core.features.client) live in a folder of
    their own, never beside the user's, and are stopped at the end: the folder's path (short: a
    Unix socket path has at most 107 bytes)."""
    import shutil
    import signal
    import tempfile

    folder = tempfile.mkdtemp(prefix="msamil-test-")
    os.environ["XDG_RUNTIME_DIR"] = folder
    yield Path(folder)
    for pid in server_pids(Path(folder)):
        os.kill(pid, signal.SIGKILL)
    shutil.rmtree(folder, ignore_errors=True)


def server_pids(folder: Path) -> list[int]:
    """Process ids of the feature servers whose sockets are under ``folder``."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if b"msamil_core.feature_server" in argv and any(a.startswith(str(folder).encode()) for a in argv):
            pids.append(int(proc.name))
    return pids


def workflow_failure(run, workdir: Path) -> str:
    """What a failed Snakemake run said: the end of its stderr, then the end of each log file of a
    failed job it names (a job's traceback is in its log, not in Snakemake's stderr)."""
    parts = [run.stderr[-3000:]]
    for logs in dict.fromkeys(re.findall(r"^\s*log: (.+?) \(check log file", run.stderr, re.MULTILINE)):
        for name in logs.split(", "):
            path = Path(workdir) / name
            if path.is_file():
                parts.append(f"--- end of {name}:\n" + path.read_text(errors="replace")[-3000:])
    return "\n".join(parts)


def shared_slide(name: str) -> Path:
    path = SLIDES / name
    if not path.exists():
        pytest.fail(f"test data missing: {path} (../shared/data must sit beside the repository)")
    return path


@pytest.fixture
def cmu_slide() -> Path:
    return shared_slide("CMU-1-Small-Region.svs")


@pytest.fixture
def ndpi_slide() -> Path:
    return shared_slide("test3-DAPI-2-(387).ndpi")


def write_pyramid_tiff(path: Path, image: np.ndarray, mpp: float = 0.5, levels: int = 3) -> Path:
    """A pyramidal JPEG-tiled TIFF (downsamples 1, 2, 4, ...) that OpenSlide opens as
    generic-tiff with the given µm/px; the demo cohort's writer."""
    from msamil_core.cohort.demo import write_pyramid_tiff as write

    path.parent.mkdir(parents=True, exist_ok=True)
    write(path, image, mpp=mpp, downsamples=tuple(2**i for i in range(levels)))
    return path


def zero_tiles(path: Path, level: int = 0, every: int = 3) -> Path:
    """Zero every ``every``-th JPEG tile of a tiled TIFF's ``level`` in place (a corrupt scan whose
    coarser levels, and so its thumbnail, still decode)."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        page = tif.pages[level]
        spans = list(zip(page.dataoffsets, page.databytecounts))[::every]
    with open(path, "r+b") as f:
        for offset, size in spans:
            f.seek(offset)
            f.write(bytes(size))
    return path


@pytest.fixture
def blank_slide(tmp_path) -> Path:
    """A real pyramidal slide of empty glass (no tissue)."""
    rng = np.random.default_rng(0)
    glass = np.clip(242 + rng.normal(0, 2, size=(1024, 1536, 3)), 0, 255).astype(np.uint8)
    return write_pyramid_tiff(tmp_path / "blank.tiff", glass)


HUB_REVISION = "0123456789abcdef0123456789abcdef01234567"


def write_hub_cache(cache: Path, repo_id: str, files: dict[str, bytes], revision: str = HUB_REVISION) -> None:
    """Lay ``files`` out as huggingface_hub's cache does (msamil_core.hub.put_in_cache)."""
    from msamil_core.hub import put_in_cache

    put_in_cache(cache, repo_id, files, revision)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache, made the default one, with HF_HUB_OFFLINE=1."""
    import huggingface_hub.constants as constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache
