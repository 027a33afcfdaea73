"""ONNX Runtime against torch, in one run: ORT fp32 (all graph optimisations) vs torch eager CNC vs the
eager CLIP vision tower alone (the floor), at batch 1 and 8, in alternated rounds; plus ORT with int8
dynamic quantisation (weights int8, activations quantised per call) and how far its maps drift.

    python -m cnc_hf_train.bench_onnx                      # random CLIP of ViT-B/16 shape, 224 px, CPU
    python -m cnc_hf_train.bench_onnx --shape tiny --image_size 64 --repeats 1   # seconds, a smoke test
    python -m cnc_hf_train.bench_onnx --demo_model demo_output/model   # + int8's AUROC change (after make demo)

Each round runs every variant once, in a rotating order, so all see the same machine load; the
reported ratio is the median of the per-round ratios. Equality is checked on the same inputs at a
batch size other than the one the graph was traced at (2).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cnc_hf_train.benchmark import SHAPES, clip_config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cnc_hf_train.bench_onnx", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="vit-b-16", choices=sorted(SHAPES), help="CLIP shape (random weights)")
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3, help="alternated rounds per batch size")
    parser.add_argument("--no_int8", action="store_true", help="skip the int8 dynamic-quantised variant")
    parser.add_argument("--demo_model", default=None, metavar="DIR",
                        help="also score the demo test set (--demo_data) with this trained model in torch, ORT fp32 "
                             "and ORT int8, and report each one's image AUROC (e.g. demo_output/model)")
    parser.add_argument("--demo_data", default="demo_output/data", metavar="DIR", help="the demo set (MVTec layout)")
    parser.add_argument("--output", default=None, help="also write the results as JSON here")
    return parser


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def alternated(variants: dict, repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each variant over `repeats` rounds, the order rotating every round."""
    names = list(variants)
    for fn in variants.values():  # warm-up
        fn()
    seconds = {name: [] for name in names}
    for round_ in range(repeats):
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:
            seconds[name].append(_time(variants[name]))
    return seconds


def drift(reference: np.ndarray, other: np.ndarray) -> dict:
    return {"max_abs_diff": float(np.abs(reference - other).max()),
            "correlation": float(np.corrcoef(reference.ravel(), other.ravel())[0, 1])}


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    import onnxruntime as ort

    from cnc_hf.modeling import CNCConfig, CNCModel
    from cnc_hf.onnx_export import export_onnx
    from cnc_hf.onnx_runtime import OnnxAnomalyDetector

    torch.manual_seed(0)
    model = CNCModel(CNCConfig(clip_config=clip_config(args.shape), image_size=args.image_size)).eval()
    result = {"shape": args.shape, "image_size": args.image_size, "torch_threads": torch.get_num_threads(),
              "onnxruntime": ort.__version__, "torch": torch.__version__, "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(model, Path(tmp) / "cnc.onnx")
        variants_ort = {"ort_fp32": OnnxAnomalyDetector(path)}
        if not args.no_int8:
            from onnxruntime.quantization import QuantType, quantize_dynamic

            int8 = Path(tmp) / "cnc_int8.onnx"
            quantize_dynamic(str(path), str(int8), weight_type=QuantType.QInt8)
            variants_ort["ort_int8"] = OnnxAnomalyDetector(int8)
        for batch in (1, 8):
            x = torch.randn(batch, 3, args.image_size, args.image_size, generator=torch.Generator().manual_seed(batch))
            numpy_x = x.numpy()
            with torch.inference_mode():
                reference = model(pixel_values=x)
                variants = {
                    "torch_vision_tower": lambda: model.clip.get_image_features(pixel_values=x),
                    "torch_cnc": lambda: model(pixel_values=x),
                    **{name: (lambda d=d: d.run(numpy_x)) for name, d in variants_ort.items()},
                }
                seconds = alternated(variants, args.repeats)
            row = {"batch": batch, **{f"{k}_img_s": batch / statistics.median(v) for k, v in seconds.items()}}
            row["ort_fp32_vs_torch_cnc"] = statistics.median(c / o for c, o in zip(seconds["torch_cnc"],
                                                                                     seconds["ort_fp32"]))
            row["ort_fp32_vs_vision_tower"] = statistics.median(t / o for t, o in zip(seconds["torch_vision_tower"],
                                                                                       seconds["ort_fp32"]))
            for name, detector in variants_ort.items():
                maps, scores = detector.run(numpy_x)
                row[f"{name}_map"] = drift(reference.anomaly_map.numpy(), maps)
                row[f"{name}_score_max_abs_diff"] = float(np.abs(reference.image_score.numpy() - scores).max())
            if "ort_int8" in variants_ort:
                row["ort_int8_vs_ort_fp32"] = statistics.median(f / i for f, i in zip(seconds["ort_fp32"],
                                                                                       seconds["ort_int8"]))
            result["rows"].append(row)
    if args.demo_model:
        result["demo_image_auroc"] = demo_auroc(args.demo_model, args.demo_data)
    print(format_report(result))
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2))
    return result


def demo_auroc(model_dir: str, data_dir: str) -> dict:
    """Image AUROC on the demo test set of a trained model, run by torch, ORT fp32 and ORT int8."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from cnc_hf.data import load_anomaly_dataset
    from cnc_hf.hub import load_pipeline
    from cnc_hf.metrics import compute_anomaly_metrics
    from cnc_hf.modeling import CNCModel
    from cnc_hf.onnx_export import export_onnx
    from cnc_hf.onnx_runtime import OnnxAnomalyDetector

    test = load_anomaly_dataset("mvtec", data_dir)["test"]
    paths, labels = list(test["path"]), list(test["label"])
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = export_onnx(CNCModel.from_pretrained(model_dir), Path(tmp) / "demo.onnx")
        int8 = Path(tmp) / "demo_int8.onnx"
        quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8)
        runners = {"torch": load_pipeline(model_dir), "ort_fp32": OnnxAnomalyDetector(fp32),
                   "ort_int8": OnnxAnomalyDetector(int8)}
        scores = {name: [r["score"] for r in run(paths, batch_size=8)] for name, run in runners.items()}
    return {name: compute_anomaly_metrics(values, labels)["image_auroc"] for name, values in scores.items()}


def format_report(result: dict) -> str:
    lines = [f"ONNX Runtime vs torch, random CLIP {result['shape']} at {result['image_size']} px "
             f"(torch {result['torch']}, {result['torch_threads']} threads; onnxruntime {result['onnxruntime']})", "",
             "| batch | vision tower img/s | torch CNC img/s | ORT fp32 img/s | ORT / torch CNC | ORT / tower "
             "| ORT map max diff | ORT int8 img/s | int8 / fp32 | int8 map max diff, corr |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        int8 = (f"{row['ort_int8_img_s']:.2f} | {row['ort_int8_vs_ort_fp32']:.2f}x | "
                f"{row['ort_int8_map']['max_abs_diff']:.3g}, {row['ort_int8_map']['correlation']:.4f}"
                if "ort_int8_img_s" in row else "- | - | -")
        lines.append(f"| {row['batch']} | {row['torch_vision_tower_img_s']:.2f} | {row['torch_cnc_img_s']:.2f} | "
                     f"{row['ort_fp32_img_s']:.2f} | {row['ort_fp32_vs_torch_cnc']:.2f}x faster | "
                     f"{row['ort_fp32_vs_vision_tower']:.2f}x | {row['ort_fp32_map']['max_abs_diff']:.2g} | {int8} |")
    if "demo_image_auroc" in result:
        lines += ["", "demo test set, image AUROC: " + ", ".join(f"{k} {v:.4f}" for k, v in
                                                              result["demo_image_auroc"].items())]
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    main()
