"""Matmul accumulation (qsim/accum.py): equal to a float64 loop that rounds as documented."""
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from qsim.accum import Accumulator, linear, matmul
from qsim.config import ConfigError, compose_config, validate
from qsim.run import build_plan
from qsim.surgery import SurgeryError, quantize_model

from conftest import REPO
from test_causality import future_change, tiny_llama

# (mantissa bits, smallest normal exponent, max) of IEEE bf16 and fp16
GRIDS = {"bf16": (7, -126, (2 - 2**-7) * 2.0**127), "fp16": (10, -14, (2 - 2**-10) * 2.0**15)}


def round_to(v: float, fmt: str) -> float:
    """Nearest value of the IEEE grid, ties to even (Python's round), inf beyond max."""
    man, emin, top = GRIDS[fmt]
    if v == 0 or math.isinf(v):
        return v
    _, e = math.frexp(abs(v))  # |v| = f * 2**e, f in [0.5, 1)
    step = 2.0 ** (max(e - 1, emin) - man)
    q = round(abs(v) / step) * step
    return math.copysign(math.inf if q > top else q, v)


def reference(a: np.ndarray, b: np.ndarray, fmt: str, chunk: int | None) -> np.ndarray:
    """The documented rule, one output at a time, in Python floats (float64)."""
    m, k = a.shape
    n = b.shape[1]
    out = np.zeros((m, n), dtype=np.float32)
    for i in range(m):
        for j in range(n):
            products = [float(a[i, t]) * float(b[t, j]) for t in range(k)]  # exact: 24-bit x 24-bit
            if chunk is None:
                acc = 0.0
                for p in products:
                    acc = round_to(math.fsum([acc, p]), fmt)
                out[i, j] = np.float32(acc)
            else:
                total = np.float32(0.0)
                for start in range(0, k, chunk):
                    total = np.float32(total + np.float32(round_to(math.fsum(products[start:start + chunk]), fmt)))
                out[i, j] = total
    return out


def operands(kind: str, seed: int):
    gen = torch.Generator().manual_seed(seed)
    a, b = torch.randn(5, 37, generator=gen), torch.randn(37, 4, generator=gen)
    if kind == "quantized":  # INT4 values times power-of-two scales: many exact ties in the partial sums
        a = torch.randint(-7, 8, a.shape, generator=gen).float() * 0.25
        b = torch.randint(-7, 8, b.shape, generator=gen).float() * 2.0**-5
    return a, b


@pytest.mark.parametrize("kernels", ["native", "torch"])  # qsim/native.c's chunk loop, and torch's
@pytest.mark.parametrize("kind", ["gaussian", "quantized"])
@pytest.mark.parametrize("chunk", [None, 1, 4, 16, 37, 100])
@pytest.mark.parametrize("fmt", ["bf16", "fp16"])
def test_accumulation_equals_the_float64_loop(fmt, chunk, kind, kernels, monkeypatch):
    monkeypatch.setenv("QSIM_KERNELS", kernels)
    a, b = operands(kind, seed=len(kind) + (chunk or 0))
    got = matmul(a, b, Accumulator(fmt, chunk))
    want = torch.from_numpy(reference(a.numpy(), b.numpy(), fmt, chunk))
    assert torch.equal(got, want)
    if kind == "gaussian":  # and it is not the fp32 matmul
        assert not torch.equal(got, a @ b)


def test_fp32_is_torch_matmul_and_batched_shapes_broadcast():
    gen = torch.Generator().manual_seed(3)
    x, w = torch.randn(2, 3, 6, 40, generator=gen), torch.randn(7, 40, generator=gen)
    assert torch.equal(linear(x, w, None, Accumulator()), nn.functional.linear(x, w))
    acc = Accumulator("bf16", 8)
    got = linear(x, w, torch.ones(7), acc)
    for i in range(2):
        for j in range(3):
            assert torch.equal(got[i, j], matmul(x[i, j], w.t(), acc) + 1)  # the bias is added afterwards
    q, k = torch.randn(2, 4, 6, 16, generator=gen), torch.randn(2, 4, 16, 6, generator=gen)
    assert torch.equal(matmul(q, k, acc)[1, 2], matmul(q[1, 2], k[1, 2], acc))


def test_fp16_accumulator_overflows_to_inf_and_bf16_does_not():
    a, b = torch.full((1, 4), 200.0), torch.full((4, 1), 200.0)  # partial sums 40000, 80000 > 65504
    assert matmul(a, b, Accumulator("fp16")).item() == math.inf
    assert matmul(a, b, Accumulator("fp16", 1)).item() == 160000.0  # each product fits; the fp32 sum holds it
    assert matmul(a, b, Accumulator("bf16")).item() == 159744.0  # finite, on bf16's 8-bit grid


def test_training_passes_the_fp32_gradient_straight_through():
    gen = torch.Generator().manual_seed(4)
    x, w = torch.randn(3, 20, generator=gen, requires_grad=True), torch.randn(5, 20, generator=gen, requires_grad=True)
    linear(x, w, None, Accumulator("bf16", 4)).square().sum().backward()
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    out = linear(x, w, None, Accumulator("bf16", 4))
    # d(sum out^2) = 2 out (the simulated output), carried back through the fp32 matmul
    assert torch.allclose(gx, 2 * out.detach() @ w) and torch.allclose(gw, 2 * out.detach().t() @ x)
    with torch.inference_mode():
        assert torch.equal(linear(x, w, None, Accumulator("bf16", 4)), out.detach())


@pytest.mark.parametrize("overrides, message", [
    (["quant.accum=fp8"], "unknown accumulator 'fp8'; valid: fp32, bf16, fp16"),
    (["quant.accum=bf16", "quant.accum_chunk=0"], "quant.accum_chunk must be >= 1 or null; got 0"),
    (["quant.accum_chunk=128"], "quant.accum_chunk rounds partial sums to a narrow accumulator; set quant.accum=bf16|fp16"),
])
def test_bad_accumulator_settings_are_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("|", r"\|")):
        validate(compose_config(["model=tiny-opt", *overrides]))


def test_a_convolution_is_refused_rather_than_left_fp32():
    model = nn.Sequential(nn.Conv1d(4, 4, 3), nn.Linear(4, 4))
    plan = build_plan(compose_config(["model=tiny-opt", "format=w4a8", "quant.accum=bf16", "quant.accum_chunk=16"]))
    with pytest.raises(SurgeryError, match="quant.accum=bf16 is simulated for linear and attention matmuls; '0' is a Conv1d"):
        quantize_model(model, plan)


def test_accumulation_keeps_attention_causal_and_moves_the_logits(one_thread):
    ids = torch.randint(3, 500, (1, 24), generator=torch.Generator().manual_seed(0))
    logits = {}
    for setting in (["quant.accum=fp32"], ["quant.accum=bf16", "quant.accum_chunk=4"]):
        model = tiny_llama()
        c = compose_config(["model=tiny-opt", "format=w4a8", "method=abfp", *setting])
        report = quantize_model(model, build_plan(c))
        assert future_change(model, 3, 500) == (0.0, 0.0)
        with torch.no_grad():
            logits[setting[-1]] = model(ids, use_cache=False).logits
    assert report.accum_matmuls == {"linears": 14, "attention_sites": 2}
    assert not torch.equal(logits["quant.accum=fp32"], logits["quant.accum_chunk=4"])


def test_run_records_the_accumulator(tmp_path):
    run = subprocess.run([sys.executable, "-m", "qsim.cli", "run", "model=tiny-opt", "format=w4a8", "method=abfp",
                          "quant.accum=bf16", "quant.accum_chunk=32", "task.seq_len=64", "task.max_windows=2",
                          "progress=false", f"hydra.run.dir={tmp_path}"], capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0, run.stderr[-2000:]
    import json

    result = json.loads((tmp_path / "result.json").read_text())
    assert result["quantized"]["accumulator"] == {
        "format": "bf16", "chunk": 32, "rule": "partial sums of 32 products rounded to bf16, added in fp32",
        "matmuls": {"linears": 12, "attention_sites": 2}}
    assert result["value"] == pytest.approx(514.0296714566367, rel=1e-4)


@pytest.mark.parametrize("fmt", ["e8m7", "e5m10_ieee"])
def test_fast_rounding_of_partial_sums_equals_the_reference(fmt):
    from qsim.accum import round_float64, round_float64_reference
    from qsim.formats import get_format

    grid, gen = get_format(fmt), torch.Generator().manual_seed(5)
    spread = torch.randn(200_000, generator=gen).double() * 10.0 ** torch.randint(-45, 40, (200_000,), generator=gen)
    ties = (torch.randint(-999, 1000, (50_000,), generator=gen).double() + 0.5) * 2.0 ** torch.randint(-150, 20, (50_000,), generator=gen)
    edges = torch.tensor([0.0, -0.0, 1e300, -1e300, 65519.99, 65520.0, 65504.0, 1.5 * 2**-24, 2.0**-25, 3 * 2.0**-25,
                          2.0**-126, 1.5 * 2.0**-127, -(2.0**-134), 3.4e38, 3.39e38, -3.4e38], dtype=torch.float64)
    x = torch.cat([spread, ties, edges])
    fast, ref = round_float64(x, grid), round_float64_reference(x, grid).float()
    assert torch.equal(fast.view(torch.int32), ref.view(torch.int32))  # signed zeros and infs included


def test_results_made_before_the_accumulator_existed_keep_their_identity_and_other_accumulators_differ():
    """A config without quant.accum (a result made before the key existed) hashes as the default's."""
    import copy

    from omegaconf import OmegaConf

    from qsim.results import identity

    now = OmegaConf.to_container(compose_config([]), resolve=True)
    before = copy.deepcopy(now)
    del before["quant"]["accum"], before["quant"]["accum_chunk"]
    data = {"eval": [{"name": "wikitext2", "split": "test"}]}
    assert identity(before, data) == identity(now, data)
    ids = {}
    for setting in (["quant.accum=fp32"], ["quant.accum=bf16", "quant.accum_chunk=128"], ["quant.accum=bf16"]):
        resolved = OmegaConf.to_container(compose_config(setting), resolve=True)
        ids[tuple(setting)] = identity(resolved, data)
    assert ids[("quant.accum=fp32",)] == identity(before, data)
    assert len(set(ids.values())) == 3
