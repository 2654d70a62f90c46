"""Causality: no quantization scale at position i depends on tokens after i (nor on other samples).

Every method preset in conf/method/ (read from the folder, so a new preset is covered), with
attention quantization on and off, on a tiny random Llama, a tiny random OPT and SmolLM2:
replacing sample 0's tokens from position T on leaves its logits before T, and all of sample 1's
logits, bit for bit unchanged. A non-causal scheme runs only when asked for with
quant.causal=false, and then it does leak and the result says causal: false."""
import pytest
import torch
import transformers
from torch import nn

from qsim import data
from qsim.config import ConfigError, group_choices
from qsim.methods import METHODS, StageContext
from qsim.models import ByteTokenizer, load_tiny_opt
from qsim.quantizer import QuantSpec
from qsim.run import Bar, build_plan, preflight, run
from qsim.surgery import (
    ACT_LAYOUT,
    ATTENTION_LAYOUTS,
    AttentionQuantizers,
    model_leaks,
    plan_leaks,
    qsim_attention,
    quantize_model,
    scale_leak,
)

from conftest import cfg

PRESETS = group_choices("method")
SEQ, T = 48, 32  # positions per sample; sample 0's tokens from T on are replaced
CHEAP = ["format=w4a8", "calib.n_samples=2", "calib.seq_len=32", "qat.steps=1", "qat.seq_len=16",
         "gptq.max_blocks=1", "progress=false"]


def attention(on: bool) -> list[str]:
    v = str(on).lower()
    return [f"quant.attention={v}", f"abfp.attention={v}", f"mse.attention={v}"]


def tiny_llama() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return transformers.LlamaForCausalLM(config).eval()


def simulate(model: nn.Module, tokenizer, overrides: list[str]):
    """Surgery and every method step of the preset, as qsim.run does; returns the config."""
    c = cfg(*overrides)
    quantize_model(model, build_plan(c))
    calib = None
    if any(METHODS[s].needs_calibration for s in c.method.steps):
        k = c.calib
        calib = data.calibration_windows(tokenizer, k.dataset, k.split, k.n_samples, k.seq_len, k.seed)
    for step in c.method.steps:
        METHODS[step].apply(StageContext(model, calib, c, Bar(None, step), tokenizer))
    return c


@torch.no_grad()
def future_change(model: nn.Module, low: int, high: int) -> tuple[float, float]:
    """(max change of sample 0's logits before T, max change of sample 1's logits) when sample 0's
    tokens from T on are replaced; both must be exactly 0 for a causal scheme."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(low, high, (2, SEQ), generator=gen)
    alt = ids.clone()
    alt[0, T:] = torch.randint(low, high, (SEQ - T,), generator=gen)
    a = model(input_ids=ids, use_cache=False).logits
    b = model(input_ids=alt, use_cache=False).logits
    assert not torch.equal(a[0, T:], b[0, T:])  # the perturbation does reach the model
    return float((a[0, :T] - b[0, :T]).abs().max()), float((a[1] - b[1]).abs().max())


def _tiny(which):
    if which == "tiny-llama":
        return tiny_llama(), ByteTokenizer()
    lm = load_tiny_opt(post_ln=False, dtype=torch.float32)
    return lm.model, lm.tokenizer


@pytest.mark.parametrize("attention_on", [True, False], ids=["attention", "linears"])
@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("which", ["tiny-llama", "tiny-opt"])
def test_every_preset_is_causal_on_tiny_models(which, preset, attention_on, one_thread):
    model, tokenizer = _tiny(which)
    c = simulate(model, tokenizer, [*CHEAP, f"method={preset}", *attention(attention_on)])
    assert plan_leaks(build_plan(c)) == [] and model_leaks(model) == []  # the result would say causal: true
    assert future_change(model, 3, 500) == (0.0, 0.0)


# SmolLM2 (each case loads it and quantizes its weights once): ABFP and RTN with attention, and MSE
# with its static attention operands (the max calibrator: causality does not depend on how the range
# is chosen, and the search is the slow part). Every preset runs on the tiny models above.
SMOLLM2_CASES = [("abfp", True), ("rtn", True), ("mse", True)]


@pytest.mark.slow
@pytest.mark.parametrize("preset,attention_on", SMOLLM2_CASES, ids=[f"{p}-{'attention' if a else 'linears'}" for p, a in SMOLLM2_CASES])
def test_presets_are_causal_on_smollm2(preset, attention_on, smollm2):
    c = simulate(smollm2.model, smollm2.tokenizer, [*CHEAP, "calib.n_samples=1", "mse.calibrator=max",
                                                    f"method={preset}", *attention(attention_on)])
    assert plan_leaks(build_plan(c)) == [] and model_leaks(smollm2.model) == []
    assert future_change(smollm2.model, 100, 10000) == (0.0, 0.0)


# ---------------------------------------------------------------- opt-in non-causal schemes

NON_CAUSAL = {
    "v-along-seq": (["method=abfp", "quant.v_axis=seq"], "attention V: dynamic 64-blocks (axis -2) scales span positions"),
    "act-per-tensor": (["quant.act.granularity=tensor"], "layer inputs: dynamic per-tensor scales span positions and the batch"),
    "act-blocks-along-seq": (["method=abfp", "abfp.act_axis=-2", "abfp.attention=false"],
                             "layer inputs: dynamic 64-blocks (axis -2) scales span positions"),
}


@pytest.mark.parametrize("scheme", list(NON_CAUSAL))
def test_non_causal_scheme_needs_opt_in_and_then_leaks(scheme, one_thread):
    overrides, leak = NON_CAUSAL[scheme]
    with pytest.raises(ConfigError, match="set quant.causal=false") as err:
        preflight(cfg("model=tiny-opt", "format=w4a8", *overrides))
    assert leak in str(err.value) and "\n" not in str(err.value)
    model = tiny_llama()
    c = simulate(model, ByteTokenizer(), [*CHEAP, *overrides, "quant.causal=false"])
    assert plan_leaks(preflight(c)) == [leak]
    assert model_leaks(model) == [leak]
    before, other_sample = future_change(model, 3, 500)
    assert before > 0  # the future does move the past: the check above is not vacuous
    assert (other_sample > 0) == ("batch" in leak)


def test_result_records_causality_and_the_v_axis(tmp_path):
    common = ["model=tiny-opt", "format=w4a8", "method=abfp", "task.max_windows=1", "task.seq_len=64", "progress=false"]
    causal = run(cfg(*common), tmp_path / "causal")
    assert causal["causal"] is True and causal["causal_leaks"] == []
    assert causal["quantized"]["attention_v_axis"] == "head_dim"
    leaky = run(cfg(*common, "quant.v_axis=seq", "quant.causal=false"), tmp_path / "leaky")
    assert leaky["causal"] is False
    assert leaky["causal_leaks"] == ["attention V: dynamic 64-blocks (axis -2) scales span positions"]
    assert leaky["quantized"]["attention_v_axis"] == "seq"
    assert leaky["value"] != causal["value"]


# ---------------------------------------------------------------- the rule, spec by spec

ACT, QKV, P = ACT_LAYOUT, ATTENTION_LAYOUTS["v"], ATTENTION_LAYOUTS["p"]
RULES = [  # (spec, layout, leak or None)
    (QuantSpec("int8", "token", axis=-1), ACT, None),
    (QuantSpec("int8", "block", axis=-1, block=64), ACT, None),
    (QuantSpec("int8", "tensor"), ACT, "dynamic per-tensor scales span positions and the batch"),
    (QuantSpec("int8", "tensor", mode="static"), ACT, None),
    (QuantSpec("int8", "channel", axis=-1), ACT, "dynamic per-channel (axis -1) scales span positions and the batch"),
    (QuantSpec("int8", "channel", axis=-1, mode="static"), ACT, None),
    (QuantSpec("int8", "channel", axis=1), ACT, "dynamic per-channel (axis 1) scales span the batch"),
    (QuantSpec("int8", "token", axis=-2), ACT, "dynamic per-vector (axis -2) scales span positions"),
    (QuantSpec("int8", "token", axis=0), ACT, "dynamic per-vector (axis 0) scales span the batch"),
    (QuantSpec("int8", "block", axis=-2, block=64), ACT, "dynamic 64-blocks (axis -2) scales span positions"),
    (QuantSpec("int8", "block", axis=-2, block=1), ACT, None),
    (QuantSpec("fp32", "tensor"), ACT, None),
    (QuantSpec("fp16", "tensor"), ACT, None),  # a cast: no scale at all
    (QuantSpec("int8", "block", axis=-1, block=64), QKV, None),  # Q, K, V along head_dim
    (QuantSpec("int8", "block", axis=-2, block=64), QKV, "dynamic 64-blocks (axis -2) scales span positions"),
    (QuantSpec("int8", "token", axis=1), QKV, None),  # across heads of one token
    (QuantSpec("int8", "block", axis=-1, block=64), P, None),  # along the keys: masked keys are exactly 0
    (QuantSpec("int8", "token", axis=-2), P, "dynamic per-vector (axis -2) scales span positions"),
    (QuantSpec("int8", "tensor"), P, "dynamic per-tensor scales span positions and the batch"),
]


@pytest.mark.parametrize("spec,layout,leak", RULES)
def test_scale_leak_rule(spec, layout, leak):
    assert scale_leak(spec, layout) == leak


@torch.no_grad()
def test_probabilities_of_masked_keys_are_exactly_zero_so_key_blocks_are_causal():
    """P blocked along the keys (ABFP) is causal because a causal mask makes P[q, k > q] exactly 0:
    later keys never raise a block's max. Here with real future changes in Q, K and V."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, SEQ, 16, generator=gen) for _ in range(3))
    mask = torch.full((SEQ, SEQ), torch.finfo(torch.float32).min).triu(1)[None, None]
    site = nn.Module().eval()
    site.qsim_attn = AttentionQuantizers(QuantSpec("int4", "block", block=16))  # blocks of 16 keys
    out, probs = qsim_attention(site, q, k, v, mask)
    assert torch.equal(probs, probs.tril())  # masked probabilities are exactly 0 (after quantization too)
    q2, k2, v2 = (x.clone() for x in (q, k, v))
    for x in (q2, k2, v2):
        x[:, :, T:] = torch.randn(1, 2, SEQ - T, 16, generator=gen)
    out2, probs2 = qsim_attention(site, q2, k2, v2, mask)
    assert torch.equal(out[:, :T], out2[:, :T]) and torch.equal(probs[:, :, :T], probs2[:, :, :T])
    assert not torch.equal(out[:, T:], out2[:, T:])
