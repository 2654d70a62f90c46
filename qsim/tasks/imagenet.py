"""ImageNet-1k validation (50,000 images): top-1 accuracy in percent, as the paper reports it
(higher is better), for image classifiers.

Online the images come from the hub (`ILSVRC/imagenet-1k`, gated: accept its terms and log
in). Offline, QSIM_DATA_DIR/imagenet/val is an image folder: one sub-folder per class, sorted
names giving class indices 0, 1, ... (ImageNet's wnids sorted, as the hub's labels are).
Each image goes through the checkpoint's image processor (resize, crop, normalise)."""
from __future__ import annotations

import torch

from .. import data
from . import TASKS, Calibration, Task


def _check(cfg) -> None:
    data.check_available("imagenet", cfg.task.split)


def pixel_values(processor, rows: list[dict]) -> torch.Tensor:
    """The rows' images (paths offline, PIL images from the hub) through the checkpoint's processor."""
    from PIL import Image

    images = [(Image.open(r["image"]) if isinstance(r["image"], str) else r["image"]).convert("RGB") for r in rows]
    return processor(images=images, return_tensors="pt")["pixel_values"]


def calibration_images(processor, dataset: str, split: str, n_samples: int, seed: int) -> torch.Tensor:
    """n_samples training images drawn with the seed (without replacement), as pixel_values."""
    rows = data.load_records(dataset, split)
    if len(rows) < n_samples:
        raise data.DataError(f"{dataset} {split} has {len(rows)} images, fewer than calib.n_samples={n_samples}")
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))[:n_samples]
    return pixel_values(processor, [rows[i] for i in order.tolist()])


def _evaluate(lm, cfg, progress=None) -> dict:
    rows = data.load_records("imagenet", cfg.task.split)
    chosen = rows if cfg.task.max_samples is None else rows[:cfg.task.max_samples]
    if progress is not None:
        progress.start(len(chosen))
    device = next(lm.model.parameters()).device
    correct = 0
    with torch.no_grad():
        for start in range(0, len(chosen), cfg.task.batch_size):
            batch = chosen[start:start + cfg.task.batch_size]
            pixels = pixel_values(lm.tokenizer, batch).to(device)
            predicted = lm.model(pixel_values=pixels).logits.argmax(-1).tolist()
            correct += sum(int(p == int(r["label"])) for p, r in zip(predicted, batch))
            if progress is not None:
                progress.advance(len(batch), f"top-1 {100 * correct / (start + len(batch)):.1f}%")
    return {"value": 100.0 * correct / len(chosen), "correct": correct, "samples": len(chosen), "samples_available": len(rows),
            "split": cfg.task.split, "tokens_evaluated": None}


TASKS["imagenet"] = Task("imagenet", "top1", _check, _evaluate, reads=lambda cfg: [("imagenet", cfg.task.split)],
                         higher_is_better=True, families=("image-classifier",),
                         calibration=Calibration("imagenet", "train", images=calibration_images))
