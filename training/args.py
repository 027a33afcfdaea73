"""The training flags: four dataclasses parsed by transformers' `HfArgumentParser`, and what they resolve to.

    python -m cnc_hf_train.train --dataset mvtec --data_dir /data/mvtec --output_dir out      # flags
    python -m cnc_hf_train.train run.yaml                                                    # a config file
    python -m cnc_hf_train.train run.json --output_dir out2 --epochs 3                       # file + flags

A config file (.yaml, .yml or .json, first on the command line) holds flag names as keys; flags after it
override its values. `training_args.json` in a finished model dir is such a file (without the
machine-specific keys such as --output_dir and --data_dir, which the card does not publish).

The dataclasses are not `transformers.TrainingArguments`: training is a custom Accelerate loop, and
TrainingArguments brings ~100 Trainer flags (schedulers, logging/eval strategies, hub pushing, ...) that this
loop would silently ignore. Same convention as transformers' no-Trainer example scripts.
"""

import argparse
import dataclasses
import importlib.util
import json
import os
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from cnc_hf.modeling.category import DEFAULT_DISTANCE_FACTOR

EPOCH_DEFAULTS = {"mvtec": 250, "visa": 200, "demo": 15}  # the paper's, and a quick one for the demo set
OTHER_DATASET_EPOCHS = 200
NAMED_DATASETS = ("mvtec", "mvtec_ad", "mvtec-ad", "mvtecad", "visa", "demo", "folder")
DEFAULT_CLIP = "openai/clip-vit-large-patch14-336"
DEFAULT_DEMO_DIR = "data/cnc_demo"
CONFIG_FILE_SUFFIXES = (".json", ".yaml", ".yml")
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


def _has_tensorboard() -> bool:
    return any(importlib.util.find_spec(name) is not None for name in ("tensorboard", "tensorboardX"))


def _folder_flags() -> dict:
    """help/metavar of the `--dataset folder` flags, written once in cnc_hf.data.folder for train, evaluate and
    convert; the DataArguments fields below take them from there."""
    from cnc_hf.data.folder import add_folder_arguments

    parser = argparse.ArgumentParser(add_help=False)
    add_folder_arguments(parser)
    return {action.dest: {"help": action.help, **({"metavar": action.metavar} if action.metavar else {})}
            for action in parser._actions}


_FOLDER = _folder_flags()


def _flag(default=dataclasses.MISSING, help: str = "", **argparse_kwargs):
    """A dataclass field whose metadata HfArgumentParser passes to `add_argument` (help, nargs, metavar, ...)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **argparse_kwargs})
    return field(default=default, metadata={"help": help, **argparse_kwargs})


@dataclass(kw_only=True)
class DataArguments:
    _argument_group_name = "data"

    dataset: str = _flag(help="mvtec, visa, demo (MVTec layout, generated into --data_dir when empty), folder (your "
                              "own image folders: --normal_dir, --abnormal_dir, ...), a parquet dataset dir or a Hub "
                              "dataset id")
    data_dir: str | None = _flag(None, f"dataset folder; required for mvtec/visa, default {DEFAULT_DEMO_DIR} for demo; "
                                       "for folder, optionally a JSON/YAML file listing the folders per category")
    categories: list[str] | None = _flag(None, "train and evaluate on these categories only")
    normal_dir: str | None = _flag(None, **_FOLDER["normal_dir"])
    abnormal_dir: list[str] | None = _flag(None, **_FOLDER["abnormal_dir"])
    mask_dir: str | None = _flag(None, **_FOLDER["mask_dir"])
    normal_test_dir: str | None = _flag(None, **_FOLDER["normal_test_dir"])
    category: str | None = _flag(None, **_FOLDER["category"])
    test_fraction: float | None = _flag(None, **_FOLDER["test_fraction"])
    split_seed: int | None = _flag(None, **_FOLDER["split_seed"])
    max_train_samples: int | None = _flag(None, "train on at most this many images (after the calibration hold-out), "
                                                "for quick runs")
    calibration_fraction: float = _flag(0.1, "fraction of each category's normal training images held out of "
                                             "training to calibrate the decision threshold (at least 1 per category "
                                             "with >= 2 images); 0 disables")
    threshold_quantile: float = _flag(0.99, "threshold = this quantile (linear interpolation) of the held-out images' "
                                            "scores; 1 = max")
    category_distance_factor: float = _flag(DEFAULT_DISTANCE_FACTOR, "an image farther from every category prototype than this factor x "
                                                 "the category's largest training-image distance is 'unrecognised' "
                                                 "(category None, pooled threshold)")
    num_workers: int = _flag(min(4, os.cpu_count() or 1), "data loader worker processes (image decoding)")

    def __post_init__(self):
        _check_fields(self)
        if self.max_train_samples is not None and self.max_train_samples < 1:
            raise TrainingSetupError(f"--max_train_samples must be positive, got {self.max_train_samples}")
        if not 0 <= self.calibration_fraction < 1:
            raise TrainingSetupError(f"--calibration_fraction must be in [0, 1), got {self.calibration_fraction}")
        if not 0 < self.threshold_quantile <= 1:
            raise TrainingSetupError(f"--threshold_quantile must be in (0, 1], got {self.threshold_quantile}")
        if not self.category_distance_factor > 0:
            raise TrainingSetupError(f"--category_distance_factor must be > 0, got {self.category_distance_factor}")
        if self.num_workers < 0:
            raise TrainingSetupError("--save_every, --num_workers and --heatmaps must be >= 0")


@dataclass(kw_only=True)
class ModelArguments:
    _argument_group_name = "model (paper values by default)"

    clip_model: str = _flag(DEFAULT_CLIP, "CLIP checkpoint: a local dir or a Hub id")
    image_size: int = _flag(224, "input resolution (the paper: 224)")
    theta: int = _flag(5, "epoch index (from 0) at which L_c2 joins, Eq. (11)")
    gamma: float = _flag(0.1, "weight of L_c2, Eq. (11)")
    tau: float = _flag(0.001, "temperature of Eq. (4)/(10)")
    num_experts: int = _flag(5, "T, experts of the gated MoE")
    moe_top_k: int = _flag(2, "K, experts per patch")
    prompt_length: int = _flag(12, "M, learnable tokens per prompt")
    promotion_scale: Literal["map", "patch"] = _flag(
        "map", "lambda = 1/||f_i|| of Eq. (5)/(8) over each image's whole HxWxC map (the paper) or over each patch "
               "(a ~sqrt(HW)x larger shift)")
    prompt_training: Literal["alignment", "all"] = _flag(
        "alignment", "the prompts learn from L_c1 (Eq. 4) only and are fixed anchors elsewhere (the paper), or from "
                     "every loss that uses them")
    no_mlf: bool = _flag(False, "ablation: no multi-layer fusion")
    no_cnc: bool = _flag(False, "ablation: no cross-modal normality constraint")
    no_moe: bool = _flag(False, "ablation: no gated mixture of experts")
    # HfArgumentParser gives a list field nargs="+"; with action="append" each use of the flag adds a list,
    # flattened below, so the flag stays repeatable as before.
    config_override: list[str] = _flag([], "set any other CNCConfig field (VALUE parsed as JSON when it can be), "
                                           "repeatable, e.g. --config_override noise_std=0.05",
                                       action="append", metavar="KEY=VALUE")

    def __post_init__(self):
        self.config_override = [item for group in self.config_override
                                for item in ([group] if isinstance(group, str) else group)]
        _check_fields(self)
        for name in ("image_size", "num_experts", "moe_top_k", "prompt_length"):
            if getattr(self, name) < 1:
                raise TrainingSetupError(f"--{name} must be positive, got {getattr(self, name)}")


@dataclass(kw_only=True)
class CNCTrainingArguments:
    _argument_group_name = "training"

    protocol: Literal["practical", "paper"] = _flag(
        "practical", f"paper: {PAPER_PROTOCOL}; the model then has no decision threshold (the paper reports "
                     "threshold-free metrics). practical: hold out --calibration_fraction to calibrate the threshold, "
                     "Gaussian-blur the map (sigma 4), --batch_size per process")
    output_dir: str = _flag(help="where the finished model, logs and checkpoints go")
    overwrite_output_dir: bool = _flag(False, "train into an output dir that holds another run (its checkpoints are "
                                              "deleted)")
    epochs: int | None = _flag(None, "default: 250 for mvtec, 200 for visa (the paper), 15 for demo, 200 otherwise")
    batch_size: int = _flag(8, "images per process per step (the paper: 8 on one GPU); with --protocol paper, per "
                               "step over all processes")
    lr: float = _flag(1e-3, "Adam learning rate (the paper: 0.001)")
    seed: int = _flag(0, "seed of initialisation, hold-out split and data order")
    mixed_precision: Literal["no", "fp16", "bf16"] | None = _flag(
        None, "autocast for training (bf16 works on CPU); default: the accelerate config's")
    cpu: bool = _flag(False, "train on the CPU even if a GPU is present")
    cache_features: bool = _flag(False, "compute the frozen CLIP features of each training image once and reuse them "
                                        "every epoch (exact: CLIP is frozen, no augmentation); much faster epochs")
    cache_dir: str | None = _flag(None, "keep the feature cache in memory-mapped files here (reused by later runs "
                                        "with the same model and data); default: in memory")
    cache_dtype: Literal["float32", "float16", "bfloat16"] = _flag(
        "float16", "storage dtype of the feature cache (ViT-L/14, MVTec AD: 5.7 GB in float16)")
    save_every: int = _flag(10, "checkpoint every N epochs (and after the last)")
    save_total_limit: int = _flag(2, "keep only the newest N checkpoints")
    resume: str | None = _flag(None, "continue from the latest complete checkpoint in output_dir/checkpoints (or from "
                                     "the given checkpoint dir)", nargs="?", const="latest", metavar="CHECKPOINT")
    report_to: Literal["tensorboard", "none"] = _flag("tensorboard" if _has_tensorboard() else "none",
                                                      "per-epoch loss logging besides stdout and train_log.jsonl")
    no_progress: bool = _flag(False, "no progress bars")

    def __post_init__(self):
        _check_fields(self)
        if self.batch_size < 1:
            raise TrainingSetupError(f"--batch_size must be positive, got {self.batch_size}")
        if self.epochs is not None and self.epochs < 0:
            raise TrainingSetupError(f"--epochs must be positive, got {self.epochs}")
        if self.save_every < 0:
            raise TrainingSetupError("--save_every, --num_workers and --heatmaps must be >= 0")
        if self.report_to == "tensorboard" and not _has_tensorboard():
            raise TrainingSetupError("--report_to tensorboard needs the tensorboard package (pip install tensorboard)")


@dataclass(kw_only=True)
class EvaluationArguments:
    _argument_group_name = "evaluation"

    no_eval: bool = _flag(False, "skip the test-set evaluation at the end")
    eval_batch_size: int = _flag(16, "batch size for evaluation and caching")
    heatmaps: int = _flag(0, "write N heat-map PNGs of test images to output_dir/heatmaps", metavar="N")

    def __post_init__(self):
        _check_fields(self)
        if self.eval_batch_size < 1:
            raise TrainingSetupError(f"--eval_batch_size must be positive, got {self.eval_batch_size}")
        if self.heatmaps < 0:
            raise TrainingSetupError("--save_every, --num_workers and --heatmaps must be >= 0")


ARGUMENT_CLASSES = (DataArguments, ModelArguments, CNCTrainingArguments, EvaluationArguments)
FLAG_NAMES = tuple(f.name for cls in ARGUMENT_CLASSES for f in dataclasses.fields(cls))


def _check_fields(arguments) -> None:
    """What argparse checks on the command line, checked again for values from a config file or code:
    a choice among the allowed ones; lists as lists (a tuple given in code would not compare equal to the list a
    checkpoint's JSON gives back on --resume)."""
    hints = typing.get_type_hints(type(arguments))
    for f in dataclasses.fields(arguments):
        value, kind = getattr(arguments, f.name), hints[f.name]
        options = [a for a in typing.get_args(kind) if typing.get_origin(a) is Literal] or [kind]
        choices = typing.get_args(options[0]) if typing.get_origin(options[0]) is Literal else None
        if choices and value is not None and value not in choices:
            raise TrainingSetupError(f"--{f.name}: invalid choice {value!r} (choose from "
                                     + ", ".join(repr(c) for c in choices) + ")")
        if isinstance(value, tuple):
            setattr(arguments, f.name, list(value))


# ----------------------------------------------------------------------------- parsing
class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show defaults, keep the description's and epilog's line breaks."""


def make_parser(**kwargs):
    """The HfArgumentParser of the four argument dataclasses (kwargs: prog, description, epilog)."""
    from transformers import HfArgumentParser

    return HfArgumentParser(ARGUMENT_CLASSES, formatter_class=HelpFormatter, **kwargs)


def read_config_file(path: str | os.PathLike) -> dict:
    """A run's flags from a .json/.yaml/.yml file (flag names as keys); unknown keys are refused."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text()
        values = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text) or {}
    except (OSError, ValueError, yaml.YAMLError) as err:
        raise TrainingSetupError(f"config file {path}: {err}") from None
    if not isinstance(values, dict):
        raise TrainingSetupError(f"{path}: expected a mapping of flag names to values, got {type(values).__name__}")
    unknown = sorted(set(values) - set(FLAG_NAMES))
    if unknown:
        raise TrainingSetupError(f"{path}: unknown flag(s) {', '.join(unknown)}; the keys are the flag names of "
                                 "--help without the dashes")
    return values


def parse_args_into_dataclasses(argv=None, parser=None) -> tuple:
    """(DataArguments, ModelArguments, CNCTrainingArguments, EvaluationArguments) from the command line, whose
    first item may be a config file: its values become the defaults, so flags after it override them.

    Not HfArgumentParser.parse_yaml_file/parse_json_file: they take the file alone (no flags after it) and
    skip argparse's type conversion of the values; defaults set on the parser get both."""
    parser = parser or make_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not argv[0].startswith("-") and argv[0].lower().endswith(CONFIG_FILE_SUFFIXES):
        values = read_config_file(argv.pop(0))
        parser.set_defaults(**values)
        # argparse checks required flags on the command line only: a required value from the file goes there,
        # first, so that a flag given later still wins.
        required = [f"--{a.dest}" for a in parser._actions if a.required and a.dest in values]
        argv = [token for flag in required for token in (flag, str(values[flag[2:]]))] + argv
    namespace = parser.parse_args(argv)  # argparse's own errors (exit 2) for unknown flags and bad values
    return tuple(cls(**{f.name: getattr(namespace, f.name) for f in dataclasses.fields(cls)})
                 for cls in ARGUMENT_CLASSES)


def parse_args(argv=None, parser=None) -> argparse.Namespace:
    """The flags as one namespace, with the defaults that depend on other flags resolved (see `resolve`)."""
    return resolve(argparse.Namespace(**merge(parse_args_into_dataclasses(argv, parser))))


def merge(arguments) -> dict:
    """One dict of flag name -> value from the argument dataclasses (`dataclasses.asdict` of each)."""
    return {name: value for group in arguments for name, value in dataclasses.asdict(group).items()}


def as_dataclasses(args: argparse.Namespace) -> tuple:
    """The argument dataclasses of a flag namespace (validated again); flags it lacks take their defaults."""
    return tuple(cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)})
                 for cls in ARGUMENT_CLASSES)


def training_args(args: argparse.Namespace) -> dict:
    """The run's flags as JSON values, `dataclasses.asdict` of the argument dataclasses: what a checkpoint
    records and `training_args.json` holds; read back by `parse_args([path])` as a config file."""
    return merge(as_dataclasses(args))


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Defaults that depend on other flags: --protocol paper holds nothing out, the epochs by data set, the
    demo's folder. Applying it twice changes nothing, so a written training_args.json parses to the same run."""
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


def saves_after(args, epoch: int) -> bool:
    """A checkpoint after epoch index `epoch`: every --save_every epochs and after the last (written once here)."""
    return bool(args.save_every) and ((epoch + 1) % args.save_every == 0 or epoch + 1 == args.epochs)


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
