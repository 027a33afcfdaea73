"""Heat maps of anomaly maps, with numpy and PIL only (no torch): shared by the pipeline and by the
torch-free ONNX Runtime path (cnc_hf.onnx_runtime), so both draw the same picture."""

from __future__ import annotations

import numpy as np
import PIL.Image

HEATMAP_MAX_SIDE = 2048
HEATMAP_ALPHA = 0.5


def _jet_table() -> np.ndarray:
    x = np.linspace(0.0, 1.0, 256, dtype=np.float32)
    lut = np.stack([np.clip(1.5 - np.abs(4.0 * x - c), 0.0, 1.0) for c in (3.0, 2.0, 1.0)], axis=-1)
    return np.round(lut * 255.0).astype(np.uint8)


_JET = _jet_table()  # built once, not per heat map


def jet_colormap(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] to jet RGB (uint8, shape + (3,)): blue -> cyan -> green -> yellow -> red.

    The classic piecewise-linear jet, computed through a 256-entry lookup table so that a large
    map costs one uint8 index array and one gather (no matplotlib dependency).
    """
    lut = _JET
    index = np.round(np.clip(np.nan_to_num(values, nan=0.0), 0.0, 1.0) * 255.0).astype(np.uint8)
    return lut[index]


def threshold_range(threshold: float | None) -> tuple[float, float] | None:
    """The colour scale of a heat map decided at `threshold`: (0, 2 x threshold), so the threshold sits at the
    middle (green) and red is twice it; None (each map's own min..max) without a positive threshold."""
    return (0.0, 2.0 * threshold) if threshold is not None and threshold > 0 else None


def fit_within(width: int, height: int, max_side: int) -> tuple[int, int]:
    """(width, height) scaled down (never up) so that the long side is at most `max_side`."""
    scale = min(1.0, max_side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def squeeze_map(anomaly_map):
    """An (H, W) anomaly map from (H, W), (1, H, W) or (1, 1, H, W) (a numpy array or a torch tensor);
    a ValueError for any other shape. The one rule for every reader of a map (pipeline, processor, overlay)."""
    while anomaly_map.ndim > 2 and anomaly_map.shape[0] == 1:
        anomaly_map = anomaly_map[0]
    if anomaly_map.ndim != 2:
        raise ValueError(f"anomaly_map: shape {tuple(anomaly_map.shape)}; expected (H, W)")
    return anomaly_map


def _axis(n_in: int, n_out: int):
    # torch's bilinear sampling with align_corners=False: source = (i + 0.5) * in/out - 0.5, clamped at 0.
    source = np.maximum((np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    low = np.minimum(np.floor(source).astype(np.int64), n_in - 1)
    high = np.minimum(low + 1, n_in - 1)
    weight = (source - low).astype(np.float32)
    return low, high, 1.0 - weight, weight


def resize_bilinear(values: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize a 2-D float map to (height, width) as `torch.nn.functional.interpolate(mode="bilinear",
    align_corners=False)` does, in float32; at most two output-size arrays live at once."""
    values = np.asarray(values, dtype=np.float32)
    if values.ndim != 2:
        raise ValueError(f"anomaly_map: shape {values.shape}; expected (H, W)")
    low, high, w_low, w_high = _axis(values.shape[0], height)
    rows = values[low] * w_low[:, None] + values[high] * w_high[:, None]  # (height, W_in): small
    low, high, w_low, w_high = _axis(values.shape[1], width)
    out = rows[:, low]
    out *= w_low
    right = rows[:, high]
    right *= w_high
    out += right
    return out


def overlay_heatmap(image: PIL.Image.Image, anomaly_map: np.ndarray, value_range: tuple[float, float] | None = None,
                    alpha: float = HEATMAP_ALPHA, max_side: int = HEATMAP_MAX_SIDE) -> PIL.Image.Image:
    """Blend a jet-coloured anomaly map (any resolution, (H, W)) over an RGB PIL `image` at the image's
    size capped at `max_side` on the long side. `value_range=(low, high)` maps low -> blue and high -> red
    (values outside are clipped); None uses the map's min..max."""
    size = fit_within(image.width, image.height, max_side)
    if image.size != size:
        image = image.resize(size, PIL.Image.Resampling.BILINEAR, reducing_gap=3.0)
    amap = resize_bilinear(squeeze_map(np.asarray(anomaly_map, dtype=np.float32)), size[1], size[0])
    low, high = value_range if value_range is not None else (float(np.nanmin(amap)), float(np.nanmax(amap)))
    span = high - low
    # In place: at display size this is the largest float array the overlay makes.
    amap -= low
    if span > 0:
        amap /= span
    else:
        amap.fill(0.0)
    colours = PIL.Image.fromarray(jet_colormap(amap), "RGB")
    return PIL.Image.blend(image, colours, alpha)
