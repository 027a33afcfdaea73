"""Faults and untrusted files: a killed training run resumes, a corrupt checkpoint is skipped with a warning,
a NaN loss stops the run without saving, pickle weights never run code, and a config that does not match its
weights names the tensor.

The training runs reuse tests/test_train.py's tiny MVTec layout and tiny random CLIP; the kill test starts
`python -m cnc_hf_train.train` in a subprocess and SIGKILLs it in the middle of an epoch.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tiny_models import REPO_ROOT, tiny_cnc_config
from test_train import argv, log_records, reset_accelerate, trainable_weights
from train_fixtures import write_mvtec_layout
from cnc_hf_train import train
from cnc_hf_train.checkpointing import (
    TRAINABLE_NAME,
    CorruptCheckpointError,
    latest_checkpoint,
    list_checkpoints,
    verify_checkpoint,
)

CHECKPOINTED = ("--no_eval", "--save_every", "1", "--save_total_limit", "3", "--theta", "1")


# As in test_train.py: one intra-op thread (the killed subprocess runs with OMP_NUM_THREADS=1 too, so its
# arithmetic is the same as this process's), a fresh Accelerate state after every run, the tiny data set.
from test_train import one_thread_and_fresh_accelerate, tiny_data  # noqa: E402,F401  (pytest fixtures)


def run(data, clip, out, *extra) -> dict:
    try:
        return train.main(argv(data, clip, out, *CHECKPOINTED, *extra))
    finally:
        reset_accelerate()


def assert_same_weights(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]


# ----------------------------------------------------------------------------- SIGKILL, then --resume
@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_gives_the_uninterrupted_weights(tmp_path, tiny_clip_dir):
    """Kill -9 a real training process half-way through epoch 3 (checkpoint 2 written), resume: the run
    finishes and its weights equal those of a run that was never interrupted."""
    data = write_mvtec_layout(tmp_path / "data", n_train=20, n_test_good=1, n_test_bad=1)  # 18 steps an epoch
    epochs = ("--epochs", "4", "--batch_size", "2")
    killed = tmp_path / "killed"
    command = [sys.executable, "-m", "cnc_hf_train.train", *argv(data, tiny_clip_dir, killed, *CHECKPOINTED, *epochs)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    console = tmp_path / "console.txt"  # a file, not a pipe: a full pipe would block the run
    with open(console, "wb") as handle:
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 240
        while not (killed / "checkpoints" / "epoch_0002").is_dir():
            assert process.poll() is None, console.read_text()[-3000:]
            assert time.time() < deadline, "no checkpoint after 240 s"
            time.sleep(0.02)
        # Checkpoint 2 is renamed into place as the last act of its save: epoch 3 is starting. Kill half-way in.
        time.sleep(0.5 * log_records(killed)[-1]["seconds"])
        assert process.poll() is None, "the run ended before it could be killed"
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == -signal.SIGKILL
    logged = [train._log_epoch(line) for line in (killed / "train_log.jsonl").read_text().splitlines()]
    assert [e for e in logged if e is not None][-1] in (2, 3), logged  # killed during epoch 3 (or, if slow, 4)
    assert not (killed / "model.safetensors").exists()
    latest = latest_checkpoint(killed)
    verify_checkpoint(latest)  # never half-written: the latest complete checkpoint loads
    assert latest.name in ("epoch_0002", "epoch_0003")

    summary = train.main(argv(data, tiny_clip_dir, killed, *CHECKPOINTED, *epochs, "--resume"))
    reset_accelerate()
    assert summary["training"]["resumed_from"] == str(latest)
    assert [r["epoch"] for r in log_records(killed)] == [1, 2, 3, 4]

    straight = tmp_path / "straight"
    run(data, tiny_clip_dir, straight, *epochs)
    assert_same_weights(trainable_weights(straight), trainable_weights(killed))


# ----------------------------------------------------------------------------- half-written and corrupt checkpoints
@pytest.fixture(scope="module")
def two_epoch_run(tmp_path_factory, tiny_data, tiny_clip_dir):
    """A finished 2-epoch run with checkpoints after epochs 1 and 2, copied per test."""
    out = tmp_path_factory.mktemp("two_epochs") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run(tiny_data, tiny_clip_dir, out)
    finally:
        torch.set_num_threads(threads)
    return out


def copy_run(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    (target / "model.safetensors").unlink()  # as if it had stopped after its last checkpoint
    return target


def test_a_half_written_checkpoint_is_ignored_and_cleaned_up(tmp_path, two_epoch_run, tiny_data, tiny_clip_dir):
    """What a kill during a save leaves: a `.tmp-epoch_N` dir (even with a complete-looking
    checkpoint.json) and an `epoch_N` dir without one. Neither is ever resumed from."""
    out = copy_run(two_epoch_run, tmp_path / "run")
    root = out / "checkpoints"
    shutil.copytree(root / "epoch_0002", root / ".tmp-epoch_0003")  # complete files, never renamed into place
    (root / "epoch_0004").mkdir()
    shutil.copy(root / "epoch_0002" / TRAINABLE_NAME, root / "epoch_0004" / TRAINABLE_NAME)  # no checkpoint.json
    assert latest_checkpoint(out) == root / "epoch_0002"

    summary = run(tiny_data, tiny_clip_dir, out, "--epochs", "3", "--resume")
    assert summary["training"]["resumed_from"] == str(root / "epoch_0002")
    assert summary["training"]["trained_epochs"] == 1
    assert not (root / ".tmp-epoch_0003").exists()  # the next save removed the leftover
    assert [n for n, _ in list_checkpoints(out)] == [1, 2, 3]


def garble(path: Path) -> None:
    """Same size, other bytes: only reading the file can tell."""
    path.write_bytes(bytes(b ^ 0x5A for b in path.read_bytes()))


CORRUPTIONS = {
    "truncated weights": lambda c: (c / TRAINABLE_NAME).write_bytes((c / TRAINABLE_NAME).read_bytes()[:-100]),
    "garbled weights": lambda c: garble(c / TRAINABLE_NAME),
    "garbled optimizer state": lambda c: garble(c / "optimizer.bin"),
    # Accelerate's load_state only logs "Could not load random states" at INFO level and carries on.
    "garbled RNG state": lambda c: garble(c / "random_states_0.pkl"),
    "missing optimizer state": lambda c: (c / "optimizer.bin").unlink(),
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_a_corrupt_latest_checkpoint_falls_back_to_the_previous_one_with_a_warning(
        corruption, tmp_path, two_epoch_run, tiny_data, tiny_clip_dir):
    out = copy_run(two_epoch_run, tmp_path / "run")
    corrupt = out / "checkpoints" / "epoch_0002"
    CORRUPTIONS[corruption](corrupt)
    with open(out / "train_log.jsonl", "a") as log:
        log.write('{"epoch": 3, "epo')  # a log line torn by a kill is dropped too
    with pytest.raises(CorruptCheckpointError, match=re.escape(str(corrupt))):
        verify_checkpoint(corrupt)

    with pytest.warns(UserWarning, match=r"skipping corrupt checkpoint epoch_0002: .*(cnc_trainable|optimizer|random_states)"):
        summary = run(tiny_data, tiny_clip_dir, out, "--resume")
    assert summary["training"]["resumed_from"].endswith("epoch_0001")
    assert summary["training"]["trained_epochs"] == 1
    verify_checkpoint(corrupt)  # epoch 2 was trained again and saved in its place
    assert [r["epoch"] for r in log_records(out)] == [1, 2]
    assert_same_weights(trainable_weights(two_epoch_run), trainable_weights(out))


def test_a_named_corrupt_checkpoint_or_no_loadable_one_is_refused(tmp_path, two_epoch_run, tiny_data, tiny_clip_dir):
    out = copy_run(two_epoch_run, tmp_path / "run")
    for checkpoint in ("epoch_0001", "epoch_0002"):
        CORRUPTIONS["truncated weights"](out / "checkpoints" / checkpoint)
    named = out / "checkpoints" / "epoch_0002"
    with pytest.raises(train.TrainingSetupError, match=f"--resume {named}: not a loadable checkpoint: .*{TRAINABLE_NAME}"):
        run(tiny_data, tiny_clip_dir, out, "--resume", str(named))
    with pytest.warns(UserWarning, match="epoch_0001"), \
            pytest.raises(train.TrainingSetupError, match=r"no loadable checkpoint .* \(2 corrupt"):
        run(tiny_data, tiny_clip_dir, out, "--resume")


# ----------------------------------------------------------------------------- NaN / inf loss
def inject_nonfinite_loss(monkeypatch, at_call: int, value: float = float("nan")) -> None:
    """Make the model's `at_call`-th training forward return a non-finite loss (test-only, no hook in the product)."""
    from cnc_hf.modeling import CNCModel

    forward, calls = CNCModel.forward, {"n": 0}

    def patched(self, *args, **kwargs):
        output = forward(self, *args, **kwargs)
        if self.training:
            calls["n"] += 1
            if calls["n"] == at_call:
                output.loss = output.loss * value
        return output

    monkeypatch.setattr(CNCModel, "forward", patched)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_nonfinite_loss_stops_the_run_naming_the_step_and_keeps_the_last_good_checkpoint(
        value, tmp_path, tiny_data, tiny_clip_dir, monkeypatch, capsys):
    """10 training images, batch 4: 3 steps an epoch. A bad loss at global step 5 = epoch 2, step 2."""
    out = tmp_path / "run"
    inject_nonfinite_loss(monkeypatch, at_call=5, value=value)
    code = train.cli(argv(tiny_data, tiny_clip_dir, out, *CHECKPOINTED, "--epochs", "3"))
    reset_accelerate()
    message = capsys.readouterr().err
    assert code == 3, message
    assert f"the loss is {value} at epoch 2, step 2 of the epoch (global step 5)" in message
    assert f"the last good checkpoint {out / 'checkpoints' / 'epoch_0001'} is kept" in message
    assert "Traceback" not in message
    assert [n for n, _ in list_checkpoints(out)] == [1]  # nothing saved after the bad step
    assert not (out / "model.safetensors").exists()
    saved = load_file(out / "checkpoints" / "epoch_0001" / TRAINABLE_NAME)
    assert all(bool(torch.isfinite(t).all()) for t in saved.values())

    monkeypatch.undo()  # the kept checkpoint is a working one: the run continues from it
    summary = run(tiny_data, tiny_clip_dir, out, "--epochs", "3", "--resume")
    assert summary["training"]["trained_epochs"] == 2


def test_nonfinite_weights_are_never_saved():
    from cnc_hf.modeling import CNCModel

    model = CNCModel(tiny_cnc_config())
    train.check_finite_weights(model, epoch=0)
    with torch.no_grad():
        model.decoder.blocks[0].qkv.weight[0, 0] = float("inf")
    with pytest.raises(train.TrainingDivergedError, match=r"epoch 4 \(decoder.blocks.0.qkv.weight\)"):
        train.check_finite_weights(model, epoch=3)


TWO_PROCESS_NAN = """
    import sys, types
    import torch
    from accelerate import Accelerator
    from cnc_hf_train.train import LOSS_NAMES, TrainingDivergedError, leave_process_group, train_one_epoch

    class Tiny(torch.nn.Module):  # stands in for CNCModel: returns its losses like CNCOutput does
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(3))
        def forward(self, x, epoch=0):
            loss = (self.weight * x).sum()
            return types.SimpleNamespace(**{{**dict.fromkeys(LOSS_NAMES), "loss": loss}})

    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == 2
    tiny = Tiny()
    model, optimizer = accelerator.prepare(tiny, torch.optim.SGD(tiny.parameters(), lr=0.1))
    rank = accelerator.process_index
    # Only process 1 sees an infinite loss, at its 3rd step; process 0's losses stay finite.
    steps = [{{"x": torch.full((3,), float("inf") if (rank, i) == (1, 2) else 1.0)}} for i in range(5)]
    try:
        train_one_epoch(model, optimizer, accelerator, steps, epoch=0, first_step=10)
    except TrainingDivergedError as err:
        print(f"process {{rank}} stopped: {{err}}", flush=True)
        leave_process_group()  # what train.py's cli() does before it exits with 3
        sys.exit(3)
    print(f"process {{rank}} did not stop", flush=True)
"""


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_nonfinite_loss_on_one_process_stops_every_process(tmp_path):
    """DDP: the other processes must stop at the same step, not wait forever in the gradient all-reduce."""
    from test_train import _free_port

    script = tmp_path / "nan_ddp.py"
    script.write_text(textwrap.dedent(TWO_PROCESS_NAN.format()))
    # The two processes are started directly with the variables a launcher would set (no launcher process to
    # import torch a third time on a small machine); Accelerator(cpu=True) then joins them with gloo.
    port, processes = str(_free_port()), []
    for rank in (0, 1):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": port, "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank),
               "LOCAL_WORLD_SIZE": "2"}
        processes.append(subprocess.Popen([sys.executable, str(script)], cwd=tmp_path, env=env, text=True,
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    try:
        output = "".join(process.communicate(timeout=180)[0] for process in processes)  # a hang fails here
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    assert [process.returncode for process in processes] == [3, 3], output[-3000:]
    for rank in (0, 1):
        assert re.search(rf"process {rank} stopped: the loss is not finite on 1 of 2 processes \(this process: "
                         r"[^)]*\) at epoch 1, step 3 of the epoch \(global step 13\)", output), output[-3000:]
    assert "did not stop" not in output


# ----------------------------------------------------------------------------- untrusted weight files
class WritesAFile:
    """A pickle payload: unpickling it calls open(path, "w"), i.e. runs code."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def write_malicious_pickle(path: Path, marker: Path) -> None:
    torch.save({"clip.logit_scale": torch.ones(()), "payload": WritesAFile(marker)}, path)


def test_a_malicious_pickle_never_runs(tmp_path, tiny_clip_dir):
    import cnc_hf.pipeline  # noqa: F401  (registers the task)
    from transformers import pipeline

    from cnc_hf.pipeline import save_model_dir
    from cnc_hf.modeling import CNCModel
    from cnc_hf.modeling.image_processing_cnc import CNCImageProcessor

    marker = tmp_path / "code_ran"
    # A saved CNC model whose safetensors file was swapped for a pickle.
    model_dir = tmp_path / "cnc"
    save_model_dir(CNCModel(tiny_cnc_config()), CNCImageProcessor(size=32), model_dir)
    (model_dir / "model.safetensors").unlink()
    write_malicious_pickle(model_dir / "pytorch_model.bin", marker)
    with pytest.raises(ValueError, match=r"no model.safetensors, only pickle file\(s\) \['pytorch_model.bin'\]"):
        CNCModel.from_pretrained(model_dir)
    for refused in ({"use_safetensors": False}, {"weights_only": False}):
        with pytest.raises(ValueError, match="safetensors weights only"):
            CNCModel.from_pretrained(model_dir, **refused)
    with pytest.raises(ValueError, match="only pickle file"):
        pipeline("image-anomaly-detection", model=str(model_dir))
    # A CLIP checkpoint with only a pickle: read with torch.load(weights_only=True), which refuses the payload.
    clip_dir = tmp_path / "clip"
    clip_dir.mkdir()
    shutil.copy(tiny_clip_dir / "config.json", clip_dir / "config.json")
    write_malicious_pickle(clip_dir / "pytorch_model.bin", marker)
    with pytest.raises(ValueError, match=r"refused the pickle weights file .*weights_only=True.*GLOBAL \S*open was not an allowed global"):
        CNCModel.from_clip_pretrained(clip_dir, image_size=32)
    assert not marker.exists()
    torch.load(clip_dir / "pytorch_model.bin", weights_only=False)  # the payload is real: loading it unsafely runs it
    assert marker.exists()


def test_a_plain_tensor_pickle_clip_checkpoint_still_loads(tmp_path, tiny_clip_dir):
    """Many CLIP checkpoints ship pytorch_model.bin; plain tensors pass torch.load(weights_only=True)."""
    from cnc_hf.modeling import CNCModel

    clip_dir = tmp_path / "clip_bin"
    clip_dir.mkdir()
    shutil.copy(tiny_clip_dir / "config.json", clip_dir / "config.json")
    weights = load_file(tiny_clip_dir / "model.safetensors")
    torch.save(weights, clip_dir / "pytorch_model.bin")
    model = CNCModel.from_clip_pretrained(clip_dir, image_size=32)
    loaded = model.clip.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in weights.items() if k in loaded)


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    from cnc_hf.modeling import CNCModel

    path = tmp_path_factory.mktemp("saved") / "cnc"
    torch.manual_seed(0)
    CNCModel(tiny_cnc_config()).save_pretrained(path)
    return path


EDITS = {  # config.json edit -> a tensor the error must name
    "prompt_length": (6, r"prompt_learner.context: shape \[3, 2, 12, 32\] in the weights, \[3, 2, 6, 32\] from config.json"),
    "num_experts": (3, r"moe.router.bias: shape \[5\] in the weights, \[3\] from config.json"),
    "use_moe": (False, r"moe.experts.0.fc1.bias: in the weights but config.json builds no such tensor"),
    "decoder_mlp_ratio": (2.0, r"decoder.blocks.0.mlp.0.weight: shape \[128, 32\] in the weights, \[64, 32\]"),
}


@pytest.mark.parametrize("field", sorted(EDITS))
def test_a_config_that_does_not_match_the_weights_names_the_tensor(field, tmp_path, saved_model):
    from cnc_hf.modeling import CNCModel

    model_dir = tmp_path / "cnc"
    shutil.copytree(saved_model, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    value, named = EDITS[field]
    config[field] = value
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=named):
        CNCModel.from_pretrained(model_dir)


def test_weights_the_config_needs_but_the_file_lacks_are_named(tmp_path):
    from cnc_hf.modeling import CNCModel

    model_dir = tmp_path / "no_moe"
    CNCModel(tiny_cnc_config(use_moe=False)).save_pretrained(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["use_moe"] = True
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="moe.experts.0.fc1.bias: config.json needs it but the weights lack it"):
        CNCModel.from_pretrained(model_dir)


def test_a_matching_model_and_a_truncated_weights_file(tmp_path, saved_model):
    from cnc_hf.modeling import CNCModel

    model, info = CNCModel.from_pretrained(saved_model, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert not any(p.requires_grad for p in model.clip.parameters())  # still re-frozen
    model_dir = tmp_path / "cnc"
    shutil.copytree(saved_model, model_dir)
    weights = model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match="safetensors weights file is corrupt or truncated"):
        CNCModel.from_pretrained(model_dir)


def test_every_torch_load_in_the_repo_is_weights_only():
    """No code path of this repo unpickles a file with full powers: every torch.load passes weights_only=True
    (Accelerate's loader, used by load_state, defaults to it), and there is no pickle.load / allow_pickle=True.
    This file is left out: it loads its own payload unsafely on purpose, to show that the payload is live."""
    found = []
    for path in sorted(REPO_ROOT.rglob("*.py")):
        relative = path.relative_to(REPO_ROOT)
        if relative.parts[0].startswith(".") or relative.parts[0] in ("build", "dist") or path.name == "test_reliability.py":
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        for match in re.finditer(r"\btorch\.load\(|\bpickle\.load\(|allow_pickle\s*=\s*True", text):
            end = match.end()
            if match.group() == "torch.load(":  # the call's text up to its closing parenthesis
                depth = 1
                while depth and end < len(text):
                    depth += {"(": 1, ")": -1}.get(text[end], 0)
                    end += 1
            found.append((str(relative), text[match.start():end]))
    unsafe = [(p, call) for p, call in found if not (call.startswith("torch.load(") and "weights_only=True" in call)]
    assert not unsafe, unsafe
    assert any(p == "tests/test_model.py" for p, _ in found)  # the scan does see calls


# ----------------------------------------------------------------------------- the final save is atomic
def _saved_pair(path):
    """(threshold, first decoder weight) of the model in `path`, or None when nothing loads from it."""
    from cnc_hf.modeling import CNCModel

    if not (path / "config.json").exists():
        return None
    model = CNCModel.from_pretrained(path)
    return model.config.threshold, model.decoder.blocks[0].qkv.weight.detach().clone()


@pytest.mark.parametrize("crash", ["before_commit_list"] + [f"replace_{k}" for k in range(0, 20, 3)])
def test_a_save_killed_at_any_point_leaves_the_old_or_the_new_model_never_a_mix(tmp_path, monkeypatch, crash):
    import cnc_hf.atomic as atomic
    from cnc_hf.modeling import CNCModel
    from cnc_hf.pipeline import save_model_dir

    torch.manual_seed(0)
    old_model = CNCModel(tiny_cnc_config(threshold=1.0)).eval()
    torch.manual_seed(1)
    new_model = CNCModel(tiny_cnc_config(threshold=2.0)).eval()
    folder = tmp_path / "model"
    save_model_dir(old_model, None, folder)
    old = _saved_pair(folder)

    class Killed(Exception):
        pass

    if crash == "before_commit_list":
        monkeypatch.setattr(atomic, "_write_synced", lambda *a: (_ for _ in ()).throw(Killed()))
    else:
        limit, calls, replace = int(crash.split("_")[1]), [], os.replace

        def dying_replace(src, dst):
            if len(calls) == limit:
                raise Killed()
            calls.append(dst)
            replace(src, dst)

        monkeypatch.setattr(atomic.os, "replace", dying_replace)
    try:
        save_model_dir(new_model, None, folder)
        finished = True
    except Killed:
        finished = False
    monkeypatch.undo()
    new_weights = new_model.decoder.blocks[0].qkv.weight.detach()
    seen = _saved_pair(folder)
    if seen is not None:  # whatever loads is one whole save, never new config over old weights or the reverse
        assert (seen[0], torch.equal(seen[1], old[1])) == (1.0, True) or (
            seen[0] == 2.0 and torch.equal(seen[1], new_weights)), crash
    reached_commit_list = crash not in ("before_commit_list", "replace_0")  # the 1st rename puts COMMIT in place
    assert atomic.finish_interrupted_save(folder) == (reached_commit_list and not finished)
    final = _saved_pair(folder)
    assert final is not None and not (folder / atomic.STAGING).exists()
    if reached_commit_list:
        assert final[0] == 2.0 and torch.equal(final[1], new_weights)
    else:
        assert final[0] == 1.0 and torch.equal(final[1], old[1])


def test_overwrite_output_dir_removes_the_previous_model_before_training(tmp_path):
    from cnc_hf.modeling import CNCModel
    from cnc_hf.pipeline import save_model_dir

    folder = tmp_path / "run"
    save_model_dir(CNCModel(tiny_cnc_config(threshold=1.0)), None, folder)
    for name in ("README.md", "training_args.json", "metrics.json", "notes.txt", "setup.py", "utils.py"):
        (folder / name).write_text("x")
    (folder / "checkpoints" / "epoch_0001").mkdir(parents=True)
    train.remove_previous_run(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt", "setup.py", "utils.py"]  # the user's own files
    # A folder whose config.json is not a CNC model's is refused, untouched.
    (folder / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(train.TrainingSetupError, match="not a CNC model's config"):
        train.remove_previous_run(folder)
    assert (folder / "config.json").exists() and (folder / "setup.py").exists()


@pytest.mark.slow
def test_concurrent_saves_into_one_folder_never_mix_and_a_torn_commit_list_is_dropped(tmp_path):
    import threading

    import cnc_hf.atomic as atomic
    from cnc_hf.modeling import CNCModel
    from cnc_hf.pipeline import save_model_dir

    models = []
    for seed, threshold in ((0, 1.0), (1, 2.0)):
        torch.manual_seed(seed)
        models.append(CNCModel(tiny_cnc_config(threshold=threshold)).eval())
    folder = tmp_path / "model"
    errors = []

    def save(model):
        try:
            save_model_dir(model, None, folder)
        except Exception as err:  # noqa: BLE001 (reported below)
            errors.append(err)

    threads = [threading.Thread(target=save, args=(m,)) for m in models]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    threshold, weight = _saved_pair(folder)
    winner = models[0] if threshold == 1.0 else models[1]
    assert torch.equal(weight, winner.decoder.blocks[0].qkv.weight)
    # A COMMIT list torn by a kill (or a full disk) means the save never completed: dropped, old model kept.
    (folder / atomic.STAGING).mkdir()
    (folder / atomic.STAGING / "config.json").write_text("{}")
    (folder / atomic.STAGING / atomic.COMMIT).write_text('["config.js')
    assert atomic.finish_interrupted_save(folder) is False and not (folder / atomic.STAGING).exists()
    assert _saved_pair(folder)[0] == threshold
