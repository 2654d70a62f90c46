"""Model surgery, in one place: turn a model into a simulated one from a config.

- nn.Linear, nn.Conv1d/2d and transformers' Conv1D get input, weight and
  output quantizers. The module's class is swapped for a quantized subclass,
  so names, parameters and state_dict keys stay exactly as they were.
  Modules are matched by isinstance: a subclass that keeps its base's forward
  (torch's NonDynamicallyQuantizableLinear) gets a quantized class built for
  it; one with its own forward cannot be swapped safely (the quantized forward
  would replace its own) and stays float, listed with that reason.
- nn.MultiheadAttention: its forward hands `in_proj_weight` and
  `out_proj.weight` to torch's functional, never calling out_proj's forward.
  QuantMultiheadAttention quantizes query/key/value (one input quantizer) and
  in_proj_weight, passes them to the functional with an identity output
  projection (exact), then calls out_proj, itself a quantized linear. The
  functional computes QK^T and PV inside, so quantizing them (or the
  in-projection outputs) for it is an error. Fused fast paths that read the
  weights directly (nn.TransformerEncoderLayer in eval) are switched off.
- Every other module with a weight (a parameter of dim >= 1) stays float and is
  listed in the report with its reason (norms, embeddings, skip patterns, ...).
- The fake-quantized weight is computed once and cached; the cache key is the
  weight's version counter and storage, plus the quantizer's version, so an
  in-place edit (SmoothQuant, GPTQ) or a new scaling invalidates it. With
  gradients enabled (QAT) the weight is quantized on each forward with the STE;
  a weight made under torch.inference_mode (no version counter) is quantized
  on each forward too.
- Attention matmuls (Q, K for QK^T; softmax probabilities P and V for PV) are
  quantized by an attention function registered with transformers'
  AttentionInterface as "qsim" and selected on the model config; no attention
  class is copied. V is scaled per token along head_dim (as KV-cache quantizers
  do), or along the sequence (PV's reduction axis) with `v_axis="seq"`
  (MX/NVFP4 V too: blocks along head_dim, one scale set per position).
- Causality is decided from the quantizer specs alone (`scale_leak`): a dynamic
  scale shared along positions sees later tokens, one shared along the batch
  sees other samples. `plan_leaks` checks a plan before loading, `model_leaks`
  the quantizers a model really has after the methods ran.
- Methods may put an orthogonal transform before a layer's input quantizer
  (`input_transform`) or before the Q/K quantizers (`qk_transform`); the
  rotation stage (methods/rotate.py) fuses its inverse into the weights.
"""
from __future__ import annotations

import fnmatch
import inspect
import re
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from . import accum
from .accum import Accumulator
from .quantizer import QuantSpec, Quantizer, shared_scale_axes

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
    v_axis: str = "head_dim"  # V's scaled axis for token/block scaling: head_dim (causal) or seq
    accum: Accumulator = Accumulator()  # accumulation of every quantized matmul (linears, attention)


@dataclass
class SurgeryReport:
    layers: list[str]
    skipped: list[str]
    attention_sites: list[str]
    overrides: dict[str, list[str]]
    float_modules: dict[str, list[str]] = field(default_factory=dict)  # reason -> every module with a weight left float
    accum_matmuls: dict[str, int] = field(default_factory=dict)  # linears / attention sites with the accumulator


# ---------------------------------------------------------------- quantized layers

class _QuantMixin:
    """Shared by the quantized layer classes; `weight_axes` = (output axis, reduction axis)."""

    weight_axes = (0, 1)
    accum: Accumulator | None = None  # a narrow matmul accumulator (linears and HF Conv1D only)

    def _attach(self, spec: LayerQuant, original: type) -> None:
        out_axis, red_axis = self.weight_axes
        self.qsim_original_class = original
        self.input_quantizer = Quantizer(_act_spec(spec.act, self.input_axis))
        self.weight_quantizer = Quantizer(_weight_spec(spec.weight, out_axis, red_axis))
        self.output_quantizer = Quantizer(_act_spec(spec.output, self.input_axis))
        self.input_transform = None  # a module applied to the input before its quantizer (methods/rotate.py)
        # Per-input-channel integer exponents s (methods/fpt.py, pre-shifted exponent bias): the input
        # is quantized as x * 2^s and the quantized weight's input channels are multiplied by 2^-s.
        # Powers of two are exact, so with quantization off the output is unchanged.
        self.input_shift: torch.Tensor | None = None
        self._wq = None
        self._wq_key = None
        self._shifted, self._shifted_key = None, None  # the cached quantized weight times 2^-input_shift

    input_axis = -1

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_transform is not None:  # e.g. an online Hadamard whose inverse is fused into the weight
            x = self.input_transform(x)
        if self.input_shift is not None:
            x = x * self._shift_factor(self.input_shift, x, self.input_axis)
        return self.input_quantizer(x)

    def _shift_factor(self, exponents: torch.Tensor, like: torch.Tensor, axis: int) -> torch.Tensor:
        shape = [1] * like.dim()
        shape[axis] = -1
        return torch.exp2(exponents.to(like.device, like.dtype)).reshape(shape)

    def quantized_weight(self) -> torch.Tensor:
        w = self._quantized_weight()
        if self.input_shift is None:
            return w
        if w is not self._wq:  # not from the cache (training, float, inference tensors): shifted per call
            return w * self._shift_factor(-self.input_shift, w, self.weight_axes[1])
        key = (self._wq_key, id(self.input_shift))
        if key != self._shifted_key:  # shifted once per cached quantized weight, not every forward
            with torch.no_grad(), torch.inference_mode(False):
                self._shifted = w * self._shift_factor(-self.input_shift, w, self.weight_axes[1])
            self._shifted_key = key
        return self._shifted

    def _quantized_weight(self) -> torch.Tensor:
        """The weight on its quantizer's grid (cached), before any input shift."""
        wq = self.weight_quantizer
        if not wq.active:
            return self.weight
        if torch.is_grad_enabled() and self.weight.requires_grad:
            return wq(self.weight)  # training: fresh each step, STE backward
        w = self.weight
        if w.is_inference():  # made under inference_mode: no version counter to key a cache on
            with torch.no_grad():
                return wq(w)
        key = (w._version, w.data_ptr(), wq.version, id(wq.spec))
        if key != self._wq_key:
            # Outside inference_mode even when called inside it: the cached copy is then an ordinary
            # tensor, which later no_grad and training forwards can use (an inference tensor cannot
            # be saved for backward).
            with torch.no_grad(), torch.inference_mode(False):
                self._wq = wq(w)
            self._wq_key = key
        return self._wq

    def drop_weight_cache(self) -> None:
        self._wq, self._wq_key = None, None
        self._shifted, self._shifted_key = None, None


class QuantLinear(_QuantMixin, nn.Linear):
    weight_axes = (0, 1)

    def forward(self, x):
        y = accum.linear(self.quantize_input(x), self.quantized_weight(), self.bias, self.accum)
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
            if self.accum is not None:
                y = (accum.matmul(x.reshape(-1, x.size(-1)), self.quantized_weight(), self.accum) + self.bias).view(size_out)
            else:
                y = torch.addmm(self.bias, x.reshape(-1, x.size(-1)), self.quantized_weight()).view(size_out)
            return self.output_quantizer(y)

    return Conv1D, QuantHFConv1D


class QuantMultiheadAttention(_QuantMixin, nn.MultiheadAttention):
    """The in-projection is this layer (input, weight, output quantizers); out_proj is a quantized linear."""

    weight_axes = (0, 1)  # in_proj_weight is [3 * embed_dim, embed_dim]

    @property
    def weight(self) -> torch.Tensor:  # what methods and freezing see as this layer's weight
        return self.in_proj_weight

    def _identity(self, like: torch.Tensor) -> torch.Tensor:
        """An identity output projection for the functional (x @ I is exact): out_proj runs after it."""
        key = (like.dtype, like.device)
        cache = self.__dict__.setdefault("_qsim_identity", {})
        if key not in cache:
            with torch.inference_mode(False):  # a normal tensor, usable later with autograd
                cache[key] = torch.eye(self.embed_dim, dtype=like.dtype, device=like.device)
        return cache[key]

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        batched_first = self.batch_first and query.dim() == 3
        prepared = {}

        def prepare(x):  # each distinct tensor quantized once; the functional wants [seq, batch, features]
            if id(x) not in prepared:  # and "is" kept (self-attention: one packed projection)
                y = self.input_quantizer(x)
                prepared[id(x)] = y.transpose(0, 1) if batched_first else y
            return prepared[id(x)]

        q, k, v = prepare(query), prepare(key), prepare(value)
        attn, weights = F.multi_head_attention_forward(
            q, k, v, self.embed_dim, self.num_heads, self.quantized_weight(), self.in_proj_bias,
            self.bias_k, self.bias_v, self.add_zero_attn, self.dropout, self._identity(q), None,
            training=self.training, key_padding_mask=key_padding_mask, need_weights=need_weights,
            attn_mask=attn_mask, average_attn_weights=average_attn_weights, is_causal=is_causal,
        )
        out = self.out_proj(attn)
        return (out.transpose(0, 1) if batched_first else out), weights


_HFConv1D, QuantHFConv1D = _hf_conv1d_class()
QUANT_CLASSES = {nn.Linear: QuantLinear, nn.Conv1d: QuantConv1d, nn.Conv2d: QuantConv2d,
                 nn.MultiheadAttention: QuantMultiheadAttention}
if _HFConv1D is not None:
    QUANT_CLASSES[_HFConv1D] = QuantHFConv1D
_SUBCLASS_QUANT: dict[type, type] = {}  # a subclass that keeps its base's forward -> its quantized class


def _quantizable_base(cls: type) -> type | None:
    """The class in QUANT_CLASSES that `cls` derives from (isinstance matching), if any."""
    return next((base for base in cls.__mro__ if base in QUANT_CLASSES), None)


# The layers whose matmul qsim/accum.py simulates (convolutions and nn.MultiheadAttention are refused).
ACCUM_CLASSES = tuple(c for c in (QuantLinear, QuantHFConv1D) if c is not None)


def quant_class(cls: type) -> type | None:
    """The quantized class for `cls`; None for a subclass with its own forward (it cannot be swapped
    safely: the quantized forward would replace its own). Other subclasses get (quantized base, cls)
    built once, so their methods, names and state_dict keys stay."""
    base = _quantizable_base(cls)
    if base is None or cls is base:
        return QUANT_CLASSES.get(base)
    if cls.forward is not base.forward:
        return None
    if cls not in _SUBCLASS_QUANT:
        _SUBCLASS_QUANT[cls] = type(f"Quant{cls.__name__}", (QUANT_CLASSES[base], cls), {"__module__": __name__})
    return _SUBCLASS_QUANT[cls]


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

V_AXES = ("head_dim", "seq")


def attention_specs(spec: QuantSpec, v_axis: str = "head_dim") -> dict[str, QuantSpec]:
    """The operand specs of one attention site. Q and K are scaled along head_dim (QK^T's
    reduction axis), P along the keys (PV's reduction axis). V along head_dim is one vector per
    token, as a KV cache stores it (causal); v_axis="seq" scales V along the positions, PV's
    reduction axis, so a block's scale sees later tokens."""
    if v_axis not in V_AXES:
        raise SurgeryError(f"unknown V axis {v_axis!r}; valid: {', '.join(V_AXES)}")
    v = replace(spec, axis=-2) if v_axis == "seq" and spec.granularity in ("token", "block") else spec
    return {"q": spec, "k": spec, "v": v, "p": spec}


class AttentionQuantizers(nn.Module):
    """The four operand quantizers of one attention site, plus a call counter."""

    def __init__(self, spec: QuantSpec, v_axis: str = "head_dim"):
        super().__init__()
        specs = attention_specs(spec, v_axis)
        self.q, self.k, self.v, self.p = (Quantizer(specs[op]) for op in "qkvp")
        self.qk_transform = None  # applied to Q and K (after RoPE) before their quantizers (methods/rotate.py)
        self.accum: Accumulator | None = None  # QK^T and PV accumulation (qsim/accum.py)
        # observe(product, a, b, out): sees each product's operands and its output, "qk" (Q, K after
        # the GQA repeat, QK^T before scaling) and "pv" (P, V, PV); methods/fpt.py reads gradients from it
        self.observe = None
        self.calls = 0


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    if groups == 1:
        return x
    b, h, t, d = x.shape
    return x[:, :, None].expand(b, h, groups, t, d).reshape(b, h * groups, t, d)


# Arguments that transformers' eager attention receives and leaves unused too, and why.
UNUSED_ATTENTION_ARGS = {
    "sliding_window": "the attention mask already limits each query to its window",
    "is_causal": "the attention mask already holds the causal (or bidirectional) pattern",
    "position_ids": "positions are in Q and K already (RoPE) and packed sequences in the mask",
    "use_cache": "the KV cache was updated before the call",
    "encoder_hidden_states": "cross-attention K and V were projected from it before the call",
    "output_attentions": "the model records the returned attention weights itself",
    "output_hidden_states": "read by the model, not by attention",
    "output_router_logits": "read by the model's MoE router, not by attention",
    "num_items_in_batch": "read by the loss, not by attention",
    "cu_seq_lens_q": "flash-attention varlen metadata; the eager mask holds the same packing",
    "cu_seq_lens_k": "flash-attention varlen metadata; the eager mask holds the same packing",
    "max_length_q": "flash-attention varlen metadata; the eager mask holds the same packing",
    "max_length_k": "flash-attention varlen metadata; the eager mask holds the same packing",
    "seq_idx": "packed-sequence index for kernels that take one; the eager mask holds the packing",
}


def qsim_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                   softcap=None, position_bias=None, s_aux=None, **kwargs):
    """Eager attention with quantized QK^T and PV operands (registered as "qsim").

    Implements what the families' eager functions do with their arguments: `softcap` (Gemma-2:
    tanh capping of the scores), `position_bias` (T5: added to the scores before the mask),
    `s_aux` (attention sinks, GPT-OSS: one extra logit per head in the softmax, dropped after).
    Arguments in UNUSED_ATTENTION_ARGS are unused by eager attention too; any other one stops
    the run. The softmax runs in fp32 (as Llama's eager; GPT-2/BERT/T5 use the input dtype,
    which differs only for half-precision models)."""
    unknown = [name for name in kwargs if name not in UNUSED_ATTENTION_ARGS]
    if unknown:
        model_type = getattr(getattr(module, "config", None), "model_type", "?")
        raise SurgeryError(f"{type(module).__name__} ({model_type}) passes {unknown[0]}= to attention, which qsim's "
                           "attention does not implement; turn attention quantization off to keep the model's own")
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
    acc = aq.accum if aq is not None else None
    scores = accum.matmul(query, key.transpose(2, 3), acc)
    if aq is not None and aq.observe is not None:
        aq.observe("qk", query, key, scores)
    scores = scores * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if position_bias is not None:
        scores = scores + position_bias
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, :, : key.shape[-2]]
    if s_aux is not None:
        sinks = s_aux.reshape(1, -1, 1, 1).expand(scores.shape[0], -1, scores.shape[-2], -1)
        logits = torch.cat([scores, sinks], dim=-1)
        logits = logits - logits.max(dim=-1, keepdim=True).values
        probs = torch.softmax(logits, dim=-1, dtype=logits.dtype)[..., :-1].to(query.dtype)
    else:
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = F.dropout(probs, p=dropout, training=module.training)
    if aq is not None:
        probs = aq.p(probs)
    out = accum.matmul(probs, value, acc)
    if aq is not None and aq.observe is not None:
        aq.observe("pv", probs, value, out)
    return out.transpose(1, 2).contiguous(), probs


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


# ---------------------------------------------------------------- causality

# What each axis of a quantized tensor indexes. Layer activations are [batch, position, feature]
# (convolutions: [batch, feature, position...]); attention Q, K, V are [batch, head, position,
# head_dim] and the probabilities P are [batch, head, query position, key].
ACT_LAYOUT = ("batch", "position", "feature")
ATTENTION_LAYOUTS = {op: ("batch", "head", "position", "feature") for op in "qkv"}
ATTENTION_LAYOUTS["p"] = ("batch", "head", "position", "key")


def scale_leak(spec: QuantSpec, layout: tuple[str, ...]) -> str | None:
    """Why a quantizer with `spec` on a tensor laid out as `layout` is not causal, or None.
    A dynamic scale shared along positions depends on later tokens; one shared along the batch
    makes a sample depend on the others. Sharing along P's keys is causal: the mask makes the
    probabilities of later keys exactly 0, so they never raise a scale. (In a bidirectional
    model attention sees every position anyway; quantization adds nothing to that.)"""
    shared = {layout[a] for a in shared_scale_axes(spec, len(layout))}
    crossed = [name for what, name in (("position", "positions"), ("batch", "the batch")) if what in shared]
    if not crossed:
        return None
    scaling = {"tensor": "per-tensor", "channel": f"per-channel (axis {spec.axis})",
               "token": f"per-vector (axis {spec.axis})", "block": f"{spec.block}-blocks (axis {spec.axis})"}
    return f"dynamic {scaling[spec.granularity]} scales span {' and '.join(crossed)}"


def _layer_layout(layer: nn.Module) -> tuple[str, ...]:
    if layer.input_axis == -1:
        return ACT_LAYOUT
    return ("batch", "feature") + ("position",) * (layer.weight.dim() - 2)


def _unique(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


def plan_leaks(plan: SurgeryPlan) -> list[str]:
    """The plan's non-causal quantizers as "where: why" (empty: causal), before any model exists.
    Activation axes are read as in a linear's input [batch, position, feature]."""
    found = []
    layer_specs = {"": plan.default}
    layer_specs.update({f" [{p}]": _apply_override(plan.default, o) for p, o in plan.overrides.items()})
    for tag, lq in layer_specs.items():
        for role, spec in (("layer inputs", lq.act), ("layer outputs", lq.output)):
            if (why := scale_leak(spec, ACT_LAYOUT)) is not None:
                found.append(f"{role}{tag}: {why}")
    if plan.attention is not None:
        for op, spec in attention_specs(plan.attention, plan.v_axis).items():
            if (why := scale_leak(spec, ATTENTION_LAYOUTS[op])) is not None:
                found.append(f"attention {op.upper()}: {why}")
    return _unique(found)


def model_leaks(model: nn.Module) -> list[str]:
    """The same check on the quantizers a model has now (after the methods' apply, which may
    change scalings), as "where: why"; weights are constants and never leak."""
    found = []
    for _, layer in quantized_layers(model):
        for role in ("input", "output"):
            q = getattr(layer, f"{role}_quantizer")
            if q.active and (why := scale_leak(q.spec, _layer_layout(layer))) is not None:
                found.append(f"layer {role}s: {why}")
    for _, aq in attention_quantizers(model):
        for op in "qkvp":
            q = getattr(aq, op)
            if q.active and (why := scale_leak(q.spec, ATTENTION_LAYOUTS[op])) is not None:
                found.append(f"attention {op.upper()}: {why}")
    return _unique(found)


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
    return [n for n, m in model.named_modules() if is_quantized_layer(m) or _quantizable_base(type(m)) is not None]


# Why a module with a weight stays float (report reasons; grouped by reason in the result).
NORM_REASON = "norm: elementwise scale, no matmul"
EMBEDDING_REASON = "embedding lookup"
FLOAT_MHA_OUT_PROJ = "out_proj of a float nn.MultiheadAttention (its weight is read directly, its forward never runs)"
SEPARATE_QKV_REASON = "nn.MultiheadAttention with separate q/k/v weights (kdim/vdim != embed_dim): not supported"


def _own_forward_reason(cls: type) -> str:
    return f"{_quantizable_base(cls).__name__} subclass with its own forward ({cls.__name__})"


def float_reason(module: nn.Module) -> str:
    """Why a module that surgery does not quantize stays float (skip patterns aside)."""
    cls = type(module)
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return EMBEDDING_REASON
    if "norm" in cls.__name__.lower() and all(p.dim() <= 1 for p in module.parameters(recurse=False)):
        return NORM_REASON
    if _quantizable_base(cls) is not None and quant_class(cls) is None:
        return _own_forward_reason(cls)
    return f"no quantized class for {cls.__name__}"


def weight_bearing(module: nn.Module) -> bool:
    return any(p.dim() >= 1 for p in module.parameters(recurse=False))


def compact_names(names: list[str]) -> list[str]:
    """Names that differ only in their first number collapse into one entry with ranges,
    in order of first appearance: model.layers.{0-29}.input_layernorm."""
    groups: dict[str, list[int]] = {}
    for name in names:
        m = re.search(r"(?:^|\.)(\d+)(?:\.|$)", name)
        if m is None:
            groups.setdefault(name, [])
            continue
        template = name[: m.start(1)] + "{}" + name[m.end(1):]
        groups.setdefault(template, []).append(int(m.group(1)))
    out = []
    for template, numbers in groups.items():
        if len(numbers) <= 1:
            out.append(template.replace("{}", str(numbers[0])) if numbers else template)
            continue
        numbers, spans, start = sorted(set(numbers)), [], None
        for i, n in enumerate(numbers):
            start = n if start is None else start
            if i + 1 == len(numbers) or numbers[i + 1] != n + 1:
                spans.append(f"{start}-{n}" if n > start else str(n))
                start = None
        out.append(template.replace("{}", "{" + ",".join(spans) + "}"))
    return out


def _fast_path_guard(_module, _args):
    """No-op: a forward pre-hook on nn.TransformerEncoderLayer turns off its fused fast path
    (torch._transformer_encoder_layer_fwd), which reads the weights directly."""


def _disable_fused_paths(model: nn.Module) -> None:
    """torch's encoder fast paths around quantized layers: the fused layer kernel would bypass them,
    nested-tensor inputs (nn.TransformerEncoder with a padding mask) cannot be quantized."""
    for module in model.modules():
        if not any(is_quantized_layer(m) for m in module.modules()):
            continue
        if isinstance(module, nn.TransformerEncoderLayer):
            module.qsim_fast_path_guard = module.register_forward_pre_hook(_fast_path_guard)
        elif isinstance(module, nn.TransformerEncoder) and getattr(module, "use_nested_tensor", False):
            module.use_nested_tensor = False
            module.qsim_nested_tensor_was = True


def quantize_model(model: nn.Module, plan: SurgeryPlan) -> SurgeryReport:
    """Swap every selected layer for its quantized class and instrument attention."""
    names = quantizable_names(model)
    check_patterns(names, plan)
    report = SurgeryReport(layers=[], skipped=[], attention_sites=[], overrides={p: [] for p in plan.overrides})
    reasons: dict[str, str] = {}
    float_mha: list[str] = []
    for name, module in list(model.named_modules()):
        cls = type(module)
        if is_quantized_layer(module) or _quantizable_base(cls) is None:
            continue
        parent = name.rpartition(".")[0]
        skipped_by = _matches(name, plan.skip)
        if skipped_by:
            report.skipped.append(name)
            reasons[name] = f"skipped by pattern {skipped_by[0]!r}"
        elif parent in float_mha and name.endswith(".out_proj"):
            reasons[name] = FLOAT_MHA_OUT_PROJ
        elif quant_class(cls) is None:
            reasons[name] = _own_forward_reason(cls)
        elif isinstance(module, nn.MultiheadAttention) and module.in_proj_weight is None:
            reasons[name] = SEPARATE_QKV_REASON
        if name in reasons:
            if isinstance(module, nn.MultiheadAttention):
                float_mha.append(name)
            continue
        spec = plan.default
        for pattern in _matches(name, plan.overrides):
            spec = _apply_override(spec, plan.overrides[pattern])
            report.overrides[pattern].append(name)
        if isinstance(module, nn.MultiheadAttention) and not spec.output.is_identity:
            raise SurgeryError(f"output quantization ({spec.output.format}) was asked for, but the in-projection outputs "
                               f"(q, k, v) of nn.MultiheadAttention {name!r} stay inside torch's functional")
        module.__class__ = quant_class(cls)
        module._attach(spec, cls)
        report.layers.append(name)
        if not plan.accum.is_fp32:
            if not isinstance(module, ACCUM_CLASSES):
                raise SurgeryError(f"quant.accum={plan.accum.format} is simulated for linear and attention matmuls; "
                                   f"{name!r} is a {cls.__name__} (skip it with quant.skip, or use quant.accum=fp32)")
            module.accum = plan.accum
            report.accum_matmuls["linears"] = report.accum_matmuls.get("linears", 0) + 1
    _disable_fused_paths(model)
    if plan.attention is not None and not plan.attention.is_identity:
        mha = [n for n, m in model.named_modules() if isinstance(m, QuantMultiheadAttention)]
        if mha:
            raise SurgeryError(
                f"attention matmul quantization (QK^T, PV) was asked for, but nn.MultiheadAttention {mha[0]!r} "
                f"computes them inside torch's functional; turn it off (quant.attention, mse.attention, abfp.attention "
                f"= false) or skip the module (quant.skip)"
            )
        register_attention()
        for name, module in model.named_modules():
            if _dispatches_attention(module) and not _matches(name, plan.skip):
                module.qsim_attn = AttentionQuantizers(plan.attention, plan.v_axis)
                report.attention_sites.append(name)
                if not plan.accum.is_fp32:
                    module.qsim_attn.accum = plan.accum
                    report.accum_matmuls["attention_sites"] = report.accum_matmuls.get("attention_sites", 0) + 1
        if not report.attention_sites:
            raise SurgeryError(
                f"attention quantization was asked for but 0 attention sites were instrumented in "
                f"{type(model).__name__}: its attention does not dispatch through transformers' AttentionInterface"
            )
        _set_attn_implementation(model, ATTN_IMPLEMENTATION)
    for name, module in model.named_modules():
        if not is_quantized_layer(module) and weight_bearing(module):
            reason = reasons.get(name) or float_reason(module)
            report.float_modules.setdefault(reason, []).append(name)
    return report


def _apply_override(spec: LayerQuant, override: dict) -> LayerQuant:
    changes = {}
    for role in ("weight", "act", "output"):
        if role in override:
            value = override[role]
            base = getattr(spec, role)
            changes[role] = replace(base, format=value) if isinstance(value, str) else replace(base, **dict(value))
    return replace(spec, **changes)


def role_specs(plan: SurgeryPlan, role: str) -> list[QuantSpec]:
    """The default spec of a role (weight, act, output) and that of every override setting it:
    what methods check before surgery."""
    return [getattr(plan.default, role)] + [getattr(_apply_override(plan.default, o), role)
                                            for o in plan.overrides.values() if role in o]


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
            layer.weight.data.copy_(layer._quantized_weight().detach())  # an input shift stays applied per forward
            layer.weight_quantizer.enabled = False
            layer.drop_weight_cache()
            frozen += 1
    return frozen


def restore_model(model: nn.Module) -> None:
    """Undo quantize_model: original classes back, quantizers and attention hooks removed."""
    for name, layer in quantized_layers(model):
        if layer.input_transform is not None:
            raise SurgeryError(f"cannot restore {name}: an input transform is fused into its weight")
        if layer.input_shift is not None:
            raise SurgeryError(f"cannot restore {name}: an input exponent shift (fpt.preshift) is folded into it")
    for _, module in model.named_modules():
        if is_quantized_layer(module):
            for attr in ("input_quantizer", "weight_quantizer", "output_quantizer"):
                delattr(module, attr)
            module.__class__ = module.qsim_original_class
            for attr in ("qsim_original_class", "_wq", "_wq_key", "_qsim_identity", "input_transform", "input_shift",
                         "_shifted", "_shifted_key"):
                module.__dict__.pop(attr, None)
        if hasattr(module, "qsim_attn"):
            del module.qsim_attn
        if "qsim_fast_path_guard" in module.__dict__:
            module.__dict__.pop("qsim_fast_path_guard").remove()
        if module.__dict__.pop("qsim_nested_tensor_was", False):
            module.use_nested_tensor = True


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


class _LayerNormFixedOrder(torch.autograd.Function):
    """F.layer_norm whose weight and bias gradients do not depend on the thread count.

    torch's CPU LayerNorm backward sums the weight/bias gradients over rows in per-thread
    buffers, so their last bits move with the thread count. Here the input gradient is torch's
    own (computed row by row) and the weight/bias gradients are sums over rows taken along the
    leading axis, which torch splits among threads by output column, not by row."""

    @staticmethod
    def forward(ctx, x, weight, bias, shape, eps):
        out, mean, rstd = torch.native_layer_norm(x, shape, weight, bias, eps)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.shape = shape
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        dx = None
        if ctx.needs_input_grad[0]:
            dx = torch.ops.aten.native_layer_norm_backward(grad, x, ctx.shape, mean, rstd, weight, bias,
                                                           [True, False, False])[0]
        rows = (-1, weight.numel()) if weight is not None else None
        dw = (grad * ((x - mean) * rstd)).reshape(rows).sum(0).view_as(weight) if ctx.needs_input_grad[1] else None
        db = grad.reshape(rows).sum(0).view_as(bias) if ctx.needs_input_grad[2] else None
        return dx, dw, db, None, None


def _layer_norm_fixed_order(self, x):
    return _LayerNormFixedOrder.apply(x, self.weight, self.bias, tuple(self.normalized_shape), self.eps)


class layer_norm_grads_in_fixed_order:
    """Context manager for training (QAT): every affine nn.LayerNorm computes its weight and bias
    gradients in an order that does not depend on the thread count; the forward is torch's own."""

    def __init__(self, model: nn.Module):
        self.norms = [m for m in model.modules()
                      if isinstance(m, nn.LayerNorm) and m.weight is not None and "forward" not in vars(m)]

    def __enter__(self):
        for m in self.norms:
            m.forward = _layer_norm_fixed_order.__get__(m)
        return self

    def __exit__(self, *exc):
        for m in self.norms:
            del m.forward
