"""The benchmark script runs end to end (tiny shape) and its memory probe sees a known allocation."""

from __future__ import annotations

import json

import torch

from training.benchmark import PeakMemory, main, timed_pair


def test_peak_memory_sees_a_known_cpu_allocation():
    probe = PeakMemory(torch.device("cpu"))
    with probe.measure():
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        block += 1
        import time

        time.sleep(0.05)
    del block
    assert 48 <= probe.peak_mb <= 256


def test_timed_pair_measures_a_known_ratio():
    import time

    a, b, ratio = timed_pair(lambda: time.sleep(0.01), lambda: time.sleep(0.03), repeats=3, device=torch.device("cpu"))
    assert 0.01 <= a < 0.02 and 0.03 <= b < 0.045
    assert 2.0 < ratio < 3.2


def test_benchmark_reports_every_figure(tmp_path):
    out = tmp_path / "bench.json"
    result = main(["--shape", "tiny", "--image_size", "64", "--repeats", "1", "--pipeline_images", "2",
                   "--metrics_images", "12", "--metrics_size", "32", "--output", str(out)])
    saved = json.loads(out.read_text())
    assert [row["batch"] for row in saved["inference"]] == [1, 8]
    for row in saved["inference"]:
        assert row["cnc_img_s"] > 0 and row["vision_tower_img_s"] > 0
        assert row["ratio"] > 0
    assert saved["pipeline"]["images"] == 2 and saved["pipeline"]["pipeline_img_s"] > 0
    t = saved["training"]
    assert t["speedup"] > 0 and t["mvtec_run_hours_cached"] > 0
    assert t["cached_img_s"] > 0 and t["uncached_img_s"] > 0
    assert saved["metrics"]["n_images"] == 12
    assert "| inference, batch 8" in saved["markdown"] and result["environment"]["attn_implementation"] == "sdpa"
