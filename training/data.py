"""The run's images: training / calibration hold-out / test splits, and their identity for --resume."""

from pathlib import Path

import numpy as np

from cnc_hf_train.args import TrainingSetupError


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
