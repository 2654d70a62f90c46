"""QAT: fine-tune the simulated model with fake quantization in the forward pass
and the piecewise-linear straight-through estimator in the backward
(INT-FP-QSim Sec. II-C, Eq. 5; the quantizer's own backward).

The training text is `qat.dataset`/`qat.split` (default SST-2 train), never the
evaluation text: `qat.steps * qat.batch_size` random windows of `qat.seq_len`
tokens, drawn with the run seed, so a run is deterministic. AdamW with a
constant learning rate; gradient checkpointing where the model supports it.
With `qat.freeze_embeddings` (default) the token/position embeddings and the
LM head stay fixed: in SmolLM2 the head is tied to the 28M-parameter
embedding, whose gradient and AdamW state would cost about a third of the
model's memory and a large matmul per step for text the model already knows.

Weights change in place, so the layers' cached fake-quantized weights
invalidate on their version counters; the model is left in eval mode.
`abfp-qat` = ABFP quantizers + QAT, the paper's QAT setting.
Errors rather than a run that trains nothing it should: no trainable
parameter, no quantized layer with a trainable weight, or QAT after GPTQ
(GPTQ switches the weight quantizers off; training would move the weights off
the grid and evaluate them in float).
"""
from __future__ import annotations

import math
import time

import torch
from torch import nn

from .. import data
from ..config import ConfigError
from ..surgery import layer_norm_grads_in_fixed_order, quantized_layers
from . import Method, MethodError, register


def validate(cfg):
    q = cfg.qat
    if q.steps < 0:
        raise ConfigError(f"qat.steps must be >= 0, got {q.steps}")
    if not q.lr > 0:
        raise ConfigError(f"qat.lr must be > 0, got {q.lr}")
    if q.seq_len < 2:
        raise ConfigError(f"qat.seq_len must be >= 2, got {q.seq_len}")
    if q.batch_size < 1:
        raise ConfigError(f"qat.batch_size must be >= 1, got {q.batch_size}")
    if q.weight_decay < 0:
        raise ConfigError(f"qat.weight_decay must be >= 0, got {q.weight_decay}")
    steps = list(cfg.method.steps)
    if "gptq" in steps and steps.index("gptq") < steps.index("qat"):
        raise ConfigError("qat after gptq would train GPTQ's on-grid weights off the grid (their weight quantizers "
                          "are off after GPTQ); run qat before gptq")
    if q.dataset not in data.TEXT_DATASETS:
        raise ConfigError(f"unknown qat.dataset {q.dataset!r}; valid: {', '.join(data.TEXT_DATASETS)}")
    if q.steps > 0:
        try:
            data.check_available(q.dataset, q.split)
        except data.DataError as err:
            raise ConfigError(f"qat training text: {err}") from None


def training_windows(tokenizer, q, seed: int) -> torch.Tensor:
    """[steps * batch_size, seq_len] random windows of the training text."""
    return data.calibration_windows(tokenizer, q.dataset, q.split, q.steps * q.batch_size, q.seq_len, seed)


def embedding_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Token and position embeddings and the output head (tied or not)."""
    params = [p for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters(recurse=False)]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        params += list(head.parameters(recurse=False))
    unique = {id(p): p for p in params}
    return list(unique.values())


def _adamw(params, q) -> torch.optim.Optimizer:
    # The fused kernel: on CPU the default multi-tensor AdamW is ~5x slower on 100M parameters.
    try:
        return torch.optim.AdamW(params, lr=q.lr, weight_decay=q.weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(params, lr=q.lr, weight_decay=q.weight_decay)


def _checkpointing(model: nn.Module, on: bool) -> None:
    """Activation checkpointing through transformers (the newer name where it exists)."""
    if on:
        # Non-reentrant: works with frozen embeddings (inputs that need no grad).
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    elif hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()


def finetune(model: nn.Module, windows: torch.Tensor, q, bar=None, seed: int = 0) -> dict:
    """Train `model` on `windows` [steps * batch_size, seq_len] with AdamW; return facts."""
    steps, batch_size = q.steps, q.batch_size
    if windows.shape[0] < steps * batch_size:
        raise ValueError(f"need {steps * batch_size} training windows, got {windows.shape[0]}")
    frozen = {id(p) for p in embedding_parameters(model)} if q.freeze_embeddings else set()
    trainable = [p for p in model.parameters() if id(p) not in frozen]
    layers = quantized_layers(model)
    trained_layers = sum(1 for _, m in layers if id(m.weight) not in frozen)
    if not trainable:
        raise MethodError(f"qat has no trainable parameter in {type(model).__name__} (qat.freeze_embeddings froze them all)")
    if layers and not trained_layers:
        raise MethodError(f"qat would train none of the {len(layers)} quantized layers (their weights are frozen)")
    saved_flags = [(p, p.requires_grad) for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(id(p) not in frozen)
    facts = {
        "steps": steps, "lr": q.lr, "seq_len": q.seq_len, "batch_size": batch_size,
        "quantized_layers_trained": trained_layers,
        "dataset": f"{q.dataset} {q.split}", "tokens": steps * batch_size * q.seq_len,
        "trainable_params": sum(p.numel() for p in trainable),
        "frozen_params": sum(p.numel() for p in model.parameters() if id(p) in frozen),
    }
    if bar is not None:
        bar.start(steps)
    if steps == 0:
        for p, flag in saved_flags:
            p.requires_grad_(flag)
        return facts

    checkpointing = bool(q.grad_checkpointing and getattr(model, "supports_gradient_checkpointing", False))
    if checkpointing:
        _checkpointing(model, True)
    device = next(model.parameters()).device
    optimizer = _adamw(trainable, q)
    torch.manual_seed(seed)  # dropout, stochastic rounding
    losses = []
    model.train()
    t0 = time.time()
    try:
        with layer_norm_grads_in_fixed_order(model):  # gradients with the same bits for any thread count
            for step in range(steps):
                batch = windows[step * batch_size : (step + 1) * batch_size].to(device)
                loss = model(input_ids=batch, labels=batch, use_cache=False).loss
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"QAT loss is {float(loss)} at step {step}; lower qat.lr")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
                if bar is not None:
                    bar.advance(1, f"loss {losses[-1]:.3f}")
    finally:
        seconds = time.time() - t0
        optimizer.zero_grad(set_to_none=True)
        del optimizer
        if checkpointing:
            _checkpointing(model, False)
        model.eval()
        for p, flag in saved_flags:
            p.requires_grad_(flag)
    tail = losses[-max(1, min(10, steps // 5)):]
    stride = max(1, math.ceil(steps / 20))
    facts.update({
        "grad_checkpointing": checkpointing,
        "loss_first": losses[0],
        "loss_last": sum(tail) / len(tail),  # mean of the last steps: one window is noisy
        "loss_curve": [round(l, 4) for l in losses[::stride]],
        "steps_per_s": round(steps / seconds, 4),
        "seconds_train": round(seconds, 3),
    })
    return facts


def apply(ctx):
    model, cfg, bar, q = ctx.model, ctx.cfg, ctx.bar, ctx.cfg.qat
    if q.steps == 0:
        return finetune(model, torch.zeros(0, q.seq_len, dtype=torch.long), q, bar, cfg.seed)
    if ctx.tokenizer is None:
        raise MethodError("qat reads its training text with the model's tokenizer: the stage context has none")
    windows = training_windows(ctx.tokenizer, q, cfg.seed)
    return finetune(model, windows, q, bar, cfg.seed)


def reads(cfg):
    return [(cfg.qat.dataset, cfg.qat.split)] if cfg.qat.steps > 0 else []


register(Method("qat", apply=apply, validate=validate, reads=reads))
