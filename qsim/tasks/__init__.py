"""Evaluation tasks, registered by name. Each checks its data before the model
loads (`check`), evaluates a loaded model (`evaluate`) and may name its own
calibration text (`calibration`: a split it never evaluates, written the way the
task feeds the model), which `calib.dataset=task` reads instead of a plain corpus."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .. import data


TASK_CALIBRATION = "task"  # calib.dataset value: the task's own calibration text


@dataclass(frozen=True)
class Calibration:
    """A task's calibration data: text (dataset, split) read by texts(dataset, split) -> strings,
    or, for image tasks, images(processor, dataset, split, n, seed) -> pixel_values [n, C, H, W]."""
    dataset: str
    split: str
    texts: Callable | None = None
    images: Callable | None = None


@dataclass(frozen=True)
class Task:
    name: str
    metric: str
    check: Callable
    evaluate: Callable
    reads: Callable  # cfg -> [(dataset, split)] evaluate reads (after any fallback): part of the result's identity
    higher_is_better: bool = False
    families: tuple = ("causal-lm", "code-lm")  # the model families (models.FAMILIES) it can score
    calibration: Calibration | None = None  # its own calibration text (calib.dataset=task); None: it has none


def calibration_source(cfg) -> tuple[str, str]:
    """(dataset, split) the calibration windows come from: calib.dataset and calib.split, or with
    calib.dataset=task, the task's own split (raises data.DataError if it has none)."""
    if cfg.calib.dataset != TASK_CALIBRATION:
        return cfg.calib.dataset, cfg.calib.split
    task = TASKS[cfg.task.name]
    if task.calibration is None:
        raise data.DataError(f"task {cfg.task.name!r} has no calibration split of its own (calib.dataset=task); "
                             f"set calib.dataset to one of {', '.join(data.TEXT_DATASETS)}")
    source = (task.calibration.dataset, task.calibration.split)
    if source in task.reads(cfg):
        raise data.DataError(f"calib.dataset=task would calibrate on {' '.join(source)}, the split task "
                             f"{cfg.task.name!r} evaluates; evaluate another split or set calib.dataset")
    return source


def calibration_windows(tokenizer, cfg, n_samples: int | None = None, seq_len: int | None = None) -> torch.Tensor:
    """cfg.calib's windows (n_samples x seq_len, defaults from cfg.calib; GPTQ's seeded sampler)
    from calibration_source(cfg): a text corpus, or the task's own texts joined; for an image
    task, n_samples seeded images through the processor (tokenizer) as pixel_values."""
    c = cfg.calib
    n_samples, seq_len = n_samples or c.n_samples, seq_len or c.seq_len
    dataset, split = calibration_source(cfg)
    if c.dataset != TASK_CALIBRATION:
        return data.calibration_windows(tokenizer, dataset, split, n_samples, seq_len, c.seed)
    own = TASKS[cfg.task.name].calibration
    if own.images is not None:
        return own.images(tokenizer, dataset, split, n_samples, c.seed)
    texts = own.texts(dataset, split)
    return data.sample_windows(data.tokenize(tokenizer, data.join_text(texts)), n_samples, seq_len, c.seed,
                               f"task {cfg.task.name}'s calibration text ({dataset} {split})")


TASKS: dict[str, Task] = {}


def _wikitext_split(cfg) -> str:
    """The paper protocol prefers validation; offline only test exists, so fall back to it."""
    split = cfg.task.split
    if cfg.task.protocol == "paper" and split == "validation" and data.data_dir() and not data.has_offline("wikitext2", split):
        return "test"
    return split


def _check_wikitext2(cfg) -> None:
    data.check_available("wikitext2", _wikitext_split(cfg))


def token_stream(tokenizer, rows: list[str], protocol: str) -> torch.Tensor:
    """The evaluation token stream.

    gptq: "\\n\\n".join(rows) tokenized once (GPTQ, SmoothQuant, RPTQ).
    paper: each row tokenized on its own (special tokens as the tokenizer adds
    them), then concatenated: Hugging Face run_clm, which INT-FP-QSim used.
    """
    if protocol == "gptq":
        return data.tokenize(tokenizer, data.join_text(rows))
    pieces = [torch.as_tensor(tokenizer(r)["input_ids"], dtype=torch.long).reshape(-1) for r in rows]
    return torch.cat([p for p in pieces if p.numel()])


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, seq_len: int, max_windows: int | None, batch_size: int, progress=None) -> dict:
    """exp(mean next-token NLL) over non-overlapping windows of seq_len; the tail is dropped."""
    available = ids.numel() // seq_len
    if available == 0:
        raise ValueError(f"the evaluation text has {ids.numel()} tokens, fewer than seq_len={seq_len}")
    windows = available if max_windows is None else min(available, max_windows)
    stream = ids[: windows * seq_len].view(windows, seq_len)
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    if progress:
        progress.start(windows)
    for start in range(0, windows, batch_size):
        batch = stream[start : start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits
        nll = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total_nll += float(nll)
        total_tokens += batch[:, 1:].numel()
        if progress:
            progress.advance(len(batch), f"ppl {math.exp(total_nll / total_tokens):.2f}")
    return {
        "value": math.exp(total_nll / total_tokens),
        "mean_nll": total_nll / total_tokens,
        "windows": windows,
        "windows_available": available,
        "tokens_evaluated": windows * seq_len,
        "tokens_predicted": total_tokens,
    }


@torch.no_grad()
def greedy_generate(model, tokenizer, prompt: str, max_new_tokens: int, stop: tuple[str, ...] = ()) -> tuple[str, int, int]:
    """Greedy continuation of prompt through the KV cache (each step feeds one token; attention
    runs through qsim's function with the cache's keys and values), ended by the EOS token, by
    max_new_tokens, or by the first of `stop` (cut off). Returns (text, prompt tokens, new tokens)."""
    device = next(model.parameters()).device
    ids = torch.tensor([tokenizer(prompt)["input_ids"]], device=device)
    eos = {t for t in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)) if t is not None}
    eos = {e for t in eos for e in (t if isinstance(t, list) else [t])}
    out = model(input_ids=ids, use_cache=True)
    new: list[int] = []
    for _ in range(max_new_tokens):
        token = int(out.logits[0, -1].argmax())
        if token in eos:
            break
        new.append(token)
        if stop and any(s in tokenizer.decode(new, skip_special_tokens=True) for s in stop):
            break
        out = model(input_ids=torch.tensor([[token]], device=device), cache=out.cache, use_cache=True)
    text = tokenizer.decode(new, skip_special_tokens=True)
    cut = min([text.index(s) for s in stop if s in text], default=len(text))
    return text[:cut], ids.shape[1], len(new)


def _evaluate_wikitext2(lm, cfg, progress=None) -> dict:
    split = _wikitext_split(cfg)
    rows = data.load_rows("wikitext2", split)
    ids = token_stream(lm.tokenizer, rows, cfg.task.protocol)
    out = perplexity(lm.model, ids, cfg.task.seq_len, cfg.task.max_windows, cfg.task.batch_size, progress)
    out["split"] = split
    return out


TASKS["wikitext2"] = Task("wikitext2", "ppl", _check_wikitext2, _evaluate_wikitext2,
                          reads=lambda cfg: [("wikitext2", _wikitext_split(cfg))],
                          calibration=Calibration("wikitext2", "train", lambda dataset, split: data.load_rows(dataset, split)))

from . import humaneval, imagenet, lmeval, squad, sst2, stsb  # noqa: E402,F401  (registers; one file per task)
