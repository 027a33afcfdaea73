"""What a run leaves after its last epoch: decision thresholds calibrated on held-out normal training
images, the category prototypes that recognise an image's category, the saved model dir, the test metrics, metrics.json/md and the model card.

Each step is one function of the run (cnc_hf_train.train.TrainingRun), called in order by
`cnc_hf_train.train.finish`; a new final step (e.g. per-category prototypes) is one more function here.
"""

from pathlib import Path

import numpy as np

from cnc_hf_train.args import training_args as flags_of


def calibrate_thresholds(run) -> dict | None:
    """config.threshold (pooled) and config.category_thresholds from the held-out normal training images (never
    the test labels); returns their details for metrics.json, None without calibration images."""
    from cnc_hf.evaluation import calibrate_threshold

    args, accelerator, model = run.args, run.accelerator, run.unwrapped
    if run.calibration_split is None:
        accelerator.print("no calibration images (--calibration_fraction 0 or single-image categories): "
                          "config.threshold stays unset")
        return None
    threshold, details = calibrate_threshold(
        model, run.processor, run.calibration_split, quantile=args.threshold_quantile, batch_size=args.eval_batch_size,
        accelerator=accelerator, num_workers=args.num_workers, progress=run.show, return_details=True)
    model.config.threshold = threshold
    # One threshold per category too: normal scores differ by category, so the pooled one decides badly for some.
    model.config.category_thresholds = {name: row["quantile"] for name, row in details["per_category"].items()}
    accelerator.print(f"decision threshold {threshold:.5f} = {args.threshold_quantile} quantile of "
                      f"{details['num_calibration_images']} held-out normal images")
    return details


def fit_prototypes(run) -> dict:
    """The category prototypes (weights) and distance limits (config) from every normal training image, held-out
    ones included: the frozen encoder only, once per image. Returns their summary for metrics.json."""
    from cnc_hf.calibration import fit_category_prototypes

    args = run.args
    details = fit_category_prototypes(run.unwrapped, run.processor, [run.train_split, run.calibration_split],
                                      batch_size=args.eval_batch_size, accelerator=run.accelerator,
                                      num_workers=args.num_workers, progress=run.show,
                                      factor=args.category_distance_factor)
    run.accelerator.print(f"category prototypes for {len(details['per_category'])} categories "
                          f"(unrecognised beyond {args.category_distance_factor:g}x each one's largest training distance)")
    return details


def evaluate_test_split(run) -> dict | None:
    """Test metrics (cnc_hf.metrics layout) on all processes, heat maps if asked; None with --no_eval."""
    from cnc_hf.evaluation import evaluate_model

    args = run.args
    if run.test_split is None:
        return None
    return evaluate_model(run.model, run.processor, run.test_split, batch_size=args.eval_batch_size,
                          accelerator=run.accelerator, heatmap_dir=run.output_dir / "heatmaps" if args.heatmaps else None,
                          progress=run.show, max_heatmaps=args.heatmaps, num_workers=args.num_workers)


def run_summary(run, threshold_details: dict | None, metrics: dict | None, category_details: dict | None = None) -> dict:
    """The threshold, the category prototypes and how the run went, for metrics.json, the card and main()'s
    return value."""
    args, cache, seconds = run.args, run.cache, run.epoch_seconds
    summary = {
        "threshold": threshold_details or {"value": None, "method": "not calibrated"},
        "category_recognition": category_details,
        "training": {"world_size": run.world, "epochs": args.epochs, "trained_epochs": len(seconds),
                     "resumed_from": args.resume, "cache_features": cache is not None,
                     "cache_build_seconds": cache.build_seconds if cache is not None else None,
                     "mean_epoch_seconds": float(np.mean(seconds)) if seconds else None,
                     "num_train_images": len(run.train_split),
                     "num_calibration_images": len(run.calibration_split) if run.calibration_split is not None else 0,
                     "mixed_precision": run.accelerator.mixed_precision, "dataset": str(args.dataset),
                     "clip_model": str(args.clip_model)},
    }
    test_threshold = metrics.pop("threshold", None) if metrics is not None else None
    if test_threshold is not None:
        summary["threshold"]["test"] = test_threshold
    return summary


def write_reports(run, metrics: dict | None, summary: dict) -> None:
    """metrics.json / metrics.md, the model card (+ training_args.json) and the table on stdout; main process."""
    from cnc_hf.evaluation import write_metrics

    write_metrics(metrics or {}, run.output_dir, summary)
    write_model_card(run.output_dir, {**(metrics or {}), **summary} if metrics else None, run.args, run.flags)
    if metrics is not None:
        from cnc_hf.metrics import format_metrics_table

        print(format_metrics_table(metrics))
    print(f"finished model in {run.output_dir}")


def save_model_dir(model, processor, output_dir: Path) -> None:
    """Weights, config, processor and code files (cnc_hf.model_dir.save_model_dir)."""
    from cnc_hf.model_dir import save_model_dir as save

    save(model, processor, output_dir)


def write_model_card(output_dir: Path, metrics: dict | None, args, training_args: dict | None = None) -> None:
    """README.md by cnc_hf.model_card, else (a failing template) a minimal card with the metrics table.
    `training_args` (default: those of `args`) go to training_args.json through model_card.public_training_args,
    which leaves out the machine-specific flags."""
    from cnc_hf.model_card import write_model_card as write

    try:
        write(output_dir, metrics=metrics, dataset=str(args.dataset), training_args=training_args or flags_of(args))
        return
    except Exception as err:  # the card is the last step: a template problem must not cost the trained model
        print(f"warning: cnc_hf.model_card.write_model_card failed ({err}); writing a minimal README.md instead")
    from cnc_hf.metrics import format_metrics_table

    table = format_metrics_table(metrics) if metrics and "per_category" in metrics else "(not evaluated)"
    threshold = (metrics or {}).get("threshold", {})
    (output_dir / "README.md").write_text(
        "---\nlibrary_name: transformers\ntags:\n- anomaly-detection\n- cnc\npipeline_tag: other\n---\n"
        f"# CNC anomaly detector\n\nCNC (Cross-modal Normality Constraint, AAAI 2025) trained with `training/train.py` "
        f"on `{args.dataset}` from `{args.clip_model}` for {args.epochs} epochs.\n\n## Test metrics (%)\n\n{table}\n\n"
        f"Decision threshold: {threshold.get('value')} ({threshold.get('method', 'not calibrated')}).\n"
    )
