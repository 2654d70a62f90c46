"""Loading, data and the perplexity protocols, on the real offline model and data."""
import json
import math

import pytest
import torch

from qsim import data
from qsim.models import load_smollm2, load_tiny_opt, smollm2_gguf_path
from qsim.tasks import perplexity, token_stream

from conftest import pinned


def test_smollm2_cache_loads_the_same_weights():
    first = load_smollm2()
    again = load_smollm2()
    assert again.from_cache
    assert smollm2_gguf_path().name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    # the cache is the GGUF's: its folder is named by the GGUF's sha256, which it records
    from qsim.environment import file_sha256
    from qsim.models import _smollm2_cache

    digest = file_sha256(smollm2_gguf_path())
    assert _smollm2_cache().name.endswith("-" + digest[:16])
    assert json.loads((_smollm2_cache() / "qsim_source.json").read_text())["sha256"] == digest
    for (name, a), (_, b) in zip(first.model.state_dict().items(), again.model.state_dict().items()):
        assert torch.equal(a, b), name
    assert first.model.config.num_hidden_layers == 30 and first.model.dtype == torch.float32


def test_smollm2_fp32_perplexity_is_that_of_a_real_lm(smollm2, wikitext_ids):
    out = perplexity(smollm2.model, wikitext_ids, seq_len=512, max_windows=2, batch_size=2)
    assert pinned(out["value"], 28.232813979087478), out["value"]  # float: no quantizer can move it
    assert out["windows"] == 2 and out["tokens_evaluated"] == 1024 and out["tokens_predicted"] == 2 * 511
    single = perplexity(smollm2.model, wikitext_ids, seq_len=512, max_windows=2, batch_size=1)
    assert math.isclose(single["value"], out["value"], rel_tol=1e-4)


def _labels_perplexity(model, ids: torch.Tensor, seq_len: int, windows: int) -> float:
    """The model's own loss (transformers' causal-LM loss with labels=input_ids), per window,
    each window's mean NLL weighted by its predicted tokens."""
    total_nll, total_tokens = 0.0, 0
    with torch.no_grad():
        for w in range(windows):
            window = ids[w * seq_len : (w + 1) * seq_len].view(1, seq_len)
            loss = model(input_ids=window, labels=window, use_cache=False).loss
            total_nll += float(loss) * (seq_len - 1)
            total_tokens += seq_len - 1
    return math.exp(total_nll / total_tokens)


def _assert_perplexity_is_the_models_own(model, ids, seq_len=128, windows=3):
    expected = _labels_perplexity(model, ids, seq_len, windows)
    for batch_size in (1, windows):
        out = perplexity(model, ids, seq_len=seq_len, max_windows=windows, batch_size=batch_size)
        assert out["windows"] == windows and out["tokens_predicted"] == windows * (seq_len - 1)
        # fp32 sums in another order: ~1e-7 apart; a shifted label or a dropped token is > 1e-3
        assert abs(out["value"] - expected) / expected < 1e-5, (batch_size, out["value"], expected)


@pytest.mark.slow
def test_perplexity_is_smollm2s_own_labels_loss(smollm2, wikitext_ids):
    _assert_perplexity_is_the_models_own(smollm2.model, wikitext_ids)


def test_perplexity_is_tiny_opts_own_labels_loss_float_and_quantized():
    from qsim.run import build_plan
    from qsim.surgery import quantize_model

    from conftest import cfg

    lm = load_tiny_opt(False, torch.float32)
    ids = data.tokenize(lm.tokenizer, data.join_text(data.load_rows("wikitext2", "test")[:200]))
    _assert_perplexity_is_the_models_own(lm.model, ids)
    quantize_model(lm.model, build_plan(cfg("model=tiny-opt", "format=w4a8")))
    _assert_perplexity_is_the_models_own(lm.model, ids)


def test_gptq_protocol_tail_dropped(wikitext_ids):
    assert wikitext_ids.numel() == 304986  # "\n\n".join of the 4,358 hub rows, SmolLM2 tokenizer
    model = load_tiny_opt(False, torch.float32).model
    out = perplexity(model, torch.arange(1100) % 500, seq_len=200, max_windows=None, batch_size=2)
    assert out["windows_available"] == 5 and out["windows"] == 5 and out["tokens_evaluated"] == 1000


def test_paper_protocol_tokenizes_rows_separately(smollm2):
    rows = data.load_rows("wikitext2", "test")[:40]
    joined = token_stream(smollm2.tokenizer, rows, "gptq")
    per_row = token_stream(smollm2.tokenizer, rows, "paper")
    assert joined.numel() != per_row.numel()
    assert per_row.numel() > 0


def test_wikitext2_offline_rows_are_the_hub_split():
    rows = data.load_rows("wikitext2", "test")
    assert len(rows) == 4358 and sum(1 for r in rows if r == "") == 1467
    assert len(data.join_text(rows).encode("utf-8")) == 1296370  # the data README counts UTF-8 bytes


def test_calibration_windows_are_deterministic_and_not_wikitext(smollm2):
    a = data.calibration_windows(smollm2.tokenizer, "ptb", "test", 4, 64, seed=0)
    b = data.calibration_windows(smollm2.tokenizer, "ptb", "test", 4, 64, seed=0)
    c = data.calibration_windows(smollm2.tokenizer, "ptb", "test", 4, 64, seed=1)
    assert a.shape == (4, 64) and torch.equal(a, b) and not torch.equal(a, c)
    sst = data.calibration_windows(smollm2.tokenizer, "sst2", "train", 2, 32, seed=0)
    assert sst.shape == (2, 32)


def test_missing_offline_file_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("QSIM_DATA_DIR", str(tmp_path))
    with pytest.raises(data.DataError, match="wikitext-2-raw-v1/test.jsonl"):
        data.load_rows("wikitext2", "test")
    with pytest.raises(data.DataError, match="QSIM_DATA_DIR"):
        data.check_available("ptb", "test")


def test_tiny_opt_post_ln_is_350m_like():
    model = load_tiny_opt(True, torch.float32).model
    assert model.config.do_layer_norm_before is False
    assert model.model.decoder.project_in is not None and model.model.decoder.project_out is not None
