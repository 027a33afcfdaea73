"""Can this CLIP see these defects at all? A nearest-neighbour bound on the frozen encoder's features.

    python -m cnc_hf_train.feature_bound --dataset demo --data_dir demo_output/data \
        --clip_model demo_output/random_clip --image_size 128

For every test image and tapped layer: the largest distance (1 - cosine) of its patch tokens to the
nearest patch token of the same category's normal training images (PatchCore's score, no training).
Printed and written (--output, JSON): its image AUROC per category and defect type. A defect type near
0.5 or below is not novel to the encoder: no model that decodes these features, CNC included, can be
expected to find it, and a threshold will not either. The README's demo section quotes this.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cnc_hf_train.feature_bound", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="demo", help="mvtec, visa, demo or a parquet dir (default: %(default)s)")
    parser.add_argument("--data_dir", required=True, help="the dataset folder")
    parser.add_argument("--clip_model", required=True, help="a CLIP checkpoint (dir or Hub id)")
    parser.add_argument("--image_size", type=int, default=224, help="input size (default: %(default)s)")
    parser.add_argument("--layers", type=int, nargs="+", default=None,
                        help="tapped layers (1-indexed; default: CNC's, 1/4, 2/4, 3/4 of the depth)")
    parser.add_argument("--output", default=None, help="also write the table as JSON here")
    return parser


def patch_tokens(model, processor, images, layers: list[int]) -> torch.Tensor:
    """(N, len(layers), L, C) L2-normalised patch tokens of the vision tower's hidden states."""
    out = []
    with torch.no_grad():
        for start in range(0, len(images), 16):
            pixels = processor(images[start:start + 16], return_tensors="pt")["pixel_values"]
            states = model(pixel_values=pixels, output_hidden_states=True).hidden_states
            out.append(torch.stack([torch.nn.functional.normalize(states[i][:, 1:].float(), dim=-1) for i in layers], 1))
    return torch.cat(out)


def nearest_neighbour_scores(train: torch.Tensor, test: torch.Tensor) -> np.ndarray:
    """(N_test, layers): per layer, max over a test image's patches of 1 - cos to the nearest training patch."""
    scores = []
    for k in range(train.shape[1]):
        bank = train[:, k].reshape(-1, train.shape[-1])
        scores.append(torch.stack([(1 - (image @ bank.T).max(dim=-1).values).max() for image in test[:, k]]))
    return torch.stack(scores, dim=1).numpy()


def main(argv: list[str] | None = None) -> int:
    from sklearn.metrics import roc_auc_score
    from transformers import CLIPVisionModel

    from cnc_hf.data import load_anomaly_dataset
    from cnc_hf.modeling.configuration_cnc import default_feature_layers
    from cnc_hf.modeling.image_processing_cnc import CNCImageProcessor

    from transformers.utils import logging

    args = build_parser().parse_args(argv)
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # a full CLIP checkpoint: its text tower is "unexpected" here, by design
    try:
        model = CLIPVisionModel.from_pretrained(args.clip_model).eval()
    finally:
        logging.set_verbosity(verbosity)
    layers = args.layers or default_feature_layers(model.config.num_hidden_layers)
    processor = CNCImageProcessor(size=args.image_size)
    data = load_anomaly_dataset(args.dataset, data_dir=args.data_dir)
    table = {}
    for category in sorted(set(data["test"]["category"])):
        train = data["train"].filter(lambda row: row["category"] == category)
        test = data["test"].filter(lambda row: row["category"] == category)
        scores = nearest_neighbour_scores(patch_tokens(model, processor, list(train["image"]), layers),
                                          patch_tokens(model, processor, list(test["image"]), layers))
        kinds = np.asarray(test["defect_type"])
        good = kinds == "good"
        table[category] = {kind: {f"layer {layer}": float(roc_auc_score(
            np.r_[np.zeros(good.sum()), np.ones((kinds == kind).sum())],
            np.r_[scores[good, k], scores[kinds == kind, k]])) for k, layer in enumerate(layers)}
            for kind in sorted(set(kinds) - {"good"})}
        for kind, row in table[category].items():
            print(f"{category:>12} {kind:<16} " + "  ".join(f"{name} AUROC {v:.2f}" for name, v in row.items()))
    if args.output:
        with open(args.output, "w") as handle:
            json.dump({"clip_model": str(args.clip_model), "layers": layers, "auroc": table}, handle, indent=2)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
