"""Model surgery, in one place: turn a model into a simulated one from a config.

- nn.Linear, nn.Conv1d/2d and transformers' Conv1D get input, weight and
  output quantizers. The module's class is swapped for a quantized subclass,
  so names, parameters and state_dict keys stay exactly as they were.
- The fake-quantized weight is computed once and cached; the cache key is the
  weight's version counter and storage, plus the quantizer's version, so an
  in-place edit (SmoothQuant, GPTQ) or a new scaling invalidates it. With
  gradients enabled (QAT) the weight is quantized on each forward with the STE.
- Attention matmuls (Q, K for QK^T; softmax probabilities P and V for PV) are
  quantized by an attention function registered with transformers'
  AttentionInterface as "qsim" and selected on the model config; no attention
  class is copied. V is scaled along the sequence axis, the reduction axis of PV.
- Methods may put an orthogonal transform before a layer's input quantizer
  (`input_transform`) or before the Q/K quantizers (`qk_transform`); the
  rotation stage (methods/rotate.py) fuses its inverse into the weights.
"""
from __future__ import annotations

import fnmatch
import inspect
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from .quantizer import QuantSpec, Quantizer

ATTN_IMPLEMENTATION = "qsim"


class SurgeryError(ValueError):
    pass


@dataclass
class LayerQuant:
    """What to put on one layer: weight, input and output quantizer specs."""

    weight: QuantSpec = field(default_factory=QuantSpec)
    act: QuantSpec = field(default_factory=QuantSpec)
    output: QuantSpec = field(default_factory=QuantSpec)


@dataclass
class SurgeryPlan:
    default: LayerQuant
    attention: QuantSpec | None = None  # None: attention matmuls left in float
    attention_base: QuantSpec | None = None  # the attention format, for methods that switch attention on
    skip: tuple[str, ...] = ()
    overrides: dict[str, dict] = field(default_factory=dict)  # pattern -> {weight|act|output: format}


@dataclass
class SurgeryReport:
    layers: list[str]
    skipped: list[str]
    attention_sites: list[str]
    overrides: dict[str, list[str]]


# ---------------------------------------------------------------- quantized layers

class _QuantMixin:
    """Shared by the quantized layer classes; `weight_axes` = (output axis, reduction axis)."""

    weight_axes = (0, 1)

    def _attach(self, spec: LayerQuant, original: type) -> None:
        out_axis, red_axis = self.weight_axes
        self.qsim_original_class = original
        self.input_quantizer = Quantizer(_act_spec(spec.act, self.input_axis))
        self.weight_quantizer = Quantizer(_weight_spec(spec.weight, out_axis, red_axis))
        self.output_quantizer = Quantizer(_act_spec(spec.output, self.input_axis))
        self.input_transform = None  # a module applied to the input before its quantizer (methods/rotate.py)
        self._wq = None
        self._wq_key = None

    input_axis = -1

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_transform is not None:  # e.g. an online Hadamard whose inverse is fused into the weight
            x = self.input_transform(x)
        return self.input_quantizer(x)

    def quantized_weight(self) -> torch.Tensor:
        wq = self.weight_quantizer
        if not wq.active:
            return self.weight
        if torch.is_grad_enabled() and self.weight.requires_grad:
            return wq(self.weight)  # training: fresh each step, STE backward
        w = self.weight
        key = (w._version, w.data_ptr(), wq.version, id(wq.spec))
        if key != self._wq_key:
            with torch.no_grad():
                self._wq = wq(w)
            self._wq_key = key
        return self._wq

    def drop_weight_cache(self) -> None:
        self._wq, self._wq_key = None, None


class QuantLinear(_QuantMixin, nn.Linear):
    weight_axes = (0, 1)

    def forward(self, x):
        y = F.linear(self.quantize_input(x), self.quantized_weight(), self.bias)
        return self.output_quantizer(y)


class QuantConv1d(_QuantMixin, nn.Conv1d):
    weight_axes = (0, 1)
    input_axis = 1

    def forward(self, x):
        y = self._conv_forward(self.quantize_input(x), self.quantized_weight(), self.bias)
        return self.output_quantizer(y)


class QuantConv2d(_QuantMixin, nn.Conv2d):
    weight_axes = (0, 1)
    input_axis = 1

    def forward(self, x):
        y = self._conv_forward(self.quantize_input(x), self.quantized_weight(), self.bias)
        return self.output_quantizer(y)


def _hf_conv1d_class():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers always has it today
        return None, None

    class QuantHFConv1D(_QuantMixin, Conv1D):
        weight_axes = (1, 0)  # weight is [in, out]: y = x @ W + b

        def forward(self, x):
            x = self.quantize_input(x)
            size_out = x.size()[:-1] + (self.nf,)
            y = torch.addmm(self.bias, x.reshape(-1, x.size(-1)), self.quantized_weight()).view(size_out)
            return self.output_quantizer(y)

    return Conv1D, QuantHFConv1D


_HFConv1D, QuantHFConv1D = _hf_conv1d_class()
QUANT_CLASSES = {nn.Linear: QuantLinear, nn.Conv1d: QuantConv1d, nn.Conv2d: QuantConv2d}
if _HFConv1D is not None:
    QUANT_CLASSES[_HFConv1D] = QuantHFConv1D


def _weight_spec(spec: QuantSpec, out_axis: int, red_axis: int) -> QuantSpec:
    # Per-channel weights keep one scale per output channel; blocks and
    # per-"token" vectors run along the reduction (input) dimension.
    if spec.granularity == "channel":
        return replace(spec, axis=out_axis)
    if spec.granularity in ("token", "block"):
        return replace(spec, axis=red_axis)
    return spec


def _act_spec(spec: QuantSpec, feature_axis: int) -> QuantSpec:
    if spec.granularity in ("token", "block") and spec.axis == -1:
        return replace(spec, axis=feature_axis)
    return spec


def is_quantized_layer(module: nn.Module) -> bool:
    return isinstance(module, _QuantMixin)


def quantized_layers(model: nn.Module):
    return [(n, m) for n, m in model.named_modules() if is_quantized_layer(m)]


# ---------------------------------------------------------------- attention

class AttentionQuantizers(nn.Module):
    """The four operand quantizers of one attention site, plus a call counter."""

    def __init__(self, spec: QuantSpec):
        super().__init__()
        self.q = Quantizer(_act_spec(spec, -1))
        self.k = Quantizer(_act_spec(spec, -1))
        self.p = Quantizer(_act_spec(spec, -1))
        v_axis = -2 if spec.granularity in ("token", "block") else spec.axis
        self.v = Quantizer(replace(spec, axis=v_axis))  # PV reduces over the key positions
        self.qk_transform = None  # applied to Q and K (after RoPE) before their quantizers (methods/rotate.py)
        self.calls = 0


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    if groups == 1:
        return x
    b, h, t, d = x.shape
    return x[:, :, None].expand(b, h, groups, t, d).reshape(b, h * groups, t, d)


def qsim_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Eager attention with quantized QK^T and PV operands (registered as "qsim")."""
    aq: AttentionQuantizers | None = getattr(module, "qsim_attn", None)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    if aq is not None:
        aq.calls += 1
        if aq.qk_transform is not None:  # an orthogonal transform of the head dim: QK^T unchanged
            query, key = aq.qk_transform(query), aq.qk_transform(key)
        query, key, value = aq.q(query), aq.k(key), aq.v(value)
    groups = query.shape[1] // key.shape[1]
    key, value = _repeat_kv(key, groups), _repeat_kv(value, groups)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, :, : key.shape[-2]]
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = F.dropout(probs, p=dropout, training=module.training)
    if aq is not None:
        probs = aq.p(probs)
    out = torch.matmul(probs, value).transpose(1, 2).contiguous()
    return out, probs


def register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, qsim_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, eager_mask)


_DISPATCH_CACHE: dict[type, bool] = {}


def _dispatches_attention(module: nn.Module) -> bool:
    """True for attention modules that call transformers' attention interface."""
    cls = type(module)
    if cls not in _DISPATCH_CACHE:
        try:
            src = inspect.getsource(cls.forward)
        except (OSError, TypeError):
            src = ""
        _DISPATCH_CACHE[cls] = "ALL_ATTENTION_FUNCTIONS" in src and "_attn_implementation" in src
    return _DISPATCH_CACHE[cls]


def _set_attn_implementation(model: nn.Module, name: str) -> None:
    configs = {id(m.config): m.config for m in model.modules() if hasattr(m, "config") and hasattr(m.config, "_attn_implementation")}
    for cfg in configs.values():
        cfg._attn_implementation = name


# ---------------------------------------------------------------- the one entry point

def _matches(name: str, patterns) -> list[str]:
    return [p for p in patterns if fnmatch.fnmatchcase(name, p)]


def check_patterns(names: list[str], plan: SurgeryPlan) -> None:
    """Every override pattern must match at least one quantizable layer."""
    for pattern in plan.overrides:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            example = ", ".join(names[:3])
            raise SurgeryError(f"override pattern {pattern!r} matches no layer (layers look like: {example}, ...)")


def quantizable_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if type(m) in QUANT_CLASSES or is_quantized_layer(m)]


def quantize_model(model: nn.Module, plan: SurgeryPlan) -> SurgeryReport:
    """Swap every selected layer for its quantized class and instrument attention."""
    names = quantizable_names(model)
    check_patterns(names, plan)
    report = SurgeryReport(layers=[], skipped=[], attention_sites=[], overrides={p: [] for p in plan.overrides})
    for name, module in list(model.named_modules()):
        cls = type(module)
        if cls not in QUANT_CLASSES:
            continue
        if _matches(name, plan.skip):
            report.skipped.append(name)
            continue
        spec = plan.default
        for pattern in _matches(name, plan.overrides):
            spec = _apply_override(spec, plan.overrides[pattern])
            report.overrides[pattern].append(name)
        module.__class__ = QUANT_CLASSES[cls]
        module._attach(spec, cls)
        report.layers.append(name)
    if plan.attention is not None and not plan.attention.is_identity:
        register_attention()
        for name, module in model.named_modules():
            if _dispatches_attention(module) and not _matches(name, plan.skip):
                module.qsim_attn = AttentionQuantizers(plan.attention)
                report.attention_sites.append(name)
        if not report.attention_sites:
            raise SurgeryError(
                f"attention quantization was asked for but 0 attention sites were instrumented in "
                f"{type(model).__name__}: its attention does not dispatch through transformers' AttentionInterface"
            )
        _set_attn_implementation(model, ATTN_IMPLEMENTATION)
    return report


def _apply_override(spec: LayerQuant, override: dict) -> LayerQuant:
    changes = {}
    for role in ("weight", "act", "output"):
        if role in override:
            value = override[role]
            base = getattr(spec, role)
            changes[role] = replace(base, format=value) if isinstance(value, str) else replace(base, **dict(value))
    return replace(spec, **changes)


@torch.no_grad()
def freeze_quantized_weights(model: nn.Module) -> int:
    """For evaluation: write each fake-quantized weight into its parameter and
    switch the weight quantizer off, so no float copy stays in memory (peak RSS
    of a simulated model then matches the float model's). Irreversible: call it
    after every method has run. Returns the number of layers frozen."""
    uses: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    frozen = 0
    for _, layer in quantized_layers(model):
        # a tied weight (lm_head = embeddings) keeps its float values for the other user
        if layer.weight_quantizer.active and uses.get(id(layer.weight), 1) == 1:
            # In place: a weight memory-mapped from the safetensors cache (private, copy-on-write)
            # turns into the quantized copy page by page; a new tensor would keep both.
            layer.weight.data.copy_(layer.quantized_weight().detach())
            layer.weight_quantizer.enabled = False
            layer.drop_weight_cache()
            frozen += 1
    return frozen


def restore_model(model: nn.Module) -> None:
    """Undo quantize_model: original classes back, quantizers and attention hooks removed."""
    for name, layer in quantized_layers(model):
        if layer.input_transform is not None:
            raise SurgeryError(f"cannot restore {name}: an input transform is fused into its weight")
    for _, module in model.named_modules():
        if is_quantized_layer(module):
            for attr in ("input_quantizer", "weight_quantizer", "output_quantizer"):
                delattr(module, attr)
            module.__class__ = module.qsim_original_class
            for attr in ("qsim_original_class", "_wq", "_wq_key", "input_transform"):
                module.__dict__.pop(attr, None)
        if hasattr(module, "qsim_attn"):
            del module.qsim_attn


def attention_quantizers(model: nn.Module):
    return [(n, m.qsim_attn) for n, m in model.named_modules() if hasattr(m, "qsim_attn")]


def all_quantizers(model: nn.Module):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, Quantizer)]


class quantization_disabled:
    """Context manager: run the model in float (for calibration statistics)."""

    def __init__(self, model: nn.Module):
        self.quantizers = [q for _, q in all_quantizers(model)]

    def __enter__(self):
        self.saved = [q.enabled for q in self.quantizers]
        for q in self.quantizers:
            q.enabled = False

    def __exit__(self, *exc):
        for q, e in zip(self.quantizers, self.saved):
            q.enabled = e
