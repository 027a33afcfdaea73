"""Crash-safe training checkpoints with `accelerator.save_state` / `load_state`.

Layout: `<output_dir>/checkpoints/epoch_0005/` after 5 finished epochs, holding what
`save_state` writes (optimizer, RNG states of every process, ...), the trainable weights
(`cnc_trainable.safetensors`) and `checkpoint.json`.

Why it never leaves a broken latest checkpoint:
1. everything is written into `checkpoints/.tmp-epoch_0005`, which no reader looks at;
2. after all processes are done, the main process writes `checkpoint.json` (fsynced) LAST: a
   checkpoint without it is incomplete by definition;
3. the directory is renamed to `epoch_0005` in one `os.replace` (atomic on POSIX file systems).
A crash at any point leaves either the old latest checkpoint or the new complete one, plus at
worst a `.tmp-*` directory that the next save removes. `latest_checkpoint` only returns
directories whose `checkpoint.json` parses and says complete.

What a kill cannot cause but a disk or a copy can (a truncated or garbled file in a checkpoint that
says complete) is caught on resume: `checkpoint.json` records every file's size (the files are
fsynced before it is written), and `resumable_checkpoint` reads every file the way `load_state`
will (`verify_checkpoint`); a checkpoint that fails is skipped WITH A WARNING naming it and the
bad file, and the previous complete one is used.

Only the trainable parameters go into checkpoints: CLIP is frozen and reloaded from
`--clip_model` (for ViT-L/14 that saves 1.7 GB per checkpoint). This is done with Accelerate's
save/load pre-hooks for single-device and DDP runs; FSDP/DeepSpeed keep their own formats.
Multi-machine runs need `output_dir` on a shared file system, as `save_state` itself assumes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from pathlib import Path

CHECKPOINTS = "checkpoints"
META_NAME = "checkpoint.json"
TRAINABLE_NAME = "cnc_trainable.safetensors"
_NAME = re.compile(r"^epoch_(\d+)$")
_STALE = re.compile(r"^\.(tmp|old)-epoch_\d+$")  # left by a crash in save_checkpoint


class CorruptCheckpointError(ValueError):
    """A checkpoint that says complete but whose files do not load; the message names the file."""


def trainable_state_dict(model) -> dict:
    """Everything but the frozen CLIP backbone (prompts, fusion, MoE, decoder)."""
    return {k: v for k, v in model.state_dict().items() if not k.startswith("clip.")}


def register_trainable_only_hooks(accelerator) -> None:
    """Make `save_state`/`load_state` write and read only the trainable weights (see module doc)."""
    from safetensors.torch import load_file, save_file

    def save_hook(models, weights, output_dir):
        if not weights:  # FSDP / DeepSpeed save the model themselves
            return
        if accelerator.is_main_process:
            state = trainable_state_dict(accelerator.unwrap_model(models[0]))
            save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, os.path.join(output_dir, TRAINABLE_NAME))
        weights.clear()  # so save_state does not write the full model (with CLIP) as well

    def load_hook(models, input_dir):
        path = os.path.join(input_dir, TRAINABLE_NAME)
        if not models or not os.path.isfile(path):
            return
        model = accelerator.unwrap_model(models[0])
        missing, unexpected = model.load_state_dict(load_file(path), strict=False)
        missing = [k for k in missing if not k.startswith("clip.")]
        if missing or unexpected:
            raise RuntimeError(
                f"checkpoint {input_dir} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}. "
                "Was it written with other model flags (--num_experts, --no_moe, ...)?"
            )
        models.clear()  # loaded: keep load_state from looking for a full model file

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def _read_meta(directory: Path) -> dict | None:
    try:
        meta = json.loads((directory / META_NAME).read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("complete") else None


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints as (epochs done, path), oldest first."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for directory in root.iterdir():
        match = _NAME.match(directory.name)
        if match and directory.is_dir() and _read_meta(directory) is not None:
            found.append((int(match.group(1)), directory))
    return sorted(found)


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1][1] if checkpoints else None


def verify_checkpoint(path: str | os.PathLike) -> dict:
    """Read every file of a checkpoint as resuming will, without touching a model; return its metadata.

    Raises CorruptCheckpointError naming the checkpoint and the file: no valid checkpoint.json, a
    file missing or of another size than when it was saved, a safetensors file that does not parse,
    or a `.bin`/`.pkl` file that `torch.load(weights_only=True)` rejects (Accelerate's own loader,
    the one `load_state` uses, so nothing in the file is executed).
    """
    from accelerate.utils import load as accelerate_load
    from safetensors.torch import load_file

    path = Path(path)
    meta = _read_meta(path)
    if meta is None:
        raise CorruptCheckpointError(f"{path}: no valid {META_NAME} (an interrupted save?)")
    for name, size in (meta.get("files") or {}).items():
        file = path / name
        if not file.is_file():
            raise CorruptCheckpointError(f"{path}: {name} is missing")
        if file.stat().st_size != size:
            raise CorruptCheckpointError(f"{path}: {name} has {file.stat().st_size} bytes, {size} when it was saved")
    for file in sorted(path.iterdir()):
        try:
            if file.suffix == ".safetensors":
                load_file(file)
            elif file.suffix in (".bin", ".pkl", ".pt"):
                accelerate_load(file, map_location="cpu")  # weights_only=True
        except Exception as err:  # safetensors, pickle and zip errors share no base class
            raise CorruptCheckpointError(f"{path}: {file.name} does not load ({type(err).__name__}: "
                                         f"{str(err).strip().splitlines()[0] if str(err).strip() else ''})") from err
    return meta


def resumable_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint whose files all load (`verify_checkpoint`), or None.

    A newer one that fails is skipped with a warning that names it and its bad file, so a run
    falls back to the previous checkpoint instead of dying on (or silently half-loading) it.
    """
    for _, path in reversed(list_checkpoints(output_dir)):
        try:
            verify_checkpoint(path)
        except CorruptCheckpointError as err:
            warnings.warn(f"skipping corrupt checkpoint {path.name}: {err}; trying the previous one", UserWarning,
                          stacklevel=2)
            continue
        return path
    return None


def read_checkpoint_meta(path: str | os.PathLike) -> dict:
    meta = _read_meta(Path(path))
    if meta is None:
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no valid {META_NAME})")
    return meta


def _file_sizes(directory: Path) -> dict[str, int]:
    """{relative path: size} of every file under `directory`, each fsynced first so that the sizes
    recorded in checkpoint.json are what the disk holds, even after a power cut."""
    sizes = {}
    for file in sorted(p for p in directory.rglob("*") if p.is_file()):
        try:
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
        except OSError:  # some platforms/file systems cannot fsync a read-only handle: sizes still count
            pass
        sizes[file.relative_to(directory).as_posix()] = file.stat().st_size
    return sizes


def _remove_stale(root: Path) -> None:
    """Delete `.tmp-*` / `.old-*` dirs that a crash during an earlier save left behind."""
    for directory in root.iterdir():
        if _STALE.match(directory.name) and directory.is_dir():
            shutil.rmtree(directory, ignore_errors=True)


def _write_json_durably(path: Path, payload: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as handle:
        json.dump(payload, handle, indent=2, default=str)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def save_checkpoint(accelerator, output_dir: str | os.PathLike, epochs_done: int, meta: dict,
                    total_limit: int | None = None) -> Path:
    """Save the full training state after `epochs_done` epochs; call on every process."""
    root = Path(output_dir) / CHECKPOINTS
    final = root / f"epoch_{epochs_done:04d}"
    tmp = root / f".tmp-epoch_{epochs_done:04d}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        _remove_stale(root)  # left by a crash during an earlier save
        tmp.mkdir()
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()  # every process has written its RNG state
    if accelerator.is_main_process:
        _write_json_durably(tmp / META_NAME, {**meta, "epochs_done": epochs_done, "complete": True,
                                              "files": _file_sizes(tmp)})
        if final.exists():  # re-saving an epoch after resuming from an earlier one
            trash = root / f".old-{final.name}"
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(final, trash)
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)
        if total_limit is not None and total_limit > 0:
            for _, old in list_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: str | os.PathLike) -> dict:
    """Restore model, optimizer and RNG states from a checkpoint; returns its metadata."""
    meta = read_checkpoint_meta(path)
    accelerator.load_state(str(path))
    return meta
