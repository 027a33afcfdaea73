"""Everything a run checks before its first step (and before it writes any file), and the previous run in
--output_dir: bad flags, paths, CLIP dirs and model settings fail here with a TrainingSetupError naming the flag."""

import json
import os
import shutil
from pathlib import Path

from cnc_hf.hub_ids import is_hub_id
from cnc_hf_train.args import LEGACY_RUN_FLAGS, NAMED_DATASETS, RUN_IDENTITY_FLAGS, TrainingSetupError, config_overrides


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
    elif name.startswith((".", "/", "~")) or not is_hub_id(name, bare=True):
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
    if not is_hub_id(name):
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


def check_same_run(args, training_args: dict) -> None:
    """--resume: the checkpoint was trained with the same run-identity flags (RUN_IDENTITY_FLAGS) as this run."""
    from cnc_hf_train.checkpointing import read_checkpoint_meta

    previous = read_checkpoint_meta(args.resume).get("args", {})
    previous = {**LEGACY_RUN_FLAGS, **previous} if previous else previous
    changed = {k: (previous.get(k), training_args[k]) for k in RUN_IDENTITY_FLAGS
               if k in previous and _flag_value(k, previous[k]) != _flag_value(k, training_args[k])}
    if changed:
        raise TrainingSetupError(f"--resume {args.resume}: the checkpoint was trained with other values of "
                                 + ", ".join(f"--{k} (was {a!r}, now {b!r})" for k, (a, b) in changed.items()))


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
