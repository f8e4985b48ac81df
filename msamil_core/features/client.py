"""Extraction through a feature server: the encoder stays loaded between a run's per-slide jobs.

The workflow runs one ``msamil extract`` job per slide (so that adding a slide extracts that
slide only); building the encoder is the fixed cost of each (~14 s for ViT-L ``uni_v1`` on a CPU,
besides ~5 s importing torch and timm). With ``features.server`` (the default) the job is a thin
client that never imports torch: it hands its slide to a server process
(:mod:`msamil_core.feature_server`) that holds the encoder, starting one if none is running, and
moves the bags the server wrote into place.

Which server: one per

* user (its socket lives in a folder only that user can open: ``$XDG_RUNTIME_DIR/msamil`` or
  ``<tmp>/msamil-<uid>``);
* encoder and settings (the key hashes the encoder's settings, ``features``, device, threads,
  the visible GPUs, the SLURM job, the Hugging Face cache and the msamil code; new weights in
  the same file make the server stop and a new one start);
* concurrent job (slot): each client holds a slot's lock while it talks to that slot's server, so
  N jobs side by side get N servers, and each server claims its GPU as a job does
  (:func:`msamil_core.runtime.resolve_device`): ``snakemake --resources gpu=N`` still gives N
  jobs N GPUs.

A server exits after ``features.server_idle`` seconds without a slide, and with its SLURM job.
Nothing is lost when either side dies: the server writes each bag to a temporary beside it and
the client moves it into place, so a bag appears whole or not at all; a client that finds its
server gone starts another and asks again (twice), a server whose client is gone stops that slide
and removes its temporaries.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Iterator

from ..errors import MsamilError

log = logging.getLogger(__name__)

ATTEMPTS = 3  # a server that dies mid-slide is replaced this many times minus one
START_TIMEOUT_S = 900.0  # building a large encoder from a slow file system takes minutes
SLOTS = 256
# Environment that decides which devices, weights and jobs a server serves.
KEY_ENVIRONMENT = ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_ID", "HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE")


class ServerGone(Exception):
    """The server died or went away before the slide was done."""


# A Unix socket's path holds at most 107 bytes; the folder leaves room for the socket's name.
MAX_FOLDER_BYTES = 70


def server_dir() -> Path:
    """The folder of this user's feature servers (sockets, locks, logs): readable by this user
    only, so no other user's job can reach a server. ``$XDG_RUNTIME_DIR/msamil``, else
    ``<tmp>/msamil-<uid>``, else ``/tmp/msamil-<uid>`` (when the others are not writable or their
    path is too long for a socket)."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    candidates = [Path(runtime) / "msamil"] if runtime and os.path.isdir(runtime) else []
    candidates += [Path(tempfile.gettempdir()) / f"msamil-{os.getuid()}", Path("/tmp") / f"msamil-{os.getuid()}"]
    for base in candidates:
        if len(os.fsencode(base)) > MAX_FOLDER_BYTES:
            continue
        try:
            base.mkdir(mode=0o700, exist_ok=True)
            break
        except OSError:
            continue
    else:
        raise MsamilError(f"feature servers: none of {', '.join(map(str, candidates))} can hold their sockets; "
                          "set XDG_RUNTIME_DIR to a short writable folder, or features.server: false")
    info = base.stat()
    if info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise MsamilError(f"feature servers: {base} belongs to another user or is open to others; remove it, "
                          "or set features.server: false")
    return base


def _code_signature() -> dict:
    """What a server's code is: a server started before msamil changed is not used."""
    from .. import __version__

    package = Path(__file__).resolve().parents[1]
    newest = max((p.stat().st_mtime_ns for p in package.rglob("*.py")), default=0)
    return {"version": __version__, "package": str(package), "python": sys.executable, "newest": newest}


def server_config(encoder: dict, checkpoint: str | None, features: dict, device: str, threads: int | None) -> dict:
    """What a server is built from (JSON), and what its key hashes. ``threads`` None or 0: torch's
    default, as a job that loads the encoder itself would have."""
    return {
        "encoder": encoder,
        "checkpoint": str(Path(checkpoint).resolve()) if checkpoint else None,
        "features": features,
        "device": device,
        "threads": threads or None,
        "environment": {k: os.environ[k] for k in KEY_ENVIRONMENT if k in os.environ},
        "code": _code_signature(),
    }


def server_key(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:24]


@contextmanager
def slot(folder: Path, key: str) -> Iterator[int]:
    """Hold the lock of the first free slot of ``key``: its server talks to this client alone."""
    for index in range(SLOTS):
        fd = os.open(folder / f"{key}-{index}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue
        try:
            yield index
        finally:
            os.close(fd)  # releases the lock
        return
    raise MsamilError(f"feature servers: all {SLOTS} slots of {folder} are held; set features.server: false")


class Server:
    """One slot's server as its client sees it: where it listens, its log, how to start it."""

    def __init__(self, folder: Path, key: str, index: int, config: dict):
        self.name = f"{key}-{index}"
        self.socket = folder / f"{self.name}.sock"
        self.log = folder / f"{self.name}.log"
        self.config_file = folder / f"{self.name}.json"
        self.config = config

    def connect(self) -> Connection | None:
        """A connection to the running server, or None when none listens."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(self.socket))
        except OSError:
            sock.close()
            return None
        return Connection(sock.detach())

    def start(self, idle: float) -> Connection:
        """Start the server and wait until it listens; a server that cannot start (weights
        missing, no GPU) fails with its own one-line error."""
        self.socket.unlink(missing_ok=True)  # left by a killed server
        self.config_file.write_text(json.dumps(self.config))
        with open(self.log, "ab") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "msamil_core.feature_server", str(self.socket), str(self.config_file),
                 str(idle)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=self.socket.parent,
                start_new_session=True)  # outlives this job; not in the job's process group
        log.info("started feature server %s (pid %d, log %s)", self.name, process.pid, self.log)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            status = process.poll()
            if status is not None:
                raise MsamilError(self.startup_error(status))
            conn = self.connect()
            if conn is not None:
                return conn
            time.sleep(0.05)
        process.kill()
        raise MsamilError(f"feature server {self.name} did not start within {START_TIMEOUT_S:.0f} s; see {self.log}")

    def startup_error(self, status: int) -> str:
        lines = self.log.read_text(errors="replace").splitlines() if self.log.exists() else []
        errors = [line.removeprefix("error: ") for line in lines if line.startswith("error: ")]
        return errors[-1] if errors else f"feature server {self.name} exited with status {status} at start; see {self.log}"


def extract_via_server(request: dict, config: dict, idle: float) -> dict[str, str]:
    """Have a feature server write one slide's bags; returns bag name -> the file now in place.

    ``request``: ``slide``, ``slide_id``, ``mpp``, ``bags`` (name -> [coordinates files, bag
    file]) and ``progress``. Paths are made absolute here (the server runs elsewhere).
    """
    request = dict(request)
    request["slide"] = os.path.abspath(request["slide"])
    request["bags"] = {name: [[os.path.abspath(c) for c in coords], os.path.abspath(out)]
                       for name, (coords, out) in request["bags"].items()}
    folder = server_dir()
    key = server_key(config)
    with slot(folder, key) as index:
        server = Server(folder, key, index, config)
        for attempt in range(1, ATTEMPTS + 1):
            conn = server.connect() or server.start(idle)
            try:
                return _exchange(conn, request)
            except ServerGone as exc:
                if attempt == ATTEMPTS:
                    raise MsamilError(f"slide {request['slide_id'] or request['slide']!r}: the feature server died "
                                      f"{ATTEMPTS} times ({exc}); see {server.log}, or set features.server: false "
                                      "to extract in the job itself") from None
                log.warning("feature server %s went away (%s); starting another", server.name, exc)
            finally:
                conn.close()
    raise AssertionError("unreachable")


def _exchange(conn: Connection, request: dict) -> dict[str, str]:
    """Send the request, relay the server's log lines, move the bags it wrote into place."""
    from ..fileio import commit

    try:
        conn.send(("extract", request))
        while True:
            kind, *payload = conn.recv()
            if kind == "log":
                level, name, message = payload
                logging.getLogger(name).log(level, message)
            elif kind == "error":
                raise MsamilError(payload[0])
            elif kind == "stale":
                raise ServerGone(payload[0])
            elif kind == "done":
                temporaries = payload[0]
                break
    except (EOFError, OSError) as exc:
        raise ServerGone(type(exc).__name__) from None
    outs = {name: out for name, (_, out) in request["bags"].items()}
    try:
        for name, tmp in temporaries.items():
            commit(tmp, outs[name])
    except BaseException:
        for tmp in temporaries.values():
            Path(tmp).unlink(missing_ok=True)
        raise
    try:
        conn.send(("ok",))
    except OSError:
        pass  # the bags are in place; the server removes only temporaries that still exist
    return outs
