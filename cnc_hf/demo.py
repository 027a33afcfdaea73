"""`cnc-hf demo`: the main job end to end on built-in data, in minutes on a CPU.

1. builds the demo data set (textures from photographs shipped with scikit-image, with
   synthetic defects and exact masks, MVTec AD layout),
2. trains CNC on it with `cnc_hf_train.train` (training/train.py in the repository; feature cache on),
3. evaluates it (per-category I-AUROC / P-AUROC / AUPRO / I-AP / P-AP table),
4. saves a finished model dir (safetensors, config, processor, code, model card),
5. runs the `image-anomaly-detection` pipeline on test images and writes a heat-map gallery.

No pretrained CLIP can be downloaded on an offline machine, so unless `--clip_model` names a
real checkpoint the demo's CLIP is RANDOMLY INITIALISED (small, so it trains in minutes). The
numbers it prints are what that model measured, nothing more. For real use:

    cnc-hf train --clip_model openai/clip-vit-large-patch14-336 --dataset mvtec --data_dir /data/mvtec_ad
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REAL_USE = ("accelerate launch -m cnc_hf_train.train --clip_model openai/clip-vit-large-patch14-336 "
            "--dataset mvtec --data_dir /path/to/mvtec_anomaly_detection --output_dir cnc-mvtec")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cnc-hf demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="demo_output", help="everything goes here (default: %(default)s)")
    parser.add_argument("--clip_model", default=None,
                        help="a real CLIP checkpoint (dir or Hub id); default: a small random CLIP (offline)")
    parser.add_argument("--epochs", type=int, default=30, help="training epochs (default: %(default)s)")
    parser.add_argument("--image_size", type=int, default=128,
                        help="model input size for the random CLIP (default: %(default)s; a real CLIP uses 224)")
    parser.add_argument("--batch_size", type=int, default=8, help="training batch size (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="data and training seed (default: %(default)s)")
    parser.add_argument("--gallery_images", type=int, default=12, help="test images in the gallery (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace a previous demo in --output_dir")
    return parser


def random_clip_checkpoint(path: Path, image_size: int, seed: int) -> Path:
    """A small randomly initialised CLIP saved like a Hub checkpoint (config + safetensors)."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=49406,
                         eos_token_id=49407, pad_token_id=1),
        vision_config=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                           image_size=image_size, patch_size=8),
        projection_dim=64,
    )
    CLIPModel(config).save_pretrained(path)
    return path


def _stage(title: str) -> None:
    print(f"\n=== {title} ===", flush=True)


def make_gallery(model_dir: Path, dataset, out_path: Path, count: int, seed: int) -> list[dict]:
    """Run the pipeline on `count` test images (both labels) and draw image | heat map | truth."""
    import numpy as np
    from PIL import Image, ImageDraw
    from transformers import pipeline

    import cnc_hf.pipeline  # noqa: F401  (registers the task)

    test = dataset["test"]
    labels = np.asarray(test["label"])
    rng = np.random.default_rng(seed)
    good, bad = np.flatnonzero(labels == 0), np.flatnonzero(labels == 1)
    half = count // 2
    picks = list(rng.choice(good, min(half, len(good)), replace=False)) + \
        list(rng.choice(bad, min(count - half, len(bad)), replace=False))
    rows = [test[int(i)] for i in picks]
    pipe = pipeline("image-anomaly-detection", model=str(model_dir))
    results = [pipe(r["image"], category=r["category"]) for r in rows]  # each category's own threshold
    tile = 160
    canvas = Image.new("RGB", (3 * tile, len(rows) * (tile + 18)), "white")
    draw = ImageDraw.Draw(canvas)
    records = []
    for k, (row, res) in enumerate(zip(rows, results)):
        y = k * (tile + 18)
        mask = row["mask"].convert("L") if row["mask"] is not None else Image.new("L", row["image"].size, 0)
        for col, img in enumerate((row["image"].convert("RGB"), res["heatmap"].convert("RGB"), mask.convert("RGB"))):
            canvas.paste(img.resize((tile, tile)), (col * tile, y + 18))
        verdict = {True: "anomaly", False: "normal", None: "?"}[res["is_anomaly"]]
        threshold = "-" if res["threshold"] is None else f"{res['threshold']:.3f}"
        draw.text((4, y + 3), f"{row['category']}/{row['defect_type']}  score {res['score']:.3f} vs {threshold} "
                              f"-> {verdict}", fill="black")
        records.append({"path": row["path"], "category": row["category"], "defect_type": row["defect_type"],
                        "label": int(row["label"]), "score": float(res["score"]), "threshold": res["threshold"],
                        "is_anomaly": res["is_anomaly"]})
    canvas.save(out_path)
    return records


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.output_dir)
    model_dir = out / "model"
    if model_dir.exists() and any(model_dir.iterdir()) and not args.overwrite:
        raise SystemExit(f"cnc-hf demo: {model_dir} already holds a model; pass --overwrite or another --output_dir.")
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()

    from cnc_hf.data import load_anomaly_dataset, make_demo_dataset

    _stage("1/5 demo data set")
    data_dir = make_demo_dataset(out / "data", seed=args.seed)
    print(f"wrote an MVTec-layout texture set to {data_dir}")

    if args.clip_model is None:
        clip = random_clip_checkpoint(out / "random_clip", args.image_size, args.seed)
        image_size = args.image_size
        print("\nNOTE: no pretrained CLIP is reachable offline, so this demo's CLIP is RANDOMLY INITIALISED "
              f"(small ViT, {image_size}px). Its numbers show the pipeline works end to end; they are not the "
              "paper's. Point --clip_model at a real checkpoint for real results.")
    else:
        clip, image_size = args.clip_model, 224

    _stage("2/5 training (cnc_hf_train.train)")
    command = [sys.executable, "-m", "cnc_hf_train.train", "--dataset", "demo", "--data_dir", str(data_dir),
               "--clip_model", str(clip), "--output_dir", str(model_dir), "--epochs", str(args.epochs),
               "--batch_size", str(args.batch_size), "--image_size", str(image_size), "--seed", str(args.seed),
               "--cache_features", "--cache_dtype", "float32", "--overwrite_output_dir"]
    print("$ " + " ".join(command), flush=True)
    code = subprocess.call(command, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if code != 0:
        raise SystemExit(f"cnc-hf demo: training failed with exit code {code}.")

    _stage("3/5 evaluation")
    from cnc_hf.metrics import format_metrics_table

    metrics = json.loads((model_dir / "metrics.json").read_text())
    table = format_metrics_table(metrics)
    if metrics.get("decisions"):
        from cnc_hf.evaluation import format_decisions_table

        table += "\n\n" + format_decisions_table(metrics["decisions"])
    print(table)
    (out / "metrics.md").write_text(table + "\n")

    _stage("4/5 saved model")
    for f in sorted(model_dir.iterdir()):
        if f.is_file():
            print(f"  {f.name:<28} {f.stat().st_size / 1e6:8.2f} MB")

    _stage("5/5 pipeline predictions")
    dataset = load_anomaly_dataset("demo", data_dir=data_dir)
    records = make_gallery(model_dir, dataset, out / "gallery.png", args.gallery_images, args.seed)
    (out / "predictions.json").write_text(json.dumps(records, indent=2))
    correct = sum(r["is_anomaly"] == bool(r["label"]) for r in records if r["is_anomaly"] is not None)
    print(f"gallery of {len(records)} test images: {out / 'gallery.png'} "
          f"({correct}/{len(records)} decisions right at each category's calibrated threshold)")

    minutes = (time.time() - start) / 60
    print(f"\nDone in {minutes:.1f} min. Model: {model_dir}  Table: {out / 'metrics.md'}  Gallery: {out / 'gallery.png'}")
    if args.clip_model is None:
        print("Reminder: the CLIP above was random. For real use:\n  " + REAL_USE)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
