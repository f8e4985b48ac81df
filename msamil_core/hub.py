"""Weights on the Hugging Face Hub: ``hf-hub:<org>/<repo>[@revision]`` references.

Downloads happen only in :func:`hub_file` with ``download=True`` (``msamil fetch-weights`` and
the workflow's ``fetch_weights`` rule, once, before extraction); every other caller reads the
local Hugging Face cache (``local_files_only``), so an extraction job never reaches the network.
The cache is the one huggingface_hub uses (``HF_HOME`` / ``HF_HUB_CACHE``) or ``cache_dir``;
``HF_TOKEN`` authorises gated repos and ``HF_HUB_OFFLINE=1`` is honoured by huggingface_hub
itself. Hub failures become one-line :class:`~msamil_core.errors.MsamilError` messages that say
what to do (accept the licence, set ``HF_TOKEN``, run ``msamil fetch-weights``).
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import MsamilError

HUB_PREFIXES = ("hf-hub:", "hf_hub:")
# The weights file of a model folder or hub repo, when nothing more specific is known.
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def is_hub_ref(value) -> bool:
    """Whether ``value`` is an ``hf-hub:`` reference (rather than a local path)."""
    return isinstance(value, str) and value.startswith(HUB_PREFIXES)


def parse_hub_ref(ref: str) -> tuple[str, str | None]:
    """``hf-hub:org/name[@revision]`` -> (repo id, revision or None)."""
    body = ref.split(":", 1)[1].strip().strip("/")
    repo, _, revision = body.partition("@")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise MsamilError(f"{ref!r}: expected hf-hub:<org>/<repo> (optionally @<revision>), e.g. hf-hub:MahmoodLab/UNI")
    return repo, revision or None


def hub_file(ref: str, filenames: tuple[str, ...] | list[str], *, download: bool = False,
             cache_dir: str | os.PathLike | None = None, required: bool = True) -> Path | None:
    """Local path of the first of ``filenames`` the repo ``ref`` has, from the Hugging Face cache.

    With ``download`` the file is fetched when missing (once; later calls find it in the cache);
    without, only the cache is read. ``required=False`` returns None when no file exists
    (for optional files such as ``config.json``).
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    repo, revision = parse_hub_ref(ref)
    page = f"https://huggingface.co/{repo}"
    if download and not offline():
        check_reachable(ref)
    not_cached = []
    for name in filenames:
        try:
            return Path(hf_hub_download(repo, name, revision=revision, cache_dir=cache_dir,
                                        local_files_only=not download))
        except GatedRepoError:
            raise MsamilError(
                f"{repo}: gated model, and this account has no access: accept the licence on {page} "
                "(logged in), then set HF_TOKEN to a read token of that account and rerun"
            ) from None
        except RepositoryNotFoundError:
            raise MsamilError(
                f"{repo}: not found or not visible without a token: check the repo id; if the model is gated, "
                f"accept the licence on {page} and set HF_TOKEN"
            ) from None
        except RevisionNotFoundError:
            raise MsamilError(f"{ref}: revision {revision!r} does not exist on {page}") from None
        except LocalEntryNotFoundError:
            not_cached.append(name)  # not in the cache (or offline): try the next published name
        except EntryNotFoundError:
            continue  # the repo does not publish this name: try the next one
        except OSError as exc:  # connection refused, disk full, ...
            raise MsamilError(f"{ref}: cannot fetch {name} ({exc}); check the network or HF_ENDPOINT") from None
        except Exception as exc:  # HfHubHTTPError and other hub answers
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise MsamilError(f"{ref}: the hub refused {name}: {first}") from None
    if not required:
        return None
    where = f"the cache {cache_dir}" if cache_dir else "the Hugging Face cache (HF_HOME / HF_HUB_CACHE)"
    if not_cached and not download:
        offline_ = " (HF_HUB_OFFLINE is set)" if offline() else ""
        raise MsamilError(
            f"{ref}: {' / '.join(filenames)} not in {where}{offline_}; fetch it once with "
            f"`msamil fetch-weights {ref}` (the workflow's fetch_weights rule does this)"
        )
    if not_cached and offline():
        raise MsamilError(f"{ref}: {' / '.join(filenames)} not in {where} and HF_HUB_OFFLINE forbids a download; "
                          "unset HF_HUB_OFFLINE where the network is reachable")
    if not_cached:
        raise MsamilError(f"{ref}: {' / '.join(filenames)} could not be downloaded from {endpoint()} (the hub "
                          "stopped answering); rerun `msamil fetch-weights`, or fetch where the hub can be reached "
                          "and copy the Hugging Face cache")
    raise MsamilError(f"{ref}: the repo has none of {', '.join(filenames)}; check the repo id or name the file")


def offline() -> bool:
    """Whether HF_HUB_OFFLINE forbids downloads."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def endpoint() -> str:
    """The hub's address (HF_ENDPOINT, else huggingface.co)."""
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def check_reachable(ref: str, timeout: float = 10.0) -> None:
    """One connection to the hub before a download: a machine without a network fails at once in
    one line, rather than after huggingface_hub's retries (about 50 s) with a message about the
    cache."""
    import socket
    from urllib.parse import urlsplit

    url = urlsplit(endpoint())
    host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise MsamilError(
            f"{ref}: the Hugging Face Hub ({endpoint()}) cannot be reached from this machine ({reason}); run "
            "`msamil fetch-weights` where it can, then copy the Hugging Face cache (HF_HOME / HF_HUB_CACHE) here, "
            "or name a local weights file"
        ) from None


def local_weights(path: str | os.PathLike, names: tuple[str, ...] | list[str] = WEIGHT_FILES) -> Path | None:
    """The file behind weights ``path``: the cached file of an ``hf-hub:`` reference (never
    downloaded here), the first of ``names`` inside a folder (None when it holds none), or
    ``path`` itself."""
    if is_hub_ref(str(path)):
        return hub_file(str(path), names)
    path = Path(path)
    if path.is_dir():
        return next((path / n for n in names if (path / n).is_file()), None)
    return path


def put_in_cache(cache: str | os.PathLike, repo_id: str, files: dict[str, bytes],
                 revision: str = "0123456789abcdef0123456789abcdef01234567") -> None:
    """Lay ``files`` (name -> bytes) out as huggingface_hub's cache ``cache`` does: blobs named by
    their content hash, a snapshot folder of relative symlinks to them, and refs/main naming the
    snapshot's commit. For tests and benches (random weights in a model's published layout), and
    for weights copied from a machine with internet access."""
    import hashlib

    repo = Path(cache) / f"models--{repo_id.replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    (repo / "snapshots" / revision).mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    for name, data in files.items():
        blob = hashlib.sha256(data).hexdigest()
        (repo / "blobs" / blob).write_bytes(data)
        link = repo / "snapshots" / revision / name
        link.unlink(missing_ok=True)
        link.symlink_to(Path("..", "..", "blobs", blob))
    (repo / "refs" / "main").write_text(revision)
