"""Which training category an image shows: the nearest category prototype of the frozen CLIP features.

One CNC model serves many categories, and each category has its own decision threshold (normal
scores differ by product). When the caller does not name the category, the model recognises it
from the features it computes anyway for the anomaly map (no second forward): the tapped layers'
patch tokens, averaged over the image (a texture/appearance summary that a defect covering part of
the image moves only a little), L2-normalised per layer and concatenated.

Training stores, per category, the prototype (mean of its normal training images' embeddings,
renormalised) in the weights (`category_prototypes`, safetensors) and a distance limit in the
config (`category_distance_limits`): `factor` times the largest cosine distance of the category's own
training images to its prototype. An image farther than the limit from its nearest prototype is
"unrecognised" (category None), not forced into the nearest category.

`embed` and `prototypes_from` need torch; `recognise` is plain Python so the ONNX Runtime path uses it too.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

DEFAULT_DISTANCE_FACTOR = 4.0


def embed(tapped_features):
    """(B, n, 1 + h*w, C) tapped encoder features -> (B, n*C) unit-norm category embeddings."""
    import torch

    pooled = tapped_features[:, :, 1:].float().mean(dim=2)  # (B, n, C): patch tokens, CLS left out
    pooled = torch.nn.functional.normalize(pooled, dim=-1)
    return pooled.flatten(1) / math.sqrt(pooled.shape[1])


def prototypes_from(embeddings, labels: Sequence[str], factor: float = DEFAULT_DISTANCE_FACTOR):
    """(names, prototypes (K, D), distance limits {name: float}) from normal training embeddings (N, D)
    and their category names."""
    import torch

    if not factor > 0:
        raise ValueError(f"category distance factor: got {factor!r}; expected a number > 0")
    names = sorted(set(labels))
    index = torch.tensor([names.index(label) for label in labels])
    prototypes = torch.stack([embeddings[index == k].mean(dim=0) for k in range(len(names))])
    prototypes = torch.nn.functional.normalize(prototypes, dim=-1)
    own = 1.0 - (embeddings * prototypes[index]).sum(dim=-1)
    # The floor keeps a category of near-identical images (radius ~0) from rejecting its own test images.
    limits = {name: max(factor * float(own[index == k].max()), 1e-4) for k, name in enumerate(names)}
    return names, prototypes, limits


def similarities(embeddings, prototypes):
    """Cosine similarity of each image to each category prototype: (B, K)."""
    return embeddings @ prototypes.to(embeddings.dtype).T


def recognise(similarity: Sequence[float], categories: Sequence[str],
              distance_limits: Mapping[str, float] | None) -> tuple[str | None, str, float]:
    """(category or None, nearest category, cosine distance to it) for one image's similarities."""
    values = [float(v) for v in similarity]
    if len(values) != len(categories) or not values:
        raise ValueError(f"category similarities: got {len(values)} values for {len(categories)} categories")
    best = max(range(len(values)), key=values.__getitem__)
    nearest, distance = categories[best], 1.0 - values[best]
    limit = (distance_limits or {}).get(nearest)
    return (nearest if limit is None or distance <= limit else None), nearest, distance
