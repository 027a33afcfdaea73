"""`cnc-hf predict`: score images with a trained model and write heat-map overlays.

    cnc-hf predict img1.png img2.jpg --model demo_output/model --output_dir predictions

Writes `<stem>_heatmap.png` (the map over the image) and `<stem>_map.npy` (float32 anomaly map
at the image's size) per image, and `predictions.json` with score and decision per image.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cnc-hf predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="+", help="image files to score (any format PIL reads)")
    parser.add_argument("--model", required=True, help="a model dir saved by training, or a Hub id")
    parser.add_argument("--output_dir", default="predictions", help="where overlays and maps go (default: %(default)s)")
    parser.add_argument("--threshold", type=float, default=None,
                        help="decision threshold on the image score (default: the model's calibrated one)")
    parser.add_argument("--batch_size", type=int, default=8, help="images per forward pass (default: %(default)s)")
    parser.add_argument("--device", default=None, help="torch device, e.g. cuda:0 (default: cpu)")
    parser.add_argument("--no_maps", action="store_true", help="do not write the .npy anomaly maps")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from transformers import pipeline

    import cnc_hf.pipeline  # noqa: F401  (registers the "image-anomaly-detection" task)

    missing = [p for p in args.images if not Path(p).is_file()]
    if missing:
        raise SystemExit(f"cnc-hf predict: no such image file(s): {', '.join(missing)}")
    pipe = pipeline("image-anomaly-detection", model=args.model, device=args.device)
    call = {"batch_size": args.batch_size}
    if args.threshold is not None:
        call["threshold"] = args.threshold
    results = pipe(list(args.images), **call)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for path, result in zip(args.images, results):
        stem = Path(path).stem
        result["heatmap"].save(out / f"{stem}_heatmap.png")
        if not args.no_maps:
            np.save(out / f"{stem}_map.npy", result["anomaly_map"].astype(np.float32))
        records.append({"image": str(path), "score": float(result["score"]), "is_anomaly": result["is_anomaly"],
                        "heatmap": str(out / f"{stem}_heatmap.png")})
        verdict = {True: "ANOMALY", False: "normal", None: "(no threshold)"}[result["is_anomaly"]]
        print(f"{result['score']:10.4f}  {verdict:<14} {path}")
    (out / "predictions.json").write_text(json.dumps(records, indent=2))
    print(f"wrote {len(records)} heat maps and predictions.json to {out}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
