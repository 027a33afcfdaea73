"""The one picture (cnc_hf.figures): what a reader needs is on it, and the marks say what they mean."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest

from cnc_hf.figures import _LINE, _PAD, RIGHT, UNKNOWN, WRONG, Example, caption_lines, colour_bar, render_examples
from cnc_hf.modeling.heatmap import jet_colormap


def example(score: float, label: int | None, threshold: float | None = 1.0, **extra) -> Example:
    flat = PIL.Image.new("RGB", (40, 30), (90, 90, 90))
    return Example(image=flat, overlay=flat, score=score, threshold=threshold, threshold_source="category",
                   is_anomaly=None if threshold is None else score >= threshold, category="brick", label=label, **extra)


def test_captions_name_category_score_threshold_decision_and_truth():
    right, wrong = example(1.5, 1, name="scratch/003.png"), example(1.5, 0, category_source="recognised")
    assert caption_lines(right) == ["brick / scratch/003.png",
                                    "score 1.500 vs threshold 1.000 (category) -> ANOMALY", "truth: defective  RIGHT"]
    assert caption_lines(wrong)[0] == "brick (recognised)" and caption_lines(wrong)[2] == "truth: normal  WRONG"
    assert caption_lines(example(0.2, None, threshold=None)) == ["brick", "score 0.200, no threshold: no decision"]
    unknown = Example(image=right.image, overlay=right.overlay, score=0.3, category_source="unrecognised")
    assert caption_lines(unknown)[0] == "category unknown (unrecognised)"


def test_grid_layout_frames_and_colour_bar():
    tile, rows = 64, [example(1.5, 1), example(1.5, 0), example(0.5, None)]
    picture = np.asarray(render_examples(rows, tile=tile, groups=2))
    block = 3 * tile + 2 * _PAD  # image | heat map | ground truth, framed
    assert picture.shape[1] == 2 * block + _PAD
    header, row_height = _LINE + _PAD, tile + 3 * _LINE + 3 * _PAD
    # Rows 1-2 in the first block, row 3 in the second; frames green (right), red (wrong), grey (no truth).
    assert tuple(picture[header + 1, 1]) == RIGHT
    assert tuple(picture[header + row_height + 1, 1]) == WRONG
    assert tuple(picture[header + 1, block + _PAD + 1]) == UNKNOWN
    # The ground-truth tile of a normal image without a mask is black (no defect pixel), of a defect one grey.
    assert (picture[header + _PAD + 5, _PAD + 2 * tile + 5] == 128).all()  # defective, no mask: unknown
    assert (picture[header + row_height + _PAD + 5, _PAD + 2 * tile + 5] == 0).all()  # normal: all black
    # The colour bar's ends are the heat map's blue (0) and red (2x the threshold).
    bar = np.asarray(colour_bar(200))
    ramp = jet_colormap(np.linspace(0.0, 1.0, 200, dtype=np.float32))  # (the ends carry black tick marks)
    assert (bar[2, 1] == ramp[1]).all() and (bar[2, 198] == ramp[198]).all()
    assert tuple(ramp[1]) == pytest.approx((0, 0, 134), abs=4) and ramp[198][0] > 120 and ramp[198][1:].max() < 5


def test_nothing_to_draw_is_an_error():
    with pytest.raises(ValueError, match="no examples"):
        render_examples([])
