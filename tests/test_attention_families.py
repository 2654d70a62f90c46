"""qsim's attention function on tiny random models of several families: with its quantizers off it
is transformers' eager attention (every argument the family passes is honoured or named as
unused), an argument it does not implement stops the run, and families whose attention does
not dispatch through AttentionInterface are refused."""
import pytest
import torch
import transformers

from qsim.quantizer import QuantSpec
from qsim.surgery import (
    UNUSED_ATTENTION_ARGS,
    LayerQuant,
    SurgeryError,
    SurgeryPlan,
    _set_attn_implementation,
    attention_quantizers,
    quantization_disabled,
    quantize_model,
)

VOCAB = 96
DECODER = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
# Each family with the attention arguments it exercises (transformers routes all of them through AttentionInterface).
FAMILIES = {
    "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**DECODER, num_key_value_heads=2)),
    "opt": lambda: transformers.OPTForCausalLM(transformers.OPTConfig(
        vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=32)),
    # softcap (1.0, with weights large enough that the scores reach it), sliding_window (4 < the 12 positions), scaling
    "gemma2": lambda: transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
        **DECODER, num_key_value_heads=2, head_dim=8, sliding_window=4, query_pre_attn_scalar=16,
        attn_logit_softcapping=1.0, initializer_range=0.5)),
    "qwen2": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**DECODER, num_key_value_heads=2)),
    "qwen3": lambda: transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**DECODER, num_key_value_heads=2, head_dim=8)),
    "gpt2": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_head=4, n_layer=2, scale_attn_by_inverse_layer_idx=True)),
    "bert": lambda: transformers.BertForMaskedLM(transformers.BertConfig(**DECODER)),
    # position_bias (relative attention bias), encoder self-, decoder self- and cross-attention
    "t5": lambda: transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_heads=4, num_layers=2, decoder_start_token_id=0)),
    # s_aux attention sinks, sliding_window
    "gpt_oss": lambda: transformers.GptOssForCausalLM(transformers.GptOssConfig(
        **DECODER, num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2, sliding_window=4)),
}
ATTENTION_ONLY = SurgeryPlan(default=LayerQuant(), attention=QuantSpec("int8", "token"))


def _build(family):
    torch.manual_seed(0)
    model = FAMILIES[family]().eval()
    if family == "gpt_oss":  # sinks start at 0; make them matter
        for layer in model.model.layers:
            torch.nn.init.normal_(layer.self_attn.sinks)
    return model


def _logits(model, ids):
    extra = {"decoder_input_ids": ids.flip(1)} if model.config.is_encoder_decoder else {}
    return model(input_ids=ids, **extra).logits


@torch.no_grad()
@pytest.mark.parametrize("family", list(FAMILIES))
def test_qsim_attention_with_quantizers_off_is_eager_attention(family):
    model = _build(family)
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    _set_attn_implementation(model, "eager")
    eager = _logits(model, ids)
    report = quantize_model(model, ATTENTION_ONLY)
    assert report.attention_sites and model.config._attn_implementation == "qsim"
    with quantization_disabled(model):
        off = _logits(model, ids)
    calls = [aq.calls for _, aq in attention_quantizers(model)]
    assert all(c == 1 for c in calls), calls  # every site went through qsim's function
    assert torch.equal(off, eager)  # bit for bit, on every family
    quantized = _logits(model, ids)
    assert torch.isfinite(quantized).all() and not torch.equal(quantized, eager)


@torch.no_grad()
def test_attention_argument_qsim_does_not_implement_stops_the_run():
    """GLM-MoE-DSA passes its sparse-attention `indices` (which transformers' eager ignores,
    computing dense attention): qsim stops instead of simulating something else."""
    config = transformers.GlmMoeDsaConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        moe_intermediate_size=16, n_routed_experts=4, num_experts_per_tok=2, q_lora_rank=16, kv_lora_rank=16,
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, index_n_heads=2, index_head_dim=16, index_topk=4)
    torch.manual_seed(0)
    model = transformers.GlmMoeDsaForCausalLM(config).eval()
    quantize_model(model, ATTENTION_ONLY)
    with pytest.raises(SurgeryError) as err:
        model(input_ids=torch.randint(0, VOCAB, (1, 12)))
    message = str(err.value)
    assert "\n" not in message
    assert "GlmMoeDsaAttention (glm_moe_dsa)" in message and "indices=" in message


@torch.no_grad()
def test_unused_arguments_are_what_eager_attention_ignores_too():
    """Passing the flash-only and bookkeeping arguments changes nothing, as with eager."""
    model = _build("llama")
    ids = torch.randint(0, VOCAB, (1, 10), generator=torch.Generator().manual_seed(2))
    quantize_model(model, ATTENTION_ONLY)
    ref = model(input_ids=ids).logits
    extra = {"is_causal": True, "output_router_logits": False, "num_items_in_batch": torch.tensor(10)}
    assert set(extra) <= set(UNUSED_ATTENTION_ARGS)
    assert torch.equal(model(input_ids=ids, **extra).logits, ref)


@pytest.mark.parametrize("family", ["bloom", "gpt_neo"])
def test_family_without_attention_interface_is_refused(family):
    """Bloom and GPT-Neo still compute attention inside their own classes in this transformers."""
    torch.manual_seed(0)
    if family == "bloom":
        model = transformers.BloomForCausalLM(transformers.BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4))
    else:
        model = transformers.GPTNeoForCausalLM(transformers.GPTNeoConfig(
            vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, attention_types=[[["global", "local"], 1]]))
    with pytest.raises(SurgeryError, match="0 attention sites were instrumented in " + type(model).__name__):
        quantize_model(model, ATTENTION_ONLY)
