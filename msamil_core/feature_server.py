"""A feature server: one encoder loaded once, extracting the slides its clients hand it.

Started by :mod:`msamil_core.features.client` as ``python -m msamil_core.feature_server SOCKET
CONFIG IDLE``; it builds the encoder (:class:`~msamil_core.features.extraction.Extractor`, on the
GPU it claims as a job would), listens on the Unix socket ``SOCKET`` and serves one client at a
time (a client holds its slot's lock), until ``IDLE`` seconds pass without one.

Per slide it does what ``msamil extract`` does in a job, writing each bag to a temporary beside its
file; the client moves them into place. Its log lines go to the client (the job's log) as well as
to the server's log. A client that goes away mid-slide stops the slide; one that goes away before
moving the bags has them removed. A request whose encoder weights changed on disk since the
server loaded them is answered ``stale`` and the server exits, so that the client starts a new
one with the new weights.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
from multiprocessing.connection import Connection
from pathlib import Path

from .errors import MsamilError

log = logging.getLogger(__name__)


class _ToClient(logging.Handler):
    """Sends the log records of the slide being served to its client."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.conn: Connection | None = None

    def emit(self, record: logging.LogRecord) -> None:
        conn = self.conn
        if conn is None:
            return
        try:  # Handler.handle holds the handler's lock
            conn.send(("log", record.levelno, record.name, record.getMessage()))
        except OSError:
            pass  # the client is gone; the watcher stops the slide


def _weights_signature(config: dict) -> tuple | None:
    """(path, size, mtime) of the weights (or e2e checkpoint) the server's encoder comes from."""
    from .features.encoders import EncoderSpec, weights_file
    from .features.extraction import file_signature
    from .settings import EncoderSettings

    return file_signature(config["checkpoint"] or
                          weights_file(EncoderSpec.from_settings(EncoderSettings(**config["encoder"]))))


def _build(config: dict):
    from .features.encoders import EncoderSpec
    from .features.extraction import Extractor
    from .runtime import set_threads
    from .settings import EncoderSettings, FeatureSettings

    set_threads(config["threads"])
    if config["checkpoint"]:
        from .training.e2e import encoder_spec_from_checkpoint

        spec = encoder_spec_from_checkpoint(config["checkpoint"])
    else:
        spec = EncoderSpec.from_settings(EncoderSettings(**config["encoder"]))
    return Extractor(spec, FeatureSettings(**config["features"]), config["device"], config["threads"])


class _Session:
    """One client's slide: the connection, and whether the client is still there. Only the
    serving thread sends; the watcher only polls."""

    def __init__(self, conn: Connection):
        self.conn = conn
        self.gone = threading.Event()
        self.done = threading.Event()

    def watch(self) -> None:
        """Until the slide is done: notice a client that hangs up (its socket turns readable at
        EOF; a client sends nothing while it waits)."""
        while not self.done.is_set():
            try:
                if self.conn.poll(0.5):
                    self.gone.set()
                    return
            except (OSError, ValueError):
                self.gone.set()
                return

    def send(self, message) -> None:
        self.conn.send(message)

    def reply(self, message) -> None:
        """Send, unless the client is gone (then there is nobody to tell)."""
        try:
            self.conn.send(message)
        except OSError:
            pass


def _serve_one(extractor, conn: Connection, config: dict, loaded, to_client: _ToClient) -> bool:
    """Serve one client; False when the server must exit (its weights changed)."""
    from .features.bags import save_bag
    from .features.extraction import Cancelled, bags_of

    try:
        kind, request = conn.recv()
    except (EOFError, OSError, ValueError):
        return True
    session = _Session(conn)
    if _weights_signature(config) != loaded:
        session.send(("stale", "its encoder weights changed on disk since it loaded them"))
        return False
    watcher = threading.Thread(target=session.watch, daemon=True)
    watcher.start()
    to_client.conn = conn
    log.info("slide %r: extracting %s for %s", request["slide_id"], ", ".join(request["bags"]),
             request["slide"])  # fmt: skip
    temporaries: dict[str, str] = {}
    try:
        names = list(request["bags"])
        coords_sets = [request["bags"][name][0] for name in names]
        made = bags_of(extractor, request["slide"], coords_sets, request["slide_id"], request["mpp"],
                       progress=request.get("progress", False), stop=session.gone.is_set,
                       leave_out=request.get("leave_out", False))
        for name, bag in zip(names, made):
            temporaries[name] = str(save_bag(request["bags"][name][1], bag, move=False))
        to_client.conn = None
        session.done.set()
        session.send(("done", temporaries))
        conn.recv()  # ("ok",) once the bags are in place, EOF if the client died first
    except Cancelled:
        log.info("slide %r: the client went away; stopped", request.get("slide_id"))
    except MsamilError as exc:
        to_client.conn = None
        session.reply(("error", str(exc)))
    except (EOFError, OSError):
        pass
    except Exception as exc:  # a bug or a broken reader: this slide fails, the server serves on
        log.exception("slide %r failed", request.get("slide_id"))
        to_client.conn = None
        session.reply(("error", f"slide {request.get('slide_id')!r}: {type(exc).__name__}: {exc} (traceback in "
                                f"{config['log']})"))
    finally:
        to_client.conn = None
        session.done.set()
        for tmp in temporaries.values():  # moved by the client, or left behind: remove what is left
            Path(tmp).unlink(missing_ok=True)
    return True


def serve(socket_path: str, config_path: str, idle: float) -> int:
    import json

    from .runtime import reclaim_gpus, release_gpus

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    config = json.loads(Path(config_path).read_text())
    config["log"] = str(Path(socket_path).with_suffix(".log"))
    try:
        extractor = _build(config)
        loaded = _weights_signature(config)
    except MsamilError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    Path(socket_path).unlink(missing_ok=True)
    listener.bind(socket_path)
    inode = os.stat(socket_path).st_ino
    listener.listen(4)
    listener.settimeout(idle)
    to_client = _ToClient()
    logging.getLogger().addHandler(to_client)
    log.info("feature server %s (pid %d) ready: %s", Path(socket_path).stem, os.getpid(), extractor.encoder_id)
    served = 0
    claimed = release_gpus()  # between slides the GPU is free for other jobs to claim, as after a job
    try:
        while True:
            try:
                sock, _ = listener.accept()
            except TimeoutError:
                break
            sock.settimeout(None)
            conn = Connection(sock.detach())
            reclaim_gpus(claimed)
            try:
                keep = _serve_one(extractor, conn, config, loaded, to_client)
            finally:
                conn.close()
                claimed = release_gpus()
            served += 1
            if not keep:
                log.info("encoder weights changed on disk; exiting")
                break
    finally:
        try:  # no client connects to a server that is leaving; a successor's socket stays
            if os.stat(socket_path).st_ino == inode:
                os.unlink(socket_path)
        except FileNotFoundError:
            pass
        listener.close()
    log.info("feature server exits after %d slide(s), %.0f s idle", served, idle)
    return 0


if __name__ == "__main__":
    sys.exit(serve(sys.argv[1], sys.argv[2], float(sys.argv[3])))
