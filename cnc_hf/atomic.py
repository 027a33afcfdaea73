"""Replace the model files of a folder so that no reader ever loads a mix of two saves.

A model folder is read as config.json + the weights (+ processor and code) that sit beside it, and
files cannot be renamed together. So a save goes through a staging folder in the same place:

1. everything is written into `<folder>/.cnc-saving/` and fsynced, then the list of its files is
   written there (`COMMIT`, fsynced): from this moment the new save is complete on disk;
2. the old `config.json` is removed FIRST, old weight files the new save does not have next;
3. the new files are renamed into place one by one, `config.json` LAST.

A kill before step 2 leaves the old model complete; during steps 2-3 the folder has no config.json,
so nothing loads from it (a clear "no config.json" error, never old weights under a new config);
after step 3 it holds the new model. `finish_interrupted_save` (called by every save, and by
train.py before it starts) completes a save that had reached its COMMIT list and drops one that had
not.
"""

from __future__ import annotations

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
    """Call `write(staging_dir)` to write a complete save, then swap it into `folder` (see the module doc)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    finish_interrupted_save(folder)
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
    staging = Path(folder) / STAGING
    if (staging / COMMIT).is_file():
        _commit(Path(folder))
        return True
    if staging.exists():
        shutil.rmtree(staging)
    return False


def _commit(folder: Path) -> None:
    staging = folder / STAGING
    names = json.loads((staging / COMMIT).read_text())
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
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


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
