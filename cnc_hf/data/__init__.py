"""Anomaly-detection datasets as 🤗 `datasets`: MVTec AD, VisA, the demo textures, your own image folders,
parquet/Hub copies.

Every loader returns a `DatasetDict` with splits "train" and "test" and the columns of
`cnc_hf.data.common.FEATURES` (image, mask, label, category, defect_type, path), built lazily
from file paths. `make_collate_fn(processor)` turns decoded rows into model batches.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from datasets import DatasetDict

from .common import (
    FEATURES,
    LABEL_NAMES,
    AnomalyCollator,
    AnomalyDatasetError,
    categories_of,
    filter_categories,
    make_collate_fn,
    validate_schema,
)
from .parquet import convert_to_parquet, push_folder_to_hub
from .demo import DEFECT_KINDS, DEMO_CATEGORIES, make_demo_dataset
from .folder import concatenate_anomaly_datasets, load_image_folder, load_image_folders
from .mvtec import load_mvtec_ad
from .visa import load_visa

_MVTEC_NAMES = ("mvtec", "mvtec_ad", "mvtec-ad", "mvtecad")


def load_anomaly_dataset(
    name_or_path: str | os.PathLike,
    data_dir: str | os.PathLike | None = None,
    categories: str | Sequence[str] | None = None,
    **kwargs,
) -> DatasetDict:
    """Load any supported anomaly dataset by name, folder or Hub id.

    - "mvtec" (or "mvtec_ad"): `load_mvtec_ad(data_dir, categories, **kwargs)`.
    - "visa": `load_visa(data_dir, categories=categories, **kwargs)` (kwargs: split_csv, on_bad_file, ...).
    - "demo": the demo textures in MVTec layout at `data_dir`; made there first (seed 0, default
      sizes) when the folder is missing or empty.
    - "folder": your own image folders: `load_image_folder(**kwargs)` (kwargs: normal_dir, abnormal_dir,
      mask_dir, normal_test_dir, test_fraction, category, seed, on_bad_file, ...), or, with `data_dir` a
      JSON/YAML file listing folders per category, `load_image_folders(data_dir, categories, **kwargs)`.
    - anything else: a parquet folder or Hub dataset id, read with `datasets.load_dataset(name_or_path,
      data_dir=data_dir, **kwargs)`, then checked against the cnc-hf schema and filtered to `categories`.
    """
    name = str(name_or_path)
    key = name.lower()
    if key == "folder":
        if data_dir is not None:
            if "normal_dir" in kwargs:
                raise ValueError("load_anomaly_dataset('folder'): give normal_dir=... or a folder list file as "
                                 "data_dir, not both")
            return load_image_folders(data_dir, categories, **kwargs)
        if kwargs.get("normal_dir") is None:
            raise ValueError("load_anomaly_dataset('folder'): normal_dir is required (the folder of good images), "
                             "or data_dir as a JSON/YAML file listing folders per category")
        return filter_categories(load_image_folder(**kwargs), categories, kwargs["normal_dir"])
    if key in _MVTEC_NAMES + ("visa", "demo"):
        if data_dir is None:
            raise ValueError(f"load_anomaly_dataset({name!r}): data_dir is required (the dataset folder on disk)")
        if key == "visa":
            return load_visa(data_dir, categories=categories, **kwargs)
        if key == "demo":
            folder = Path(data_dir).expanduser()
            if not folder.exists() or not any(folder.iterdir()):
                make_demo_dataset(folder)
        return load_mvtec_ad(data_dir, categories, **kwargs)

    import datasets

    try:
        dataset = datasets.load_dataset(name, data_dir=None if data_dir is None else str(data_dir), **kwargs)
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"load_anomaly_dataset: {name!r} is neither 'mvtec', 'visa', 'demo', 'folder', a dataset folder nor a "
            "reachable "
            f"Hub dataset ({err})"
        ) from err
    validate_schema(dataset, name)
    return filter_categories(dataset, categories, name)


__all__ = [
    "AnomalyCollator",
    "AnomalyDatasetError",
    "DEFECT_KINDS",
    "DEMO_CATEGORIES",
    "FEATURES",
    "LABEL_NAMES",
    "categories_of",
    "concatenate_anomaly_datasets",
    "convert_to_parquet",
    "load_anomaly_dataset",
    "load_image_folder",
    "load_image_folders",
    "load_mvtec_ad",
    "load_visa",
    "make_collate_fn",
    "make_demo_dataset",
    "push_folder_to_hub",
    "validate_schema",
]
