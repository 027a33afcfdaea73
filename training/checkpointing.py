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
from pathlib import Path

CHECKPOINTS = "checkpoints"
META_NAME = "checkpoint.json"
TRAINABLE_NAME = "cnc_trainable.safetensors"
_NAME = re.compile(r"^epoch_(\d+)$")


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


def read_checkpoint_meta(path: str | os.PathLike) -> dict:
    meta = _read_meta(Path(path))
    if meta is None:
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no valid {META_NAME})")
    return meta


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
        if tmp.exists():
            shutil.rmtree(tmp)  # left by a crash during an earlier save
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()  # every process has written its RNG state
    if accelerator.is_main_process:
        _write_json_durably(tmp / META_NAME, {**meta, "epochs_done": epochs_done, "complete": True})
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
