"""Train CNC (Cross-modal Normality Constraint, AAAI 2025) with Accelerate; the output dir is a finished model.

One GPU, many GPUs or many machines, the same script. Installed, it is the module
`cnc_hf_train.train` (the repository's `training/` folder), runnable from any folder:

    cnc-hf train --dataset mvtec --data_dir /data/mvtec_ad --output_dir out/cnc-mvtec
    accelerate launch --multi_gpu --num_processes 8 -m cnc_hf_train.train --dataset visa --data_dir /data/visa ...
    accelerate launch --multi_gpu --num_processes 2 -m cnc_hf_train.train --cpu ...   (2 CPU processes, gloo)

From a clone after `make install` (an editable install), `training/train.py` is the same file. The flags
(training/args.py) can come from a config file, flag names as keys; flags after it override it:

    cnc-hf train run.yaml --output_dir out/cnc-mvtec        (or run.json, e.g. a model's training_args.json)

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
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cnc_hf_train.args import (  # noqa: F401  (re-exported: train.py was their home)
    DEFAULT_CLIP, DEFAULT_DEMO_DIR, EPOCH_DEFAULTS, LEGACY_RUN_FLAGS, NAMED_DATASETS, OTHER_DATASET_EPOCHS,
    PAPER_PROTOCOL, RUN_IDENTITY_FLAGS, CNCTrainingArguments, DataArguments, EvaluationArguments, ModelArguments,
    TrainingSetupError, config_overrides, make_parser, per_process_batch, saves_after, training_args)
from cnc_hf_train.args import _has_tensorboard  # noqa: F401
from cnc_hf_train.args import parse_args as _parse_args
from cnc_hf_train.checks import (  # noqa: F401
    RUN_OUTPUTS, _check_replaceable, _flag_value, check_clip_model, check_dataset_name, check_folder_flags,
    check_model_config, check_output_dir, check_same_run, check_same_training_data, check_writable,
    remove_previous_run)
from cnc_hf_train.data import check_test_split, load_data, split_train_calibration, training_data_identity  # noqa: F401
from cnc_hf_train.outputs import save_model_dir, write_model_card  # noqa: F401

CONFIGS_DIR = Path(__file__).resolve().parent / "configs"  # package data of cnc_hf_train (`--config_file` of accelerate)
LOSS_NAMES = ("loss", "loss_distill", "loss_constraint", "loss_moe", "loss_c1", "loss_c2")


class TrainingDivergedError(RuntimeError):
    """The loss (or the weights) became NaN/inf; training stopped before saving anything from that point."""


# ----------------------------------------------------------------------------- arguments (training/args.py)
def build_parser():
    """The HfArgumentParser of training/args.py, with this module's docstring as --help's text."""
    intro, _, rest = __doc__.partition("Defaults are the paper's")
    defaults, _, choices = rest.partition("Design choices (also in --help):")
    return make_parser(
        prog="cnc_hf_train.train",
        description=intro.strip() + "\n\nDefaults are the paper's" + defaults.split("What the output dir")[0].rstrip(),
        epilog="design choices:" + choices.rstrip() + "\n\nAccelerate configs and an example run config (train_mvtec.yaml) "
               f"shipped with cnc-hf: {CONFIGS_DIR}",
    )


def parse_args(argv=None) -> argparse.Namespace:
    """The flags (or a .yaml/.json config file first, then flags) as one namespace; see training/args.py."""
    return _parse_args(argv, build_parser())


# ----------------------------------------------------------------------------- setup
@dataclass
class TrainingRun:
    """What setup() prepares and the epochs and finish() use; one per call of main()."""

    args: argparse.Namespace
    flags: dict  # the flags as given (before --protocol paper splits the batch): training_args.json, the card
    accelerator: Any
    model: Any  # as prepared by Accelerate (DDP-wrapped with several processes)
    optimizer: Any
    processor: Any
    train_split: Any
    calibration_split: Any
    test_split: Any
    data_identity: dict
    start_epoch: int = 0
    sampler: Any = None
    steps_per_epoch: int = 0
    cache: Any = None  # the frozen encoder's features (--cache_features), else None and train_loader feeds images
    train_loader: Any = None
    epoch_seconds: list = field(default_factory=list)

    @property
    def output_dir(self) -> Path:
        return Path(self.args.output_dir)

    @property
    def unwrapped(self):
        return self.accelerator.unwrap_model(self.model)

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def main_process(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def show(self) -> bool:  # progress bars
        return self.accelerator.is_local_main_process and not self.args.no_progress

    @property
    def log_path(self) -> Path:
        return self.output_dir / "train_log.jsonl"


def setup(args) -> TrainingRun:
    """Everything before the first epoch. All that can be wrong is checked before any file is written; then
    the output dir, the model on its device(s), a resumed checkpoint, this process's data shard and log."""
    from accelerate.utils import set_seed
    from cnc_hf.modeling.image_processing_cnc import CNCImageProcessor

    check_dataset_name(args)
    check_clip_model(args.clip_model)
    check_model_config(args)
    check_output_dir(args)
    flags = training_args(args)
    accelerator = make_accelerator(args)
    per_process_batch(args, accelerator.num_processes)
    if args.resume:
        check_same_run(args, training_args(args))
    set_seed(args.seed, device_specific=True)  # per-process noise/dropout streams
    with accelerator.main_process_first():  # "demo" writes its images on first use: once, not per process
        train_split, calibration_split, test_split = load_data(args)
    data_identity = training_data_identity(args, train_split, calibration_split)
    if args.resume:
        check_same_training_data(args.resume, data_identity)
    model = build_model(args)
    accelerator.wait_for_everyone()  # all processes passed the checks: now files may be written
    prepare_output_dir(args, accelerator)
    run = TrainingRun(args, flags, accelerator, model, None, CNCImageProcessor(size=args.image_size), train_split,
                      calibration_split, test_split, data_identity)
    prepare_model(run)
    prepare_steps(run)
    start_log(run)
    return run


def make_accelerator(args):
    from accelerate import Accelerator, DistributedDataParallelKwargs

    return Accelerator(
        cpu=args.cpu, mixed_precision=args.mixed_precision, project_dir=str(args.output_dir),
        log_with=None if args.report_to == "none" else args.report_to,
        # The MoE may route no token of a batch to an expert: its weights then get no gradient.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )


def build_model(args):
    from cnc_hf.modeling import CNCModel

    try:
        return CNCModel.from_clip_pretrained(args.clip_model, **config_overrides(args))
    except TrainingSetupError:
        raise
    except (OSError, ValueError) as err:
        raise TrainingSetupError(f"--clip_model {args.clip_model}: cannot build the model: {err}") from err


def prepare_output_dir(args, accelerator) -> None:
    """Complete (or drop) a final save that was killed half-way, clear the previous run with
    --overwrite_output_dir (not when resuming), create the dir; the main process writes, all meet after."""
    output_dir = Path(args.output_dir)
    if accelerator.is_main_process and output_dir.is_dir():
        from cnc_hf.atomic import finish_interrupted_save

        finish_interrupted_save(output_dir)
    if accelerator.is_main_process and args.overwrite_output_dir and args.resume is None:
        remove_previous_run(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()


def prepare_model(run: TrainingRun) -> None:
    """Adam over the trainable parameters only, Accelerate's wrapping, a resumed checkpoint, the trackers."""
    from cnc_hf_train.checkpointing import load_checkpoint, register_trainable_only_hooks

    accelerator, args = run.accelerator, run.args
    trainable = [p for p in run.model.parameters() if p.requires_grad]
    optimizer = make_optimizer(trainable, args.lr, accelerator.device.type)
    run.model, run.optimizer = accelerator.prepare(run.model, optimizer)
    register_trainable_only_hooks(accelerator)
    if args.resume:
        meta = load_checkpoint(accelerator, args.resume)
        run.start_epoch = meta["epochs_done"]
        accelerator.print(f"resumed from {args.resume} after {run.start_epoch} epochs")
        if meta.get("world_size", run.world) != run.world:
            accelerator.print(f"note: the checkpoint was written by {meta['world_size']} process(es), this run has "
                              f"{run.world}: the data shards differ, so the run will not repeat the original exactly")
    if args.report_to != "none":
        accelerator.init_trackers("runs", config={k: str(v) for k, v in vars(args).items()})


def prepare_steps(run: TrainingRun) -> None:
    """This process's fixed shard of the training set (training/sharding.py), reshuffled each epoch by its
    sampler, and where its steps come from: the feature cache (--cache_features) or a DataLoader of images."""
    from torch.utils.data import DataLoader, Subset

    from cnc_hf.data import make_collate_fn
    from cnc_hf_train.sharding import ShardSampler, shard_indices

    args, accelerator = run.args, run.accelerator
    shard = shard_indices(len(run.train_split), accelerator.process_index, run.world)
    local = Subset(run.train_split, shard)
    run.sampler = ShardSampler(len(shard), args.seed, accelerator.process_index)
    run.steps_per_epoch = math.ceil(len(shard) / args.batch_size)
    collate = make_collate_fn(run.processor)
    pin = accelerator.device.type == "cuda"
    if args.cache_features and run.start_epoch < args.epochs:
        run.cache = build_feature_cache(run, shard, DataLoader(
            local, batch_size=args.eval_batch_size, shuffle=False, num_workers=args.num_workers, collate_fn=collate,
            pin_memory=pin, generator=torch.Generator()))  # see the epoch loader below
    else:
        # A private generator: the loader's base seed must not consume the global RNG, which the model's
        # noise uses (the cached path has no loader; both must see the same noise).
        run.train_loader = DataLoader(local, batch_size=args.batch_size, sampler=run.sampler,
                                      num_workers=args.num_workers, collate_fn=collate, pin_memory=pin,
                                      persistent_workers=args.num_workers > 0,
                                      generator=torch.Generator().manual_seed(args.seed))
    accelerator.print(f"training on {len(run.train_split)} images ({len(shard)} per process x {run.world} "
                      f"process(es)), {run.steps_per_epoch} steps/epoch, epochs {run.start_epoch + 1}..{args.epochs}, "
                      f"{sum(p.numel() for p in run.model.parameters() if p.requires_grad):,} trainable parameters"
                      + (f", {len(run.calibration_split)} held out for the threshold" if run.calibration_split else ""))


def build_feature_cache(run: TrainingRun, shard: list, loader):
    """The frozen encoder's tapped features of this process's shard (training/feature_cache.py), keyed by a
    fingerprint of the CLIP model, the config, the processor and the image paths."""
    from cnc_hf_train.feature_cache import CACHE_DTYPES, FeatureCache

    args, model = run.args, run.unwrapped
    paths = run.train_split["path"]  # the column alone: no image is decoded
    fingerprint = {"clip_model": str(Path(args.clip_model).resolve()) if Path(args.clip_model).exists()
                   else args.clip_model, "config": model.config.to_diff_dict(), "processor": run.processor.to_dict(),
                   "paths": [paths[i] for i in shard]}
    fingerprint["config"].pop("threshold", None)
    cache = FeatureCache.build(model, loader, len(shard), CACHE_DTYPES[args.cache_dtype], args.cache_dir,
                               fingerprint, run.accelerator.device, progress=run.show)
    run.accelerator.print(f"feature cache: {len(cache)} images/process, {cache.nbytes / 2**20:.1f} MiB/process "
                          f"({args.cache_dtype}), built in {cache.build_seconds:.2f}s")
    return cache


def start_log(run: TrainingRun) -> None:
    """train_log.jsonl: a resumed run drops the lines of epochs after its checkpoint (and a torn line from a kill)."""
    if run.main_process:
        lines = run.log_path.read_text().splitlines() if run.log_path.exists() else []
        kept = [line for line in lines if (_log_epoch(line) or math.inf) <= run.start_epoch]
        run.log_path.write_text("".join(line + "\n" for line in kept))


# ----------------------------------------------------------------------------- one epoch
def run_epoch(run: TrainingRun, epoch: int) -> None:
    """Epoch index `epoch` (from 0): the steps, the log line, and a checkpoint when --save_every says so."""
    from tqdm.auto import tqdm

    from cnc_hf_train.checkpointing import save_checkpoint

    args, accelerator = run.args, run.accelerator
    run.model.train()
    run.sampler.set_epoch(epoch)
    steps = tqdm(epoch_steps(run), total=run.steps_per_epoch, desc=f"epoch {epoch + 1}/{args.epochs}",
                 disable=not run.show, leave=False)
    saving = saves_after(args, epoch)
    start = time.perf_counter()
    try:
        losses = train_one_epoch(run.model, run.optimizer, accelerator, steps, epoch,
                                 first_step=epoch * run.steps_per_epoch)
        if saving:
            check_finite_weights(run.unwrapped, epoch)
    except TrainingDivergedError as err:
        raise TrainingDivergedError(_diverged_message(err, run.output_dir)) from None
    run.epoch_seconds.append(time.perf_counter() - start)
    log_epoch(run, epoch, losses)
    if saving:
        save_checkpoint(accelerator, run.output_dir, epoch + 1,
                        {"args": training_args(args), "world_size": run.world, "data": run.data_identity},
                        args.save_total_limit)


def epoch_steps(run: TrainingRun):
    """The epoch's model inputs: cached features in the sampler's order, or decoded image batches."""
    device, batch_size = run.accelerator.device, run.args.batch_size
    if run.cache is not None:
        from cnc_hf_train.sharding import batches

        return ({"tapped_features": run.cache.batch(positions, device)}
                for positions in batches(list(run.sampler), batch_size))
    return ({"pixel_values": batch["pixel_values"].to(device, non_blocking=True)} for batch in run.train_loader)


def log_epoch(run: TrainingRun, epoch: int, losses: dict) -> None:
    """One line on stdout, one record in train_log.jsonl, the losses to the tracker."""
    seconds = run.epoch_seconds[-1]
    record = {"epoch": epoch + 1, "epochs": run.args.epochs, "world_size": run.world, "cached": run.cache is not None,
              "seconds": seconds, "c2_active": epoch >= run.unwrapped.config.theta, **losses}
    run.accelerator.print(epoch_log_line(record))
    if run.main_process:
        with open(run.log_path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
    if run.args.report_to != "none":
        run.accelerator.log({f"train/{k}": record[k] for k in LOSS_NAMES if record[k] is not None}
                            | {"train/epoch_seconds": seconds}, step=epoch + 1)


# ----------------------------------------------------------------------------- pieces
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


# ----------------------------------------------------------------------------- finish
def finish(run: TrainingRun) -> dict:
    """After the last epoch, in order (training/outputs.py): the weights checked finite, the decision
    thresholds from held-out images, the model dir saved, the test metrics, metrics.json/md and the card.
    A step that changes the saved model (as the category prototypes) goes before the save."""
    from cnc_hf_train import outputs

    check_trained_weights(run)
    threshold_details = outputs.calibrate_thresholds(run)
    category_details = outputs.fit_prototypes(run)
    if run.main_process:
        save_model_dir(run.unwrapped, run.processor, run.output_dir)
    run.accelerator.wait_for_everyone()
    metrics = outputs.evaluate_test_split(run)
    summary = outputs.run_summary(run, threshold_details, metrics, category_details)
    if run.main_process:
        outputs.write_reports(run, metrics, summary)
    run.accelerator.wait_for_everyone()
    end_run(run)
    return {"metrics": metrics, **summary, "output_dir": str(run.output_dir)}


def check_trained_weights(run: TrainingRun) -> None:
    """Never calibrate or save a NaN model; then the mean epoch time (and what the feature cache saved)."""
    if not run.epoch_seconds:
        return
    try:
        check_finite_weights(run.unwrapped, run.args.epochs - 1)
    except TrainingDivergedError as err:
        raise TrainingDivergedError(_diverged_message(err, run.output_dir)) from None
    line = f"mean epoch time {np.mean(run.epoch_seconds):.2f}s over {len(run.epoch_seconds)} epoch(s)"
    if run.cache is not None:  # an uncached epoch also runs the encoder on every image: about the build time
        line += (f" with cached features; building the cache took {run.cache.build_seconds:.2f}s, about what the "
                 "frozen encoder adds to every uncached epoch")
    run.accelerator.print(line)


def end_run(run: TrainingRun) -> None:
    """Free the DDP wrapper (its reducer holds the process group) before the group is destroyed: freed later,
    with main's frame, it hung one process at exit in ~1 of 11 two-process runs."""
    run.model = run.optimizer = run.train_loader = None
    run.accelerator.free_memory()
    gc.collect()
    run.accelerator.end_training()


# ----------------------------------------------------------------------------- the run
def main(argv=None) -> dict:
    """Train, calibrate, save and evaluate; returns a summary (metrics, times, world size).

    `argv`: command-line tokens (a .yaml/.json config file may come first), or a namespace from parse_args."""
    args = argv if isinstance(argv, argparse.Namespace) else parse_args(argv)
    run = setup(args)
    for epoch in range(run.start_epoch, args.epochs):
        run_epoch(run, epoch)
    return finish(run)


def _log_epoch(line: str) -> int | None:
    """The epoch of a train_log.jsonl line, None for an empty or torn one (a kill while it was written)."""
    try:
        return int(json.loads(line)["epoch"])
    except (ValueError, KeyError, TypeError):
        return None


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
