"""The one picture cnc-hf draws of its results: labelled rows of image | heat map | ground truth.

The demo gallery, `evaluate --heatmaps`, the model card's example and the app all call
`render_examples`, so a picture reads the same everywhere and without the source code:

- column headers over the tiles ("image", "heat map", "ground truth");
- under each row a caption: the image's name and category, its score, the threshold that decided
  (and where that threshold came from), the decision, and, when the truth is known, whether the
  decision was right (the row is framed green when right, red when wrong, grey when unknown);
- at the bottom a colour bar that says what the heat-map colours mean. The pipeline colours a map
  from 0 to twice the deciding threshold, so one bar serves every row whatever its category: blue
  is 0, green the row's own threshold, red twice it or more.

Only numpy and PIL (no torch), so the ONNX Runtime path and the app can draw it too.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont

try:
    from cnc_hf.modeling.heatmap import jet_colormap
except ImportError:  # a Space, where cnc_hf is not installed: the copy cnc_hf.space writes beside the app
    from cnc_heatmap import jet_colormap

RIGHT, WRONG, UNKNOWN = (40, 150, 60), (210, 40, 40), (170, 170, 170)
_FONT_SIZE = 13
_LINE = 16
_PAD = 6


@dataclass
class Example:
    """One image's row. `overlay` is the pipeline's heat map; `truth` a defect mask (L or RGB) or None;
    `label` the ground truth (1 defective, 0 normal, None unknown)."""

    image: PIL.Image.Image
    overlay: PIL.Image.Image
    score: float
    threshold: float | None = None
    threshold_source: str | None = None
    is_anomaly: bool | None = None
    category: str | None = None
    category_source: str | None = None
    name: str | None = None
    truth: PIL.Image.Image | None = None
    label: int | None = None

    @classmethod
    def from_result(cls, image, result: dict, **known) -> "Example":
        """From a pipeline result dict (score, threshold, threshold_source, is_anomaly, category, heatmap)."""
        return cls(image=image, overlay=result["heatmap"], score=float(result["score"]),
                   threshold=result.get("threshold"), threshold_source=result.get("threshold_source"),
                   is_anomaly=result.get("is_anomaly"), category=known.pop("category", result.get("category")),
                   category_source=known.pop("category_source", result.get("category_source")), **known)

    @property
    def correct(self) -> bool | None:
        if self.label is None or self.is_anomaly is None:
            return None
        return bool(self.is_anomaly) == bool(self.label)


@functools.lru_cache(maxsize=4)
def font(size: int = _FONT_SIZE):
    """PIL's default font at `size`, loaded once (the app draws a panel per click)."""
    try:
        return PIL.ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow without FreeType: the fixed bitmap font
        return PIL.ImageFont.load_default()


def caption_lines(example: Example) -> list[str]:
    """The caption under a row, each line short enough for a tile or two."""
    category = example.category or "category unknown"
    if example.category_source in ("recognised", "unrecognised"):  # say that the model, not the caller, named it
        category += f" ({example.category_source})"
    name = " / ".join(part for part in (category, example.name) if part)
    if example.threshold is None:
        decision = f"score {example.score:.3f}, no threshold: no decision"
    else:
        verdict = "ANOMALY" if example.is_anomaly else "normal"
        source = f" ({example.threshold_source})" if example.threshold_source else ""
        decision = f"score {example.score:.3f} vs threshold {example.threshold:.3f}{source} -> {verdict}"
    lines = [name, decision]
    if example.label is not None:
        truth = "defective" if example.label else "normal"
        lines.append(f"truth: {truth}" + {True: "  RIGHT", False: "  WRONG", None: ""}[example.correct])
    return lines


def _truth_tile(example: Example, tile: int) -> PIL.Image.Image:
    if example.truth is not None:
        return example.truth.convert("RGB").resize((tile, tile), PIL.Image.Resampling.NEAREST)
    if example.label == 0:  # a normal image: no defect pixel anywhere
        return PIL.Image.new("RGB", (tile, tile), "black")
    cell = PIL.Image.new("RGB", (tile, tile), (128, 128, 128))
    PIL.ImageDraw.Draw(cell).text((_PAD, tile // 2 - _LINE // 2), "no mask", fill="white", font=font())
    return cell


def colour_bar(width: int, thresholds_known: bool = True, height: int = 14,
               value_range: tuple[float, float] | None = None) -> PIL.Image.Image:
    """The heat-map scale with its labels. With thresholds, 0 / threshold / 2x threshold; with a fixed
    `value_range` its two ends; without either, each map's own min..max."""
    ramp = jet_colormap(np.tile(np.linspace(0.0, 1.0, width, dtype=np.float32), (height, 1)))
    bar = PIL.Image.new("RGB", (width, height + 2 * _LINE + 4), "white")
    bar.paste(PIL.Image.fromarray(ramp, "RGB"), (0, 0))
    draw, f = PIL.ImageDraw.Draw(bar), font()
    if value_range is not None:
        labels = [(0.0, f"{value_range[0]:.3g}"), (1.0, f"{value_range[1]:.3g}")]
        note = "heat-map colour scale"
    elif thresholds_known:
        labels = [(0.0, "0"), (0.5, "threshold"), (1.0, "2x threshold")]
        note = "heat map: blue = 0, green = the row's decision threshold, red = twice it or more"
    else:
        labels = [(0.0, "min"), (1.0, "max")]
        note = "heat map: each map's own minimum (blue) to maximum (red); no threshold"
    for at, text in labels:
        x = round(at * (width - 1))
        draw.line([(x, 0), (x, height + 2)], fill="black", width=2 if at == 0.5 else 1)
        length = draw.textlength(text, font=f)
        draw.text((min(max(0, x - length / 2), width - length), height + 3), text, fill="black", font=f)
    draw.text((0, height + 3 + _LINE), note, fill="black", font=f)
    return bar


def render_examples(examples: Sequence[Example], tile: int = 192, groups: int = 1,
                    ground_truth: bool | None = None, title: str | None = None,
                    value_range: tuple[float, float] | None = None) -> PIL.Image.Image:
    """A labelled grid: `groups` blocks of rows side by side, each row image | heat map [| ground truth].

    `ground_truth=None` shows the truth column when any example has a mask or a label.
    `value_range`: the fixed (low, high) the overlays were coloured with, if not 0..2x threshold.
    """
    if not examples:
        raise ValueError("render_examples: no examples to draw")
    if ground_truth is None:
        ground_truth = any(e.truth is not None or e.label is not None for e in examples)
    headers = ["image", "heat map"] + (["ground truth"] if ground_truth else [])
    f = font()
    caption_height = 3 * _LINE + _PAD
    row_height = tile + caption_height + 2 * _PAD
    block_width = len(headers) * tile + 2 * _PAD
    per_group = -(-len(examples) // groups)
    width = groups * block_width + (groups - 1) * _PAD
    title_height = _LINE + _PAD if title else 0
    header_height = _LINE + _PAD
    thresholds_known = all(e.threshold is not None for e in examples)
    bar = colour_bar(min(width - 2 * _PAD, 480), thresholds_known, value_range=value_range)
    height = title_height + header_height + per_group * row_height + bar.height + 2 * _PAD
    canvas = PIL.Image.new("RGB", (width, height), "white")
    draw = PIL.ImageDraw.Draw(canvas)
    if title:
        draw.text((_PAD, _PAD // 2), title, fill="black", font=f)
    for g in range(groups):
        left = g * (block_width + _PAD)
        for c, header in enumerate(headers):
            x = left + _PAD + c * tile + (tile - draw.textlength(header, font=f)) / 2
            draw.text((x, title_height + 2), header, fill="black", font=f)
    for k, example in enumerate(examples):
        g, r = divmod(k, per_group)
        left, top = g * (block_width + _PAD), title_height + header_height + r * row_height
        frame = {True: RIGHT, False: WRONG, None: UNKNOWN}[example.correct]
        draw.rectangle([left, top, left + block_width - 1, top + row_height - _PAD], outline=frame, width=3)
        tiles = [example.image.convert("RGB").resize((tile, tile), PIL.Image.Resampling.BILINEAR),
                 example.overlay.convert("RGB").resize((tile, tile), PIL.Image.Resampling.BILINEAR)]
        if ground_truth:
            tiles.append(_truth_tile(example, tile))
        for c, cell in enumerate(tiles):
            canvas.paste(cell, (left + _PAD + c * tile, top + _PAD))
        for i, line in enumerate(caption_lines(example)):
            colour = frame if i == 2 and example.correct is not None else "black"
            draw.text((left + _PAD, top + _PAD + tile + 2 + i * _LINE), line, fill=colour, font=f)
    canvas.paste(bar, (_PAD, height - bar.height - _PAD))
    return canvas
