"""Speed and memory of CNC, each figure measured side by side with its floor in one run.

    python -m cnc_hf_train.benchmark                           # ViT-B/16 at 224 on the CPU
    python -m cnc_hf_train.benchmark --shape vit-l-14 --device cuda --dtype bfloat16
    python -m cnc_hf_train.benchmark --output bench.json --skip metrics

Random CLIP weights of real shapes (speed does not depend on the values):
1. inference images/s of CNCModel vs the CLIP vision tower alone (`get_image_features`, the
   floor), batch 1 and 8; text features cached, encoder stopped at the deepest tap;
2. pipeline images/s end to end (PNG decode, preprocess, model, upsample, heat map) next to
   the model alone on the same batches;
3. training images/s with and without the frozen-feature cache (`--cache_features`): one model
   step on a batch in memory; the FLOPs torch counts for each side, which bound the speedup the
   cache can give; whole epochs of training/train.py on MVTec-layout PNGs of camera size (decode
   included); and the whole-run estimate for the paper's MVTec AD setup (3629 images x 250 epochs);
4. peak memory of each (CUDA: max allocated; CPU: peak RSS growth, sampled every 2 ms, in a child
   process with glibc's mmap threshold fixed so that freed tensors leave RSS, see run_memory_pass);
5. the metrics suite on MVTec-AD-sized data vs scikit-learn (training/bench_metrics.py).

Prints a markdown table and writes JSON (`--output`). Each figure and its floor run alternately
(`--repeats` rounds after a warm-up); the table gives medians, and each ratio is the median of
the per-round ratios, so machine load hits both sides alike. Peak memory is taken in one extra
call of each (on the CPU in a child process, see run_memory_pass).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import tempfile
import threading
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch

MVTEC_TRAIN_IMAGES, MVTEC_EPOCHS = 3629, 250
# Set in the child process that measures CPU peak memory (see run_memory_pass): it times nothing.
MEMORY_PASS = os.environ.get("CNC_BENCH_MEMORY_PASS") == "1"

SHAPES = {
    # name: (vision width, layers, heads, mlp, patch, native size, text width, text layers, projection)
    "tiny": (64, 4, 4, 128, 8, 64, 64, 2, 32),
    "vit-b-16": (768, 12, 12, 3072, 16, 224, 512, 12, 512),
    "vit-l-14": (1024, 24, 16, 4096, 14, 336, 768, 12, 768),
}


def clip_config(shape: str):
    from transformers import CLIPConfig

    width, layers, heads, mlp, patch, native, t_width, t_layers, proj = SHAPES[shape]
    return CLIPConfig(
        text_config=dict(hidden_size=t_width, intermediate_size=4 * t_width, num_hidden_layers=t_layers,
                         num_attention_heads=max(1, t_width // 64), bos_token_id=49406, eos_token_id=49407),
        vision_config=dict(hidden_size=width, intermediate_size=mlp, num_hidden_layers=layers,
                           num_attention_heads=heads, patch_size=patch, image_size=native),
        projection_dim=proj,
    )


class PeakMemory:
    """Peak memory of a block: CUDA max allocated, or the CPU process's peak RSS growth (sampled)."""

    def __init__(self, device: torch.device):
        self.device, self.peak_mb = device, 0.0

    @contextmanager
    def measure(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
            yield self
            torch.cuda.synchronize(self.device)
            self.peak_mb = (torch.cuda.max_memory_allocated(self.device) - base) / 2**20
            return
        import psutil

        process = psutil.Process()
        base = process.memory_info().rss
        peak = [base]
        done = threading.Event()

        def sample():
            while not done.is_set():
                peak[0] = max(peak[0], process.memory_info().rss)
                time.sleep(0.002)

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            done.set()
            thread.join()
            self.peak_mb = max(0, peak[0] - base) / 2**20


def peak_mb(fn, device: torch.device) -> float | None:
    """Peak memory of one call of `fn` in MB; None on the CPU outside the memory pass, which fills it in."""
    if device.type != "cuda" and not MEMORY_PASS:
        return None
    probe = PeakMemory(device)
    with probe.measure():
        fn()
    return probe.peak_mb


def run_memory_pass(args) -> dict:
    """The CPU peak-memory figures, from a child process started with glibc's mmap threshold fixed.

    By default glibc raises its mmap threshold after the first large free and then serves later tensors
    from a heap it keeps: RSS stays flat after a warm-up and every peak reads ~0. A fixed threshold (64 KiB)
    makes each tensor buffer its own mapping, returned on free, so RSS tracks live memory. But it also
    makes every large allocation fault in fresh pages, which slowed training steps (3.9 and 4.2 s against
    3.0 and 3.9 s at ViT-B/16, back to back): so the timings come from this process (the allocator users
    get) and the memory from the child. The variable must be set before a process starts, hence the child.
    """
    import subprocess
    import sys

    skip = sorted(set(args.skip) | {"epochs", "metrics"})
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "memory.json"
        command = [sys.executable, "-m", "cnc_hf_train.benchmark", "--shape", args.shape,
                   "--image_size", str(args.image_size), "--device", args.device, "--dtype", args.dtype, "--train_batch", str(args.train_batch),
                   "--pipeline_images", str(args.pipeline_images), "--repeats", "1", "--skip", *skip,
                   "--output", str(out)]
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "CNC_BENCH_MEMORY_PASS": "1"}
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0:  # keep the timings already taken; the peaks stay unknown ("-")
            import warnings

            warnings.warn(f"the memory pass ({' '.join(command)}) failed, no CPU peak memory:\n{done.stderr[-3000:]}")
            return {}
        return json.loads(out.read_text())


def merge_peaks(result: dict, memory: dict) -> None:
    """Copy every `*_peak_mb` figure of the memory pass into `result` (same sections, same rows)."""
    def merge(mine, theirs):
        if isinstance(mine, dict) and isinstance(theirs, dict):
            for key, value in theirs.items():
                if key.endswith("_peak_mb"):
                    mine[key] = value
                elif key in mine:
                    merge(mine[key], value)
        elif isinstance(mine, list) and isinstance(theirs, list):
            for a, b in zip(mine, theirs):
                merge(a, b)

    merge(result, memory)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _once(fn, device: torch.device) -> float:
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def timed_pair(fn_a, fn_b, repeats: int, device: torch.device) -> tuple[float, float, float]:
    """Median seconds of `fn_a` and `fn_b`, run alternately (a, b, a, b, ...) after one warm-up
    each, and the median of the per-round ratios b/a: both sides see the same machine load, which
    on a shared CPU moves far more than the difference being measured."""
    fn_a(), fn_b()
    _sync(device)
    if MEMORY_PASS:  # warm-up only: the timings come from the parent process
        return math.nan, math.nan, math.nan
    a, b = [], []
    for _ in range(repeats):
        a.append(_once(fn_a, device))
        b.append(_once(fn_b, device))
    return statistics.median(a), statistics.median(b), statistics.median(y / x for x, y in zip(a, b))


def bench_inference(model, args, device, autocast) -> list[dict]:
    rows = []
    size = args.image_size
    for batch in (1, 8):
        x = torch.randn(batch, 3, size, size, device=device)
        interpolate = size != model.config.clip_config.vision_config.image_size
        floor_fn = lambda: model.clip.get_image_features(pixel_values=x, interpolate_pos_encoding=interpolate)  # noqa: E731
        cnc_fn = lambda: model(pixel_values=x)  # noqa: E731
        with torch.inference_mode(), autocast():
            floor, cnc, ratio = timed_pair(floor_fn, cnc_fn, args.repeats, device)
            floor_mem, cnc_mem = peak_mb(floor_fn, device), peak_mb(cnc_fn, device)
        rows.append({"batch": batch, "vision_tower_img_s": batch / floor, "cnc_img_s": batch / cnc,
                     "ratio": ratio, "vision_tower_peak_mb": floor_mem, "cnc_peak_mb": cnc_mem})
    return rows


def bench_pipeline(model, args, device) -> dict:
    from PIL import Image
    from transformers import pipeline

    import cnc_hf  # noqa: F401  (registers the task)
    from cnc_hf.modeling.image_processing_cnc import CNCImageProcessor

    rng = np.random.default_rng(0)
    processor = CNCImageProcessor(size=args.image_size)
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i in range(args.pipeline_images):  # camera-like size, not the model's
            path = Path(tmp) / f"img{i}.png"
            Image.fromarray(rng.integers(0, 255, (512, 512, 3), dtype=np.uint8)).save(path)
            paths.append(str(path))
        pipe = pipeline("image-anomaly-detection", model=model, image_processor=processor, device=device)
        x = processor([Image.open(p) for p in paths], return_tensors="pt")["pixel_values"].to(device)

        def model_only():
            with torch.inference_mode():
                for start in range(0, len(paths), 8):
                    model(pixel_values=x[start: start + 8])

        model_only_s, seconds, ratio = timed_pair(model_only, lambda: pipe(paths, batch_size=8, threshold=1.0),
                                                  args.repeats, device)
        memory = peak_mb(lambda: pipe(paths, batch_size=8, threshold=1.0), device)
    return {"images": len(paths), "pipeline_img_s": len(paths) / seconds, "model_img_s": len(paths) / model_only_s,
            "ratio": ratio, "pipeline_peak_mb": memory}


def bench_training(model, args, device, autocast) -> dict:
    params = [p for p in model.parameters() if p.requires_grad]
    from cnc_hf_train.train import make_optimizer

    optimizer = make_optimizer(params, lr=1e-3, device_type=device.type)
    batch = args.train_batch
    x = torch.randn(batch, 3, args.image_size, args.image_size, device=device)
    model.train()
    with torch.no_grad():
        tapped = model.encode_image(x)

    def step(**inputs):
        with autocast():
            loss = model(**inputs, epoch=6).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    flops = {} if MEMORY_PASS else count_training_flops(model, x, tapped, autocast)
    uncached, cached, ratio = timed_pair(lambda: step(pixel_values=x), lambda: step(tapped_features=tapped),
                                         args.repeats, device)
    uncached_mem = peak_mb(lambda: step(pixel_values=x), device)
    cached_mem = peak_mb(lambda: step(tapped_features=tapped), device)
    with torch.no_grad(), autocast():
        encode = statistics.median(_once(lambda: model.encode_image(x), device) for _ in range(args.repeats))
    model.eval()
    images = MVTEC_TRAIN_IMAGES * MVTEC_EPOCHS
    return {
        "batch": batch, "uncached_img_s": batch / uncached, "cached_img_s": batch / cached,
        "speedup": 1.0 / ratio, "encode_img_s": batch / encode, **flops,
        "uncached_peak_mb": uncached_mem, "cached_peak_mb": cached_mem,
        "cache_mb_per_image": tapped[0].numel() * 2 / 2**20,  # float16 storage, the default
        "mvtec_run_hours_uncached": images / (batch / uncached) / 3600,
        "mvtec_run_hours_cached": (images / (batch / cached) + MVTEC_TRAIN_IMAGES / (batch / encode)) / 3600,
    }


def count_training_flops(model, x, tapped, autocast) -> dict:
    """FLOPs of the frozen encoder's forward and of the trainable part's forward + backward on one batch,
    counted by torch (matmuls; attention too where torch counts the SDPA kernel in use, not on the CPU), and
    the speedup the cache can give this model if time follows FLOPs: (encoder + head) / head. The cache
    removes the encoder only. The bound grows a little with the batch (the text tower's cost is per step)
    and would grow with a cheaper head than the paper's three ViT blocks."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as encoder, torch.no_grad(), autocast():
        model.encode_image(x)
    with FlopCounterMode(display=False) as head:
        with autocast():
            loss = model(tapped_features=tapped, epoch=6).loss
        loss.backward()
    model.zero_grad(set_to_none=True)
    enc, step = encoder.get_total_flops(), head.get_total_flops()
    return {"encoder_gflop": enc / 1e9, "head_step_gflop": step / 1e9, "flop_bound_speedup": (enc + step) / max(step, 1)}


def bench_epochs(args, device) -> dict:
    """Whole epochs of training/train.py with and without `--cache_features`, as a user runs them: an
    MVTec-AD-layout folder of camera-size PNGs (the demo's photo textures at `--epoch_png_size`), decoded and
    preprocessed by the data loader every uncached epoch. Runs alternate (uncached, cached) `--epoch_rounds`
    times; each figure is a median of the runs' mean epoch times."""
    from transformers import CLIPModel
    from transformers.utils import logging as hf_logging

    from cnc_hf.data import make_demo_dataset
    from cnc_hf_train.train import main as train_main

    per_category = max(1, args.epoch_images // 3)  # the demo has 3 categories
    with tempfile.TemporaryDirectory() as tmp:
        clip_dir = Path(tmp) / "clip"
        torch.manual_seed(0)
        CLIPModel(clip_config(args.shape)).save_pretrained(clip_dir)
        data_dir = make_demo_dataset(Path(tmp) / "data", image_size=args.epoch_png_size, n_train=per_category,
                                     n_test_good=1, n_test_defect=1)
        common = ["--dataset", "mvtec", "--data_dir", str(data_dir), "--clip_model", str(clip_dir),
                  "--image_size", str(args.image_size), "--epochs", str(args.epoch_count),
                  "--batch_size", str(args.train_batch), "--no_eval", "--calibration_fraction", "0",
                  "--save_every", "0", "--report_to", "none", "--no_progress", "--overwrite_output_dir",
                  "--mixed_precision", "bf16" if args.dtype == "bfloat16" else "no"]
        if device.type == "cpu":
            common.append("--cpu")
        runs = {"uncached": [], "cached": []}
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the random CLIP's load report, once per run
        try:
            for _ in range(args.epoch_rounds):
                for name, extra in (("uncached", []), ("cached", ["--cache_features"])):
                    summary = train_main(common + ["--output_dir", str(Path(tmp) / name)] + extra)["training"]
                    runs[name].append(summary)
        finally:
            hf_logging.set_verbosity(verbosity)
    uncached = statistics.median(r["mean_epoch_seconds"] for r in runs["uncached"])
    cached = statistics.median(r["mean_epoch_seconds"] for r in runs["cached"])
    build = statistics.median(r["cache_build_seconds"] for r in runs["cached"])
    speedups = [u["mean_epoch_seconds"] / c["mean_epoch_seconds"] for u, c in zip(runs["uncached"], runs["cached"])]
    return {"images": runs["cached"][0]["num_train_images"], "png_size": args.epoch_png_size,
            "epochs_per_run": args.epoch_count, "rounds": args.epoch_rounds,
            "uncached_epoch_s": uncached, "cached_epoch_s": cached, "cache_build_s": build,
            "speedup": statistics.median(speedups)}


def _mb(value) -> str:
    return "-" if value is None else f"{value:.0f}"


def format_report(result: dict) -> str:
    env = result["environment"]
    lines = [f"CNC benchmark: {env['shape']} at {env['image_size']}px, {env['device']}, {env['dtype']}, "
             f"attention {env['attn_implementation']}, torch {env['torch']}, {env['threads']} threads", ""]
    lines += ["| measurement | CNC | floor | ratio | peak MB (CNC / floor) |", "|---|---|---|---|---|"]
    for row in result.get("inference", []):
        lines.append(f"| inference, batch {row['batch']} (img/s) | {row['cnc_img_s']:.2f} | {row['vision_tower_img_s']:.2f}"
                     f" (vision tower) | {row['ratio']:.2f}x time | {_mb(row['cnc_peak_mb'])} / {_mb(row['vision_tower_peak_mb'])} |")
    if "pipeline" in result:
        p = result["pipeline"]
        lines.append(f"| pipeline end to end, {p['images']} PNGs 512px (img/s) | {p['pipeline_img_s']:.2f} | "
                     f"{p['model_img_s']:.2f} (model alone) | {p['ratio']:.2f}x time | {_mb(p['pipeline_peak_mb'])} / - |")
    if "training" in result:
        t = result["training"]
        lines.append(f"| training, batch {t['batch']} (img/s) | {t['cached_img_s']:.2f} cached | "
                     f"{t['uncached_img_s']:.2f} uncached | {t['speedup']:.2f}x faster | "
                     f"{_mb(t['cached_peak_mb'])} / {_mb(t['uncached_peak_mb'])} |")
        lines.append(f"| FLOPs per training batch of {t['batch']} (GFLOP) | {t['head_step_gflop']:.4g} trainable part, fwd+bwd | "
                     f"{t['head_step_gflop'] + t['encoder_gflop']:.4g} with the encoder ({t['encoder_gflop']:.4g}) | "
                     f"{t['flop_bound_speedup']:.2f}x bound on the cache speedup | |")
        lines.append(f"| paper's MVTec run, {MVTEC_TRAIN_IMAGES} x {MVTEC_EPOCHS} (hours) | "
                     f"{t['mvtec_run_hours_cached']:.1f} cached | {t['mvtec_run_hours_uncached']:.1f} uncached | | "
                     f"cache {t['cache_mb_per_image']:.2f} MB/image (fp16) |")
    if "epochs" in result:
        e = result["epochs"]
        lines.append(f"| training/train.py epoch, {e['images']} PNGs {e['png_size']}px (s/epoch) | {e['cached_epoch_s']:.2f} "
                     f"cached | {e['uncached_epoch_s']:.2f} uncached | {e['speedup']:.2f}x faster | "
                     f"cache built in {e['cache_build_s']:.1f} s |")
    if "metrics" in result:
        m = result["metrics"]
        ours = m["seconds"]["cnc_hf_full_suite"]
        ref = m["seconds"].get("sklearn_pixel_auroc", 0) + m["seconds"].get("sklearn_pixel_ap", 0)
        lines.append(f"| metrics: 7 metrics pooled + per category, {m['n_images']} maps {m['size']}px (s) | {ours:.2f} | "
                     f"{ref:.2f} (sklearn: pixel AUROC + AP only) | {ref / ours:.1f}x faster | |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cnc_hf_train.benchmark", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="vit-b-16", help="CLIP shape (default: %(default)s)")
    parser.add_argument("--image_size", type=int, default=224, help="input size (the paper: 224)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="bfloat16 = autocast (weights stay float32)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per figure after a warm-up")
    parser.add_argument("--train_batch", type=int, default=8, help="training batch (the paper: 8)")
    parser.add_argument("--pipeline_images", type=int, default=16)
    parser.add_argument("--epoch_images", type=int, default=24,
                        help="training images for the train.py epoch benchmark (3 demo categories)")
    parser.add_argument("--epoch_png_size", type=int, default=1024, help="their PNG size (MVTec AD: 700-1024)")
    parser.add_argument("--epoch_count", type=int, default=2, help="epochs per train.py run")
    parser.add_argument("--epoch_rounds", type=int, default=2, help="(uncached, cached) train.py run pairs")
    parser.add_argument("--metrics_images", type=int, default=1725, help="maps for the metrics benchmark (MVTec AD: 1725)")
    parser.add_argument("--metrics_size", type=int, default=224, help="map size for the metrics benchmark")
    parser.add_argument("--skip", nargs="*", default=[], choices=["inference", "pipeline", "training", "epochs", "metrics"])
    parser.add_argument("--output", default=None, help="write the JSON here")
    return parser


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    from cnc_hf.modeling import CNCConfig, CNCModel

    device = torch.device(args.device)
    torch.manual_seed(0)
    config = CNCConfig(clip_config=clip_config(args.shape), image_size=args.image_size)
    model = CNCModel(config).to(device).eval()

    def autocast():
        if args.dtype == "bfloat16":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return nullcontext()

    result = {"environment": {
        "shape": args.shape, "image_size": args.image_size, "device": str(device), "dtype": args.dtype,
        "attn_implementation": model.clip.config._attn_implementation, "torch": torch.__version__,
        "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "feature_layers": config.feature_layers, "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }}
    if "inference" not in args.skip:
        result["inference"] = bench_inference(model, args, device, autocast)
    if "pipeline" not in args.skip:
        result["pipeline"] = bench_pipeline(model, args, device)
    if "training" not in args.skip:
        result["training"] = bench_training(model, args, device, autocast)
    if device.type != "cuda" and not MEMORY_PASS and {"inference", "pipeline", "training"} - set(args.skip):
        merge_peaks(result, run_memory_pass(args))
    if "epochs" not in args.skip:
        result["epochs"] = bench_epochs(args, device)
    if "metrics" not in args.skip:
        from cnc_hf_train.bench_metrics import run_metrics_benchmark

        result["metrics"] = run_metrics_benchmark(n_images=args.metrics_images, size=args.metrics_size)
    report = "" if MEMORY_PASS else format_report(result)
    print(report)
    if args.output:
        Path(args.output).write_text(json.dumps({**result, "markdown": report}, indent=2, default=str))
    return result


if __name__ == "__main__":
    main()
