"""`cnc-hf export`: a trained CNC model as one ONNX file, for ONNX Runtime without torch.

    cnc-hf export --model demo_output/model --output cnc.onnx
    cnc-hf predict part.png --onnx cnc.onnx          # no torch needed (cnc_hf.onnx_runtime)

The graph takes `pixel_values` (B, 3, S, S) float32, preprocessed as `CNCImageProcessor` does, with a
dynamic batch axis, and returns `anomaly_map` (B, S, S) and `image_score` (B,): the model's own forward
in eval mode (Eq. 17, smoothing and score reduction as configured). The text features are constants of
the graph: after training the prompts are fixed, so the text tower is run once here and folded in.
What a runtime needs beside the graph (the processor's settings, the calibrated threshold, the model's
config) is stored in the ONNX file's metadata_props under the key "cnc_hf" (JSON).

The exporter is torch's TorchScript-based one (`dynamo=False`), which needs no onnxscript.
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import torch

METADATA_KEY = "cnc_hf"
INPUT_NAME = "pixel_values"
OUTPUT_NAMES = ("anomaly_map", "image_score")
CATEGORY_OUTPUT = "category_similarity"
DEFAULT_OPSET = 17


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cnc-hf export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a model dir saved by training, or a Hub id")
    parser.add_argument("--output", required=True, help="the .onnx file to write")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset (default: %(default)s)")
    parser.add_argument("--image_size", type=int, default=None,
                        help="input side S in pixels (default: the model's config.image_size)")
    return parser


class _Exportable(torch.nn.Module):
    """The model with its text features as constants (a buffer), returning (anomaly_map, image_score)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        if model.prompt_learner is not None:
            with torch.no_grad():
                self.register_buffer("text_features", model.text_features().detach().clone())

    def forward(self, pixel_values):
        output = self.model(pixel_values=pixel_values)
        if output.category_similarity is None:
            return output.anomaly_map, output.image_score
        return output.anomaly_map, output.image_score, output.category_similarity


def export_onnx(model, output: str | Path, processor=None, opset: int = DEFAULT_OPSET,
                image_size: int | None = None) -> Path:
    """Write `model` (a CNCModel) as ONNX to `output` and return its path; see the module docstring."""
    import onnx

    from cnc_hf.modeling.image_processing_cnc import CNCImageProcessor

    output = Path(output)
    if output.suffix != ".onnx":
        raise ValueError(f"--output {output}: expected a file name ending in .onnx")
    size = int(image_size or model.config.image_size)
    processor = processor or CNCImageProcessor(size=size)
    if processor.size != size:
        processor = CNCImageProcessor(**{**processor.to_dict(), "size": size})
    model = model.eval().float()
    wrapper = _Exportable(model).eval()
    if model.prompt_learner is not None:  # the traced forward reads the constant, never the text tower
        model.text_features = lambda: wrapper.text_features
    dummy = torch.zeros(2, 3, size, size)
    # A model with category prototypes also returns each image's similarity to them (category recognition).
    names = list(OUTPUT_NAMES) + ([CATEGORY_OUTPUT] if getattr(model, "category_prototypes", None) is not None else [])
    axes = {name: {0: "batch"} for name in [INPUT_NAME, *names]}
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".tmp")
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # The tracer warns where Python numbers come from shapes: the spatial size is fixed by design (one
            # input size per export) and the batch axis is declared dynamic; tests check other batch sizes.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", message=".*shape_type_inference.*")
            warnings.filterwarnings("ignore", message="Constant folding - Only steps=1")  # a slice ORT still runs
            torch.onnx.export(wrapper, (dummy,), str(tmp), input_names=[INPUT_NAME], output_names=names,
                              dynamic_axes=axes, opset_version=opset, dynamo=False, do_constant_folding=True)
    finally:
        if model.prompt_learner is not None:
            del model.text_features  # the class method again
    graph = onnx.load(str(tmp))
    metadata = {
        "image_size": size,
        "processor": {k: v for k, v in processor.to_dict().items() if k in ("size", "image_mean", "image_std",
                                                                             "resample")},
        "threshold": model.config.threshold,
        "model_type": "cnc",
        "config": {k: v for k, v in model.config.to_diff_dict().items() if k != "clip_config"},
    }
    graph.metadata_props.add(key=METADATA_KEY, value=json.dumps(metadata, default=str))
    onnx.save(graph, str(tmp))
    tmp.replace(output)  # a reader never sees a half-written file
    return output


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from cnc_hf.hub import load_model
    from cnc_hf.modeling.image_processing_cnc import CNCImageProcessor

    model = load_model(args.model)
    processor = CNCImageProcessor.from_pretrained(args.model) if Path(args.model).is_dir() else None
    path = export_onnx(model, args.output, processor=processor, opset=args.opset, image_size=args.image_size)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MB): input {INPUT_NAME} (B, 3, S, S), outputs "
          f"{', '.join(OUTPUT_NAMES)}; run it with `cnc-hf predict IMAGES --onnx {path}`")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
