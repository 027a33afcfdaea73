"""training/train.py end to end on a tiny random CLIP and tiny data sets written by the tests.

Covers: --help and the paper's defaults, the finished output dir (loads with from_pretrained and
the pipeline), resume == uninterrupted, cache == no cache, bf16 on CPU, two real processes, bad
input refused before training, crash-safe checkpoints, and that training actually learns.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tiny_models import REPO_ROOT
from train_fixtures import write_folder_layout, write_mvtec_layout
from cnc_hf_train import train
from cnc_hf_train.checkpointing import META_NAME, latest_checkpoint, list_checkpoints

TRAINED_FILES = ("model.safetensors", "config.json", "preprocessor_config.json", "modeling_cnc.py",
                 "configuration_cnc.py", "image_processing_cnc.py", "README.md", "metrics.json", "metrics.md",
                 "train_log.jsonl")


def reset_accelerate() -> None:
    """main() builds an Accelerator in this process; the next run needs a fresh (singleton) state."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(autouse=True)
def one_thread_and_fresh_accelerate():
    """One intra-op thread (tiny matmuls on a shared 2-core box otherwise spin-wait for seconds), and a
    fresh Accelerate state per run, since main() builds an Accelerator in this process each time."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    reset_accelerate()


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    return write_mvtec_layout(tmp_path_factory.mktemp("tiny_mvtec"), n_train=6, n_test_good=2, n_test_bad=2)


def argv(data, clip, out, *extra) -> list[str]:
    return ["--dataset", "mvtec", "--data_dir", str(data), "--clip_model", str(clip), "--output_dir", str(out),
            "--image_size", "32", "--batch_size", "4", "--eval_batch_size", "4", "--num_workers", "0", "--cpu",
            "--no_progress", "--report_to", "none", "--epochs", "2", *extra]


def log_records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def trainable_weights(out: Path) -> dict:
    return {k: v for k, v in load_file(out / "model.safetensors").items() if not k.startswith("clip.")}


# ----------------------------------------------------------------------------- flags
def test_help_lists_the_flags(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--dataset", "--data_dir", "--clip_model", "--output_dir", "--epochs", "--batch_size", "--image_size",
                 "--seed", "--mixed_precision", "--resume", "--cache_features", "--cache_dtype", "--save_every",
                 "--calibration_fraction", "--overwrite_output_dir", "--no_eval", "--cpu", "--report_to"):
        assert flag in text


def test_defaults_are_the_papers():
    args = train.parse_args(["--dataset", "mvtec", "--data_dir", "x", "--output_dir", "o"])
    assert (args.lr, args.batch_size, args.epochs, args.image_size) == (1e-3, 8, 250, 224)
    assert (args.theta, args.gamma, args.tau, args.num_experts, args.moe_top_k, args.prompt_length) == (5, 0.1, 0.001, 5, 2, 12)
    assert args.clip_model == "openai/clip-vit-large-patch14-336"
    assert train.parse_args(["--dataset", "visa", "--output_dir", "o"]).epochs == 200
    demo = train.parse_args(["--dataset", "demo", "--output_dir", "o"])
    assert demo.epochs == 15 and demo.data_dir == train.DEFAULT_DEMO_DIR
    assert train.parse_args(["--dataset", "visa", "--output_dir", "o", "--epochs", "3"]).epochs == 3
    overrides = train.config_overrides(train.parse_args(
        ["--dataset", "demo", "--output_dir", "o", "--no_moe", "--config_override", "noise_std=0.05"]))
    assert overrides["use_moe"] is False and overrides["noise_std"] == 0.05 and overrides["theta"] == 5


def test_demo_without_data_dir_says_where_its_images_go(capsys):
    args = train.parse_args(["--dataset", "demo", "--output_dir", "o"])
    assert args.data_dir == train.DEFAULT_DEMO_DIR
    assert f"the demo images go to {Path(train.DEFAULT_DEMO_DIR).resolve()}" in capsys.readouterr().err


def test_checkpoints_every_save_every_epochs_and_after_the_last():
    args = train.parse_args(["--dataset", "visa", "--output_dir", "o", "--epochs", "5", "--save_every", "2"])
    assert [epoch + 1 for epoch in range(5) if train.saves_after(args, epoch)] == [2, 4, 5]
    args.save_every = 0
    assert not any(train.saves_after(args, epoch) for epoch in range(5))


# ----------------------------------------------------------------------------- config files
def test_a_config_file_gives_the_same_run_as_its_flags(tmp_path):
    import yaml

    args = train.parse_args(["--dataset", "mvtec", "--data_dir", "x", "--output_dir", "o", "--protocol", "paper",
                             "--no_moe", "--categories", "a", "b", "--config_override", "noise_std=0.05",
                             "--config_override", "fusion_dropout=0.2", "--resume"])
    written = train.training_args(args)  # dataclasses.asdict of the argument dataclasses
    (tmp_path / "run.json").write_text(json.dumps(written))
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(written))
    assert train.parse_args([str(tmp_path / "run.json")]) == args
    assert train.parse_args([str(tmp_path / "run.yaml")]) == args
    # Flags after the file override it; a repeatable flag adds to the file's list.
    later = train.parse_args([str(tmp_path / "run.yaml"), "--epochs", "3", "--output_dir", "p",
                              "--config_override", "theta=1"])
    assert (later.epochs, later.output_dir, later.no_moe, later.calibration_fraction) == (3, "p", True, 0.0)
    assert later.config_override == ["noise_std=0.05", "fusion_dropout=0.2", "theta=1"]


@pytest.mark.parametrize("content, match", [
    ("dataset: mvtec\noutput_dir: o\nlrr: 1\n", r"unknown flag\(s\) lrr"),
    ("dataset: mvtec\noutput_dir: o\nprotocol: papr\n", r"--protocol: invalid choice 'papr'"),
    ("dataset: mvtec\noutput_dir: o\nbatch_size: 0\n", r"--batch_size must be positive"),
    ("- dataset\n", r"expected a mapping"),
])
def test_a_bad_config_file_is_refused_naming_the_key(tmp_path, content, match):
    (tmp_path / "run.yaml").write_text(content)
    with pytest.raises(train.TrainingSetupError, match=match):
        train.parse_args([str(tmp_path / "run.yaml")])
    (tmp_path / "typed.yaml").write_text("dataset: mvtec\noutput_dir: o\nepochs: ten\n")
    with pytest.raises(SystemExit):  # argparse's own check of the value's type, as for the flag
        train.parse_args([str(tmp_path / "typed.yaml")])
    with pytest.raises(train.TrainingSetupError, match=r"config file .*missing.json"):
        train.parse_args([str(tmp_path / "missing.json")])


def test_the_shipped_run_config_is_the_papers_mvtec_run():
    shipped = train.parse_args([str(train.CONFIGS_DIR / "train_mvtec.yaml"), "--data_dir", "x", "--output_dir", "o"])
    assert shipped == train.parse_args(["--dataset", "mvtec", "--data_dir", "x", "--output_dir", "o",
                                        "--cache_features"])


def test_the_folder_flags_are_the_shared_ones():
    import dataclasses

    from cnc_hf.data.folder import FOLDER_FLAGS
    from cnc_hf_train.args import DataArguments

    assert set(FOLDER_FLAGS) <= {f.name for f in dataclasses.fields(DataArguments)}


def test_calibration_holdout_is_per_category_and_disjoint(tiny_data):
    from cnc_hf.data import load_anomaly_dataset

    full = load_anomaly_dataset("mvtec", tiny_data)["train"]
    train_part, calibration = train.split_train_calibration(full, 0.1, seed=0)
    assert sorted(calibration["category"]) == ["rings", "waves"]  # 10% of 6 rounds to 0: at least 1 each
    assert not set(train_part["path"]) & set(calibration["path"])
    assert len(train_part) + len(calibration) == len(full)
    assert train.split_train_calibration(full, 0.0, seed=0)[1] is None
    assert len(train.split_train_calibration(full, 0.1, seed=0, max_train_samples=3)[0]) == 3


# ----------------------------------------------------------------------------- a full run
@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_data, tiny_clip_dir):
    out = tmp_path_factory.mktemp("run") / "model"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    summary = train.main(argv(tiny_data, tiny_clip_dir, out, "--heatmaps", "3", "--save_every", "1",
                              "--save_total_limit", "1", "--report_to", "tensorboard"))
    torch.set_num_threads(threads)
    reset_accelerate()
    return out, summary


def test_output_dir_is_a_finished_model(trained_run, tiny_data):
    out, summary = trained_run
    for name in TRAINED_FILES:
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["per_category"]) == {"rings", "waves"}
    assert set(metrics["mean"]) >= {"image_auroc", "pixel_auroc", "aupro", "image_ap", "pixel_ap"}
    assert metrics["num_images"] == 8 and metrics["world_size"] == 1
    assert metrics["threshold"]["quantile"] == 0.99 and "held-out normal training images" in metrics["threshold"]["method"]
    assert metrics["threshold"]["num_calibration_images"] == 2
    assert metrics["training"]["trained_epochs"] == 2
    readme = (out / "README.md").read_text()
    assert "I-AUROC" in readme and "rings" in readme
    assert "| **Mean** |" in (out / "metrics.md").read_text()
    records = log_records(out)
    assert [r["epoch"] for r in records] == [1, 2]
    assert all(r[k] is not None and r[k] == r[k] for r in records for k in train.LOSS_NAMES)
    assert [p.name for _, p in list_checkpoints(out)] == ["epoch_0002"]  # --save_total_limit 1
    assert list((out / "runs").rglob("events.out.tfevents*")), "TensorBoard events"
    assert len(list((out / "heatmaps").glob("*.png"))) == 3


def test_output_dir_loads_and_keeps_the_threshold(trained_run):
    from cnc_hf.modeling import CNCModel

    out, summary = trained_run
    model = CNCModel.from_pretrained(out, dtype=torch.float32)
    threshold = json.loads((out / "metrics.json").read_text())["threshold"]["value"]
    assert model.config.threshold == pytest.approx(threshold)
    assert not any(p.requires_grad for p in model.clip.parameters())
    # The saved weights are the trained ones (checkpoint of the last epoch == final model), plus the category
    # prototypes that the run computes after its last epoch, one row per training category.
    final = trainable_weights(out)
    prototypes = final.pop("category_prototypes")
    assert prototypes.shape[0] == len(model.config.categories) == len(json.loads((out / "config.json").read_text())
                                                                        ["category_distance_limits"])
    checkpoint = load_file(out / "checkpoints" / "epoch_0002" / "cnc_trainable.safetensors")
    assert set(checkpoint) == set(final)
    assert all(torch.equal(checkpoint[k], final[k]) for k in final)


def test_output_dir_runs_in_the_pipeline(trained_run, tiny_data):
    from transformers import pipeline

    out, _ = trained_run
    pytest.importorskip("cnc_hf.pipeline")
    pipe = pipeline("image-anomaly-detection", model=str(out), trust_remote_code=True)
    result = pipe(str(next((tiny_data / "rings" / "test" / "noise").glob("*.png"))))
    assert result["is_anomaly"] in (True, False)
    assert result["anomaly_map"].shape == (32, 32)


def test_training_args_json_parses_back_to_the_run(trained_run, tiny_data, tiny_clip_dir):
    from cnc_hf.model_card import _PRIVATE_ARGS
    from cnc_hf_train.args import FLAG_NAMES

    out, _ = trained_run
    saved = out / "training_args.json"
    published = {name for name in FLAG_NAMES if name not in _PRIVATE_ARGS and not name.endswith("_dir")}
    assert set(json.loads(saved.read_text())) == published  # every flag but the machine-specific ones
    given = argv(tiny_data, tiny_clip_dir, out, "--heatmaps", "3", "--save_every", "1", "--save_total_limit", "1",
                 "--report_to", "tensorboard")
    machine = ["--data_dir", str(tiny_data), "--clip_model", str(tiny_clip_dir), "--output_dir", str(out),
               "--num_workers", "0", "--no_progress", "--report_to", "tensorboard"]
    assert train.parse_args([str(saved), *machine]) == train.parse_args(given)


# ----------------------------------------------------------------------------- resume, cache, precision
def test_resume_gives_the_same_weights_as_one_run(tmp_path, tiny_data, tiny_clip_dir):
    """2 epochs straight == 1 epoch, stop, --resume, 1 more (theta=1: L_c2 switches on after the resume)."""
    common = ("--no_eval", "--save_every", "1", "--theta", "1")
    straight = tmp_path / "straight"
    train.main(argv(tiny_data, tiny_clip_dir, straight, *common))
    reset_accelerate()
    resumed = tmp_path / "resumed"
    train.main(argv(tiny_data, tiny_clip_dir, resumed, *common, "--epochs", "1"))
    reset_accelerate()
    summary = train.main(argv(tiny_data, tiny_clip_dir, resumed, *common, "--epochs", "2", "--resume"))
    assert summary["training"]["resumed_from"].endswith("epoch_0001")
    assert summary["training"]["trained_epochs"] == 1
    a, b = trainable_weights(straight), trainable_weights(resumed)
    assert set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
    for a_record, b_record in zip(log_records(straight), log_records(resumed), strict=True):
        assert all(a_record[k] == b_record[k] for k in train.LOSS_NAMES)
    assert [r["c2_active"] for r in log_records(resumed)] == [False, True]
    reset_accelerate()
    with pytest.raises(train.TrainingSetupError, match=r"other values of --lr \(was 0.001, now 0.01\)"):
        train.main(argv(tiny_data, tiny_clip_dir, resumed, *common, "--epochs", "3", "--resume", "--lr", "0.01"))


def test_resume_refuses_other_data_and_accepts_the_same_clip_dir_spelled_differently(tmp_path, tiny_data,
                                                                                     tiny_clip_dir):
    import shutil

    import numpy as np
    from PIL import Image

    common = ("--no_eval", "--save_every", "1")
    out = tmp_path / "run"
    train.main(argv(tiny_data, tiny_clip_dir, out, *common, "--epochs", "1"))
    reset_accelerate()
    # The same layout with every training pixel inverted: same paths, same count.
    inverted = tmp_path / "inverted"
    shutil.copytree(tiny_data, inverted)
    for path in inverted.glob("*/train/good/*.png"):
        Image.fromarray(255 - np.asarray(Image.open(path))).save(path)
    with pytest.raises(train.TrainingSetupError, match=r"trained on other data: .*" + str(tiny_data) + r".* now .*"
                       + str(inverted)):
        train.main(argv(inverted, tiny_clip_dir, out, *common, "--epochs", "2", "--resume"))
    reset_accelerate()
    summary = train.main(argv(tiny_data, str(tiny_clip_dir) + "/", out, *common, "--epochs", "2", "--resume"))
    assert summary["training"]["trained_epochs"] == 1  # a trailing slash names the same CLIP folder


def test_an_unwritable_output_dir_is_refused_before_any_work(tmp_path, tiny_data, tiny_clip_dir, capsys):
    code = train.cli(argv(tiny_data, tiny_clip_dir, "/proc/cnc-hf-out", "--cache_features"))
    assert code == 2
    err = capsys.readouterr().err
    assert "--output_dir /proc/cnc-hf-out: cannot write in /proc" in err and "Traceback" not in err


def test_feature_cache_gives_the_same_losses_and_weights(tmp_path, tiny_data, tiny_clip_dir):
    common = ("--no_eval", "--save_every", "0", "--theta", "1")
    plain = tmp_path / "plain"
    train.main(argv(tiny_data, tiny_clip_dir, plain, *common))
    reset_accelerate()
    cached = tmp_path / "cached"
    summary = train.main(argv(tiny_data, tiny_clip_dir, cached, *common, "--cache_features", "--cache_dtype", "float32",
                              "--cache_dir", str(tmp_path / "cache")))
    assert summary["training"]["cache_features"] is True
    for a, b in zip(log_records(plain), log_records(cached), strict=True):
        assert not a["cached"] and b["cached"]
        for name in train.LOSS_NAMES:
            assert b[name] == pytest.approx(a[name], rel=1e-5, abs=1e-6), name
    wa, wb = trainable_weights(plain), trainable_weights(cached)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5)
    assert len(list((tmp_path / "cache").glob("features-*.bin"))) == 1


def test_feature_cache_on_disk_is_reused(tmp_path, tiny_clip_dir):
    from cnc_hf_train.feature_cache import FeatureCache

    from cnc_hf.modeling import CNCModel

    model = CNCModel.from_clip_pretrained(tiny_clip_dir, image_size=32)
    pixels = torch.randn(5, 3, 32, 32)
    loader = [{"pixel_values": pixels[:3]}, {"pixel_values": pixels[3:]}]
    first = FeatureCache.build(model, loader, 5, torch.bfloat16, tmp_path, {"key": 1}, progress=False)
    expected = model.encode_image(pixels).to(torch.bfloat16)
    assert torch.equal(first.features, expected)
    second = FeatureCache.build(model, [], 5, torch.bfloat16, tmp_path, {"key": 1}, progress=False)  # no encoding
    assert torch.equal(second.features, expected)
    assert torch.equal(second.batch([4, 0], torch.device("cpu")), expected[[4, 0]])
    with pytest.raises(RuntimeError, match="expected 5"):
        FeatureCache.build(model, loader[:1], 5, torch.float32, None, progress=False)


def test_adam_is_fused_where_torch_has_the_kernel_and_updates_like_plain_adam():
    torch.manual_seed(0)
    start, grads = torch.randn(3, 5), [torch.randn(3, 5) for _ in range(3)]
    finals = []
    for device_type in ("cpu", "some_accelerator"):
        param = torch.nn.Parameter(start.clone())
        optimizer = train.make_optimizer([param], lr=1e-3, device_type=device_type)
        assert optimizer.param_groups[0]["fused"] is (True if device_type == "cpu" else None)
        for grad in grads:
            param.grad = grad.clone()
            optimizer.step()
        finals.append(param.detach())
    assert torch.allclose(finals[0], finals[1], atol=1e-6) and not torch.equal(finals[0], start)


def test_bf16_autocast_trains_on_cpu(tmp_path, tiny_data, tiny_clip_dir):
    summary = train.main(argv(tiny_data, tiny_clip_dir, tmp_path / "bf16", "--no_eval", "--save_every", "0",
                              "--epochs", "1", "--mixed_precision", "bf16"))
    assert summary["training"]["mixed_precision"] == "bf16"
    record = log_records(tmp_path / "bf16")[0]
    assert all(torch.isfinite(torch.tensor(record[k])) for k in train.LOSS_NAMES)


# ----------------------------------------------------------------------------- checkpoints
def test_incomplete_checkpoints_are_never_the_latest(tmp_path):
    root = tmp_path / "checkpoints"
    for name, meta in (("epoch_0001", {"complete": True}), ("epoch_0002", {"complete": True}),
                       ("epoch_0003", None), (".tmp-epoch_0004", {"complete": True}), ("epoch_0005", "garbage")):
        (root / name).mkdir(parents=True)
        if meta is not None:
            (root / name / META_NAME).write_text(meta if isinstance(meta, str) else json.dumps(meta))
    assert latest_checkpoint(tmp_path) == root / "epoch_0002"
    assert [n for n, _ in list_checkpoints(tmp_path)] == [1, 2]


def test_a_crash_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """Kill the save between the state files and the metadata: the latest checkpoint is still the old,
    complete one; the next save cleans up; loading restores the trainable weights (and only those
    were written: no CLIP in checkpoints)."""
    from accelerate import Accelerator

    from tiny_models import tiny_cnc_config
    from cnc_hf.modeling import CNCModel
    from cnc_hf_train import checkpointing

    def make():
        torch.manual_seed(0)
        model = CNCModel(tiny_cnc_config())
        accelerator = Accelerator(cpu=True)
        model, optimizer = accelerator.prepare(model, torch.optim.Adam([p for p in model.parameters() if p.requires_grad]))
        checkpointing.register_trainable_only_hooks(accelerator)
        return accelerator, model

    accelerator, model = make()
    first = checkpointing.save_checkpoint(accelerator, tmp_path, 1, {"args": {}})
    assert sorted(p.name for p in first.iterdir()) == ["checkpoint.json", "cnc_trainable.safetensors", "optimizer.bin",
                                                       "random_states_0.pkl"]
    saved = {k: v.clone() for k, v in checkpointing.trainable_state_dict(model).items()}
    with torch.no_grad():
        model.decoder.blocks[0].qkv.weight.add_(1.0)

    def crash(path, payload):
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(checkpointing, "_write_json_durably", crash)
    with pytest.raises(KeyboardInterrupt):
        checkpointing.save_checkpoint(accelerator, tmp_path, 2, {"args": {}})
    assert (tmp_path / "checkpoints" / ".tmp-epoch_0002").is_dir()
    assert latest_checkpoint(tmp_path) == first
    monkeypatch.undo()

    checkpointing.save_checkpoint(accelerator, tmp_path, 2, {"args": {}}, total_limit=1)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["epoch_0002"]
    reset_accelerate()
    accelerator, fresh = make()
    meta = checkpointing.load_checkpoint(accelerator, tmp_path / "checkpoints" / "epoch_0002")
    assert meta["epochs_done"] == 2
    loaded = checkpointing.trainable_state_dict(fresh)
    assert torch.equal(loaded["decoder.blocks.0.qkv.weight"], saved["decoder.blocks.0.qkv.weight"] + 1.0)


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("case", ["unknown_dataset", "empty_data_dir", "missing_data_dir", "clip_without_weights",
                                  "clip_missing", "bad_model_flags", "output_dir_taken", "resume_without_checkpoint", "bad_override",
                                  "test_split_without_anomalies"])
def test_bad_input_is_refused_before_training(case, tmp_path, tiny_data, tiny_clip_dir, monkeypatch):
    # If anything got as far as building the model, the checks came too late.
    monkeypatch.setattr(train, "build_model", lambda args: pytest.fail("training setup started"))
    out = tmp_path / "out"
    data, clip, extra = tiny_data, tiny_clip_dir, []
    if case == "unknown_dataset":
        args, match = argv(data, clip, out), r"--dataset 'mvtech': unknown dataset"
        args[args.index("mvtec")] = "mvtech"
    elif case == "empty_data_dir":
        (tmp_path / "empty").mkdir()
        args, match = argv(tmp_path / "empty", clip, out), r"--data_dir .*no MVTec AD categories"
    elif case == "missing_data_dir":
        args, match = argv(tmp_path / "nowhere", clip, out), r"--data_dir .*no such directory"
    elif case == "clip_without_weights":
        (tmp_path / "clip").mkdir()
        (tmp_path / "clip" / "config.json").write_text((tiny_clip_dir / "config.json").read_text())
        args, match = argv(data, tmp_path / "clip", out), r"--clip_model .*no weights"
    elif case == "clip_missing":
        args, match = argv(data, tmp_path / "no_clip", out), r"--clip_model .*no such directory"
    elif case == "bad_model_flags":
        args, match = argv(data, clip, out, "--moe_top_k", "6"), r"moe_top_k"
    elif case == "output_dir_taken":
        out.mkdir()
        (out / "model.safetensors").write_text("another run")
        args, match = argv(data, clip, out), r"--output_dir .* already holds another run .*--overwrite_output_dir"
    elif case == "resume_without_checkpoint":
        args, match = argv(data, clip, out, "--resume"), r"--resume: no complete checkpoint"
    elif case == "bad_override":
        args, match = argv(data, clip, out, "--config_override", "nonsense=1"), r"--config_override 'nonsense=1'"
    else:
        import shutil

        shutil.copytree(tiny_data, tmp_path / "data")
        for f in (tmp_path / "data" / "waves" / "test" / "noise").glob("*.png"):
            f.unlink()
        shutil.rmtree(tmp_path / "data" / "waves" / "ground_truth")
        args, match = argv(tmp_path / "data", clip, out), r"category 'waves' has no anomalous image.*--no_eval"
    with pytest.raises(train.TrainingSetupError, match=match):
        train.main(args)
    if case != "output_dir_taken":
        assert not out.exists() or not any(out.iterdir())


def test_cli_reports_setup_errors_with_exit_code_2(tmp_path, tiny_clip_dir, capsys):
    code = train.cli(argv(tmp_path / "nowhere", tiny_clip_dir, tmp_path / "out"))
    assert code == 2 and "no such directory" in capsys.readouterr().err


# ----------------------------------------------------------------------------- your own image folders
PIXEL_KEYS = ("pixel_auroc", "pixel_ap", "pixel_f1_max", "aupro")


def folder_argv(root, clip, out, *extra) -> list[str]:
    args = argv(root, clip, out, "--normal_dir", str(root / "good"), "--abnormal_dir", str(root / "noise"),
                str(root / "blobs"), *extra)
    args[args.index("--data_dir"):args.index("--data_dir") + 2] = []
    args[args.index("mvtec")] = "folder"
    return args


def test_training_on_image_folders_without_masks_reports_image_metrics_and_null_pixel_metrics(tmp_path, tiny_clip_dir):
    """Good images + two defect folders, no masks: trains, evaluates the defects (image metrics), and no pixel
    metric appears anywhere (metrics.json null, metrics.md and the model card "-", model-index without them);
    `cnc-hf evaluate` with the same flags reads the same test images."""
    from huggingface_hub import ModelCard

    from cnc_hf import evaluation

    root = write_folder_layout(tmp_path / "waves", n_good=10, n_bad=2, seed=3)
    out = tmp_path / "out"
    summary = train.main(folder_argv(root, tiny_clip_dir, out, "--save_every", "0"))
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["per_category"]) == {"waves"}  # the parent folder's name
    assert metrics["training"]["num_train_images"] + metrics["training"]["num_calibration_images"] == 8
    for level in (metrics, metrics["per_category"]["waves"], metrics["mean"]):
        assert all(0.0 <= level[k] <= 1.0 for k in ("image_auroc", "image_ap", "image_f1_max"))
        assert all(level[k] is None for k in PIXEL_KEYS), level
    category = metrics["per_category"]["waves"]
    assert (category["num_images"], category["num_anomalous"], category["num_images_pixel"],
            category["num_anomalous_with_mask"]) == (6, 4, 2, 0)
    assert metrics["mean"]["num_categories_pixel"] == 0
    table = (out / "metrics.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| waves |")).split(" | ")
    assert row[2:4] == ["-", "-"] and row[5:7] == ["-", "-"] and row[1] != "-"  # P-AUROC, AUPRO, P-AP, mTotal
    assert "0 of 4 anomalous with a mask" in table
    card = ModelCard.load(out / "README.md")
    assert "| waves |" in card.text and "pixel metrics absent" in card.text
    reported = {result.metric_name for result in card.data.eval_results}
    assert reported == {"I-AUROC", "I-AP", "I-F1max"}  # never a pixel metric that was not measured
    assert summary["metrics"]["pixel_auroc"] is None
    from cnc_hf.hub import upload_model_dir

    assert "metrics.json" in upload_model_dir(out, "me/waves", dry_run=True)  # re-renders the card from metrics.json
    assert {r.metric_name for r in ModelCard.load(out / "README.md").data.eval_results} == reported

    reset_accelerate()
    assert evaluation.main(["--model", str(out), "--dataset", "folder", "--normal_dir", str(root / "good"),
                            "--abnormal_dir", str(root / "noise"), str(root / "blobs"), "--output_dir",
                            str(tmp_path / "eval"), "--batch_size", "4", "--cpu", "--no_progress"]) == 0
    again = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert again["num_images"] == metrics["num_images"] == 6
    assert again["image_auroc"] == pytest.approx(metrics["image_auroc"], abs=1e-6)
    assert again["pixel_auroc"] is None


@pytest.mark.parametrize("case", ["flag_without_folder", "folder_without_normal_dir", "missing_abnormal_dir",
                                  "bad_test_fraction", "folder_list_missing"])
def test_folder_flags_are_checked_before_training(case, tmp_path, tiny_data, tiny_clip_dir, monkeypatch):
    monkeypatch.setattr(train, "build_model", lambda args: pytest.fail("training setup started"))
    root = write_folder_layout(tmp_path / "waves", n_good=4, n_bad=1)
    out = tmp_path / "out"
    if case == "flag_without_folder":
        args, match = argv(tiny_data, tiny_clip_dir, out, "--normal_dir", str(root / "good")), \
            r"--normal_dir applies to --dataset folder only"
    elif case == "folder_without_normal_dir":
        args = folder_argv(root, tiny_clip_dir, out)
        args[args.index("--normal_dir"):args.index("--normal_dir") + 2] = []
        match = r"--dataset folder needs --normal_dir"
    elif case == "missing_abnormal_dir":
        args, match = folder_argv(root, tiny_clip_dir, out), r"--abnormal_dir .*nowhere: no such directory"
        args[args.index(str(root / "blobs"))] = str(tmp_path / "nowhere")
    elif case == "bad_test_fraction":
        args, match = folder_argv(root, tiny_clip_dir, out, "--test_fraction", "1.5"), r"--test_fraction must be in"
    else:
        args = folder_argv(root, tiny_clip_dir, out, "--data_dir", str(tmp_path / "folders.yaml"))
        args[args.index("--normal_dir"):args.index("--normal_dir") + 2] = []
        args[args.index("--abnormal_dir"):args.index("--abnormal_dir") + 3] = []
        match = r"--data_dir .*folders.yaml: no such file"
    with pytest.raises(train.TrainingSetupError, match=match):
        train.main(args)
    assert not out.exists()


def test_a_folder_list_file_trains_several_categories(tmp_path, tiny_clip_dir):
    write_folder_layout(tmp_path / "data" / "waves", "waves", n_good=6, n_bad=1, masks_for=1, seed=4)
    write_folder_layout(tmp_path / "data" / "rings", "rings", n_good=6, n_bad=1, seed=5)
    listing = tmp_path / "data" / "folders.yaml"
    listing.write_text("waves:\n  normal_dir: waves/good\n  abnormal_dir: [waves/noise, waves/blobs]\n"
                       "  mask_dir: waves/masks\n"
                       "rings:\n  normal_dir: rings/good\n  abnormal_dir: [rings/noise, rings/blobs]\n")
    args = argv(listing, tiny_clip_dir, tmp_path / "out", "--epochs", "1", "--save_every", "0")
    args[args.index("mvtec")] = "folder"
    metrics = train.main(args)["metrics"]
    waves, rings = metrics["per_category"]["waves"], metrics["per_category"]["rings"]
    assert waves["num_anomalous_with_mask"] == 2 and waves["pixel_auroc"] is not None  # masks: pixel metrics
    assert rings["num_anomalous_with_mask"] == 0 and rings["pixel_auroc"] is None
    assert metrics["mean"]["pixel_auroc"] == pytest.approx(waves["pixel_auroc"])
    assert metrics["mean"]["num_categories_pixel"] == 1


# ----------------------------------------------------------------------------- learning
def test_training_learns_to_separate_noise_blobs(tmp_path, tiny_clip_dir):
    """Smooth patterns vs. the same with noise blobs: after a few epochs the image AUROC is clearly
    above the untrained model's (with the same random CLIP)."""
    from accelerate.utils import set_seed

    from cnc_hf.data import load_anomaly_dataset
    from cnc_hf.evaluation import evaluate_model
    from cnc_hf.modeling import CNCModel
    from cnc_hf.modeling.image_processing_cnc import CNCImageProcessor

    data = write_mvtec_layout(tmp_path / "data", n_train=12, n_test_good=6, n_test_bad=6, seed=1)
    set_seed(0)
    untrained = CNCModel.from_clip_pretrained(tiny_clip_dir, image_size=32)
    before = evaluate_model(untrained, CNCImageProcessor(size=32), load_anomaly_dataset("mvtec", data)["test"],
                            progress=False)
    summary = train.main(argv(data, tiny_clip_dir, tmp_path / "out", "--epochs", "8", "--cache_features",
                              "--save_every", "0"))
    after = summary["metrics"]
    assert after["mean"]["image_auroc"] >= before["mean"]["image_auroc"] + 0.15, (before["mean"], after["mean"])
    assert after["mean"]["image_auroc"] >= 0.85
    records = log_records(tmp_path / "out")
    assert records[-1]["loss_distill"] < records[0]["loss_distill"]


# ----------------------------------------------------------------------------- two real processes
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_cpu_processes_train_and_evaluate_every_test_image_once(tmp_path, tiny_clip_dir):
    """training/configs/ddp_cpu_2proc.yaml (= `--multi_gpu --num_processes 2`) + `--cpu`: two gloo
    processes (the plain `--cpu --num_processes 2` launch silently runs one). 9 test images over 2 processes with batch 2
    pads the last batch; gather_for_metrics must drop the duplicates."""
    data = tmp_path / "data"
    write_mvtec_layout(data, categories=("waves",), n_train=5, n_test_good=3, n_test_bad=2, seed=2)
    write_mvtec_layout(data, categories=("rings",), n_train=5, n_test_good=2, n_test_bad=2, seed=3)
    out = tmp_path / "out"
    config = REPO_ROOT / "training" / "configs" / "ddp_cpu_2proc.yaml"  # the shipped config, tested here
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
               "--main_process_port", str(_free_port()), str(REPO_ROOT / "training" / "train.py"),
               *argv(data, tiny_clip_dir, out, "--epochs", "2", "--eval_batch_size", "2", "--batch_size", "2",
                     "--cache_features", "--save_every", "1")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    start = time.time()
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["training"]["world_size"] == 2
    assert metrics["world_size"] == 2
    assert metrics["num_images"] == 9
    assert set(metrics["per_category"]) == {"rings", "waves"}
    assert metrics["threshold"]["num_calibration_images"] == 2  # gathered from both processes, no duplicates
    assert all(r["world_size"] == 2 for r in log_records(out))
    assert (out / "checkpoints" / "epoch_0002" / "random_states_1.pkl").is_file()
    assert time.time() - start < 300


def test_shards_cover_the_set_with_equal_lengths_and_orders_are_reproducible():
    from cnc_hf_train.sharding import ShardSampler, batches, shard_indices

    shards = [shard_indices(9, rank, 2) for rank in range(2)]
    assert [len(s) for s in shards] == [5, 5]  # padded by wrapping around, like DistributedSampler
    assert set(shards[0]) | set(shards[1]) == set(range(9)) and not set(shards[0]) & set(shards[1]) - {0}
    assert shard_indices(1, 1, 4) == [0]
    sampler = ShardSampler(5, seed=0)
    sampler.set_epoch(3)
    order = list(sampler)
    assert sorted(order) == list(range(5))
    again = ShardSampler(5, seed=0)
    again.set_epoch(3)
    assert list(again) == order
    assert batches(order, 2) == [order[:2], order[2:4], order[4:]]
