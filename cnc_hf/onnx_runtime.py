"""Run a model exported by `cnc-hf export` with ONNX Runtime, without torch: onnxruntime, numpy, PIL and
transformers (whose image-processor base class `CNCImageProcessor` builds on; it needs no torch).

    from cnc_hf.onnx_runtime import OnnxAnomalyDetector
    detector = OnnxAnomalyDetector("cnc.onnx")
    result = detector("part.png")            # or a PIL image, a numpy array, a list of them
    result["score"], result["is_anomaly"], result["anomaly_map"], result["heatmap"]

The result dict is the pipeline's (`AnomalyMapPipeline`): the same preprocessing (`CNCImageProcessor`
with the settings stored in the ONNX file), the anomaly map resized to the image's own size with the
same bilinear sampling, the decision at the calibrated threshold, and the same heat map. ONNX
Runtime runs with all graph optimisations on.
"""

from __future__ import annotations

import json
import os
from types import SimpleNamespace
from typing import Any

import numpy as np

METADATA_KEY = "cnc_hf"  # as written by cnc_hf.onnx_export


class OnnxAnomalyDetector:
    """A CNC model exported to ONNX, called like the pipeline.

    Args:
        path: the .onnx file written by `cnc-hf export`.
        threshold: decision threshold on the image score (default: the calibrated one stored in the file).
        providers: ONNX Runtime execution providers (default: CPU).
        intra_op_threads: threads per operator (default: ONNX Runtime's choice).
    """

    def __init__(self, path: str | os.PathLike, threshold: float | None = None, providers: list[str] | None = None,
                 intra_op_threads: int | None = None):
        import onnxruntime as ort

        from cnc_hf.modeling.image_processing_cnc import CNCImageProcessor

        path = os.fspath(path)
        if not os.path.isfile(path):
            raise ValueError(f"onnx model {path!r}: no such file; write one with `cnc-hf export`")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if intra_op_threads:
            options.intra_op_num_threads = intra_op_threads
        self.session = ort.InferenceSession(path, options, providers=providers or ["CPUExecutionProvider"])
        stored = self.session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
        if stored is None:
            raise ValueError(f"onnx model {path!r}: no {METADATA_KEY!r} metadata; expected a file written by "
                             "`cnc-hf export`")
        self.metadata = json.loads(stored)
        self.image_size = int(self.metadata["image_size"])
        self.processor = CNCImageProcessor(**self.metadata["processor"])
        config = self.metadata.get("config", {})
        # What modeling.decision.decide reads, as the pipeline reads it from the model's config.
        self.config = SimpleNamespace(
            threshold=self.metadata.get("threshold") if threshold is None else float(threshold),
            **{key: config.get(key) for key in ("category_thresholds", "categories", "category_distance_limits")})

    @property
    def threshold(self) -> float | None:
        """The pooled threshold: `threshold=` given to the constructor, else the calibrated one."""
        return self.config.threshold

    def decision_threshold(self, category: str | None = None, threshold: float | None = None):
        """(threshold, source) that decides for `category`, as `AnomalyMapPipeline.decision_threshold`."""
        from cnc_hf.modeling.configuration_cnc import threshold_for

        return threshold_for(self.config.threshold, self.config.category_thresholds, category, threshold)

    def run(self, pixel_values: np.ndarray) -> tuple[np.ndarray, ...]:
        """The raw graph: (B, 3, S, S) float32 -> (anomaly_map (B, S, S), image_score (B,)[, category_similarity
        (B, K) for a model with category prototypes])."""
        pixel_values = np.asarray(pixel_values)
        expected = (3, self.image_size, self.image_size)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(f"pixel_values: shape {tuple(pixel_values.shape)}; expected (B, {expected[0]}, "
                             f"{expected[1]}, {expected[2]}) as CNCImageProcessor(size={self.image_size}) makes it")
        if pixel_values.dtype != np.float32:
            raise ValueError(f"pixel_values: dtype {pixel_values.dtype}; expected float32")
        return tuple(self.session.run(None, {"pixel_values": pixel_values}))

    def __call__(self, images: Any, batch_size: int = 8, threshold: float | None = None,
                 return_heatmap: bool = True, category: str | None = None):
        """Score one image or a list of them; returns one result dict, or a list for a list."""
        from cnc_hf.modeling.decision import image_result
        from cnc_hf.modeling.image_processing_cnc import load_rgb

        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size: got {batch_size!r}; expected an int >= 1")
        if category is not None:
            self.decision_threshold(category, threshold)  # an unknown category fails before any image is read
        single = not isinstance(images, (list, tuple))
        items = [images] if single else list(images)
        results = []
        for start in range(0, len(items), batch_size):
            rgbs = [load_rgb(item) for item in items[start:start + batch_size]]
            pixel_values = self.processor(rgbs, return_tensors="np")["pixel_values"]
            maps, scores, *similarities = self.run(pixel_values)
            for k, (rgb, small, score) in enumerate(zip(rgbs, maps, scores)):
                results.append(image_result(float(score), small, rgb, (rgb.height, rgb.width), self.processor,
                                            self.config, category, similarities[0][k] if similarities else None,
                                            threshold, return_heatmap=return_heatmap))
        return results[0] if single else results

