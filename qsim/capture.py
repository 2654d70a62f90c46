"""What calibrating stages share: float passes over the calibration windows, the tracing of
which layers read which tensor (and the norm that made it), and a one-thread section.
MSE, SmoothQuant, RPTQ, GPTQ, MoFQ and FPT capture activations through these."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .quantizer import Quantizer
from .surgery import QuantMultiheadAttention, quantization_disabled, quantized_layers


class StopForward(Exception):
    """Raised by a hook once a calibration pass has seen all it needs; the caller catches it."""


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _unobserved_head(model: torch.nn.Module) -> torch.nn.Module | None:
    """The output head (LM head) when no quantizer sits in it: calibration passes stop at its input.
    The LM head is ~20% of SmolLM2's forward; nothing after it is observed."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is None or any(isinstance(m, Quantizer) for m in head.modules()):
        return None
    return head


@torch.no_grad()
def float_passes(model: torch.nn.Module, calib: torch.Tensor, bar, info: str = "") -> None:
    """Run each calibration window through the float model (every quantizer off;
    quantizer observers still see their input), up to an unquantized output head."""
    device = model_device(model)
    bar.start(len(calib))
    head = _unobserved_head(model)

    def stop(_module, _args):
        raise StopForward

    handle = head.register_forward_pre_hook(stop) if head is not None else None
    try:
        with quantization_disabled(model):
            for window in calib:
                try:
                    model(window[None].to(device), use_cache=False)
                except StopForward:
                    pass
                bar.advance(1, info)
    finally:
        if handle is not None:
            handle.remove()


@dataclass
class InputGroup:
    """Linears that read one tensor, and the norm that produced it (if any)."""

    layers: list[str]
    norm: str | None = None
    foldable: bool = False
    modules: list[nn.Module] = field(default_factory=list, repr=False)


def is_norm(module: nn.Module) -> bool:
    w = getattr(module, "weight", None)
    return "norm" in type(module).__name__.lower() and isinstance(w, nn.Parameter) and w.dim() == 1


def features_last(module: nn.Module) -> bool:
    """Quantized layers whose input has its features on the last axis (not convolutions)."""
    return module.input_axis == -1


def smoothable(module: nn.Module) -> bool:
    """Features-last layers with one input: nn.MultiheadAttention's one in-projection weight
    serves query, key and value, which an input scale cannot divide consistently."""
    return features_last(module) and not isinstance(module, QuantMultiheadAttention)


def _storage_key(t: torch.Tensor):
    return (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())


@torch.no_grad()
def trace_input_groups(model: nn.Module, ids: torch.Tensor) -> list[InputGroup]:
    """One float forward: group the linears by the tensor they read, and name
    the norm that produced it. Views of a norm's output (a reshape) count as
    its output. Every traced tensor is held until the end, so no freed storage
    is reused and mistaken for another."""
    norm_of: dict = {}
    first_key: dict[str, tuple] = {}
    held = []
    handles = []
    modules = dict(model.named_modules())

    def norm_hook(name):
        def hook(_m, _args, out):
            if isinstance(out, torch.Tensor):
                held.append(out)
                norm_of.setdefault(_storage_key(out), name)
        return hook

    def layer_hook(name):
        def hook(_m, args, kwargs):
            x = args[0] if args else kwargs.get("input", kwargs.get("query"))
            if isinstance(x, torch.Tensor) and name not in first_key:
                held.append(x)
                first_key[name] = _storage_key(x)
        return hook

    try:
        for name, m in modules.items():
            if is_norm(m):
                handles.append(m.register_forward_hook(norm_hook(name)))
        for name, m in quantized_layers(model):
            if features_last(m):
                handles.append(m.register_forward_pre_hook(layer_hook(name), with_kwargs=True, prepend=True))
        with quantization_disabled(model):
            model(ids.to(model_device(model)), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    by_key: dict[tuple, list[str]] = {}
    for name, key in first_key.items():
        by_key.setdefault(key, []).append(name)
    groups = []
    for key, names in by_key.items():
        g = InputGroup(layers=names, norm=norm_of.get(key))
        g.modules = [modules[n] for n in names]
        groups.append(g)
    return groups


def trace_ids(calib: torch.Tensor, length: int = 32) -> torch.Tensor:
    """A short first input for tracing: the first window's first tokens (an image: the first)."""
    if calib.is_floating_point():  # pixel_values [n, C, H, W]
        return calib[:1]
    return calib[:1, : min(length, calib.shape[1])]


def calib_extent(calib: torch.Tensor) -> dict:
    """What a stage calibrated on, for its facts: token windows, or images (pixel_values)."""
    if calib.is_floating_point():
        return {"calib_images": len(calib), "calib_image_size": list(calib.shape[-2:])}
    return {"calib_windows": len(calib), "calib_tokens": int(calib.numel())}


class one_thread:
    """For stages of thousands of small ops and a few LAPACK calls on small matrices (GPTQ,
    rotation): on a busy machine a thread pool costs 2-10x more than it saves."""

    def __enter__(self):
        self.saved = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.saved)
