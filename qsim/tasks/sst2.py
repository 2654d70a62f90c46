"""SST-2 (GLUE dev, 872 sentences): accuracy of the sentiment label (higher is better).

A causal LM is scored zero-shot by label log-likelihood, with lm-evaluation-harness's GLUE
prompt: "{sentence}\\nQuestion: Is this sentence positive or negative?\\nAnswer:" followed by
" negative" or " positive"; the label whose tokens have the larger summed log-probability is
the prediction. A sequence classifier takes the argmax of its head, its labels read from the
checkpoint's id2label (a name containing "neg"/"pos", else the index)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import data
from . import TASKS, Calibration, Task

PROMPT = "{sentence}\nQuestion: Is this sentence positive or negative?\nAnswer:"
LABELS = (" negative", " positive")  # GLUE: 0 negative, 1 positive


def calibration_texts(dataset: str, split: str) -> list[str]:
    """The training sentences as the task reads them: the prompt and the gold label's word."""
    return [PROMPT.format(sentence=s) + LABELS[label] for s, label in examples(split, None)[0]]


def _check(cfg) -> None:
    data.check_available("sst2", cfg.task.split)


def examples(split: str, max_samples: int | None) -> tuple[list[tuple[str, int]], int]:
    """(sentence, label) of the first max_samples rows, and how many there are."""
    rows = data.load_records("sst2", split)
    out = [(r.get("text", r.get("sentence")), int(r["label"])) for r in rows]
    return (out if max_samples is None else out[:max_samples]), len(out)


@torch.no_grad()
def label_loglikelihoods(model, tokenizer, context: str, continuations: tuple[str, ...]) -> tuple[list[float], int]:
    """Summed log p(continuation | context) for each continuation, and the tokens read. The
    context is tokenized alone and each continuation appended (lm-eval's split), so all share
    the context's tokens; one forward per continuation (one in all when each is one token)."""
    device = next(model.parameters()).device
    ctx = tokenizer(context)["input_ids"]
    conts = [tokenizer(context + c)["input_ids"][len(ctx):] for c in continuations]
    if all(len(c) == 1 for c in conts):
        logits = model(input_ids=torch.tensor([ctx], device=device), use_cache=False).logits[0, -1].float()
        logp = F.log_softmax(logits, -1)
        return [float(logp[c[0]]) for c in conts], len(ctx)
    scores, tokens = [], 0
    for cont in conts:
        ids = torch.tensor([ctx + cont], device=device)
        logp = F.log_softmax(model(input_ids=ids, use_cache=False).logits[0, len(ctx) - 1:-1].float(), -1)
        scores.append(float(logp.gather(-1, torch.tensor(cont, device=device)[:, None]).sum()))
        tokens += ids.numel()
    return scores, tokens


def _label_index(id2label: dict) -> dict[int, int]:
    """The classifier head's index -> GLUE label (0 negative, 1 positive)."""
    names = {int(i): str(n).lower() for i, n in id2label.items()}
    if len(names) == 2 and all(("neg" in n) != ("pos" in n) for n in names.values()):
        return {i: int("pos" in n) for i, n in names.items()}
    return {i: i for i in names}


@torch.no_grad()
def _evaluate(lm, cfg, progress=None) -> dict:
    chosen, available = examples(cfg.task.split, cfg.task.max_samples)
    if progress is not None:
        progress.start(len(chosen))
    model, tok = lm.model, lm.tokenizer
    device = next(model.parameters()).device
    correct, tokens = 0, 0
    to_label = _label_index(model.config.id2label) if lm.family == "seq-classifier" else None
    for done, (sentence, label) in enumerate(chosen, 1):
        if to_label is None:
            scores, n = label_loglikelihoods(model, tok, PROMPT.format(sentence=sentence), LABELS)
            predicted = max(range(len(scores)), key=scores.__getitem__)
        else:
            batch = tok(sentence, truncation=True, max_length=cfg.task.seq_len, return_tensors="pt").to(device)
            predicted, n = to_label[int(model(**batch).logits[0].argmax())], int(batch["input_ids"].numel())
        correct += predicted == label
        tokens += n
        if progress is not None:
            progress.advance(1, f"acc {correct / done:.3f}")
    return {"value": correct / len(chosen), "correct": correct, "samples": len(chosen), "samples_available": available,
            "split": cfg.task.split, "tokens_evaluated": tokens,
            "scoring": "classifier head" if to_label is not None else "label log-likelihood (lm-eval GLUE prompt)"}


TASKS["sst2"] = Task("sst2", "accuracy", _check, _evaluate, reads=lambda cfg: [("sst2", cfg.task.split)],
                     higher_is_better=True, families=("causal-lm", "code-lm", "seq-classifier"),
                     calibration=Calibration("sst2", "train", calibration_texts))
