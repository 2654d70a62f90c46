"""Rotation and LoRC (issue 12).

Hadamard constructions checked exactly; the rotated model computes the float
model's function (quantizers off) on a tiny Llama (non-power-of-two sizes, GQA,
tied head), a tiny pre-LN OPT and SmolLM2; the online Hadamard runs inside the
quantized layer before its input quantizer; causality holds with rotation and
4-bit activations; LoRC's full rank restores W and rank 0 changes nothing."""
import math

import pytest
import torch

from conftest import cfg
from qsim.config import ConfigError, validate
from qsim.methods import METHODS, StageContext
from qsim.methods.rotate import Hadamard, inner_hadamard, hadamard_split, layout, paley, rotation
from qsim.run import build_plan
from qsim.surgery import SurgeryError, quantization_disabled, quantize_model, quantized_layers, restore_model


# ---------------------------------------------------------------- Hadamard matrices

@pytest.mark.parametrize("order, construction", [
    (12, "Paley I (q=11)"), (20, "Paley I (q=19)"), (28, "Paley II (q=13)"), (36, "Paley II (q=17)"),
    (44, "Paley I (q=43)"), (60, "Paley I (q=59)"),
])
def test_paley_matrices_are_hadamard(order, construction):
    h, name = paley(order)
    assert name == construction
    assert set(h.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(h @ h.t(), order * torch.eye(order, dtype=torch.float64))


def test_kronecker_of_two_paley_matrices():
    h, name = inner_hadamard(144)  # no Paley matrix of order 144 (143 and 71 do not qualify)
    assert name == "Paley I (q=3) x Paley II (q=17)"
    assert torch.equal(h @ h.t(), 144 * torch.eye(144, dtype=torch.float64))
    assert paley(52) is None and hadamard_split(52) is None and hadamard_split(9) is None


@pytest.mark.parametrize("n, construction, inner", [
    (64, "Sylvester 64", 1),
    (576, "Sylvester 16 x Paley II (q=17) 36", 36),  # SmolLM2 hidden
    (1536, "Sylvester 128 x Paley I (q=11) 12", 12),  # SmolLM2 FFN
    (80, "Sylvester 4 x Paley I (q=19) 20", 20),
    (72, "Sylvester 2 x Paley II (q=17) 36", 36),
])
def test_fast_hadamard_is_orthonormal_and_matches_its_matrix(n, construction, inner):
    h = Hadamard(n)
    assert h.construction == construction
    assert h.inner_t.numel() == inner * inner or (inner == 1 and h.inner_t.numel() == 1)  # no n x n matrix
    m = h.matrix()
    rows = m[:: max(1, n // 64)]  # a sample of rows against all: the full product costs O(n^3)
    torch.testing.assert_close(rows @ m.t(), torch.eye(n, dtype=torch.float64)[:: max(1, n // 64)], rtol=0, atol=1e-12)
    assert torch.allclose(m.abs(), torch.full_like(m, n ** -0.5))  # a scaled +-1 matrix
    x = torch.randn(2, 3, n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(h(x), x @ m, rtol=0, atol=1e-12)
    assert h(x.float()).dtype == torch.float32


def test_sizes_without_hadamard_get_a_seeded_dense_orthogonal():
    r = rotation(52, seed=3)
    assert "random orthogonal (seed 3" in r.construction
    m = r.matrix()
    torch.testing.assert_close(m @ m.t(), torch.eye(52, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(rotation(52, seed=3).matrix(), m, rtol=0, atol=0)


# ---------------------------------------------------------------- invariance

def tiny_llama():
    """A small random Llama with non-power-of-two sizes (hidden 72 = 2 x 36, FFN 96 = 8 x 12,
    head dim 24 = 2 x 12), GQA, a tied head and non-trivial norm scales."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    c = LlamaConfig(vocab_size=512, hidden_size=72, intermediate_size=96, num_hidden_layers=2, num_attention_heads=3,
                    num_key_value_heads=1, head_dim=24, max_position_embeddings=128, tie_word_embeddings=True)
    model = LlamaForCausalLM(c).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def tiny_preln_opt():
    from qsim.models import load_tiny_opt

    model = load_tiny_opt(post_ln=False, dtype=torch.float32).model
    with torch.no_grad():  # LayerNorm scales and shifts to fold
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.uniform_(0.5, 1.5) if name.endswith("weight") else p.uniform_(-0.5, 0.5)
    return model


def _rotated(model, *overrides):
    c = cfg("format=w4a4", "method=rotate-abfp", *overrides)
    quantize_model(model, build_plan(c))
    return METHODS["rotate"].apply(StageContext(model, None, c, None))


def _float_logits(model, ids):
    with torch.no_grad(), quantization_disabled(model):
        return model(ids, use_cache=False).logits


def _rel_change(a, b):
    return float((a - b).abs().max() / b.abs().max())


ALL_ROTATIONS = ["norm folding", "residual", "online down_proj", "ov head-wise", "qk head-dim"]


@pytest.mark.parametrize("which, residual", [("llama", "hadamard"), ("opt", "hadamard"), ("opt", "online")])
def test_rotated_tiny_model_computes_the_same_function(which, residual):
    model = tiny_llama() if which == "llama" else tiny_preln_opt()
    ids = torch.randint(0, 512, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
    facts = _rotated(model, f"rotate.residual={residual}", *(["model=tiny-opt"] if which == "opt" else []))
    assert _rel_change(_float_logits(model, ids), ref) < 1e-4
    if residual == "online":
        assert facts["rotations"] == ["norm outputs online"] + ALL_ROTATIONS[2:] and facts["layernorms_as_rmsnorm"] == 0
    else:
        assert facts["rotations"] == ALL_ROTATIONS and facts["untied_lm_head"]
    if which == "llama":
        assert facts["residual"]["construction"] == "Sylvester 2 x Paley II (q=17) 36"
        assert facts["online"]["construction"] == "Sylvester 8 x Paley I (q=11) 12" and facts["online"]["sites"] == 2
    elif residual == "hadamard":
        assert facts["layernorms_as_rmsnorm"] == 5 and facts["zero_mean_residual"]
    with torch.no_grad():  # quantizers on: the rotated model quantizes differently, and finitely
        quantized = model(ids, use_cache=False).logits
    assert torch.isfinite(quantized).all() and _rel_change(quantized, ref) > 1e-3


def test_residual_rotation_seed_random_orthogonal_and_online_kinds():
    ids = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(1))
    outs = {}
    for overrides in (["rotate.seed=0"], ["rotate.seed=1"], ["rotate.residual=random"], ["rotate.residual=online"]):
        model = tiny_llama()
        with torch.no_grad():
            ref = model(ids, use_cache=False).logits
        facts = _rotated(model, *overrides)
        assert _rel_change(_float_logits(model, ids), ref) < 1e-4
        outs[overrides[0]] = model.model.embed_tokens.weight.detach().clone()
        if overrides[0] == "rotate.residual=random":
            assert facts["residual"] == {"kind": "random orthogonal", "size": 72, "seed": 0}
        if overrides[0] == "rotate.residual=online":  # embeddings and norms untouched, 5 readers a block
            assert facts["rotations"] == ["norm outputs online"] + ALL_ROTATIONS[2:]
            assert facts["norm_outputs_online"]["sites"] == 10 and not facts["untied_lm_head"]
            assert torch.equal(model.model.embed_tokens.weight, tiny_llama().model.embed_tokens.weight)
    assert not torch.equal(outs["rotate.seed=0"], outs["rotate.seed=1"])


@pytest.mark.slow
def test_rotated_smollm2_computes_the_same_function(smollm2):
    ids = torch.randint(0, 49152, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = smollm2.model(ids, use_cache=False).logits
    facts = _rotated(smollm2.model)
    assert facts["rotations"] == ALL_ROTATIONS and facts["untied_lm_head"] and facts["norms_folded"] == 61
    assert facts["residual"]["construction"] == "Sylvester 16 x Paley II (q=17) 36"
    assert facts["online"]["construction"] == "Sylvester 128 x Paley I (q=11) 12" and facts["online"]["sites"] == 30
    assert facts["qk"]["sites"] == 30
    assert _rel_change(_float_logits(smollm2.model, ids), ref) < 1e-4
    assert smollm2.model.lm_head.weight is not smollm2.model.model.embed_tokens.weight


def test_online_hadamard_runs_inside_the_layer_before_its_input_quantizer():
    model = tiny_llama()
    _rotated(model)
    down = dict(quantized_layers(model))["model.layers.0.mlp.down_proj"]
    seen = {}
    down.register_forward_pre_hook(lambda _m, args: seen.setdefault("layer", args[0].detach().clone()))
    down.input_quantizer.register_forward_pre_hook(lambda _m, args: seen.setdefault("quantizer", args[0].detach().clone()))
    with torch.no_grad():
        model(torch.randint(0, 512, (1, 8)), use_cache=False)
    torch.testing.assert_close(seen["quantizer"], down.input_transform(seen["layer"]))
    assert not torch.allclose(seen["quantizer"], seen["layer"])
    with pytest.raises(SurgeryError, match="input transform is fused"):
        restore_model(model)


def test_rotation_with_4bit_activations_stays_causal():
    from qsim.surgery import attention_quantizers

    model = tiny_llama()
    _rotated(model)  # W4A4 ABFP, quantized attention, Q/K rotated
    for _, aq in attention_quantizers(model):
        aq.v.enabled = False  # V's scales run along the sequence (not causal before this change either)
    ids = torch.randint(0, 512, (1, 20), generator=torch.Generator().manual_seed(2))
    changed = ids.clone()
    changed[0, 12:] = (changed[0, 12:] + 7) % 512
    with torch.no_grad():
        a, b = model(ids, use_cache=False).logits, model(changed, use_cache=False).logits
    assert torch.equal(a[0, :12], b[0, :12]) and not torch.equal(a[0, 12:], b[0, 12:])


def test_post_ln_opt_is_refused_in_one_line(tiny_opt_postln):
    with pytest.raises(ConfigError, match="post-LN OPT"):
        validate(cfg("model=tiny-opt-postln", "method=rotate-abfp"))
    with pytest.raises(SurgeryError, match="post-LN OPT") as err:
        layout(tiny_opt_postln)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("overrides, message", [
    (["method.steps=[abfp,rotate]"], "rotate must be the first step"),
    (["rotate.residual=learned"], "rotate.residual"),
    (["method.steps=[rotate,smoothquant,abfp]", "smoothquant.scope=all"], "smoothquant.scope=all"),
    (["method=gptq-lorc", "lorc.rank=-1"], "lorc.rank"),
    (["method=gptq-lorc", "lorc.format=int99"], "lorc.format"),
])
def test_bad_rotate_and_lorc_config(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(cfg("method=rotate", *overrides))


# ---------------------------------------------------------------- LoRC

def _tiny_opt_with(*overrides):
    from qsim.models import load_tiny_opt

    model = load_tiny_opt(post_ln=False, dtype=torch.float32).model
    c = cfg("model=tiny-opt", "format=w4a16", *overrides)
    quantize_model(model, build_plan(c))
    calib = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(0))
    facts = {s: METHODS[s].apply(StageContext(model, calib, c, None)) for s in c.method.steps}
    return model, facts


def test_lorc_rank_zero_is_gptq_alone():
    ids = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(3))
    plain, _ = _tiny_opt_with("method=gptq")
    with_lorc, facts = _tiny_opt_with("method=gptq-lorc", "lorc.rank=0")
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, with_lorc(ids).logits)
    assert facts["lorc"]["layers"] == 0 and facts["lorc"]["added_bits_per_weight"] == 0.0
    assert not any(hasattr(m, "float_weight") for _, m in quantized_layers(with_lorc))


@pytest.mark.parametrize("steps", ["[gptq,lorc]", "[rtn,lorc]"])
def test_lorc_full_rank_restores_the_float_weights(steps):
    from qsim.models import load_tiny_opt

    ref = dict(load_tiny_opt(post_ln=False, dtype=torch.float32).model.named_parameters())
    model, facts = _tiny_opt_with("method=gptq-lorc", f"method.steps={steps}", "lorc.rank=1000", "lorc.format=fp32")
    assert facts["lorc"]["layers"] == 12 and facts["lorc"]["weight_error_before_mean"] > 0.05
    for name, layer in quantized_layers(model):
        if name != "lm_head" and layer.weight.dim() == 2:
            torch.testing.assert_close(layer.weight, ref[name + ".weight"], rtol=0, atol=2e-6)
            assert not layer.weight_quantizer.enabled


def test_lorc_rank8_lowers_the_error_and_counts_bits():
    _, fp16 = _tiny_opt_with("method=gptq-lorc")
    _, int8 = _tiny_opt_with("method=gptq-lorc", "lorc.format=int8")
    f = fp16["lorc"]
    assert f["layers"] == 12 and f["weight_error_after_mean"] < 0.8 * f["weight_error_before_mean"]
    # tiny OPT: 8 layers 64x64, 2 of 128x64, 2 of 64x128: 8 (out + in) 16-bit values per layer
    weights = 8 * 64 * 64 + 4 * 128 * 64
    assert f["added_bits_per_weight"] == pytest.approx(8 * 16 * (8 * 128 + 4 * 192) / weights)
    scales = 32 * (8 * (64 + 8) + 2 * (128 + 8) + 2 * (64 + 8))
    assert int8["lorc"]["added_bits_per_weight"] == pytest.approx((8 * 8 * (8 * 128 + 4 * 192) + scales) / weights)


# ---------------------------------------------------------------- end to end

def test_rotate_gptq_lorc_end_to_end_on_tiny_opt(tmp_path):
    from qsim.run import run

    c = cfg("model=tiny-opt", "format=w4a8", "method=rotate-gptq", "method.steps=[rotate,gptq,lorc]",
            "calib.n_samples=2", "calib.seq_len=32", "task.max_windows=1", "task.seq_len=64", "progress=false")
    result = run(c, tmp_path)
    assert math.isfinite(result["value"])
    assert result["methods"]["rotate"]["rotations"][:4] == ALL_ROTATIONS[:4]
    assert result["methods"]["gptq"]["layers"] == 12 and result["methods"]["lorc"]["layers"] == 12
