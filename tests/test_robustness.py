"""Killed writers, corrupt files and several users: temporaries are never taken for outputs and are
cleaned by the next run; a truncated bag, coordinates file, mask or checkpoint fails in one line
naming the file; GPU claims work across users."""

from __future__ import annotations

import os
import pickle
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import shared_slide, write_pyramid_tiff
from msamil_core.errors import MsamilError
from msamil_core.features.bags import Bag, load_bag, save_bag
from msamil_core.fileio import FOREIGN_TEMP_AGE_S, TEMP_PREFIX, is_temporary, remove_stale_temporaries
from msamil_core.reporting.tables import bag_counts
from msamil_core.wsi.coords import read_coords, write_coords
from msamil_core.wsi.masks import load_mask, save_mask

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(REPO))

# A writer that stops half-way through a real bag's bytes, as a job does when SIGKILLed mid-write.
HALF_WRITER = """
import sys, time
from msamil_core.fileio import atomic_path
data = open(sys.argv[1], "rb").read()
with atomic_path(sys.argv[2]) as tmp:
    with open(tmp, "wb") as f:
        f.write(data[: len(data) // 2])
        f.flush()
    print(tmp, flush=True)
    time.sleep(300)
"""


def small_bag(slide_id: str = "s1", n: int = 40) -> Bag:
    rng = np.random.default_rng(0)
    return Bag(features=torch.from_numpy(rng.normal(size=(n, 8)).astype(np.float32)),
               coords=torch.from_numpy(rng.integers(0, 4000, (n, 2))), scales=torch.from_numpy(rng.integers(0, 3, n)),
               patch_size_level0=torch.full((n,), 512), slide_id=slide_id, encoder="synthetic")


def half_written(source: Path, target: Path) -> tuple[subprocess.Popen, Path]:
    """A writer process stopped half-way into ``target``'s temporary (the temporary's path)."""
    proc = subprocess.Popen([sys.executable, "-c", HALF_WRITER, str(source), str(target)], stdout=subprocess.PIPE,
                            text=True, env=ENV)
    return proc, Path(proc.stdout.readline().strip())


def test_a_killed_writers_temporary_is_never_an_output_and_the_next_run_removes_it(tmp_path):
    features = tmp_path / "features"
    save_bag(features / "s0.pt", small_bag("s0"))
    source = tmp_path / "source.pt"
    save_bag(source, small_bag("s1"))

    killed, leftover = half_written(source, features / "s1.pt")
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert leftover.exists() and leftover.stat().st_size == source.stat().st_size // 2
    assert leftover.parent == features and leftover.name.startswith(TEMP_PREFIX) and is_temporary(leftover)
    # no glob of ours takes a temporary for an output
    for pattern in ("*.pt", "*.h5", "*.json", "*.png", "*.csv", "fold*", "s1*"):
        assert not [p for p in features.glob(pattern) if is_temporary(p)], pattern
    # a hidden leftover of an older version's naming (.s1.pt.XXXX.pt) is skipped too
    (features / ".s3.pt.k2j4h1.pt").write_bytes(leftover.read_bytes())
    assert bag_counts(features) == {"s0": (40, 40)}

    # a second writer starting in that folder removes the killed writer's temporary
    running, live = half_written(source, features / "s2.pt")
    try:
        assert not leftover.exists() and live.exists()
        # and a third leaves the running writer's temporary alone
        subprocess.run([sys.executable, "-c", "import sys; from msamil_core.fileio import write_json; "
                        "write_json(sys.argv[1], {'ok': 1})", str(features / "other.json")], check=True, env=ENV)
        assert live.exists() and (features / "other.json").exists()
    finally:
        running.kill()
        running.wait()
    assert remove_stale_temporaries(features) == [live]
    assert sorted(p.name for p in features.iterdir()) == [".s3.pt.k2j4h1.pt", "other.json", "s0.pt"]


def test_temporaries_of_another_machine_go_once_they_are_old(tmp_path):
    """On a shared file system a writer's liveness cannot be checked from another host: its
    temporary is removed once unmodified for a day."""
    other = "elsewhere" if socket.gethostname() != "elsewhere" else "elsewhere2"
    fresh, old = (tmp_path / f"{TEMP_PREFIX}{other}+123+456+s{i}.pt.abc.tmp" for i in (1, 2))
    for path in (fresh, old):
        path.write_bytes(b"partial")
    os.utime(old, (time.time() - FOREIGN_TEMP_AGE_S - 60,) * 2)
    assert remove_stale_temporaries(tmp_path) == [old]
    assert fresh.exists()


def truncate(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def one_line_naming(exc: pytest.ExceptionInfo, path: Path) -> str:
    message = str(exc.value)
    assert str(path) in message and "\n" not in message, message
    return message


def test_truncated_bags_coordinates_and_masks_name_the_file(tmp_path):
    bag = small_bag()
    pt = tmp_path / "s1.pt"
    save_bag(pt, bag)
    with pytest.raises(MsamilError) as exc:
        load_bag(truncate(pt))
    assert "rerun" in one_line_naming(exc, pt)
    with pytest.raises(MsamilError) as exc:
        bag_counts(tmp_path)
    assert "rerun" in one_line_naming(exc, pt)

    import h5py

    trident = tmp_path / "trident" / "s1.h5"  # a TRIDENT/CLAM feature file
    trident.parent.mkdir()
    with h5py.File(trident, "w") as f:
        f.create_dataset("features", data=bag.features.numpy())
        f.create_dataset("coords", data=bag.coords.numpy()).attrs["patch_size_level0"] = 512
    load_bag(trident)
    with pytest.raises(MsamilError) as exc:
        load_bag(truncate(trident))
    one_line_naming(exc, trident)

    h5 = tmp_path / "s1.h5"
    write_coords(h5, np.arange(2000, dtype=np.int64).reshape(-1, 2), {"patch_size_level0": 512})
    with pytest.raises(MsamilError) as exc:
        read_coords(truncate(h5))
    assert "rerun" in one_line_naming(exc, h5)

    mask = tmp_path / "tissue_mask.png"
    rng = np.random.default_rng(1)
    for keep in (0.5, 0.02):  # cut in the pixel data, and in the header
        save_mask(mask, rng.random((300, 400)) > 0.5)  # noise: a PNG of many compressed blocks
        with pytest.raises(MsamilError) as exc:
            load_mask(truncate(mask, keep))
        assert "rerun" in one_line_naming(exc, mask)


def test_a_truncated_checkpoint_names_the_file(tmp_path):
    from msamil_core.mil import create_model
    from msamil_core.training.mil import load_checkpoint

    model = create_model("abmil.base", in_dim=8, num_classes=2)
    ckpt = tmp_path / "fold0" / "checkpoint.pt"
    from msamil_core.fileio import save_torch

    save_torch(ckpt, {"model_name": "abmil.base", "model_args": dict(model.model_args), "state_dict": model.state_dict(),
                      "classes": ["a", "b"], "encoder": "synthetic", "config": {"scales": ["20x"]}})
    load_checkpoint(ckpt)  # whole: reads
    with pytest.raises(MsamilError) as exc:
        load_checkpoint(truncate(ckpt))
    assert "truncated" in one_line_naming(exc, ckpt)


# ----------------------------------------------------------------------------- full disk

# Runs the rest of its command line with a 64 KiB tmpfs mounted on $1, in a mount namespace of its
# own, then lists the files left on that disk and exits with the command's status.
ON_A_FULL_DISK = ('set -e; d="$1"; shift; mount -t tmpfs -o size=64k tmpfs "$d"; set +e; "$@"; rc=$?; '
                  'find "$d" -type f; exit $rc')
# A checkpoint bigger than that disk: torch.save's zip writer fails with a RuntimeError, no errno.
SAVE_CHECKPOINT = """
import sys, torch
from msamil_core.errors import MsamilError
from msamil_core.fileio import save_torch
try:
    save_torch(sys.argv[1], {"state_dict": {"w": torch.randn(256, 256)}})
except MsamilError as exc:
    sys.exit(str(exc))
"""


def on_a_full_disk(disk: Path, *command: str) -> subprocess.CompletedProcess:
    disk.mkdir()
    probe = subprocess.run(["unshare", "-m", "sh", "-c", ON_A_FULL_DISK, "sh", str(disk), "true"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root and unshare): {probe.stderr.strip()}")
    return subprocess.run(["unshare", "-m", "sh", "-c", ON_A_FULL_DISK, "sh", str(disk), *command],
                          capture_output=True, text=True, env=ENV, timeout=300)


def test_a_full_disk_fails_in_one_line_naming_the_file_and_leaves_nothing(tmp_path):
    """A write that runs out of space (a thumbnail through PIL, a checkpoint through torch's zip
    writer, which gives no errno) fails in one line that names the file and says to free space;
    no partial output or temporary is left on the disk."""
    disk = tmp_path / "disk"
    slide = shared_slide("CMU-1-Small-Region.svs")
    run = on_a_full_disk(disk, sys.executable, "-m", "msamil_core", "thumbnail", "--slide", str(slide),
                         "--out", str(disk / "s" / "thumbnail.png"), "--meta", str(disk / "s" / "meta.json"))
    assert run.returncode == 1, run.stderr[-2000:]
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith(f"msamil thumbnail: error: could not write {disk}/s/thumbnail.png: the file system"), last
    assert "free space there" in last
    assert run.stdout == ""  # no thumbnail, meta.json or temporary left on the disk

    disk = tmp_path / "disk2"
    run = on_a_full_disk(disk, sys.executable, "-c", SAVE_CHECKPOINT, str(disk / "ckpt.pt"))
    assert run.returncode == 1, run.stderr[-2000:]
    assert run.stderr.strip() == (f"could not write {disk / 'ckpt.pt'}: the file system holding {disk} is full (or "
                                  "over quota); free space there, or move the output folder to a larger disk, and "
                                  "rerun")
    assert run.stdout == ""


# ----------------------------------------------------------------------------- open slides


def open_slide_files(paths: list[Path]) -> set[Path]:
    """The slides among ``paths`` this process has a file descriptor open on."""
    wanted = {str(p.resolve()): p for p in paths}
    held = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target in wanted:
            held.add(wanted[target])
    return held


def test_e2e_keeps_at_most_open_slides_open(tmp_path):
    from msamil_core.training.e2e import SlidePatchDataset, SlideSource
    from msamil_core.wsi.geometry import SCALES

    rng = np.random.default_rng(0)
    slides, sources = [], []
    for i in range(5):
        sid = f"s{i}"
        slides.append(write_pyramid_tiff(tmp_path / f"{sid}.tiff", rng.integers(0, 255, (512, 640, 3), dtype=np.uint8)))
        paths = []
        for scale, size in zip(SCALES, (64, 128, 256)):
            paths.append(tmp_path / "coords" / scale / f"{sid}.h5")
            grid = np.array([(x, y) for x in range(0, 640 - size + 1, size) for y in range(0, 512 - size + 1, size)])
            write_coords(paths[-1], grid, {"target_magnification": int(scale[:-1]), "patch_size_level0": size})
        sources.append(SlideSource(sid, str(slides[-1]), None, tuple(map(str, paths))))
    labels = [i % 2 for i in range(5)]

    def read_all(open_slides: int) -> tuple[list, int, int]:
        ds = SlidePatchDataset(sources, labels, k=6, input_size=32, scales=list(SCALES), open_slides=open_slides)
        items, most_files, most_cached = [], 0, 0
        for epoch in range(2):
            ds.epoch = epoch
            for i in [0, 1, 2, 0, 3, 4, 1, 2] if epoch else range(5):  # revisits and evictions
                items.append(ds[i])
                most_files = max(most_files, len(open_slide_files(slides)))
                most_cached = max(most_cached, len(ds.slides))
        copy = pickle.loads(pickle.dumps(ds))  # as a DataLoader worker gets it: no handle travels
        assert len(copy.slides) == 0 and copy.slides.capacity == open_slides and len(ds.slides) > 0
        ds.close()
        assert not open_slide_files(slides)
        return items, most_files, most_cached

    bounded, files, cached = read_all(2)
    assert files == 2 and cached == 2  # more slides than the bound, never more than 2 open
    unbounded, files, cached = read_all(10)
    assert files == 5 and cached == 5  # what the count sees when nothing is closed
    for a, b in zip(bounded, unbounded):
        assert a.slide_id == b.slide_id and torch.equal(a.patches, b.patches) and torch.equal(a.coords, b.coords)
    with pytest.raises(MsamilError, match="open_slides"):
        SlidePatchDataset(sources, labels, k=6, input_size=32, scales=list(SCALES), open_slides=0)


# ----------------------------------------------------------------------------- GPU claims, two users

CLAIM = """
import os, sys, time
from msamil_core.runtime import claim_free, gpu_lock_dir
uid = int(sys.argv[2])
os.umask(0o077)  # a cautious user's umask must not lock others out
if uid:
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
print(claim_free(["gpu-a", "gpu-b", "gpu-c"], gpu_lock_dir(sys.argv[1])), flush=True)
if sys.argv[3] == "hold":
    time.sleep(300)
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to two other users needs root")
def test_gpu_claims_work_for_several_users():
    """Jobs of different users share the GPU locks: each claims a GPU no other user's job holds,
    and no user's job fails on another's lock file. Each process imports as root (the venv may
    not be readable by others) and then becomes its user before claiming."""
    base = Path(tempfile.mkdtemp(prefix="msamil-test-users-", dir="/tmp"))
    os.chmod(base, 0o1777)  # like /tmp: every user may create files in it
    holders = []

    def claim(uid: int, hold: bool) -> str:
        proc = subprocess.Popen([sys.executable, "-c", CLAIM, str(base), str(uid), "hold" if hold else "once"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
        if hold:
            holders.append(proc)
            line = proc.stdout.readline().strip()
            if not line:
                proc.wait()
                pytest.fail(proc.stderr.read())
            return line
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert "Error" not in err and "warning" not in err.lower(), err
        return out.strip()

    try:
        assert claim(54321, hold=True) == "0"  # user A makes the lock folder and the lock of gpu-a
        assert claim(54322, hold=True) == "1"  # user B takes gpu-b: A's lock files do not stop B
        assert claim(54321, hold=False) == "2"
        assert claim(0, hold=False) == "2"
        lock_dir = base / "msamil-gpu-locks"
        assert oct(lock_dir.stat().st_mode & 0o7777) == "0o1777"
        owners = {p.name: (p.stat().st_uid, oct(p.stat().st_mode & 0o777)) for p in lock_dir.iterdir()}
        assert owners["msamil-gpu-a.lock"] == (54321, "0o666") and owners["msamil-gpu-b.lock"] == (54322, "0o666")
        killed = holders.pop(0)
        killed.kill()  # user A's job is killed: its GPU is free for user B
        killed.wait()
        assert claim(54322, hold=False) == "0"
    finally:
        for proc in holders:
            proc.kill()
            proc.wait()
        import shutil

        shutil.rmtree(base)


# ----------------------------------------------------------------------------- sheets without paths


@pytest.mark.parametrize("column", ["empty", "absent"])
def test_train_and_evaluate_on_bags_need_no_slide_paths(tmp_path, column):
    from msamil_core.cli import main
    from msamil_core.cohort.sheet import load_sheet

    rows = ["slide_id,path,label,patient_id" if column == "empty" else "slide_id,label,patient_id"]
    for i in range(8):
        bag = small_bag(f"s{i}", n=12)
        bag.features[:3, :2] += 3.0 * (i % 2)
        save_bag(tmp_path / "bags" / f"s{i}.pt", bag)
        rows.append(f"s{i},,{'tumor' if i % 2 else 'normal'},p{i}" if column == "empty" else
                    f"s{i},{'tumor' if i % 2 else 'normal'},p{i}")
    sheet = tmp_path / "sheet.csv"
    sheet.write_text("\n".join(rows) + "\n")
    out = tmp_path / "models"
    assert main(["splits", "--sheet", str(sheet), "--out", str(tmp_path / "folds.csv"), "--n-folds", "2"]) == 0
    assert main(["train", "--features", str(tmp_path / "bags"), "--sheet", str(sheet), "--out", str(out), "--folds",
                 str(tmp_path / "folds.csv"), "--fold", "0", "--model", "abmil.base", "--epochs", "2",
                 "--threads", "1", "--evaluate"]) == 0
    assert (out / "fold0" / "checkpoint.pt").is_file() and (out / "fold0" / "metrics.json").is_file()
    assert main(["evaluate", "--features", str(tmp_path / "bags"), "--sheet", str(sheet), "--folds",
                 str(tmp_path / "folds.csv"), "--fold", "0", "--models", str(out), "--threads", "1"]) == 0
    # what opens slides (the workflow, predict, e2e) still needs every path
    with pytest.raises(MsamilError, match="empty `path`" if column == "empty" else "missing column.*path"):
        load_sheet(sheet)


@pytest.mark.slow
def test_the_workflow_still_requires_slide_paths(tmp_path):
    sheet = tmp_path / "sheet.csv"
    sheet.write_text("slide_id,path,label,patient_id\ns0,,a,p0\ns1,,b,p1\n")
    out = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(tmp_path),
                          "--cores", "1", "-n", "--config", f"slides={sheet}"], capture_output=True, text=True,
                         env=ENV, cwd=tmp_path, timeout=600)
    assert out.returncode != 0
    assert f"slide sheet {sheet}, row 2: empty `path`" in out.stdout + out.stderr
