"""Train CNC (Cross-modal Normality Constraint, AAAI 2025) with Accelerate; the output dir is a finished model.

One GPU, many GPUs or many machines, the same script. Installed, it is the module
`cnc_hf_train.train` (the repository's `training/` folder), runnable from any folder:

    cnc-hf train --dataset mvtec --data_dir /data/mvtec_ad --output_dir out/cnc-mvtec
    accelerate launch --multi_gpu --num_processes 8 -m cnc_hf_train.train --dataset visa --data_dir /data/visa ...
    accelerate launch --multi_gpu --num_processes 2 -m cnc_hf_train.train --cpu ...   (2 CPU processes, gloo)

From a clone after `make install` (an editable install), `training/train.py` is the same file.

Defaults are the paper's (Implementation Details): CLIP ViT-L/14@336px at 224x224, Adam,
lr 1e-3, batch size 8, 250 epochs on MVTec AD / 200 on VisA, theta = 5, gamma = 0.1,
tau = 0.001, T = 5 experts, top K = 2, prompts of M = 12 tokens. Epochs are counted from 0 as in
Eq. (11): L_c2 joins at epoch index theta, i.e. from the 6th epoch. Only the trainable parameters
(prompts, fusion, MoE, decoder) go to Adam; CLIP stays frozen.

What the output dir holds at the end: model.safetensors + config.json (with the calibrated
`threshold`), preprocessor_config.json, the model's code files (trust_remote_code), README.md
(model card with the measured test metrics), metrics.json / metrics.md (per category + the
paper's mean), train_log.jsonl (per-epoch losses and times), checkpoints/ and runs/ (TensorBoard).

Design choices (also in --help):
- Decision threshold: `--calibration_fraction` (default 0.1) of the normal TRAINING images of each
  category (at least one when a category has two or more) is held out of training; after training,
  threshold = the `--threshold_quantile` (0.99, linear interpolation) of their image scores. No
  test label is used (the paper reports threshold-free metrics only). 0.99 aims at ~1% false alarms
  on normal images and, unlike the max, is not set by one odd image. Stored as `config.threshold`
  (the pipeline's yes/no: score >= threshold); method and test precision/recall in metrics.json.
- `--protocol practical` (default) differs from the paper's protocol in three named ways, each for a
  decision a user acts on: the calibration hold-out above, a Gaussian blur of the map (sigma 4, usual in
  reverse-distillation code) before the max that gives the image score, and `--batch_size` per
  process (N GPUs train with 8N). `--protocol paper` undoes all three: every training image
  trains, the map is Eq. (17) unblurred, 8 images per step in all; no threshold is calibrated.
- `--cache_features`: the frozen encoder's tapped features are computed once per training image
  (training/feature_cache.py). Exact, because CLIP is frozen and there is no augmentation.
  `--cache_dtype float16` (default) halves the memory; float32 reproduces the uncached losses.
- Sharding: each process trains on a fixed shard, reshuffled each epoch (training/sharding.py).
  DDP runs with find_unused_parameters: the MoE may route no patch of a batch to some expert.
- Two CPU processes: `accelerate launch --cpu --num_processes 2` silently runs ONE process; use
  `accelerate launch --multi_gpu --num_processes 2 ... training/train.py --cpu` (gloo).
- Checkpoints: `accelerator.save_state` into a temporary dir, metadata written last, atomic
  rename (training/checkpointing.py); `--resume` continues from the latest complete one, epoch
  counter and RNG states included, and gives the same weights as an uninterrupted run. A latest
  checkpoint whose files do not load is skipped with a warning naming it; the previous one is used.
- A NaN/inf loss stops the run before that step's update, naming the epoch and step; nothing is
  saved after the last good checkpoint (exit code 3 from the command line).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

EPOCH_DEFAULTS = {"mvtec": 250, "visa": 200, "demo": 15}  # the paper's, and a quick one for the demo set
OTHER_DATASET_EPOCHS = 200
NAMED_DATASETS = ("mvtec", "mvtec_ad", "mvtec-ad", "mvtecad", "visa", "demo", "folder")
DEFAULT_CLIP = "openai/clip-vit-large-patch14-336"
CONFIGS_DIR = Path(__file__).resolve().parent / "configs"  # package data of cnc_hf_train (`--config_file` of accelerate)
DEFAULT_DEMO_DIR = "data/cnc_demo"
LOSS_NAMES = ("loss", "loss_distill", "loss_constraint", "loss_moe", "loss_c1", "loss_c2")
# Flags that define a run: resuming with other values would silently mix two different trainings.
RUN_IDENTITY_FLAGS = ("dataset", "categories", "clip_model", "image_size", "lr", "seed", "calibration_fraction",
                      "max_train_samples", "tau", "gamma", "theta", "num_experts", "moe_top_k", "prompt_length",
                      "no_mlf", "no_cnc", "no_moe", "config_override", "batch_size", "protocol",
                      "promotion_scale", "prompt_training")
# What a checkpoint written before these flags existed was trained with (see CNCConfig.LEGACY_DEFAULTS).
LEGACY_RUN_FLAGS = {"protocol": "practical", "promotion_scale": "patch", "prompt_training": "all"}
# --protocol paper: the paper's Implementation Details as closely as this code can follow them.
PAPER_PROTOCOL = "all training images train (no calibration hold-out), no map blur, batch 8 in all (not per process)"


class TrainingSetupError(ValueError):
    """A bad flag, path or data set, found before any training starts; the message names the flag."""


class TrainingDivergedError(RuntimeError):
    """The loss (or the weights) became NaN/inf; training stopped before saving anything from that point."""


# ----------------------------------------------------------------------------- arguments
def _has_tensorboard() -> bool:
    import importlib.util

    return any(importlib.util.find_spec(name) is not None for name in ("tensorboard", "tensorboardX"))


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show defaults, keep the description's and epilog's line breaks."""


def build_parser() -> argparse.ArgumentParser:
    intro, _, rest = __doc__.partition("Defaults are the paper's")
    defaults, _, choices = rest.partition("Design choices (also in --help):")
    parser = argparse.ArgumentParser(
        prog="cnc_hf_train.train",
        description=intro.strip() + "\n\nDefaults are the paper's" + defaults.split("What the output dir")[0].rstrip(),
        epilog="design choices:" + choices.rstrip() + f"\n\nAccelerate configs shipped with cnc-hf: {CONFIGS_DIR}",
        formatter_class=_HelpFormatter,
    )
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", required=True,
                      help="mvtec, visa, demo (MVTec layout, generated into --data_dir when empty), folder (your own "
                           "image folders: --normal_dir, --abnormal_dir, ...), a parquet dataset dir or a Hub "
                           "dataset id")
    data.add_argument("--data_dir", default=None,
                      help=f"dataset folder; required for mvtec/visa, default {DEFAULT_DEMO_DIR} for demo; for folder, "
                           "optionally a JSON/YAML file listing the folders per category")
    data.add_argument("--categories", nargs="+", default=None, help="train and evaluate on these categories only")
    from cnc_hf.data.folder import add_folder_arguments

    add_folder_arguments(data)
    data.add_argument("--max_train_samples", type=int, default=None,
                      help="train on at most this many images (after the calibration hold-out), for quick runs")
    data.add_argument("--calibration_fraction", type=float, default=0.1,
                      help="fraction of each category's normal training images held out of training to calibrate "
                           "the decision threshold (at least 1 per category with >= 2 images); 0 disables")
    data.add_argument("--threshold_quantile", type=float, default=0.99,
                      help="threshold = this quantile (linear interpolation) of the held-out images' scores; 1 = max")
    data.add_argument("--num_workers", type=int, default=min(4, os.cpu_count() or 1),
                      help="data loader worker processes (image decoding)")

    model = parser.add_argument_group("model (paper values by default)")
    model.add_argument("--clip_model", default=DEFAULT_CLIP, help="CLIP checkpoint: a local dir or a Hub id")
    model.add_argument("--image_size", type=int, default=224, help="input resolution (the paper: 224)")
    model.add_argument("--theta", type=int, default=5, help="epoch index (from 0) at which L_c2 joins, Eq. (11)")
    model.add_argument("--gamma", type=float, default=0.1, help="weight of L_c2, Eq. (11)")
    model.add_argument("--tau", type=float, default=0.001, help="temperature of Eq. (4)/(10)")
    model.add_argument("--num_experts", type=int, default=5, help="T, experts of the gated MoE")
    model.add_argument("--moe_top_k", type=int, default=2, help="K, experts per patch")
    model.add_argument("--prompt_length", type=int, default=12, help="M, learnable tokens per prompt")
    model.add_argument("--promotion_scale", choices=["map", "patch"], default="map",
                       help="lambda = 1/||f_i|| of Eq. (5)/(8) over each image's whole HxWxC map (the paper) or "
                            "over each patch (a ~sqrt(HW)x larger shift)")
    model.add_argument("--prompt_training", choices=["alignment", "all"], default="alignment",
                       help="the prompts learn from L_c1 (Eq. 4) only and are fixed anchors elsewhere (the paper), "
                            "or from every loss that uses them")
    model.add_argument("--no_mlf", action="store_true", help="ablation: no multi-layer fusion")
    model.add_argument("--no_cnc", action="store_true", help="ablation: no cross-modal normality constraint")
    model.add_argument("--no_moe", action="store_true", help="ablation: no gated mixture of experts")
    model.add_argument("--config_override", action="append", default=[], metavar="KEY=VALUE",
                       help="set any other CNCConfig field (VALUE parsed as JSON when it can be), repeatable, "
                            "e.g. --config_override noise_std=0.05")

    train = parser.add_argument_group("training")
    train.add_argument("--protocol", choices=["practical", "paper"], default="practical",
                       help=f"paper: {PAPER_PROTOCOL}; the model then has no decision threshold (the paper reports "
                            "threshold-free metrics). practical: hold out --calibration_fraction to calibrate the "
                            "threshold, Gaussian-blur the map (sigma 4), --batch_size per process")
    train.add_argument("--output_dir", required=True, help="where the finished model, logs and checkpoints go")
    train.add_argument("--overwrite_output_dir", action="store_true",
                       help="train into an output dir that holds another run (its checkpoints are deleted)")
    train.add_argument("--epochs", type=int, default=None,
                       help="default: 250 for mvtec, 200 for visa (the paper), 15 for demo, 200 otherwise")
    train.add_argument("--batch_size", type=int, default=8,
                       help="images per process per step (the paper: 8 on one GPU); with --protocol paper, per "
                            "step over all processes")
    train.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (the paper: 0.001)")
    train.add_argument("--seed", type=int, default=0, help="seed of initialisation, hold-out split and data order")
    train.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None,
                       help="autocast for training (bf16 works on CPU); default: the accelerate config's")
    train.add_argument("--cpu", action="store_true", help="train on the CPU even if a GPU is present")
    train.add_argument("--cache_features", action="store_true",
                       help="compute the frozen CLIP features of each training image once and reuse them every "
                            "epoch (exact: CLIP is frozen, no augmentation); much faster epochs")
    train.add_argument("--cache_dir", default=None,
                       help="keep the feature cache in memory-mapped files here (reused by later runs with the "
                            "same model and data); default: in memory")
    train.add_argument("--cache_dtype", choices=["float32", "float16", "bfloat16"], default="float16",
                       help="storage dtype of the feature cache (ViT-L/14, MVTec AD: 5.7 GB in float16)")
    train.add_argument("--save_every", type=int, default=10, help="checkpoint every N epochs (and after the last)")
    train.add_argument("--save_total_limit", type=int, default=2, help="keep only the newest N checkpoints")
    train.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                       help="continue from the latest complete checkpoint in output_dir/checkpoints (or from the "
                            "given checkpoint dir)")
    train.add_argument("--report_to", choices=["tensorboard", "none"], default="tensorboard" if _has_tensorboard() else "none",
                       help="per-epoch loss logging besides stdout and train_log.jsonl")
    train.add_argument("--no_progress", action="store_true", help="no progress bars")

    evaluation = parser.add_argument_group("evaluation")
    evaluation.add_argument("--no_eval", action="store_true", help="skip the test-set evaluation at the end")
    evaluation.add_argument("--eval_batch_size", type=int, default=16, help="batch size for evaluation and caching")
    evaluation.add_argument("--heatmaps", type=int, default=0, metavar="N",
                            help="write N heat-map PNGs of test images to output_dir/heatmaps")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    positive = ["batch_size", "eval_batch_size", "image_size", "num_experts", "moe_top_k", "prompt_length"]
    for name in positive + ["epochs", "max_train_samples"]:
        value = getattr(args, name)
        if value is not None and value < (1 if name in positive + ["max_train_samples"] else 0):
            raise TrainingSetupError(f"--{name} must be positive, got {value}")
    if not 0 <= args.calibration_fraction < 1:
        raise TrainingSetupError(f"--calibration_fraction must be in [0, 1), got {args.calibration_fraction}")
    if not 0 < args.threshold_quantile <= 1:
        raise TrainingSetupError(f"--threshold_quantile must be in (0, 1], got {args.threshold_quantile}")
    if args.save_every < 0 or args.num_workers < 0 or args.heatmaps < 0:
        raise TrainingSetupError("--save_every, --num_workers and --heatmaps must be >= 0")
    if args.report_to == "tensorboard" and not _has_tensorboard():
        raise TrainingSetupError("--report_to tensorboard needs the tensorboard package (pip install tensorboard)")
    if args.protocol == "paper":
        args.calibration_fraction = 0.0
    key = str(args.dataset).lower()
    if args.epochs is None:
        default_key = "mvtec" if key.startswith("mvtec") else key
        args.epochs = EPOCH_DEFAULTS.get(default_key, OTHER_DATASET_EPOCHS)
    if key == "demo" and args.data_dir is None:
        args.data_dir = DEFAULT_DEMO_DIR
        print(f"train.py: --dataset demo without --data_dir: the demo images go to {Path(DEFAULT_DEMO_DIR).resolve()} "
              "(made there on first use)", file=sys.stderr)
    return args


def per_process_batch(args, world: int) -> None:
    """--protocol paper: --batch_size is the batch of one step over all processes (the paper's 8), so each of
    `world` processes takes batch_size / world; args.batch_size becomes that per-process share."""
    if args.protocol != "paper" or world == 1:
        return
    if args.batch_size % world:
        raise TrainingSetupError(f"--protocol paper: --batch_size {args.batch_size} is the batch over all processes "
                                 f"and must be divisible by the {world} processes")
    args.batch_size //= world


def config_overrides(args) -> dict:
    """CNCConfig fields from the flags."""
    overrides = {"image_size": args.image_size, "theta": args.theta, "gamma": args.gamma, "tau": args.tau,
                 "num_experts": args.num_experts, "moe_top_k": args.moe_top_k, "prompt_length": args.prompt_length,
                 "use_mlf": not args.no_mlf, "use_cnc": not args.no_cnc, "use_moe": not args.no_moe,
                 "promotion_scale": args.promotion_scale, "prompt_training": args.prompt_training}
    if args.protocol == "paper":
        overrides["map_smoothing_sigma"] = 0.0  # Eq. (17) and "the maximum score of the pixel-level anomaly map"
    from cnc_hf.modeling import CNCConfig

    known = set(CNCConfig().to_dict())
    for item in args.config_override:
        name, sep, raw = item.partition("=")
        if not sep or name not in known or name in ("clip_config", "threshold", "category_thresholds"):
            raise TrainingSetupError(f"--config_override {item!r}: expected KEY=VALUE with KEY a CNCConfig field "
                                     f"(not clip_config/threshold)")
        try:
            overrides[name] = json.loads(raw)
        except ValueError:
            overrides[name] = raw
    return overrides


# ----------------------------------------------------------------------------- checks before training
def check_output_dir(args) -> None:
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        raise TrainingSetupError(f"--output_dir {out} exists and is not a directory")
    check_writable(out)
    if args.resume is not None:
        from cnc_hf_train.checkpointing import CorruptCheckpointError, list_checkpoints, resumable_checkpoint, verify_checkpoint

        if args.resume == "latest":  # the newest checkpoint whose files load; a corrupt newer one is skipped with a warning
            target = resumable_checkpoint(out)
            if target is None:
                found = len(list_checkpoints(out))
                raise TrainingSetupError(f"--resume: no {'loadable' if found else 'complete'} checkpoint in "
                                         f"{out / 'checkpoints'}" + (f" ({found} corrupt, see the warnings)" if found else "")
                                         + "; drop --resume to start a new run")
        else:  # a checkpoint named on the command line is used as it is, or refused
            target = Path(args.resume)
            try:
                verify_checkpoint(target)
            except CorruptCheckpointError as err:
                raise TrainingSetupError(f"--resume {args.resume}: not a loadable checkpoint: {err}") from err
        args.resume = str(target)
        return
    if args.overwrite_output_dir:
        _check_replaceable(out)
    if out.is_dir() and any(out.iterdir()) and not args.overwrite_output_dir:
        held = ", ".join(sorted(p.name for p in out.iterdir())[:6])
        raise TrainingSetupError(
            f"--output_dir {out} already holds another run ({held}); pass --resume to continue it, "
            "--overwrite_output_dir to replace it, or choose another --output_dir"
        )


def check_writable(out: Path) -> None:
    """--output_dir (or, if it does not exist yet, its nearest existing parent) takes files: probed with a
    temporary file before any expensive work (the feature cache, training), leaving nothing behind."""
    import tempfile

    probe = out
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    try:
        handle, name = tempfile.mkstemp(prefix=".cnc-write-test-", dir=probe)
        os.close(handle)
        os.unlink(name)
    except OSError as err:
        raise TrainingSetupError(f"--output_dir {out}: cannot write in {probe} ({err.strerror or err}); "
                                 "choose a writable --output_dir") from None


def check_clip_model(name: str) -> None:
    """A local CLIP dir must hold a config and weights; anything else must look like a Hub id."""
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise TrainingSetupError(f"--clip_model {name}: not a directory")
        if not (path / "config.json").is_file():
            raise TrainingSetupError(f"--clip_model {name}: no config.json; expected a CLIP checkpoint dir")
        weights = [*path.glob("*.safetensors"), *path.glob("pytorch_model*.bin"), *path.glob("*.index.json")]
        if not weights:
            raise TrainingSetupError(f"--clip_model {name}: no weights (model.safetensors or pytorch_model.bin) in "
                                     "the dir; a CLIP checkpoint needs its weights")
    elif name.startswith((".", "/", "~")) or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name):
        raise TrainingSetupError(f"--clip_model {name}: no such directory (and not a Hub id)")


def check_model_config(args) -> None:
    """Build the CNCConfig from the CLIP config and the flags (reads config.json only): bad values such as
    --moe_top_k > --num_experts, or an unreachable Hub id, fail here rather than after loading data."""
    from cnc_hf.modeling import CNCConfig

    overrides = config_overrides(args)
    try:
        CNCConfig.from_clip_pretrained(args.clip_model, **overrides)
    except (OSError, ValueError) as err:
        raise TrainingSetupError(f"--clip_model {args.clip_model} with the model flags: {err}") from err


def check_dataset_name(args) -> None:
    name = str(args.dataset)
    check_folder_flags(args)
    if name.lower() in NAMED_DATASETS or Path(name).expanduser().exists():
        if name.lower() in ("mvtec", "mvtec_ad", "mvtec-ad", "mvtecad", "visa"):
            if args.data_dir is None:
                raise TrainingSetupError(f"--dataset {name} needs --data_dir (the dataset folder)")
            if not Path(args.data_dir).expanduser().is_dir():
                raise TrainingSetupError(f"--data_dir {args.data_dir}: no such directory")
        return
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        raise TrainingSetupError(f"--dataset {name!r}: unknown dataset; expected one of mvtec, visa, demo, a parquet "
                                 "dataset dir or a Hub dataset id (owner/name)")


def check_folder_flags(args) -> None:
    """--dataset folder: its flags fit together and name existing folders (or a folder list file), before any work;
    its flags with another --dataset are refused."""
    from cnc_hf.data.folder import folder_arguments

    try:
        kwargs = folder_arguments(args, args.data_dir)
    except ValueError as err:
        raise TrainingSetupError(str(err)) from None
    if not kwargs:
        return
    if args.data_dir is not None and not Path(args.data_dir).expanduser().is_file():
        raise TrainingSetupError(f"--dataset folder --data_dir {args.data_dir}: no such file; expected a JSON/YAML file "
                                 "listing the folders per category (or use --normal_dir and --abnormal_dir)")
    if not 0 <= kwargs["test_fraction"] < 1:
        raise TrainingSetupError(f"--test_fraction must be in [0, 1), got {kwargs['test_fraction']}")
    for flag in ("normal_dir", "normal_test_dir", "mask_dir", "abnormal_dir"):
        for folder in ([] if kwargs.get(flag) is None else
                       kwargs[flag] if isinstance(kwargs[flag], list) else [kwargs[flag]]):
            if not Path(folder).expanduser().is_dir():
                raise TrainingSetupError(f"--{flag} {folder}: no such directory")


def _flag_value(name: str, value):
    """A run-identity flag as compared on resume: the same CLIP folder with or without a trailing slash (or
    another spelling of the same path) is the same model."""
    if name == "clip_model" and isinstance(value, str):
        return os.path.normpath(os.path.abspath(value)) if os.path.exists(value) else value.rstrip("/")
    return value


def training_data_identity(args, train_split, calibration_split) -> dict:
    """What identifies the images a run trains (and calibrates) on: a hash of each file's path below
    --data_dir, its size and its first 4 KiB (image data starts there in PNG and JPEG files, so
    rewritten pixels change it), computed without decoding any image."""
    import hashlib

    root = Path(args.data_dir).resolve() if args.data_dir else None
    digest, count = hashlib.sha256(), 0
    for split in (train_split, calibration_split):
        for raw in (split["path"] if split is not None else []):
            path = Path(str(raw))
            try:
                name = str(path.resolve().relative_to(root)) if root else str(raw)
            except ValueError:
                name = str(raw)
            digest.update(name.encode() + b"\0")
            if path.is_file():
                with open(path, "rb") as handle:
                    digest.update(str(path.stat().st_size).encode() + handle.read(4096))
            count += 1
    return {"fingerprint": digest.hexdigest()[:16], "num_images": count, "data_dir": args.data_dir,
            "dataset": str(args.dataset)}


def check_same_training_data(checkpoint: str, identity: dict) -> None:
    from cnc_hf_train.checkpointing import read_checkpoint_meta

    previous = read_checkpoint_meta(checkpoint).get("data")
    if previous and previous.get("fingerprint") != identity["fingerprint"]:
        raise TrainingSetupError(
            f"--resume {checkpoint}: the checkpoint was trained on other data: {previous.get('dataset')} at "
            f"{previous.get('data_dir')} ({previous.get('num_images')} images, fingerprint {previous.get('fingerprint')}), "
            f"now {identity['dataset']} at {identity['data_dir']} ({identity['num_images']} images, fingerprint "
            f"{identity['fingerprint']}). Resume with the same data, or start a new run in another --output_dir"
        )


def load_data(args):
    """The dataset, with clear errors; returns (train, calibration or None, test or None).

    --dataset folder: `cnc_hf.data.load_image_folder` with the folder flags (or `load_image_folders` with a
    JSON/YAML --data_dir). Its test split (good images held out by --test_fraction and --split_seed, and the
    defect images) is the one `cnc-hf evaluate` with the same flags reads.
    """
    from cnc_hf.data import load_anomaly_dataset
    from cnc_hf.data.folder import folder_arguments

    folder_kwargs = {}
    try:
        folder_kwargs = folder_arguments(args, args.data_dir)
        dataset = load_anomaly_dataset(args.dataset, data_dir=args.data_dir, categories=args.categories,
                                       **folder_kwargs)
    except (OSError, ValueError, ConnectionError) as err:
        where = f"--data_dir {args.data_dir}" if args.data_dir is not None or not folder_kwargs else \
            f"--normal_dir {args.normal_dir}"
        raise TrainingSetupError(f"--dataset {args.dataset} {where}: {err}") from err
    train, calibration = split_train_calibration(dataset["train"], args.calibration_fraction, args.seed,
                                                 args.max_train_samples)
    test = None if args.no_eval else dataset["test"]
    if test is not None:
        check_test_split(test)
    return train, calibration, test


def split_train_calibration(train, fraction: float, seed: int, max_train_samples: int | None = None):
    """Hold out `fraction` of each category's normal training images (at least 1 where a category
    has >= 2); the rest (optionally capped at `max_train_samples`) is the training set."""
    labels = np.asarray(train["label"])
    categories = np.asarray(train["category"])
    if (labels != 0).any():
        print(f"note: dropping {(labels != 0).sum()} training images labelled anomalous (training is unsupervised)")
    rng = np.random.default_rng(seed)
    keep, hold = [], []
    for category in sorted(set(categories)):
        idx = np.flatnonzero((categories == category) & (labels == 0))
        rng.shuffle(idx)
        n_hold = 0 if fraction == 0 or idx.size < 2 else min(idx.size - 1, max(1, round(fraction * idx.size)))
        hold += idx[:n_hold].tolist()
        keep += idx[n_hold:].tolist()
    if max_train_samples is not None and len(keep) > max_train_samples:
        keep = rng.choice(np.asarray(keep), size=max_train_samples, replace=False).tolist()
    if not keep:
        raise TrainingSetupError("no normal training images left to train on (check --categories / the dataset)")
    calibration = train.select(sorted(hold)) if hold else None
    return train.select(sorted(keep)), calibration


def check_test_split(test) -> None:
    """Image AUROC needs normal and anomalous test images in every category; say so before training."""
    labels = np.asarray(test["label"])
    categories = np.asarray(test["category"])
    for category in sorted(set(categories)):
        found = set(labels[categories == category].tolist())
        if found != {0, 1}:
            kind = "anomalous" if 1 not in found else "normal"
            raise TrainingSetupError(f"test split: category {str(category)!r} has no {kind} image, so it cannot be "
                                     "evaluated; fix the data or pass --no_eval")


# ----------------------------------------------------------------------------- pieces of the run
def build_model(args):
    from cnc_hf.modeling import CNCModel

    try:
        return CNCModel.from_clip_pretrained(args.clip_model, **config_overrides(args))
    except TrainingSetupError:
        raise
    except (OSError, ValueError) as err:
        raise TrainingSetupError(f"--clip_model {args.clip_model}: cannot build the model: {err}") from err


# What a run leaves in its output dir: --overwrite_output_dir removes all of it before training, so a run
# that then dies leaves no model of the previous run that would load (or be pushed) as this run's result.
# Only what cnc-hf writes goes: a config.json / README.md that is not a CNC model's, and code files other
# than the model's own (the user's setup.py, utils.py, ...), stay.
RUN_OUTPUTS = ("checkpoints", "runs", "heatmaps", "evaluation", "train_log.jsonl", "metrics.json", "metrics.md",
               "training_args.json", "heatmap_example.png", "preprocessor_config.json", "model.safetensors",
               "model-*.safetensors", "model.safetensors.index.json", ".cnc-saving")


def _check_replaceable(output_dir: Path) -> None:
    """--overwrite_output_dir replaces a CNC run only: a config.json of anything else is not ours to delete."""
    config = output_dir / "config.json"
    if not config.is_file():
        return
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        model_type = None
    if model_type != "cnc":
        raise TrainingSetupError(f"--overwrite_output_dir: {config} is not a CNC model's config (model_type "
                                 f"{model_type!r}); refusing to replace that folder's contents, choose another "
                                 "--output_dir")


def remove_previous_run(output_dir: Path) -> None:
    import cnc_hf.modeling

    _check_replaceable(output_dir)
    config = output_dir / "config.json"
    if config.is_file():  # config.json first: from then on the folder holds no loadable model, whatever a kill leaves
        config.unlink()
        (output_dir / "README.md").unlink(missing_ok=True)
    model_code = {p.name for p in Path(cnc_hf.modeling.__file__).parent.glob("*.py") if p.name != "__init__.py"}
    for pattern in RUN_OUTPUTS + tuple(sorted(model_code)):
        for target in output_dir.glob(pattern):
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)


def save_model_dir(model, processor, output_dir: Path) -> None:
    """Weights, config, processor and code files (+ pipeline registration when cnc_hf.pipeline has it)."""
    try:
        from cnc_hf.pipeline import save_model_dir as save
    except ImportError:
        save = None
    if save is not None:
        save(model, processor, output_dir)
    else:
        model.save_pretrained(output_dir)
        processor.save_pretrained(output_dir)


def write_model_card(output_dir: Path, metrics: dict | None, args) -> None:
    """README.md via cnc_hf.hub when available, else a minimal card with the metrics table."""
    training_args = {k: v for k, v in vars(args).items() if k not in ("overwrite_output_dir", "no_progress")}
    try:
        from cnc_hf.hub import write_model_card as write
    except ImportError:
        write = None
    if write is not None:
        try:
            write(output_dir, metrics=metrics, dataset=str(args.dataset), training_args=training_args)
            return
        except Exception as err:  # the card is the last step: a template problem must not cost the trained model
            print(f"warning: cnc_hf.hub.write_model_card failed ({err}); writing a minimal README.md instead")
    from cnc_hf.metrics import format_metrics_table

    table = format_metrics_table(metrics) if metrics and "per_category" in metrics else "(not evaluated)"
    threshold = (metrics or {}).get("threshold", {})
    (output_dir / "README.md").write_text(
        "---\nlibrary_name: transformers\ntags:\n- anomaly-detection\n- cnc\npipeline_tag: image-anomaly-detection\n---\n"
        f"# CNC anomaly detector\n\nCNC (Cross-modal Normality Constraint, AAAI 2025) trained with `training/train.py` "
        f"on `{args.dataset}` from `{args.clip_model}` for {args.epochs} epochs.\n\n## Test metrics (%)\n\n{table}\n\n"
        f"Decision threshold: {threshold.get('value')} ({threshold.get('method', 'not calibrated')}).\n"
    )


def epoch_log_line(record: dict) -> str:
    parts = [f"{k}={record[k]:.4f}" for k in LOSS_NAMES if record.get(k) is not None]
    return (f"epoch {record['epoch']}/{record['epochs']}  " + "  ".join(parts) +
            f"  ({record['seconds']:.2f}s{', cached features' if record['cached'] else ''})")


FUSED_ADAM_DEVICES = ("cpu", "cuda", "mps", "xpu")  # where torch has the fused Adam kernel


def make_optimizer(params, lr: float, device_type: str = "cpu") -> torch.optim.Optimizer:
    """Adam (the paper's optimizer), fused where torch has the kernel: one kernel for all ~29M trainable
    values instead of a loop of element-wise ops per tensor. Same update rule; measured 0.037 s vs 0.097 s
    per step at ViT-B/16 on the CPU. Elsewhere torch's default implementation.

    A resumed run takes the optimizer settings saved in its checkpoint (exact resume), so a checkpoint
    written before fused Adam resumes unfused.
    """
    return torch.optim.Adam(params, lr=lr, fused=True if device_type in FUSED_ADAM_DEVICES else None)


def train_one_epoch(model, optimizer, accelerator, steps, epoch: int, first_step: int = 0) -> dict:
    """One pass over `steps` (dicts of model inputs); returns each loss part's mean per image over all
    processes (None for parts the model does not have, e.g. L_c1/L_c2 without CNC).

    A NaN/inf loss on any process raises TrainingDivergedError (naming the epoch, the step in the epoch
    and the global step, counted from `first_step`) BEFORE that step's backward and update, so the
    weights stay those of the last finite step.
    """
    sums = torch.zeros(len(LOSS_NAMES) + 1, device=accelerator.device)  # sum of loss part x images, images
    present = set()
    for step, inputs in enumerate(steps, start=1):
        with accelerator.autocast():
            output = model(**inputs, epoch=epoch)  # epoch index from 0: L_c2 joins at theta (Eq. 11)
        # One small all-reduce per step, so that every process stops at the same step (a process leaving the
        # loop alone would hang the others in DDP's gradient all-reduce). It syncs with the device once a step.
        nonfinite = accelerator.reduce((~torch.isfinite(output.loss.detach().float())).float(), reduction="sum")
        if nonfinite.item() > 0:
            value = output.loss.item()
            if accelerator.num_processes > 1:
                value = (f"not finite on {int(nonfinite.item())} of {accelerator.num_processes} processes "
                         f"(this process: {value})")
            raise TrainingDivergedError(f"the loss is {value} at epoch {epoch + 1}, step {step} of the epoch (global "
                                        f"step {first_step + step}); stopped before this step's update")
        accelerator.backward(output.loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        n = next(iter(inputs.values())).shape[0]
        parts = [getattr(output, name) for name in LOSS_NAMES]
        present |= {name for name, part in zip(LOSS_NAMES, parts) if part is not None}
        sums += torch.stack([(p.detach().float() if p is not None else sums.new_zeros(())) * n for p in parts]
                            + [sums.new_tensor(float(n))])
    totals = accelerator.reduce(sums, reduction="sum").tolist()
    return {name: totals[i] / totals[-1] if name in present else None for i, name in enumerate(LOSS_NAMES)}


def check_finite_weights(model, epoch: int) -> None:
    """Refuse to save NaN/inf weights (a finite loss can still come with an infinite gradient on the last step)."""
    bad = [name for name, p in model.named_parameters() if p.requires_grad and not bool(torch.isfinite(p).all())]
    if bad:
        raise TrainingDivergedError(f"the weights became NaN/inf during epoch {epoch + 1} ({', '.join(bad[:3])}"
                                    f"{' ...' if len(bad) > 3 else ''}); they were not saved")


def _diverged_message(err: TrainingDivergedError, output_dir: Path) -> str:
    """The error plus where the run can continue from."""
    from cnc_hf_train.checkpointing import latest_checkpoint

    last = latest_checkpoint(output_dir)
    keep = (f"the last good checkpoint {last} is kept (continue from it with --resume, e.g. with a lower --lr or "
            "--mixed_precision no)" if last is not None else
            "no checkpoint was written before it (--save_every N saves every N epochs)")
    return f"training diverged: {err}; nothing was saved after that point, {keep}"


# ----------------------------------------------------------------------------- the run
def main(argv=None) -> dict:
    """Train, calibrate, save and evaluate; returns a summary (metrics, times, world size)."""
    args = argv if isinstance(argv, argparse.Namespace) else parse_args(argv)
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.utils import set_seed
    from torch.utils.data import DataLoader, Subset
    from tqdm.auto import tqdm

    from cnc_hf.data import make_collate_fn
    from cnc_hf.calibration import fit_category_prototypes
    from cnc_hf.evaluation import calibrate_threshold, evaluate_model, write_metrics
    from cnc_hf.modeling.image_processing_cnc import CNCImageProcessor
    from cnc_hf_train.checkpointing import (load_checkpoint, read_checkpoint_meta, register_trainable_only_hooks,
                                            save_checkpoint)
    from cnc_hf_train.feature_cache import CACHE_DTYPES, FeatureCache
    from cnc_hf_train.sharding import ShardSampler, batches, shard_indices

    # Everything that can be wrong is checked before the first step (and before any file is written).
    check_dataset_name(args)
    check_clip_model(args.clip_model)
    check_model_config(args)
    check_output_dir(args)
    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        cpu=args.cpu, mixed_precision=args.mixed_precision, project_dir=str(output_dir),
        log_with=None if args.report_to == "none" else args.report_to,
        # The MoE may route no token of a batch to an expert: its weights then get no gradient.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    main_process = accelerator.is_main_process
    show = accelerator.is_local_main_process and not args.no_progress
    per_process_batch(args, accelerator.num_processes)
    if args.resume:
        previous = read_checkpoint_meta(args.resume).get("args", {})
        previous = {**LEGACY_RUN_FLAGS, **previous} if previous else previous
        changed = {k: (previous.get(k), getattr(args, k)) for k in RUN_IDENTITY_FLAGS
                   if k in previous and _flag_value(k, previous[k]) != _flag_value(k, _jsonable(getattr(args, k)))}
        if changed:
            raise TrainingSetupError(f"--resume {args.resume}: the checkpoint was trained with other values of "
                                     + ", ".join(f"--{k} (was {a!r}, now {b!r})" for k, (a, b) in changed.items()))
    set_seed(args.seed, device_specific=True)  # per-process noise/dropout streams
    with accelerator.main_process_first():  # "demo" writes its images on first use: once, not per process
        train_split, calibration_split, test_split = load_data(args)
    data_identity = training_data_identity(args, train_split, calibration_split)
    if args.resume:
        check_same_training_data(args.resume, data_identity)
    model = build_model(args)
    processor = CNCImageProcessor(size=args.image_size)
    accelerator.wait_for_everyone()  # all processes passed the checks: now files may be written

    if main_process and output_dir.is_dir():
        from cnc_hf.atomic import finish_interrupted_save

        finish_interrupted_save(output_dir)  # a final save killed half-way: complete it or drop it
    if main_process and args.overwrite_output_dir and args.resume is None:
        remove_previous_run(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(trainable, args.lr, accelerator.device.type)
    model, optimizer = accelerator.prepare(model, optimizer)
    register_trainable_only_hooks(accelerator)
    unwrapped = accelerator.unwrap_model(model)
    world = accelerator.num_processes
    start_epoch = 0
    if args.resume:
        meta = load_checkpoint(accelerator, args.resume)
        start_epoch = meta["epochs_done"]
        accelerator.print(f"resumed from {args.resume} after {start_epoch} epochs")
        if meta.get("world_size", world) != world:
            accelerator.print(f"note: the checkpoint was written by {meta['world_size']} process(es), this run has "
                              f"{world}: the data shards differ, so the run will not repeat the original exactly")
    if args.report_to != "none":
        accelerator.init_trackers("runs", config={k: str(v) for k, v in vars(args).items()})

    # This process's fixed shard of the training set (training/sharding.py).
    shard = shard_indices(len(train_split), accelerator.process_index, world)
    local = Subset(train_split, shard)
    sampler = ShardSampler(len(shard), args.seed, accelerator.process_index)
    collate = make_collate_fn(processor)
    pin = accelerator.device.type == "cuda"
    cache = None
    if args.cache_features and start_epoch < args.epochs:
        paths = train_split["path"]  # the column alone: no image is decoded
        fingerprint = {"clip_model": str(Path(args.clip_model).resolve()) if Path(args.clip_model).exists()
                       else args.clip_model, "config": unwrapped.config.to_diff_dict(), "processor": processor.to_dict(),
                       "paths": [paths[i] for i in shard]}
        fingerprint["config"].pop("threshold", None)
        loader = DataLoader(local, batch_size=args.eval_batch_size, shuffle=False, num_workers=args.num_workers,
                            collate_fn=collate, pin_memory=pin, generator=torch.Generator())  # see the epoch loader
        cache = FeatureCache.build(unwrapped, loader, len(shard), CACHE_DTYPES[args.cache_dtype], args.cache_dir,
                                   fingerprint, accelerator.device, progress=show)
        accelerator.print(f"feature cache: {len(cache)} images/process, {cache.nbytes / 2**20:.1f} MiB/process "
                          f"({args.cache_dtype}), built in {cache.build_seconds:.2f}s")

    steps_per_epoch = math.ceil(len(shard) / args.batch_size)
    accelerator.print(f"training on {len(train_split)} images ({len(shard)} per process x {world} process(es)), "
                      f"{steps_per_epoch} steps/epoch, epochs {start_epoch + 1}..{args.epochs}, "
                      f"{sum(p.numel() for p in trainable):,} trainable parameters"
                      + (f", {len(calibration_split)} held out for the threshold" if calibration_split else ""))
    log_path = output_dir / "train_log.jsonl"
    if main_process:  # a resumed run drops the log lines of epochs after its checkpoint
        lines = log_path.read_text().splitlines() if log_path.exists() else []
        kept = [line for line in lines if (_log_epoch(line) or math.inf) <= start_epoch]  # a torn line from a kill: dropped
        log_path.write_text("".join(line + "\n" for line in kept))
    epoch_seconds = []

    if cache is None:
        # A private generator: the loader's base seed must not consume the global RNG, which the model's
        # noise uses (the cached path has no loader; both must see the same noise).
        train_loader = DataLoader(local, batch_size=args.batch_size, sampler=sampler, num_workers=args.num_workers,
                                  collate_fn=collate, pin_memory=pin, persistent_workers=args.num_workers > 0,
                                  generator=torch.Generator().manual_seed(args.seed))

    for epoch in range(start_epoch, args.epochs):
        model.train()
        sampler.set_epoch(epoch)
        if cache is not None:
            steps = ({"tapped_features": cache.batch(positions, accelerator.device)}
                     for positions in batches(list(sampler), args.batch_size))
        else:
            steps = ({"pixel_values": batch["pixel_values"].to(accelerator.device, non_blocking=True)}
                     for batch in train_loader)
        steps = tqdm(steps, total=steps_per_epoch, desc=f"epoch {epoch + 1}/{args.epochs}", disable=not show,
                     leave=False)
        start = time.perf_counter()
        try:
            losses = train_one_epoch(model, optimizer, accelerator, steps, epoch, first_step=epoch * steps_per_epoch)
            if args.save_every and ((epoch + 1) % args.save_every == 0 or epoch + 1 == args.epochs):
                check_finite_weights(unwrapped, epoch)
        except TrainingDivergedError as err:
            raise TrainingDivergedError(_diverged_message(err, output_dir)) from None
        seconds = time.perf_counter() - start
        epoch_seconds.append(seconds)
        record = {"epoch": epoch + 1, "epochs": args.epochs, "world_size": world, "cached": cache is not None,
                  "seconds": seconds, "c2_active": epoch >= unwrapped.config.theta, **losses}
        accelerator.print(epoch_log_line(record))
        if main_process:
            with open(log_path, "a") as handle:
                handle.write(json.dumps(record) + "\n")
        if args.report_to != "none":
            accelerator.log({f"train/{k}": record[k] for k in LOSS_NAMES if record[k] is not None}
                            | {"train/epoch_seconds": seconds}, step=epoch + 1)
        if args.save_every and ((epoch + 1) % args.save_every == 0 or epoch + 1 == args.epochs):
            save_checkpoint(accelerator, output_dir, epoch + 1,
                            {"args": _jsonable(vars(args)), "world_size": world, "data": data_identity},
                            args.save_total_limit)

    if epoch_seconds:
        try:
            check_finite_weights(unwrapped, args.epochs - 1)  # never calibrate or save a NaN model
        except TrainingDivergedError as err:
            raise TrainingDivergedError(_diverged_message(err, output_dir)) from None
        line = f"mean epoch time {np.mean(epoch_seconds):.2f}s over {len(epoch_seconds)} epoch(s)"
        if cache is not None:  # an uncached epoch also runs the encoder on every image: about the build time
            line += (f" with cached features; building the cache took {cache.build_seconds:.2f}s, about what the "
                     "frozen encoder adds to every uncached epoch")
        accelerator.print(line)

    # Threshold from held-out normal training images (never the test labels), then save the model.
    threshold_details = None
    if calibration_split is not None:
        threshold, threshold_details = calibrate_threshold(
            unwrapped, processor, calibration_split, quantile=args.threshold_quantile, batch_size=args.eval_batch_size,
            accelerator=accelerator, num_workers=args.num_workers, progress=show, return_details=True)
        unwrapped.config.threshold = threshold
        # One threshold per category too: normal scores differ by category, so the pooled one decides badly for some.
        unwrapped.config.category_thresholds = {name: row["quantile"]
                                                for name, row in threshold_details["per_category"].items()}
        accelerator.print(f"decision threshold {threshold:.5f} = {args.threshold_quantile} quantile of "
                          f"{threshold_details['num_calibration_images']} held-out normal images")
    else:
        accelerator.print("no calibration images (--calibration_fraction 0 or single-image categories): "
                          "config.threshold stays unset")
    # Category prototypes from every normal training image (the frozen encoder only), so that the pipeline
    # recognises an image's category, and with it the threshold, when the caller does not name it.
    category_details = fit_category_prototypes(unwrapped, processor, [train_split, calibration_split],
                                               batch_size=args.eval_batch_size, accelerator=accelerator,
                                               num_workers=args.num_workers, progress=show)
    if main_process:
        save_model_dir(unwrapped, processor, output_dir)
    accelerator.wait_for_everyone()

    metrics = None
    if test_split is not None:
        metrics = evaluate_model(model, processor, test_split, batch_size=args.eval_batch_size, accelerator=accelerator,
                                 heatmap_dir=output_dir / "heatmaps" if args.heatmaps else None, progress=show,
                                 max_heatmaps=args.heatmaps, num_workers=args.num_workers)
    summary = {
        "threshold": threshold_details or {"value": None, "method": "not calibrated"},
        "category_recognition": category_details,
        "training": {"world_size": world, "epochs": args.epochs, "trained_epochs": len(epoch_seconds),
                     "resumed_from": args.resume, "cache_features": cache is not None,
                     "cache_build_seconds": cache.build_seconds if cache is not None else None,
                     "mean_epoch_seconds": float(np.mean(epoch_seconds)) if epoch_seconds else None,
                     "num_train_images": len(train_split),
                     "num_calibration_images": len(calibration_split) if calibration_split is not None else 0,
                     "mixed_precision": accelerator.mixed_precision, "dataset": str(args.dataset),
                     "clip_model": str(args.clip_model)},
    }
    if metrics is not None:
        test_threshold = metrics.pop("threshold", None)
        if test_threshold is not None:
            summary["threshold"]["test"] = test_threshold
    if main_process:
        write_metrics(metrics or {}, output_dir, summary)
        write_model_card(output_dir, {**(metrics or {}), **summary} if metrics else None, args)
        if metrics is not None:
            from cnc_hf.metrics import format_metrics_table

            print(format_metrics_table(metrics))
        print(f"finished model in {output_dir}")
    accelerator.wait_for_everyone()
    # Free the DDP wrapper (its reducer holds the process group) before the group is destroyed: freed later,
    # with main's frame, it hung one process at exit in ~1 of 11 two-process runs.
    del model, optimizer
    accelerator.free_memory()
    gc.collect()
    accelerator.end_training()
    return {"metrics": metrics, **summary, "output_dir": str(output_dir)}


def _log_epoch(line: str) -> int | None:
    """The epoch of a train_log.jsonl line, None for an empty or torn one (a kill while it was written)."""
    try:
        return int(json.loads(line)["epoch"])
    except (ValueError, KeyError, TypeError):
        return None


def _jsonable(value):
    return json.loads(json.dumps(value, default=str))


def cli(argv=None) -> int:
    try:
        main(argv)
    except TrainingSetupError as err:
        print(f"train.py: error: {err}", file=sys.stderr)
        return 2
    except TrainingDivergedError as err:
        print(f"train.py: error: {err}", file=sys.stderr)
        leave_process_group()
        return 3
    return 0


def leave_process_group() -> None:
    """After a TrainingDivergedError, which every process raises at the same step: meet at a barrier, then close
    the process group. A process that simply exits while a peer still holds the connection can abort in c10d's
    teardown ("terminate called without an active exception", exit -6 instead of 3); seen in ~1 of 12 runs."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(cli())
