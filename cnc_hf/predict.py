"""`cnc-hf predict`: score images with a trained model and write heat-map overlays.

    cnc-hf predict img1.png img2.jpg --model demo_output/model --output_dir predictions
    cnc-hf predict /data/mvtec/bottle/test --model demo_output/model       # a folder, recursively
    cnc-hf predict "/data/mvtec/*/test/*/000.png" --model demo_output/model  # a glob (quoted or not)
    cnc-hf predict part.png --onnx cnc.onnx                                  # ONNX Runtime, no torch

Inputs are image files, folders (searched recursively for .png/.jpg/.jpeg/.bmp/.tif/.tiff/.webp)
and glob patterns. Outputs mirror the inputs' paths below their common folder, so images that
share a file name (every MVTec defect folder has a 000.png) never overwrite each other:
`bottle/test/broken_large/000.png` gives `<output_dir>/bottle/test/broken_large/000_heatmap.png`
(the map over the image) and `..._map.npy` (float32 anomaly map at the image's size).

Results are written as they come, one batch at a time (memory does not grow with the number of
images): `predictions.jsonl` and `predictions.csv` line by line, then `predictions.json` (the same
records as one list) at the end. Each record: image, score, is_anomaly, category (--category, else the
one the model recognises from the image; empty when it recognises none), category_source (given,
recognised, unrecognised), the threshold that decided and its source (call, category, pooled),
normalized_score (score / threshold: 1.0 is the boundary), heatmap, map.
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import os
from collections import Counter
from pathlib import Path

import numpy as np

GLOB_CHARS = set("*?[")
RECORD_FIELDS = ("image", "score", "is_anomaly", "category", "category_source", "threshold", "threshold_source",
                 "normalized_score", "heatmap", "map")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cnc-hf predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="+", help="image files, folders (recursive) or glob patterns")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="a model dir saved by training, or a Hub id")
    source.add_argument("--onnx", metavar="FILE", help="a .onnx file from `cnc-hf export`: ONNX Runtime, no torch needed")
    parser.add_argument("--output_dir", default="predictions", help="where overlays and maps go (default: %(default)s)")
    parser.add_argument("--threshold", type=float, default=None,
                        help="decision threshold on the image score (default: the model's calibrated one)")
    parser.add_argument("--category", default=None,
                        help="the product category of the images: decide at that category's calibrated threshold "
                             "(default: the category the model recognises in each image, or the pooled threshold "
                             "for an image it recognises as none of its categories)")
    parser.add_argument("--batch_size", type=int, default=8, help="images per forward pass (default: %(default)s)")
    parser.add_argument("--device", default=None, help="torch device, e.g. cuda:0 (default: cpu)")
    parser.add_argument("--no_maps", action="store_true", help="do not write the .npy anomaly maps")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    return parser


def collect_images(inputs: list[str]) -> list[Path]:
    """The image files named by `inputs` (files, folders searched recursively, glob patterns), in the
    order given, each once. Raises SystemExit naming every input that matches nothing."""
    from cnc_hf.data.common import is_image_file

    found, missing, seen = [], [], set()
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            matches = sorted(p for p in path.rglob("*") if is_image_file(p))
        elif path.is_file():
            matches = [path]
        elif GLOB_CHARS & set(item):
            matches = sorted(Path(p) for p in glob.glob(item, recursive=True))
            matches = [p for q in matches for p in (sorted(x for x in q.rglob("*") if is_image_file(x))
                                                     if q.is_dir() else [q] if is_image_file(q) else [])]
        else:
            matches = []
        if not matches:
            missing.append(item)
        for match in matches:
            key = match.resolve()
            if key not in seen:
                seen.add(key)
                found.append(match)
    if missing:
        raise SystemExit(f"cnc-hf predict: no such image file, folder or matching pattern: {', '.join(missing)}")
    return found


def output_stems(images: list[Path], output_dir: Path) -> list[Path]:
    """Where each image's outputs go, without the suffix: its path below the images' common folder,
    inside `output_dir`. Distinct images always get distinct stems: images that differ only in their
    extension (x.png, x.jpg) keep it in the stem (x.png_heatmap.png, x.jpg_heatmap.png)."""
    resolved = [p.resolve() for p in images]
    common = Path(os.path.commonpath([p.parent for p in resolved]))
    stems = [p.relative_to(common).with_suffix("") for p in resolved]
    clashing = {s for s, n in Counter(stems).items() if n > 1}
    return [output_dir / (p.relative_to(common) if s in clashing else s) for p, s in zip(resolved, stems)]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.batch_size < 1:
        raise SystemExit("cnc-hf predict: --batch_size must be >= 1")
    out = Path(args.output_dir)
    # Outputs of an earlier run inside a folder given as input are not inputs.
    images = [p for p in collect_images(args.images) if out.resolve() not in p.resolve().parents]
    if not images:
        raise SystemExit(f"cnc-hf predict: no images to score in {', '.join(args.images)} (outside {out})")
    stems = output_stems(images, out)
    from tqdm.auto import tqdm

    if args.onnx:
        from cnc_hf.onnx_runtime import OnnxAnomalyDetector

        pipe = OnnxAnomalyDetector(args.onnx)
    else:
        from cnc_hf.hub import load_pipeline

        pipe = load_pipeline(args.model, device=args.device)
    call = {"batch_size": args.batch_size, "threshold": args.threshold, "category": args.category}
    try:
        pipe.decision_threshold(args.category, args.threshold)  # an unknown --category: one line, before any output
    except ValueError as err:
        raise SystemExit(f"cnc-hf predict: {err}") from None
    out.mkdir(parents=True, exist_ok=True)
    records = []
    with open(out / "predictions.jsonl", "w", encoding="utf-8") as lines, \
            open(out / "predictions.csv", "w", encoding="utf-8", newline="") as table, \
            tqdm(total=len(images), desc="predict", unit="img", disable=args.no_progress) as bar:
        writer = csv.DictWriter(table, fieldnames=RECORD_FIELDS)
        writer.writeheader()
        for start in range(0, len(images), args.batch_size):
            chunk = images[start:start + args.batch_size]
            results = pipe([str(p) for p in chunk], **call)
            for path, stem, result in zip(chunk, stems[start:start + args.batch_size], results):
                record = _write_outputs(path, stem, result, write_map=not args.no_maps)
                records.append(record)
                lines.write(json.dumps(record) + "\n")
                writer.writerow(record)
                verdict = {True: "ANOMALY", False: "normal", None: "(no threshold)"}[result["is_anomaly"]]
                bar.write(f"{result['score']:10.4f}  {verdict:<14} {path}")
            lines.flush()
            table.flush()
            bar.update(len(chunk))
    (out / "predictions.json").write_text(json.dumps(records, indent=2))
    print(f"wrote {len(records)} heat maps and predictions.json/.jsonl/.csv to {out}")
    return 0


def _write_outputs(path: Path, stem: Path, result: dict, write_map: bool) -> dict:
    stem.parent.mkdir(parents=True, exist_ok=True)
    heatmap = stem.with_name(stem.name + "_heatmap.png")
    result["heatmap"].save(heatmap)
    map_path = None
    if write_map:
        map_path = stem.with_name(stem.name + "_map.npy")
        np.save(map_path, result["anomaly_map"].astype(np.float32))
    return {"image": str(path), "score": float(result["score"]), "is_anomaly": result["is_anomaly"],
            "category": result["category"], "category_source": result.get("category_source"),
            "threshold": result["threshold"], "threshold_source": result.get("threshold_source"),
            "normalized_score": result["normalized_score"], "heatmap": str(heatmap),
            "map": str(map_path) if map_path else None}


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
