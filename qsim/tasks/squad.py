"""SQuAD v1.1 dev (10,570 questions): F1 and exact match, in percent (higher is better).

The metric is the official v1.1 evaluation script's definition, written here (`evaluate`
0.4 fetches its squad metric from the hub, which fails offline; torchmetrics is not a
dependency): answers are normalised (lower case, punctuation and the articles a/an/the
removed, whitespace collapsed), F1 is the token-overlap F1 of the normalised answers, EM
their equality, each the maximum over the question's reference answers, averaged.

- A QA encoder (model.family=qa-encoder) is extractive: the question and context go in as
  a pair, the context in windows of task.seq_len tokens overlapping by task.stride; the answer
  is the span (at most task.max_answer_tokens) with the largest start+end logit over all windows.
- A causal LM is generative: PROMPT, greedy decoding through the KV cache (and so through
  qsim's attention function) for at most task.max_new_tokens, cut at the first newline.
"""
from __future__ import annotations

import collections
import re
import string

import torch

from .. import data
from . import TASKS, Calibration, Task, greedy_generate

PROMPT = "Title: {title}\n\nBackground: {context}\n\nQuestion: {question}\n\nAnswer:"


def normalize_answer(text: str) -> str:
    """The official script's normalisation: lower, drop punctuation, drop articles, collapse spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def f1_score(prediction: str, truth: str) -> float:
    pred, gold = normalize_answer(prediction).split(), normalize_answer(truth).split()
    common = sum((collections.Counter(pred) & collections.Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, truth: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(truth))


def squad_scores(predictions: list[str], answers: list[list[str]]) -> dict:
    """{"f1", "exact_match"} in percent: each prediction's best over its references, averaged."""
    f1 = sum(max(f1_score(p, a) for a in refs) for p, refs in zip(predictions, answers, strict=True))
    em = sum(max(exact_match(p, a) for a in refs) for p, refs in zip(predictions, answers, strict=True))
    return {"f1": 100.0 * f1 / len(predictions), "exact_match": 100.0 * em / len(predictions)}


def _check(cfg) -> None:
    data.check_available("squad", cfg.task.split)


def questions(split: str, max_samples: int | None) -> tuple[list[dict], int]:
    rows = data.load_records("squad", split)
    return (rows if max_samples is None else rows[:max_samples]), len(rows)


@torch.no_grad()
def extract_answer(model, tokenizer, question: str, context: str, seq_len: int, stride: int,
                   max_answer_tokens: int) -> tuple[str, int]:
    """The best context span by start+end logit over the context's windows; and the tokens read."""
    device = next(model.parameters()).device
    enc = tokenizer(question, context, truncation="only_second", max_length=seq_len, stride=stride,
                    return_overflowing_tokens=True, return_offsets_mapping=True, padding=False)
    best, best_span, tokens = -float("inf"), (0, 0), 0
    for w in range(len(enc["input_ids"])):
        ids = torch.tensor([enc["input_ids"][w]], device=device)
        extra = {k: torch.tensor([enc[k][w]], device=device) for k in ("attention_mask", "token_type_ids") if k in enc}
        out = model(input_ids=ids, **extra)
        start, end = out.start_logits[0].float(), out.end_logits[0].float()
        in_context = torch.tensor([s == 1 for s in enc.sequence_ids(w)], device=device)
        start = start.masked_fill(~in_context, -float("inf"))
        end = end.masked_fill(~in_context, -float("inf"))
        n = start.numel()
        score = start[:, None] + end[None, :]  # [start, end]
        allowed = torch.ones(n, n, dtype=torch.bool, device=device).triu().tril(max_answer_tokens - 1)
        score = score.masked_fill(~allowed, -float("inf"))
        value, flat = score.flatten().max(0)
        if float(value) > best:
            best, (s, e) = float(value), divmod(int(flat), n)
            offsets = enc["offset_mapping"][w]
            best_span = (offsets[s][0], offsets[e][1])
        tokens += ids.numel()
    return context[best_span[0]:best_span[1]], tokens


def _evaluate(lm, cfg, progress=None) -> dict:
    chosen, available = questions(cfg.task.split, cfg.task.max_samples)
    if progress is not None:
        progress.start(len(chosen))
    extractive = lm.family == "qa-encoder"
    predictions, tokens, f1_sum = [], 0, 0.0
    for q in chosen:
        if extractive:
            answer, n = extract_answer(lm.model, lm.tokenizer, q["question"], q["context"], cfg.task.seq_len,
                                       cfg.task.stride, cfg.task.max_answer_tokens)
        else:
            answer, n, _ = greedy_generate(lm.model, lm.tokenizer, PROMPT.format(**q), cfg.task.max_new_tokens, ("\n",))
            answer = answer.strip()
        predictions.append(answer)
        tokens += n
        f1_sum += max(f1_score(answer, a) for a in q["answers"])
        if progress is not None:
            progress.advance(1, f"F1 {100 * f1_sum / len(predictions):.1f}")
    scores = squad_scores(predictions, [q["answers"] for q in chosen])
    return {"value": scores["f1"], **scores, "samples": len(chosen), "samples_available": available,
            "split": cfg.task.split, "tokens_evaluated": tokens,
            "mode": "extractive" if extractive else "generative (greedy, KV cache)",
            "examples": [{"id": q["id"], "prediction": p, "answers": q["answers"]} for q, p in zip(chosen[:5], predictions)]}


def calibration_texts(dataset: str, split: str) -> list[str]:
    """Training questions as the generative prompt reads them, each followed by its first answer."""
    return [PROMPT.format(**q) + " " + q["answers"][0] for q in questions(split, None)[0] if q["answers"]]


TASKS["squad"] = Task("squad", "f1", _check, _evaluate, reads=lambda cfg: [("squad", cfg.task.split)],
                      higher_is_better=True, families=("qa-encoder", "causal-lm", "code-lm"),
                      calibration=Calibration("squad", "train", calibration_texts))
