"""GPTQ (Frantar et al. 2022): weight rounding with second-order error feedback,
on the simulator's own weight grid.

Per layer, with H = 2 X X^T / n from calibration inputs X, columns are
quantized one at a time (optionally in act-order, largest diag(H) first) and
each column's rounding error is spread over the not-yet-quantized columns
through the upper Cholesky factor of H^-1, in lazy blocks of `gptq.block_size`
columns. The grid is whatever the layer's weight quantizer is: INT-b or a
minifloat, per tensor, per output channel (asymmetric INT like the reference
with `gptq.symmetric=false`), per group of `gptq.group_size` input columns,
or ABFP n-blocks with BF16 scales. Group/block scales are computed from the
already-updated weights when their first column comes up (the reference's
rule); with act-order they are fixed up front from the original weights
("static groups"), since groups are contiguous input ranges in the engine.

Model level: sequential over the decoder blocks. The inputs of block 0 are
captured for every calibration window; for each block, one pass collects the
Hessians of its linears, GPTQ runs on them, and a second pass through the now
quantized block gives the next block's inputs. Hessian inputs are what each
matmul sees in the simulated model: the outputs of already-quantized earlier
blocks, passed through the layer's own input (activation) quantizer; inside
the current block the weights are float while the Hessians are collected
(as in the reference). Layers that read the same tensor with the same input
quantizer (q/k/v, gate/up) share one Hessian and are quantized together.

After GPTQ the layer's weight holds values on the grid and its weight
quantizer is switched off: re-quantizing with dynamic scales would not be
idempotent (a block whose max was rounded down gets a smaller scale).
Linears outside the decoder blocks (and convolutions, attention in-projections,
blocks past gptq.max_blocks, layers the calibration windows never reach) keep
RTN weights; the facts list each with its reason (`rtn_layers`). A format that
does not quantize weights is a config error; a run where GPTQ rounds no layer,
an error.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from ..config import ConfigError
from ..formats import IntFormat
from ..quantizer import GRANULARITIES, QuantSpec, dynamic_range, quantize_view, static_range
from ..surgery import QuantHFConv1D, QuantLinear, compact_names, is_quantized_layer, role_specs
from ..capture import StopForward, one_thread
from . import METHODS, Method, MethodError, register

# ---------------------------------------------------------------- the grid, column by column


@dataclass
class WeightGrid:
    """A weight quantizer's grid for a [rows, cols] matrix (rows = output channels).

    `group` columns share a scale (None: the whole row, or the whole tensor for
    tensor granularity); `amax` is a static per-row/per-tensor range.
    """

    spec: QuantSpec
    group: int | None = None
    amax: torch.Tensor | None = None

    @classmethod
    def of(cls, spec: QuantSpec, amax: torch.Tensor | None = None) -> "WeightGrid":
        group = spec.block if spec.granularity == "block" else None
        if spec.mode == "static" and spec.granularity not in ("tensor", "channel"):
            raise ValueError("static weight scales are supported per tensor or per channel")
        return cls(spec, group, amax if spec.mode == "static" else None)

    @property
    def per_tensor(self) -> bool:
        return self.spec.granularity == "tensor"

    def fit(self, columns: torch.Tensor):
        """The range (lo, hi) of the rows of `columns` [rows, k]; lo None = symmetric."""
        if self.amax is not None:
            return static_range(self.amax, columns, replace(self.spec, axis=0))
        if self.per_tensor:
            return dynamic_range(columns, replace(self.spec, granularity="tensor"))
        return dynamic_range(columns, replace(self.spec, granularity="token", axis=-1))

    def quantize(self, column: torch.Tensor, params) -> torch.Tensor:
        lo, hi = params
        q, _ = quantize_view(column.unsqueeze(1), lo, hi, self.spec, self.spec.fmt, want_mask=False)
        return q.squeeze(1)

    def quantize_matrix(self, weight: torch.Tensor) -> torch.Tensor:
        """Round-to-nearest on the same grid (the RTN baseline)."""
        out = torch.empty_like(weight)
        step = self.group or weight.shape[1]
        for start in range(0, weight.shape[1], step):
            cols = weight[:, start : start + step]
            lo, hi = self.fit(cols)
            out[:, start : start + step], _ = quantize_view(cols, lo, hi, self.spec, self.spec.fmt, want_mask=False)
        return out


# ---------------------------------------------------------------- GPTQ on one matrix


@dataclass
class GPTQResult:
    weight: torch.Tensor  # quantized, [rows, cols]
    damp_used: float
    dead_columns: int


def _inverse_cholesky(hessian: torch.Tensor, damp: float):
    """Upper Cholesky factor of (H + damp*mean(diag H)*I)^-1; more damping if H is not PD."""
    mean_diag = float(torch.diagonal(hessian).mean())
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    for attempt in range(6):
        d = damp * 10**attempt if damp > 0 else (0.0 if attempt == 0 else 1e-4 * 10 ** (attempt - 1))
        lower, info = torch.linalg.cholesky_ex(hessian + d * mean_diag * eye)
        if info == 0:
            inverse = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if info == 0:
                return upper, d
    raise RuntimeError("GPTQ: the Hessian stays singular even with 100x dampening")


@torch.no_grad()
def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, grid: WeightGrid, block_size: int = 128,
                  damp: float = 0.01, act_order: bool = False) -> GPTQResult:
    """Quantize `weight` [rows, cols] column by column on `grid`, feeding each
    column's error forward with the inverse Hessian of the inputs [cols, cols]."""
    with one_thread():
        return _gptq(weight, hessian, grid, block_size, damp, act_order)


def _gptq(weight, hessian, grid, block_size, damp, act_order) -> GPTQResult:
    W = weight.detach().float().clone()
    H = hessian.detach().float().clone()
    cols = W.shape[1]
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0  # an input that is always 0: any weight works; the reference zeroes it
    W[:, dead] = 0.0
    group = grid.group
    perm = torch.argsort(torch.diagonal(H), descending=True) if act_order else None
    # Fixed ranges: per row / tensor over the whole matrix, or static groups under act-order.
    fixed = grid.fit(W) if group is None else None
    static_groups = [grid.fit(W[:, s : s + group]) for s in range(0, cols, group)] if (group and act_order) else None
    if perm is not None:
        W, H = W[:, perm], H[perm][:, perm]
    Hinv, damp_used = _inverse_cholesky(H, damp)

    Q = torch.zeros_like(W)
    _column_loop(W, Hinv, Q, grid, block_size, fixed, static_groups, perm)
    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    return GPTQResult(Q.to(weight.dtype), damp_used, int(dead.sum()))


def _column_loop(W, Hinv, Q, grid, block_size, params, static_groups, perm):
    cols, group = W.shape[1], grid.group
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if static_groups is not None:
                params = static_groups[int(perm[col]) // group]
            elif group is not None and col % group == 0:
                # The group's columns as updated so far: this block's part, then the rest.
                span = W1[:, i : i + group]
                if span.shape[1] < group and i2 < cols:
                    span = torch.cat([span, W[:, i2 : col + group]], dim=1)
                params = grid.fit(span)
            w = W1[:, i]
            q = grid.quantize(w, params)
            Q[:, col] = q
            err = (w - q) / Hinv1[i, i]
            W1[:, i:].sub_(err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err
        if i2 < cols:
            W[:, i2:].sub_(Err1 @ Hinv[i1:i2, i2:])


def reconstruction_errors(weight: torch.Tensor, candidates: list[torch.Tensor], hessian: torch.Tensor) -> list[float]:
    """||W X - Q X||^2 / ||W X||^2 for each Q, through H = 2 X X^T / n, in one product."""
    W = weight.float()
    M = torch.cat([W] + [W - q.float() for q in candidates], 0)
    per_row = ((M @ hessian.float()) * M).sum(1).split(W.shape[0])
    den = float(per_row[0].sum())
    return [float(r.sum()) / den if den > 0 else float(r.sum()) for r in per_row[1:]]


def reconstruction_error(weight: torch.Tensor, quantized: torch.Tensor, hessian: torch.Tensor) -> float:
    """||W X - Q X||^2 / ||W X||^2 through H = 2 X X^T / n (no data needed)."""
    return reconstruction_errors(weight, [quantized], hessian)[0]


# ---------------------------------------------------------------- model plumbing


def layer_matrix(layer: nn.Module) -> torch.Tensor:
    """The weight as [out, in] (HF Conv1D stores it [in, out])."""
    w = layer.weight
    return w.t() if layer.weight_axes == (1, 0) else w


def gptq_supported(layer: nn.Module) -> bool:
    return isinstance(layer, (QuantLinear, QuantHFConv1D)) and layer.weight.dim() == 2


def find_decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of repeated blocks that holds the most quantized linears."""
    best, best_count = None, 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(b) for b in module}) != 1:
            continue
        count = sum(1 for b in module for m in b.modules() if is_quantized_layer(m) and gptq_supported(m))
        if count > best_count:
            best, best_count = (name, module), count
    if best is None:
        raise MethodError(f"GPTQ: found no list of decoder blocks with quantized linears in {type(model).__name__}")
    return best


def _share_equal(value, previous):
    """`value` with tensors equal to the matching ones in `previous` replaced by them (saves memory)."""
    if torch.is_tensor(value) and torch.is_tensor(previous):
        if value.shape == previous.shape and value.dtype == previous.dtype and torch.equal(value, previous):
            return previous
        return value
    if isinstance(value, tuple) and isinstance(previous, tuple) and len(value) == len(previous):
        return tuple(_share_equal(v, p) for v, p in zip(value, previous))
    if isinstance(value, dict) and isinstance(previous, dict):
        return {k: _share_equal(v, previous.get(k)) for k, v in value.items()}
    return value


@dataclass
class BlockInputs:
    """Per calibration window: the hidden state entering a block, and the other call arguments."""

    hidden: list[torch.Tensor] = field(default_factory=list)
    args: list[tuple] = field(default_factory=list)
    kwargs: list[dict] = field(default_factory=list)


@torch.no_grad()
def capture_block_inputs(model: nn.Module, first_block: nn.Module, calib: torch.Tensor) -> BlockInputs:
    captured = BlockInputs()

    def grab(_module, args, kwargs):
        kwargs = dict(kwargs)
        if args:
            hidden, rest = args[0], tuple(args[1:])
        else:
            hidden, rest = kwargs.pop("hidden_states"), ()
        if captured.kwargs:
            kwargs = _share_equal(kwargs, captured.kwargs[-1])
            rest = _share_equal(rest, captured.args[-1])
        captured.hidden.append(hidden)
        captured.args.append(rest)
        captured.kwargs.append(kwargs)
        raise StopForward

    device = next(first_block.parameters()).device
    handle = first_block.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for window in calib:
            try:
                model(input_ids=window.unsqueeze(0).to(device), use_cache=False)
            except StopForward:
                pass
    finally:
        handle.remove()
    if len(captured.hidden) != len(calib):
        raise MethodError("GPTQ: the first decoder block was not called for every calibration window")
    return captured


def _block_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


class _HessianSum:
    """X^T X summed over calibration windows. Only the upper triangle is accumulated, in strips of
    STRIP rows (X_i^T X[:, i:]), which costs ~55% of a full product; hessian() mirrors it."""

    STRIP = 192

    def __init__(self, size: int, device):
        self.sum = torch.zeros(size, size, dtype=torch.float32, device=device)
        self.count = 0
        self.window = -1

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        for i in range(0, x.shape[1], self.STRIP):
            self.sum[i : i + self.STRIP, i:].addmm_(x[:, i : i + self.STRIP].t(), x[:, i:])
        self.count += x.shape[0]

    def hessian(self) -> torch.Tensor:
        upper = torch.triu(self.sum)
        return (upper + torch.triu(upper, 1).t()) * (2.0 / self.count)


def _input_signature(quantizer) -> tuple:
    return (quantizer.spec, quantizer.enabled, quantizer.amax is None)


@torch.no_grad()
def collect_hessians(block: nn.Module, layers: list[tuple[str, nn.Module]], inputs: BlockInputs):
    """Run the block over every window; return [(layer names, Hessian)] with
    layers that read the same input through equal input quantizers grouped.
    A window's pass stops once every layer has seen its input (the last matmul's output is unused)."""
    accumulator: dict[str, _HessianSum] = {}
    seen: dict = {}  # per window: (id(input), signature) -> accumulator; holds the input so ids stay unique
    reached: set[str] = set()  # per window: the layers whose input has been seen
    window = {"index": 0}

    def hook_for(name, layer):
        def hook(quantizer, args, output):
            x = args[0]
            sig = (id(x), _input_signature(quantizer))
            if name not in accumulator:
                shared = seen.get(sig) if quantizer.amax is None else None
                accumulator[name] = shared[1] if shared else _HessianSum(x.shape[-1], x.device)
            acc = accumulator[name]
            seen.setdefault(sig, (x, acc))
            if acc.window != window["index"]:
                acc.window = window["index"]
                acc.add(output)
            reached.add(name)
            if len(reached) == len(layers):
                raise StopForward
        return hook

    handles = [layer.input_quantizer.register_forward_hook(hook_for(name, layer)) for name, layer in layers]
    saved = [layer.weight_quantizer.enabled for _, layer in layers]
    for _, layer in layers:
        layer.weight_quantizer.enabled = False  # float weights inside the block, as the reference
    try:
        for i, hidden in enumerate(inputs.hidden):
            window["index"] = i
            seen.clear()
            reached.clear()
            try:
                block(hidden, *inputs.args[i], **inputs.kwargs[i])
            except StopForward:
                pass
    finally:
        seen.clear()
        for h in handles:
            h.remove()
        for (_, layer), enabled in zip(layers, saved):
            layer.weight_quantizer.enabled = enabled
    groups: dict[int, tuple[list[str], _HessianSum]] = {}
    for name, _ in layers:
        acc = accumulator.get(name)
        if acc is not None and acc.count > 0:
            groups.setdefault(id(acc), ([], acc))[0].append(name)
    return [(names, acc.hessian()) for names, acc in groups.values()]


def _stackable(layers: list[nn.Module]) -> bool:
    """Rows of several layers can run as one matrix when each row's scale depends on that row only."""
    specs = {layer.weight_quantizer.spec for layer in layers}
    return len(specs) == 1 and next(iter(specs)).granularity != "tensor" and all(l.weight_quantizer.amax is None for l in layers)


@torch.no_grad()
def quantize_group(names: list[str], modules: dict[str, nn.Module], hessian: torch.Tensor, g,
                   keep_float: bool = False) -> dict[str, dict]:
    """GPTQ the layers that share `hessian`, write their weights, return per-layer errors.
    keep_float: leave the float weight on the layer as `float_weight` for a later stage."""
    named = [(n, modules[n]) for n in names]
    batches = [named] if _stackable([l for _, l in named]) else [[item] for item in named]
    stats = {}
    for batch in batches:
        originals = [layer_matrix(l).detach().float().clone() for _, l in batch]
        first = batch[0][1].weight_quantizer
        grid = WeightGrid.of(first.spec, first.amax)
        result = gptq_quantize(torch.cat(originals, 0), hessian, grid, g.block_size, g.damp, g.act_order)
        rows = [o.shape[0] for o in originals]
        for (name, layer), original, q in zip(batch, originals, torch.split(result.weight, rows)):
            rtn = layer.weight_quantizer(layer.weight).detach()
            rtn = rtn.t() if layer.weight_axes == (1, 0) else rtn
            err_gptq, err_rtn = reconstruction_errors(original, [q, rtn], hessian)
            stats[name] = {
                "gptq": err_gptq,
                "rtn": err_rtn,
                "damp": result.damp_used,
                "dead": result.dead_columns,
            }
            layer.weight.copy_(q.t() if layer.weight_axes == (1, 0) else q)
            if keep_float:
                layer.float_weight = original
            layer.weight_quantizer.enabled = False  # weights are on the grid now; see module doc
            layer.drop_weight_cache()
    return stats


def run_gptq(model: nn.Module, calib: torch.Tensor, g, bar=None, keep_float: bool = False) -> dict:
    """GPTQ every quantized linear of the decoder blocks, block by block."""
    t0 = time.time()
    blocks_name, blocks = find_decoder_blocks(model)
    limit = len(blocks) if g.max_blocks is None else min(g.max_blocks, len(blocks))
    was_training = model.training
    model.eval()
    inputs = capture_block_inputs(model, blocks[0], calib)
    if bar is not None:
        bar.start(limit)
    stats: dict[str, dict] = {}
    with torch.no_grad():
        for index in range(limit):
            block = blocks[index]
            prefix = f"{blocks_name}.{index}."
            layers = [(prefix + n, m) for n, m in block.named_modules()
                      if is_quantized_layer(m) and gptq_supported(m) and m.weight_quantizer.active]
            modules = dict(layers)
            for names, hessian in collect_hessians(block, layers, inputs):
                stats.update(quantize_group(names, modules, hessian, g, keep_float))
                del hessian
            if index + 1 < limit:
                inputs.hidden = [_block_output(block(h, *a, **k))
                                 for h, a, k in zip(inputs.hidden, inputs.args, inputs.kwargs)]
            if bar is not None:
                ratios = [stats[n]["gptq"] / max(stats[n]["rtn"], 1e-30) for n in modules if n in stats]
                bar.advance(1, f"error vs RTN x{sum(ratios) / max(len(ratios), 1):.2f}")
    model.train(was_training)
    return _facts(model, stats, calib, blocks_name, limit, len(blocks), time.time() - t0)


def rtn_reason(name: str, layer: nn.Module, blocks_name: str, done: int) -> str:
    """Why a quantized layer kept RTN weights."""
    prefix = blocks_name + "."
    if not name.startswith(prefix):
        return f"outside the decoder blocks ({blocks_name})"
    if int(name[len(prefix):].split(".")[0]) >= done:
        return "past gptq.max_blocks"
    if not gptq_supported(layer):
        return f"not a linear ({type(layer).__name__})"
    return "not reached in its block by the calibration windows"


def _facts(model, stats, calib, blocks_name, done, total, seconds) -> dict:
    ratios = [s["gptq"] / s["rtn"] for s in stats.values() if s["rtn"] > 0]
    rtn_layers: dict[str, list[str]] = {}
    for n, m in model.named_modules():
        if is_quantized_layer(m) and m.weight_quantizer.active and n not in stats:
            rtn_layers.setdefault(rtn_reason(n, m, blocks_name, done), []).append(n)
    if not stats:
        why = "; ".join(f"{reason}: {len(names)}" for reason, names in rtn_layers.items()) or "no quantized weight"
        raise MethodError(f"gptq rounded no layer in {blocks_name}[0:{done}] ({why})")
    return {
        "blocks": f"{blocks_name}[0:{done}] of {total}",
        "layers": len(stats),
        "calib_samples": int(calib.shape[0]),
        "calib_seq_len": int(calib.shape[1]),
        "hessian_inputs": "quantized (each layer's input quantizer applied)",
        "weight_quantizer": "disabled after GPTQ wrote on-grid weights",
        "rtn_layers": {reason: compact_names(names) for reason, names in rtn_layers.items()},  # GPTQ did not touch
        "error_gptq_mean": sum(s["gptq"] for s in stats.values()) / max(len(stats), 1),
        "error_rtn_mean": sum(s["rtn"] for s in stats.values()) / max(len(stats), 1),
        "error_ratio_mean": sum(ratios) / max(len(ratios), 1),
        "error_ratio_max": max(ratios, default=None),
        "layers_worse_than_rtn": sorted(n for n, s in stats.items() if s["gptq"] > s["rtn"]),
        "layer_errors": {n: [round(s["gptq"], 8), round(s["rtn"], 8)] for n, s in stats.items()},
        "seconds_gptq": round(seconds, 3),
    }


# ---------------------------------------------------------------- the stage


def configure(plan, cfg):
    """The weight grid GPTQ rounds onto (activations stay as configured)."""
    g = cfg.gptq
    w = plan.default.weight
    abfp_blocks = False
    if g.granularity == "block":
        w = replace(w, granularity="block", block=cfg.abfp.n, scale_dtype=cfg.abfp.scale_dtype)
        abfp_blocks = True
    elif g.group_size is not None:
        w = replace(w, granularity="block", block=g.group_size)
    elif g.granularity is not None:
        w = replace(w, granularity=g.granularity)
    elif w.granularity == "block":
        abfp_blocks = True  # an earlier step (abfp) set block weights: GPTQ rounds onto them
    else:
        w = replace(w, granularity="channel")
    # Asymmetric (zero point) only for integer grids and not for ABFP's max scaling.
    symmetric = g.symmetric or abfp_blocks or not isinstance(w.fmt, IntFormat)
    plan.default = replace(plan.default, weight=replace(w, symmetric=symmetric, mode="dynamic"))
    if any(s.scale_dtype == "e4m3" for s in role_specs(plan, "weight")):
        raise ValueError("gptq fits one block scale at a time; E4M3 block scales under a global scale (nvfp4) are not supported with it")
    if all(s.is_identity for s in role_specs(plan, "weight")):
        raise ValueError(f"gptq rounds weights, but format.weight is {w.format} (nothing to round)")


def validate(cfg):
    g = cfg.gptq
    if g.block_size < 1:
        raise ConfigError(f"gptq.block_size must be >= 1, got {g.block_size}")
    if g.damp < 0:
        raise ConfigError(f"gptq.damp must be >= 0, got {g.damp}")
    if g.group_size is not None and g.group_size < 1:
        raise ConfigError(f"gptq.group_size must be >= 1 or null, got {g.group_size}")
    if g.granularity is not None and g.granularity not in GRANULARITIES:
        raise ConfigError(f"unknown gptq.granularity {g.granularity!r}; valid: {', '.join(GRANULARITIES)}")
    if g.group_size is not None and g.granularity is not None:
        raise ConfigError(f"set gptq.group_size or gptq.granularity, not both (got {g.granularity!r})")
    if g.max_blocks is not None and g.max_blocks < 1:
        raise ConfigError(f"gptq.max_blocks must be >= 1 or null (all), got {g.max_blocks}")
    if cfg.abfp.scale_format is not None:
        raise ConfigError("gptq fits one block scale at a time; abfp.scale_format (two-level scales) is not supported with it")


def apply(ctx):
    model, calib, cfg, bar = ctx.model, ctx.calib, ctx.cfg, ctx.bar
    steps = list(cfg.method.steps)
    later = steps[steps.index("gptq") + 1:]
    return run_gptq(model, calib, cfg.gptq, bar, keep_float=any(METHODS[s].reads_float_weights for s in later))


register(Method("gptq", configure=configure, apply=apply, validate=validate, needs_calibration=True))
