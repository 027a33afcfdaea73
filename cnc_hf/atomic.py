"""Replace the model files of a folder so that no reader ever loads a mix of two saves.

A model folder is read as config.json + the weights (+ processor and code) that sit beside it, and
files cannot be renamed together. So a save goes through a staging folder in the same place:

1. everything is written into `<folder>/.cnc-saving/` and fsynced, then the list of its files is
   written there (`COMMIT`, fsynced): from this moment the new save is complete on disk;
2. the old `config.json` is removed FIRST, old weight files the new save does not have next;
3. the new files are renamed into place one by one, `config.json` LAST.

A kill before step 2 leaves the old model complete; during steps 2-3 the folder has no config.json,
so nothing loads from it (a clear "no config.json" error, never old weights under a new config);
after step 3 it holds the new model. (A reader that opened the old config.json before step 2 and the
weights after step 3 would still pair them: the protocol protects what is on disk, not a reader
that straddles a save; cnc-hf's own readers load a folder once.) Saves into one folder take a lock. `finish_interrupted_save` (called by every save, and by
train.py before it starts) completes a save that had reached its COMMIT list and drops one that had
not.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable

STAGING = ".cnc-saving"
COMMIT = "COMMIT"
CONFIG = "config.json"
WEIGHT_PATTERNS = ("model.safetensors", "model-*.safetensors", "model.safetensors.index.json")


def save_atomically(folder: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call `write(staging_dir)` to write a complete save, then swap it into `folder` (see the module doc).
    Saves into one folder are serialised by a lock file (released by the system if the process dies)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with _locked(folder):
        _finish(folder)
        staging = folder / STAGING
        staging.mkdir()
        write(staging)
        names = sorted(p.name for p in staging.iterdir() if p.is_file())
        for name in names:
            _fsync(staging / name)
        _write_synced(staging / COMMIT, json.dumps(names))
        _fsync(staging)
        _commit(folder)
    return folder


def finish_interrupted_save(folder: str | os.PathLike) -> bool:
    """Complete a save killed after its COMMIT list was written (True), or remove a staging folder left
    before that point, whose new files were never complete (False)."""
    folder = Path(folder)
    if not (folder / STAGING).exists():
        return False
    with _locked(folder):
        return _finish(folder)


def _finish(folder: Path) -> bool:
    staging = folder / STAGING
    if _read_commit(staging) is not None:
        _commit(folder)
        return True
    if staging.exists():
        shutil.rmtree(staging)
    return False


def _read_commit(staging: Path) -> list[str] | None:
    """The COMMIT list, or None when there is none (or a torn one: the save had not completed)."""
    try:
        names = json.loads((staging / COMMIT).read_text())
    except (OSError, ValueError):
        return None
    return names if isinstance(names, list) else None


@contextlib.contextmanager
def _locked(folder: Path):
    # The lock file lives in the temp dir, keyed by the folder's real path, so the model folder holds
    # only model files (a lock file there would be listed, copied and uploaded with them).
    import hashlib
    import tempfile

    key = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:24]
    locks = Path(tempfile.gettempdir()) / "cnc-hf-locks"
    locks.mkdir(exist_ok=True)
    with open(locks / f"{key}.lock", "a+") as handle:
        try:
            import fcntl
        except ImportError:  # not POSIX: no cross-process lock, the staging protocol alone
            yield
            return
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _commit(folder: Path) -> None:
    staging = folder / STAGING
    names = _read_commit(staging)
    if (staging / CONFIG).exists():  # not yet moved: the old config goes first (a repeated commit keeps the new one)
        (folder / CONFIG).unlink(missing_ok=True)
        for pattern in WEIGHT_PATTERNS:  # e.g. shards of an older sharded save that the new save lacks
            for old in folder.glob(pattern):
                if old.name not in names:
                    old.unlink()
        _fsync(folder)
    for name in sorted(names, key=lambda n: n == CONFIG):  # config.json last
        if (staging / name).exists():
            os.replace(staging / name, folder / name)
    _fsync(folder)
    shutil.rmtree(staging)


def _write_synced(path: Path, text: str) -> None:
    """Write `text` to `path` whole or not at all: a temporary file, fsynced, renamed over it."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _fsync(path: Path) -> None:
    """fsync a file or a folder (its entries); a platform that cannot is left as it is."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
