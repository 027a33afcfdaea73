"""Command line: convert a local MVTec AD / VisA / demo folder into the Hub form, optionally push it.

    python -m cnc_hf.data.convert --format mvtec --root /data/mvtec_ad --output_dir mvtec_parquet \
        [--categories bottle cable] [--push_to_hub org/mvtec-ad] [--private]

See `cnc_hf.data.parquet` for what is written; `datasets.load_dataset(output_dir)` reads it back.
"""

from __future__ import annotations

import argparse
from typing import Sequence

from datasets import DatasetDict

from .common import AnomalyDatasetError
from .parquet import DEFAULT_MAX_SHARD_BYTES, convert_to_parquet, push_folder_to_hub


def _load_source(fmt: str, root: str, categories, split_csv, on_bad_file: str) -> DatasetDict:
    from .mvtec import load_mvtec_ad
    from .visa import load_visa

    if fmt in ("mvtec", "demo"):
        return load_mvtec_ad(root, categories, on_bad_file=on_bad_file)
    return load_visa(root, split_csv=split_csv, categories=categories, on_bad_file=on_bad_file)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cnc_hf.data.convert",
        description="Convert a local MVTec AD / VisA folder into parquet shards loadable by datasets.load_dataset.",
    )
    parser.add_argument("--format", required=True, choices=["mvtec", "visa", "demo"], help="layout of --root")
    parser.add_argument("--root", required=True, help="dataset root folder on disk")
    parser.add_argument("--output_dir", required=True, help="folder to write data/*.parquet and README.md to")
    parser.add_argument("--categories", nargs="+", default=None, help="only these categories (default: all)")
    parser.add_argument("--split_csv", default=None, help="VisA only: split file (default split_csv/1cls.csv)")
    parser.add_argument("--on_bad_file", choices=["error", "skip"], default="error")
    parser.add_argument("--max_shard_mb", type=float, default=DEFAULT_MAX_SHARD_BYTES / 1024**2)
    parser.add_argument("--push_to_hub", metavar="REPO_ID", default=None, help="also upload to this dataset repo")
    parser.add_argument("--private", action="store_true", help="create the Hub repo as private")
    args = parser.parse_args(argv)
    if args.split_csv is not None and args.format != "visa":
        parser.error("--split_csv applies to --format visa only")

    try:
        dataset = _load_source(args.format, args.root, args.categories, args.split_csv, args.on_bad_file)
    except (FileNotFoundError, AnomalyDatasetError) as err:
        parser.exit(2, f"error: {err}\n")
    name = {"mvtec": "MVTec AD", "visa": "VisA", "demo": "cnc-hf demo textures"}[args.format]
    output_dir = convert_to_parquet(dataset, args.output_dir, root=args.root, source_name=name,
                                    max_shard_bytes=int(args.max_shard_mb * 1024**2))
    print(f"wrote {len(dataset['train'])} train / {len(dataset['test'])} test rows to {output_dir}")
    if args.push_to_hub:
        push_folder_to_hub(output_dir, args.push_to_hub, private=args.private)
        print(f"pushed {output_dir} to https://huggingface.co/datasets/{args.push_to_hub}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
