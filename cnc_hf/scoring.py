"""The scoring loop shared by calibration and evaluation: a model over a dataset split, batched, sharded
over Accelerate processes, in eval mode without autocast (scores do not depend on the training's mixed
precision)."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader


def score_batches(model, processor, dataset_split, batch_size: int, accelerator=None, num_workers: int = 0,
                  progress: bool = True, desc: str = "eval"):
    """Yield (batch, anomaly_map, image_score, category_similarity or None) for every batch of this process's shard.

    With an `accelerator` the loader is sharded over the processes (padded to even batches; the
    caller gathers with `gather_for_metrics`). The model runs in eval mode, without autocast, so that
    scores are the same whatever mixed precision training used.
    """
    if accelerator is not None:
        model = accelerator.unwrap_model(model)
    was_training = model.training
    model.eval()
    device = accelerator.device if accelerator is not None else next(model.parameters()).device
    try:
        with torch.no_grad():
            for batch in sharded_batches(dataset_split, processor, batch_size, device, accelerator, num_workers,
                                         progress, desc):
                output = model(pixel_values=batch["pixel_values"].to(device))
                similarity = output.category_similarity
                yield (batch, output.anomaly_map.float(), output.image_score.float(),
                       None if similarity is None else similarity.float())
    finally:
        model.train(was_training)


def sharded_batches(dataset_split, processor, batch_size: int, device, accelerator=None, num_workers: int = 0,
                    progress: bool = True, desc: str = "eval"):
    """The collated batches (`cnc_hf.data.make_collate_fn`) of this process's shard of `dataset_split`, in order,
    with a progress bar on the main process. With an `accelerator` the shards are padded to even batches
    (gather with `gather_for_metrics`)."""
    from tqdm.auto import tqdm

    from cnc_hf.data import make_collate_fn

    loader = DataLoader(dataset_split, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=make_collate_fn(processor))
    if accelerator is not None:
        # prepare_data_loader, not prepare: the loader must not join the accelerator's checkpointed state.
        from accelerate.data_loader import prepare_data_loader

        loader = prepare_data_loader(loader, device, num_processes=accelerator.num_processes,
                                     process_index=accelerator.process_index, put_on_device=True)
    main = accelerator is None or accelerator.is_local_main_process
    yield from tqdm(loader, desc=desc, disable=not (progress and main), leave=False)


def gather(accelerator, tensors):
    return tensors if accelerator is None else accelerator.gather_for_metrics(tensors)


def predict_image_scores(model, processor, dataset_split, batch_size: int = 8, accelerator=None,
                         num_workers: int = 0, progress: bool = True) -> tuple[np.ndarray, list[str]]:
    """Image scores of every image of `dataset_split` (gathered over processes) and their categories."""
    names = sorted(set(dataset_split["category"]))
    ids = {name: i for i, name in enumerate(names)}
    scores, categories = [], []
    for batch, _, score, _ in score_batches(model, processor, dataset_split, batch_size, accelerator, num_workers,
                                          progress, desc="calibrate"):
        cat = torch.tensor([ids[c] for c in batch["categories"]], device=score.device)
        score, cat = gather(accelerator, (score, cat))
        scores.append(score.cpu().numpy())
        categories += [names[i] for i in cat.tolist()]
    return np.concatenate(scores).astype(np.float64), categories
