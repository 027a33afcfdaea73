"""AnomalyMapPipeline: one call from an image to a score, a yes/no, an anomaly map and a heat map.

    from transformers import pipeline
    detector = pipeline("image-anomaly-detection", model="org/cnc-mvtec", trust_remote_code=True)
    result = detector("part.png")
    result["score"], result["is_anomaly"], result["anomaly_map"], result["heatmap"]

This file is saved next to the model (`cnc_hf.save_model_dir`, `CNCModel.save_pretrained`) and loaded as remote code
by processes that do not have cnc-hf installed, so it imports only numpy, PIL, torch, transformers
and sibling files of the saved model.

Output per image (a list of these for a list input):
- `score` (float): the model's image score (the maximum of the anomaly map, Eq. 17, at the model
  resolution; `config.image_score_reduction`).
- `is_anomaly` (bool or None): `score >= threshold`. The threshold is, in this order: `threshold=`
  passed to the call; the category's own calibrated threshold (`config.category_thresholds`); else
  the pooled `config.threshold` (calibrated on held-out normal images by the trainer). When none
  exists it is None and a warning says so once: we never invent a threshold.
- `category` (str or None): the caller's `category=` (an unknown name is a ValueError listing the
  known ones); else the training category the model recognises from the image (the nearest
  prototype of its frozen CLIP features, `modeling/category.py`; no second forward); None when the
  image is farther than every category's distance limit (a warning says so; the pooled threshold
  decides) or the model has no prototypes.
- `category_source` ("given", "recognised", "unrecognised" or None), `category_distance` (cosine
  distance to the nearest prototype, when recognition ran) and `nearest_category`.
- `threshold` (float or None) and `threshold_source` ("call", "category" or "pooled"): what decided.
- `normalized_score` (float or None): score / threshold, so 1.0 is the decision boundary of every
  category (None without a positive threshold): one number to compare or rank across products.
- `anomaly_map` (float32 numpy, height x width of the ORIGINAL image): the map resized back
  bilinearly. This is the only full-size float array the pipeline creates.
- `heatmap` (RGB PIL image): the map as a jet colour map blended at alpha 0.5 over the input,
  at the original size but at most `HEATMAP_MAX_SIDE` (2048) pixels on the long side, so that a
  10000 x 10000 input does not get a 300 MB overlay. Colour scale (fixed, so that images can be
  compared): `[0, 2 * threshold]` when a threshold is known, so the threshold sits at the middle
  of the scale (green) and red means twice the threshold; without a threshold the scale is the
  image's own min..max (relative only). `heatmap_range=(low, high)` overrides it per call.

Inputs: a file path, http(s) URL, bytes of an encoded image, PIL image, numpy array or torch
tensor (see `to_rgb_pil` for dtypes and layouts), or a list / 4-D batch of them; `batch_size=`
batches the model forward. Anything unusable raises a ValueError that names the input.
"""

from __future__ import annotations

import math

import numpy as np
import PIL.Image
import torch
from transformers import Pipeline
from transformers.utils import logging

from .configuration_cnc import check_threshold, threshold_for
from .decision import image_result
from .heatmap import HEATMAP_ALPHA, HEATMAP_MAX_SIDE, fit_within, jet_colormap
from .heatmap import overlay_heatmap as _overlay
from .image_processing_cnc import CNCImageProcessor, _describe, load_rgb, to_rgb_pil  # noqa: F401  (re-exported)

logger = logging.get_logger(__name__)

TASK = "image-anomaly-detection"
PIPELINE_TYPE = "image"
_fit_within = fit_within  # the name the tests and earlier code use


def overlay_heatmap(
    image: PIL.Image.Image,
    anomaly_map: np.ndarray | torch.Tensor,
    value_range: tuple[float, float] | None = None,
    alpha: float = HEATMAP_ALPHA,
    max_side: int = HEATMAP_MAX_SIDE,
) -> PIL.Image.Image:
    """Blend a jet-coloured anomaly map over `image` (any input `to_rgb_pil` reads) and return an RGB PIL
    image; `anomaly_map` may be a numpy array or a tensor. See `heatmap.overlay_heatmap`."""
    if isinstance(anomaly_map, torch.Tensor):
        anomaly_map = anomaly_map.detach().to("cpu", torch.float32).numpy()
    return _overlay(to_rgb_pil(image), anomaly_map, value_range, alpha, max_side)


# --------------------------------------------------------------------------- the pipeline
class AnomalyMapPipeline(Pipeline):
    r"""Anomaly detection and localisation with a CNC model (task `"image-anomaly-detection"`).

    Build it with `transformers.pipeline("image-anomaly-detection", model=...)` or directly:
    `AnomalyMapPipeline(model=model, image_processor=processor)` (the processor defaults to a
    `CNCImageProcessor` at `model.config.image_size`).

    Call arguments (also accepted at construction, as defaults):
        threshold (`float`, *optional*): decision threshold on the score; defaults to the category's
            calibrated threshold when `category` is given, else `model.config.threshold`.
        category (`str`, *optional*): the product category of the images (one of the model's training
            categories), which selects its calibrated threshold.
        heatmap_range (`(float, float)`, *optional*): colour scale of the heat map; see the module docstring.
        return_heatmap (`bool`, defaults to True): skip the overlay (faster) when False; the key is then None.
        batch_size (`int`): images per model forward.
    """

    _load_processor = False
    _load_image_processor = True
    _load_feature_extractor = False
    _load_tokenizer = False
    _load_video_processor = False

    def __init__(self, model, image_processor=None, **kwargs):
        if image_processor is None and kwargs.get("feature_extractor") is None:
            image_processor = CNCImageProcessor(size=model.config.image_size)
        size = getattr(image_processor, "size", None)
        if isinstance(size, int) and size != model.config.image_size:
            raise ValueError(
                f"the image processor resizes to {size} px (preprocessor_config.json `size`) but the model was "
                f"trained at {model.config.image_size} px (config.json `image_size`); make them equal"
            )
        kwargs.setdefault("task", TASK)
        super().__init__(model=model, image_processor=image_processor, **kwargs)
        self.model.eval()  # train mode returns losses, not maps
        self._warned_no_threshold = False

    def _sanitize_parameters(self, threshold=None, heatmap_range=None, return_heatmap=None, category=None, **kwargs):
        if kwargs:
            raise ValueError(
                f"AnomalyMapPipeline got unexpected arguments {sorted(kwargs)}; "
                "expected threshold, category, heatmap_range, return_heatmap, batch_size"
            )
        postprocess = {}
        if threshold is not None:
            postprocess["threshold"] = check_threshold(threshold)
        if category is not None:
            self.decision_threshold(str(category))  # an unknown category fails here, before any image is read
            postprocess["category"] = str(category)
        if heatmap_range is not None:
            low, high = (float(v) for v in heatmap_range)
            if not (math.isfinite(low) and math.isfinite(high) and high > low):
                raise ValueError(f"heatmap_range: got {heatmap_range!r}; expected (low, high) with high > low")
            postprocess["heatmap_range"] = (low, high)
        if return_heatmap is not None:
            postprocess["return_heatmap"] = bool(return_heatmap)
        return {}, {}, postprocess

    def __call__(self, inputs, **kwargs):
        """Score one image or a list of images; see the class docstring for the arguments."""
        # A tuple or a 4-D array/tensor is a batch, as for CNCImageProcessor.
        if isinstance(inputs, tuple) or (isinstance(inputs, (np.ndarray, torch.Tensor)) and inputs.ndim == 4):
            inputs = list(inputs)
        if isinstance(inputs, list) and not inputs:
            return []
        return super().__call__(inputs, **kwargs)

    def preprocess(self, image):
        rgb = load_rgb(image)
        height, width = rgb.height, rgb.width
        # The processor resizes the 8-bit image before any float conversion (memory O(size^2)).
        pixel_values = self.image_processor(rgb, return_tensors="pt")["pixel_values"]
        # Keep only a display-size copy of the input for the heat map, not the full image.
        display_size = _fit_within(width, height, HEATMAP_MAX_SIDE)
        display = rgb if rgb.size == display_size else rgb.resize(display_size, PIL.Image.Resampling.BILINEAR,
                                                                 reducing_gap=3.0)
        return {
            "pixel_values": pixel_values.to(self.dtype or torch.float32),
            "original_size": torch.tensor([[height, width]]),
            "image": display,
        }

    def _forward(self, model_inputs):
        # Pipeline.forward already runs this under inference mode on the right device.
        outputs = self.model(pixel_values=model_inputs["pixel_values"])
        return {
            "anomaly_map": outputs.anomaly_map,  # first key: the batch size is read from it
            "image_score": outputs.image_score,
            "category_similarity": outputs.category_similarity,
            "original_size": model_inputs["original_size"],
            "image": model_inputs["image"],
        }

    def decision_threshold(self, category: str | None = None, threshold: float | None = None) -> tuple[float | None, str]:
        """(threshold, source) that decides for `category`: `threshold` if given ("call"), else the category's
        calibrated one ("category"), else the pooled one ("pooled"). ValueError for an unknown category."""
        config = self.model.config
        return threshold_for(config.threshold, getattr(config, "category_thresholds", None), category, threshold)

    def _warn_no_threshold(self) -> None:
        if not self._warned_no_threshold:
            self._warned_no_threshold = True
            logger.warning(
                "AnomalyMapPipeline: the model has no calibrated threshold (config.threshold is None) and none was "
                "passed, so is_anomaly is None. Pass threshold=... or use a model trained with cnc-hf's trainer."
            )

    def postprocess(self, model_outputs, threshold=None, heatmap_range=None, return_heatmap=True, category=None):
        height, width = (int(v) for v in model_outputs["original_size"].reshape(-1)[:2])
        small_map = model_outputs["anomaly_map"].reshape(model_outputs["anomaly_map"].shape[-2:]).float().cpu()
        score = float(model_outputs["image_score"].reshape(-1)[0])
        similarity = model_outputs.get("category_similarity")
        similarity = None if similarity is None else similarity.reshape(-1).float().tolist()
        result = image_result(score, small_map, model_outputs["image"], (height, width), self.image_processor,
                              self.model.config, category, similarity, threshold, heatmap_range, return_heatmap)
        if result["category_source"] == "unrecognised":
            logger.warning(
                "AnomalyMapPipeline: the image is unlike every training category (cosine distance "
                f"{result['category_distance']:.4f} to the nearest, {result['nearest_category']!r}, beyond its limit "
                f"{self.model.config.category_distance_limits[result['nearest_category']]:.4f}); category None, "
                "pooled threshold. Pass category=... if you know it."
            )
        if result["threshold"] is None:
            self._warn_no_threshold()
        return result


def custom_pipelines_entry() -> dict:
    """The `custom_pipelines` value of a saved config.json, in the format `Pipeline.save_pretrained` writes:
    what `pipeline(TASK, model=dir, trust_remote_code=True)` reads to find this file in the model directory."""
    impl = f"{AnomalyMapPipeline.__module__.rpartition('.')[2]}.{AnomalyMapPipeline.__name__}"
    return {TASK: {"impl": impl, "pt": ["AutoModel"], "type": PIPELINE_TYPE}}


__all__ = ["AnomalyMapPipeline", "HEATMAP_MAX_SIDE", "PIPELINE_TYPE", "TASK", "custom_pipelines_entry", "jet_colormap",
           "load_rgb", "overlay_heatmap"]
