"""Command line: convert a local MVTec AD / VisA / demo folder, or your own image folders, into the Hub
form, optionally push it.

    python -m cnc_hf.data.convert --format mvtec --root /data/mvtec_ad --output_dir mvtec_parquet \
        [--categories bottle cable] [--push_to_hub org/mvtec-ad] [--private]
    python -m cnc_hf.data.convert --format folder --normal_dir my_part/good --abnormal_dir my_part/scratch \
        my_part/dent [--mask_dir my_part/masks] [--category my_part] --output_dir my_part_parquet
    python -m cnc_hf.data.convert --format folder --root folders.yaml --output_dir parts_parquet   (per category)

`path` is stored relative to `--root` (for --format folder: the folder that holds all the images), so no
local folder names reach the Hub.

See `cnc_hf.data.parquet` for what is written; `datasets.load_dataset(output_dir)` reads it back.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Sequence

from datasets import DatasetDict

from .common import categories_of
from .folder import add_folder_arguments, folder_arguments
from .parquet import DEFAULT_MAX_SHARD_BYTES, convert_to_parquet, push_folder_to_hub


def _load_source(fmt: str, root: str, categories, split_csv, on_bad_file: str, folder_kwargs=None) -> DatasetDict:
    from . import load_anomaly_dataset
    from .mvtec import load_mvtec_ad
    from .visa import load_visa

    if fmt == "folder":
        return load_anomaly_dataset("folder", data_dir=root, categories=categories, on_bad_file=on_bad_file,
                                    **folder_kwargs)
    if fmt in ("mvtec", "demo"):
        return load_mvtec_ad(root, categories, on_bad_file=on_bad_file)
    return load_visa(root, split_csv=split_csv, categories=categories, on_bad_file=on_bad_file)


def common_root(dataset: DatasetDict) -> Path:
    """The deepest folder holding every image and mask of `dataset`: what `path` is made relative to
    for image folders, which have no dataset root of their own."""
    from datasets import Image

    paths = []
    for split in dataset.values():
        paths += split["path"]
        masks = split.select_columns(["mask"]).cast_column("mask", Image(decode=False))["mask"]  # nothing decoded
        paths += [m["path"] for m in masks if m is not None and m["path"]]
    return Path(os.path.commonpath([os.path.abspath(os.path.dirname(p)) for p in paths]))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cnc_hf.data.convert",
        description="Convert a local MVTec AD / VisA folder, or your own image folders, into parquet shards "
                    "loadable by datasets.load_dataset.",
    )
    parser.add_argument("--format", required=True, choices=["mvtec", "visa", "demo", "folder"],
                        help="layout of --root; folder: your own image folders (--normal_dir, --abnormal_dir, ...)")
    parser.add_argument("--root", default=None,
                        help="dataset root folder on disk (required except for --format folder, where it is an "
                             "optional JSON/YAML file listing the folders per category)")
    parser.add_argument("--output_dir", required=True, help="folder to write data/*.parquet and README.md to")
    parser.add_argument("--categories", nargs="+", default=None, help="only these categories (default: all)")
    parser.add_argument("--split_csv", default=None, help="VisA only: split file (default split_csv/1cls.csv)")
    parser.add_argument("--on_bad_file", choices=["error", "skip"], default="error")
    parser.add_argument("--max_shard_mb", type=float, default=DEFAULT_MAX_SHARD_BYTES / 1024**2)
    parser.add_argument("--push_to_hub", metavar="REPO_ID", default=None, help="also upload to this dataset repo")
    parser.add_argument("--private", action="store_true", help="create the Hub repo as private")
    add_folder_arguments(parser.add_argument_group("--format folder (your own image folders)"))
    args = parser.parse_args(argv)
    if args.split_csv is not None and args.format != "visa":
        parser.error("--split_csv applies to --format visa only")
    args.dataset = args.format  # folder_arguments checks the folder flags against it
    try:
        folder_kwargs = folder_arguments(args, args.root)
    except ValueError as err:
        parser.error(str(err))
    if args.root is None and args.format != "folder":
        parser.error(f"--root is required for --format {args.format}")

    try:
        dataset = _load_source(args.format, args.root, args.categories, args.split_csv, args.on_bad_file,
                               folder_kwargs)
    except (FileNotFoundError, ValueError) as err:  # AnomalyDatasetError is a ValueError
        parser.exit(2, f"error: {err}\n")
    if args.format == "folder":
        root = common_root(dataset)
        name = f"image folders ({', '.join(categories_of(dataset))})"
    else:
        root = args.root
        name = {"mvtec": "MVTec AD", "visa": "VisA", "demo": "cnc-hf demo textures"}[args.format]
    output_dir = convert_to_parquet(dataset, args.output_dir, root=root, source_name=name,
                                    max_shard_bytes=int(args.max_shard_mb * 1024**2))
    print(f"wrote {len(dataset['train'])} train / {len(dataset['test'])} test rows to {output_dir}")
    if args.push_to_hub:
        push_folder_to_hub(output_dir, args.push_to_hub, private=args.private)
        print(f"pushed {output_dir} to https://huggingface.co/datasets/{args.push_to_hub}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
