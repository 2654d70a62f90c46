"""STS-B (GLUE dev, 1,500 sentence pairs): Spearman's rank correlation between the cosine
similarity of the two sentences' embeddings and the human score (higher is better).

An embedding is the mean of the model's last hidden states over the sentence's tokens
(sentence-transformers' mean pooling, which all-MiniLM-L6-v2 was trained with), L2-normalised;
the same code scores an encoder or a causal LM. Sentences are truncated at task.seq_len and,
with task.batch_size=1 (the default), never padded. The metric is scipy's spearmanr."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import data
from . import TASKS, Calibration, Task


def _check(cfg) -> None:
    data.check_available("stsb", cfg.task.split)


def pairs(split: str, max_samples: int | None) -> tuple[list[tuple[str, str, float]], int]:
    """(sentence1, sentence2, score) of the first max_samples pairs, and how many there are."""
    rows = data.load_records("stsb", split)
    out = [(r["sentence1"], r["sentence2"], float(r["score"] if "score" in r else r["label"])) for r in rows]
    return (out if max_samples is None else out[:max_samples]), len(out)


@torch.no_grad()
def embed(model, tokenizer, sentences: list[str], seq_len: int, batch_size: int, progress=None) -> tuple[torch.Tensor, int]:
    """Mean-pooled, L2-normalised last hidden states [n, hidden] and the tokens read."""
    device = next(model.parameters()).device
    out, tokens = [], 0
    for start in range(0, len(sentences), batch_size):
        batch = tokenizer(sentences[start:start + batch_size], truncation=True, max_length=seq_len,
                          padding=batch_size > 1, return_tensors="pt")
        batch = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        hidden = model(**batch, output_hidden_states=True).hidden_states[-1]
        mask = batch.get("attention_mask", torch.ones(batch["input_ids"].shape, device=device)).unsqueeze(-1).to(hidden.dtype)
        tokens += int(mask.sum())
        out.append(F.normalize(((hidden * mask).sum(1) / mask.sum(1).clamp(min=1)).float(), dim=-1))
        if progress is not None:
            progress.advance(len(batch["input_ids"]))
    return torch.cat(out), tokens


def _evaluate(lm, cfg, progress=None) -> dict:
    from scipy.stats import spearmanr

    chosen, available = pairs(cfg.task.split, cfg.task.max_samples)
    if progress is not None:
        progress.start(2 * len(chosen))
    sentences = [a for a, _, _ in chosen] + [b for _, b, _ in chosen]
    vectors, tokens = embed(lm.model, lm.tokenizer, sentences, cfg.task.seq_len, cfg.task.batch_size, progress)
    cosine = (vectors[: len(chosen)] * vectors[len(chosen):]).sum(-1)
    rho = spearmanr(cosine.numpy(), [s for _, _, s in chosen]).statistic
    return {"value": float(rho), "samples": len(chosen), "samples_available": available, "split": cfg.task.split,
            "tokens_evaluated": tokens}


def calibration_texts(dataset: str, split: str) -> list[str]:
    """Both sentences of every training pair, as the task embeds them (one at a time)."""
    return [s for first, second, _ in pairs(split, None)[0] for s in (first, second)]


TASKS["stsb"] = Task("stsb", "spearman", _check, _evaluate, reads=lambda cfg: [("stsb", cfg.task.split)],
                     higher_is_better=True, families=("sentence-encoder", "causal-lm"),
                     calibration=Calibration("stsb", "train", calibration_texts))
