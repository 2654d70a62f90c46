"""`qsim sensitivity [key=value ...]`: how much each quantized layer (and attention
site, when attention is quantized) costs on its own.

The model is quantized and calibrated as `qsim run` would (format, quant, method);
then the mean next-token loss on `sensitivity.windows` calibration windows of
`sensitivity.seq_len` tokens (calib.dataset/split/seed) is measured with:
- everything in float, and everything quantized (the two baselines);
- only one unit quantized (`only`: its loss minus the float loss);
- every unit but one quantized (`all_but`: the all-quantized loss minus this loss,
  i.e. what leaving that unit in float recovers).
A unit is a layer's input, weight and output quantizers, or an attention site's
four operand quantizers; units are toggled by `Quantizer.enabled` (weights keep
their cached quantized copy, nothing is frozen). The decoder blocks before a unit's
block are replayed from their stored outputs (`PrefixCache`), not recomputed. Writes sensitivity.csv,
sensitivity.png and sensitivity.json into the run folder and prints the top units.
"""
from __future__ import annotations

import contextlib
import csv
import fnmatch
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .quantizer import Quantizer
from .surgery import attention_quantizers, quantized_layers


def sensitivity_units(model, patterns=("*",)) -> list[tuple[str, str, list[Quantizer]]]:
    """(name, kind, active quantizers) per quantized layer and attention site whose name matches a pattern."""
    units = []
    for name, layer in quantized_layers(model):
        qs = [q for q in (layer.input_quantizer, layer.weight_quantizer, layer.output_quantizer) if q.active]
        if qs:
            units.append((name, "layer", qs))
    for name, aq in attention_quantizers(model):
        qs = [q for q in (aq.q, aq.k, aq.v, aq.p) if q.active]
        if qs:
            units.append((name, "attention", qs))
    return [u for u in units if any(fnmatch.fnmatchcase(u[0], p) for p in patterns)]


class PrefixCache:
    """Outputs of the decoder blocks, per window, in the float and in the all-quantized state.
    A unit in block i changes nothing before block i: with only it quantized, blocks 0..i-1 are
    float; with all but it, they are all quantized. Their outputs are replayed from this cache
    (each block's forward returns the stored output of the same window), so only blocks i.. run."""

    def __init__(self, model):
        self.prefix, self.blocks = _decoder_blocks(model)
        self.outputs = {}  # state -> [block][window] -> the block's output
        self.window = 0

    def block_of(self, unit: str) -> int:
        if self.blocks is None:
            return 0
        rest = unit[len(self.prefix) + 1:] if unit.startswith(self.prefix + ".") else ""
        head = rest.split(".", 1)[0]
        return int(head) if head.isdigit() else 0

    @contextlib.contextmanager
    def record(self, state: str):
        if self.blocks is None:
            yield
            return
        store = self.outputs[state] = [[] for _ in self.blocks]
        handles = [b.register_forward_hook(lambda _m, _a, out, j=j: store[j].append(out)) for j, b in enumerate(self.blocks)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    @contextlib.contextmanager
    def replay(self, state: str, upto: int):
        """Blocks 0..upto-1 return their stored outputs of `state`."""
        stubbed = [] if self.blocks is None else list(self.blocks)[:upto]
        for j, block in enumerate(stubbed):
            block.forward = lambda *_a, j=j, **_k: self.outputs[state][j][self.window]
        try:
            yield
        finally:
            for block in stubbed:
                del block.forward


def _decoder_blocks(model):
    """(name, ModuleList) of the decoder blocks: the longest ModuleList whose entries hold quantized layers."""
    best = (None, None)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 1 and all(
                any(isinstance(m, Quantizer) for m in child.modules()) for child in module):
            if best[1] is None or len(module) > len(best[1]):
                best = (name, module)
    return best


@torch.inference_mode()
def mean_loss(model, windows: torch.Tensor, cache: PrefixCache | None = None) -> float:
    """Mean next-token NLL over the windows (one forward each)."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i, w in enumerate(windows):
        if cache is not None:
            cache.window = i
        ids = w[None].to(device)
        logits = model(input_ids=ids, use_cache=False).logits
        total += float(F.cross_entropy(logits[0, :-1].float(), ids[0, 1:], reduction="sum"))
        count += ids.shape[1] - 1
    return total / count


def _set(quantizers, on: bool) -> None:
    for q in quantizers:
        q.enabled = on


def measure(model, windows: torch.Tensor, bar=None, patterns=("*",), prefix_cache: bool = True) -> dict:
    """The two baselines and, per unit (those matching `patterns`), the `only` and `all_but` loss changes."""
    every = [q for _, _, qs in sensitivity_units(model) for q in qs]
    units = sensitivity_units(model, patterns)
    if not units:
        raise ValueError(f"no active quantizer in a unit matching {list(patterns)}: nothing to measure")
    cache = PrefixCache(model)
    if not prefix_cache:
        cache.blocks = None
    if bar is not None:
        bar.start(2 * len(units) + 2)
    rows = []
    try:
        _set(every, False)
        with cache.record("float"):
            loss_float = mean_loss(model, windows, cache)
        if bar is not None:
            bar.advance(1, "float")
        for name, kind, qs in units:
            _set(qs, True)
            with cache.replay("float", cache.block_of(name)):
                rows.append({"unit": name, "kind": kind, "loss_only": mean_loss(model, windows, cache)})
            _set(qs, False)
            if bar is not None:
                bar.advance(1, f"only {name}")
        _set(every, True)
        with cache.record("quantized"):
            loss_quant = mean_loss(model, windows, cache)
        if bar is not None:
            bar.advance(1, "all quantized")
        for row, (name, _, qs) in zip(rows, units):
            _set(qs, False)
            with cache.replay("quantized", cache.block_of(name)):
                row["loss_all_but"] = mean_loss(model, windows, cache)
            _set(qs, True)
            if bar is not None:
                bar.advance(1, f"all but {name}")
    finally:
        _set(every, True)
    for row in rows:
        row["only"] = row["loss_only"] - loss_float
        row["all_but"] = loss_quant - row["loss_all_but"]
    return {"loss_float": loss_float, "loss_quantized": loss_quant, "units": rows}


def write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["unit", "kind", "only", "all_but", "loss_only", "loss_all_but"])
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


def write_png(path: Path, out: dict, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = out["units"]
    x = range(len(rows))
    fig, axes = plt.subplots(2, 1, figsize=(max(8, len(rows) * 0.08), 7), sharex=True)
    for ax, key, label in ((axes[0], "only", "only this unit quantized:\nloss - float loss"),
                           (axes[1], "all_but", "all but this unit quantized:\nall-quantized loss - loss")):
        ax.bar(x, [r[key] for r in rows], color=["tab:orange" if r["kind"] == "attention" else "tab:blue" for r in rows])
        ax.set_ylabel(label, fontsize=8)
        ax.axhline(0, color="black", linewidth=0.5)
    axes[0].set_title(f"{title}\nfloat loss {out['loss_float']:.4f}, all quantized {out['loss_quantized']:.4f}", fontsize=9)
    axes[1].set_xticks(list(x))
    axes[1].set_xticklabels([r["unit"].replace("model.", "") for r in rows], rotation=90, fontsize=4)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def cmd_sensitivity(args: list[str]) -> None:
    from omegaconf import OmegaConf
    from rich.console import Console
    from rich.table import Table

    from . import data
    from .cli import explain_compose_error, fail
    from .config import ConfigError, compose_config
    from .presets import user_keys
    from .models import ModelLoadError, load_model
    from .results import versions, write_json_atomic
    from .run import Bar, progress_display, calibrate, preflight, run_identity
    from .surgery import SurgeryError, quantize_model
    from .tasks import calibration_source, calibration_windows

    out_dir = None
    if "--out" in args:
        i = args.index("--out")
        if i + 1 >= len(args):
            fail("--out needs a directory")
        out_dir, args = Path(args[i + 1]), args[:i] + args[i + 2:]
    try:
        cfg = compose_config(args)
    except Exception as err:
        fail(explain_compose_error(err, args))
    try:
        plan = preflight(cfg, reads="sensitivity", explicit=user_keys(args))
        if min(cfg.sensitivity.windows, cfg.sensitivity.top, cfg.sensitivity.seq_len - 1) < 1:
            raise ConfigError("sensitivity.windows and sensitivity.top must be >= 1, sensitivity.seq_len >= 2")
        data.check_available(*calibration_source(cfg))
    except (ConfigError, data.DataError) as err:
        fail(str(err))
    if out_dir is None:
        import os

        stamp = time.strftime("%Y-%m-%d/%H-%M-%S")
        out_dir = (Path(os.environ.get("QSIM_RESULTS_DIR", "results")) / "sensitivity" /
                   f"{stamp}_{cfg.model.name}_w{cfg.format.weight}_a{cfg.format.act}_{cfg.method.name}")
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    t0 = time.time()
    try:
        with progress_display(cfg.progress) as progress:
            lm = load_model(cfg.model)
            quantize_model(lm.model, plan)
            facts = calibrate(lm.model, lm.tokenizer, cfg, progress)
            windows = calibration_windows(lm.tokenizer, cfg, cfg.sensitivity.windows, cfg.sensitivity.seq_len)
            t1 = time.time()
            out = measure(lm.model, windows, Bar(progress, "sensitivity"), list(cfg.sensitivity.units))
    except (ModelLoadError, SurgeryError, data.DataError, ValueError) as err:
        fail(str(err))
    seconds = round(time.time() - t1, 1)
    title = f"{cfg.model.name} W {cfg.format.weight} / A {cfg.format.act}, {cfg.method.name} {list(cfg.method.steps)}"
    write_csv(out_dir / "sensitivity.csv", out["units"])
    write_png(out_dir / "sensitivity.png", out, title)
    write_json_atomic(out_dir / "sensitivity.json", {
        **out, "windows": len(windows), "seq_len": int(windows.shape[1]), "methods": facts,
        "timings": {"measure": seconds, "total": round(time.time() - t0, 1)}, "versions": versions(),
        "config": OmegaConf.to_container(cfg, resolve=True), **run_identity(cfg),
        "windows_data": data.data_identity(*calibration_source(cfg))})
    table = Table(title=f"sensitivity: {title} ({len(windows)} windows x {windows.shape[1]}, {seconds} s)")
    for col in ("rank", "unit", "kind", "only (loss - float)", "all but (all-quant - loss)"):
        table.add_column(col, justify="left" if col in ("unit", "kind") else "right", no_wrap=col == "unit")
    top = sorted(out["units"], key=lambda r: -r["only"])[: cfg.sensitivity.top]
    for i, r in enumerate(top, 1):
        table.add_row(str(i), r["unit"], r["kind"], f"{r['only']:+.5f}", f"{r['all_but']:+.5f}")
    console = Console(width=max(Console().width, 130))  # room for full layer names
    console.print(table)
    console.print(f"float loss {out['loss_float']:.4f} (ppl {math.exp(out['loss_float']):.2f}), all quantized "
                  f"{out['loss_quantized']:.4f} (ppl {math.exp(out['loss_quantized']):.2f}); {len(out['units'])} units")
    console.print(f"wrote {out_dir}/sensitivity.csv, sensitivity.png, sensitivity.json")
    sys.stdout.flush()
