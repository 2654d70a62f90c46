"""Rotation (QuaRot; SpinQuant's random-Hadamard setting): make the model
computationally invariant, then rotate it so that activations and weights lose
their outlier channels before anything is quantized.

1. Norm folding: each RMSNorm / LayerNorm scale (and LayerNorm bias) moves into
   the linears that read the norm's output; the norm keeps scale 1, bias 0.
   A pre-LN OPT's LayerNorm also subtracts the mean, which no rotation passes
   through: the residual stream is made zero-mean instead (token and position
   embeddings, out_proj and fc2 centred over the hidden dim) and its
   LayerNorms become RMSNorms, the same function on zero-mean inputs.
2. Residual rotation Q (hidden x hidden, `rotate.residual`): a Hadamard matrix
   with random signs (`rotate.seed`), or a seeded random orthogonal matrix.
   Embeddings E -> E Q; readers of the stream W -> W Q (q/k/v, gate/up, fc1,
   the LM head); writers W -> Q^T W, b -> Q^T b (o_proj, down_proj, out_proj,
   fc2). Fully fused, nothing runs online. An LM head tied to the embeddings
   is untied (the final norm folds into the head only).
3. Online Hadamard H on the FFN output projection's input (`rotate.online`):
   W -> W H fused, x -> x H at run time inside the quantized layer, before its
   input quantizer (surgery's `input_transform`).
4. Head-wise Hadamard on V and O (`rotate.ov`): fused into v_proj's output
   rows and o_proj's input columns, head by head (exact with GQA: each query
   head reads one rotated V head).
5. Q and K after RoPE (`rotate.qk`), only when the attention matmuls are
   quantized: a head-dim Hadamard before their quantizers (QK^T unchanged),
   online through surgery's `qk_transform`.

`rotate.residual=online` replaces 1-2: the norms keep their scales, nothing is
folded and the residual stream stays as it is; instead the same randomized
Hadamard runs online on each norm's output, inside every reader (q/k/v,
gate/up; computed once per shared input) before its input quantizer, and is
fused into the readers' weights. It costs two fast transforms per block at
run time and helps where the norm's scale is what tames an outlier: SmolLM2's
residual carries massive activations (one channel holding nearly all of a
token's norm, max/rms up to 23.8 of a possible 24) in channels whose RMSNorm
scale is ~0; folding that scale into the weights leaves the channel in the
quantized input, and the rotation spreads it over every channel (per-token
INT4 error of the gate/up input 0.15-0.22 of the output vs 0.11-0.12 with the
scale applied before the rotation). `rotate.residual=none` leaves the stream
and the norms alone: only 3-5 apply.

Hadamard matrices of size n = 2^m * K: Sylvester's for 2^m times a Paley matrix
of order K (Paley I: K = q + 1 with q prime, q = 3 mod 4: 12, 20, 24, 44, ...;
Paley II: K = 2(q + 1) with q prime, q = 1 mod 4: 12, 28, 36, 60, ...; or a
product of two), with the smallest such K: SmolLM2's 576 = 16 * 36 (Paley II,
q = 17), its FFN's 1536 = 128 * 12. A size with no split gets a seeded random
orthogonal matrix, stated in the result. At run time the transform is fast:
one K x K matmul along the inner axis, then log2(2^m) butterfly stages
(a, b) -> (a + b, a - b) along the outer axis, O(n (K + log n)) per vector,
never a dense n x n matmul.

Fusing runs in float32 (float64 costs several times more on CPU for a
logit change far below the 1e-4 invariance bar) and writes the weights in
place (their version counters bump, so cached quantized weights are recomputed). Families: Llama (llama,
mistral, qwen2) and pre-LN OPT. Post-LN OPT (OPT-350m) is refused: its
LayerNorms sit on the residual stream itself. Rotation must be the first step,
so that every later stage (GPTQ, ABFP, SmoothQuant, ...) sees rotated weights.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError
from ..quantizer import SameInputCache
from ..surgery import SurgeryError, attention_quantizers, is_quantized_layer
from . import Method, register
from ..capture import one_thread

LLAMA_FAMILY = ("llama", "mistral", "qwen2")
RESIDUAL_KINDS = ("hadamard", "random", "online", "none")
FUSE_DTYPE = torch.float32
_EMBEDDING_CHUNK = 8192  # rows of an embedding rotated at a time


# ---------------------------------------------------------------- Hadamard matrices

def _is_prime(p: int) -> bool:
    return p >= 2 and all(p % d for d in range(2, math.isqrt(p) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = chi(j - i) over GF(q), q prime; chi = quadratic character (0 at 0)."""
    squares = {(i * i) % q for i in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if a in squares else -1.0 for a in range(1, q)], dtype=torch.float64)
    return chi[(torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q]


def paley(order: int) -> tuple[torch.Tensor, str] | None:
    """A +-1 Hadamard matrix of `order` by Paley's constructions, or None."""
    q = order - 1
    if q % 4 == 3 and _is_prime(q):  # Paley I: H = I + [[0, 1^T], [-1, Q]] (Q antisymmetric)
        s = torch.zeros(order, order, dtype=torch.float64)
        s[0, 1:], s[1:, 0], s[1:, 1:] = 1.0, -1.0, _jacobsthal(q)
        return s + torch.eye(order, dtype=torch.float64), f"Paley I (q={q})"
    q = order // 2 - 1
    if order % 2 == 0 and q % 4 == 1 and _is_prime(q):  # Paley II from the symmetric conference matrix
        c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
        c[0, 1:], c[1:, 0], c[1:, 1:] = 1.0, 1.0, _jacobsthal(q)
        off = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        diag = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
        return torch.kron(c, off) + torch.kron(torch.eye(q + 1, dtype=torch.float64), diag), f"Paley II (q={q})"
    return None


def inner_hadamard(k: int) -> tuple[torch.Tensor, str] | None:
    """Paley of order k, or the Kronecker product of two Paley matrices."""
    found = paley(k)
    if found is not None:
        return found
    for a in range(4, math.isqrt(k) + 1):
        if k % a == 0:
            left, right = paley(a), paley(k // a)
            if left is not None and right is not None:
                return torch.kron(left[0], right[0]), f"{left[1]} x {right[1]}"
    return None


def hadamard_split(n: int) -> tuple[int, int, torch.Tensor | None, str] | None:
    """(2^m, K, H_K or None for K = 1, description) with n = 2^m K and the smallest K; None if unknown."""
    for m in range(n.bit_length() - 1, -1, -1):
        if n % (1 << m):
            continue
        outer, k = 1 << m, n >> m
        if k == 1:
            return outer, 1, None, f"Sylvester {outer}"
        inner = inner_hadamard(k)
        if inner is not None:
            return outer, k, inner[0], f"Sylvester {outer} x {inner[1]} {k}"
    return None


class Hadamard(nn.Module):
    """x -> x M along the last axis, M = (H_2^m kron H_K)^T / sqrt(n) orthonormal.

    Fast: the K x K factor is one matmul over the inner axis, the power of two
    log2(2^m) butterfly stages over the outer axis (contiguous chunks of K)."""

    def __init__(self, n: int):
        super().__init__()
        split = hadamard_split(n)
        if split is None:
            raise ValueError(f"no Hadamard matrix of order {n} is constructed here")
        self.n, self.outer, self.k, inner, self.construction = n, *split
        scale = 1.0 / math.sqrt(n)
        # Float64: the same module fuses weights exactly and is cast to the activation's dtype.
        inner_t = (inner.t() * scale) if inner is not None else torch.tensor(scale, dtype=torch.float64)
        self.register_buffer("inner_t", inner_t, persistent=False)

    def extra_repr(self) -> str:
        return f"n={self.n}: {self.construction}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, outer, k = x.shape, self.outer, self.k
        factor = self.inner_t.to(device=x.device, dtype=x.dtype)
        y = x.reshape(-1, outer, k)
        y = y @ factor if k > 1 else y * factor
        h = 1
        while h < outer:
            v = y.reshape(-1, outer // (2 * h), 2, h * k)
            a, b = v[:, :, 0], v[:, :, 1]
            y = torch.stack((a + b, a - b), dim=2)
            h *= 2
        return y.reshape(shape)

    def matrix(self) -> torch.Tensor:
        """M itself (float64): the transform of the identity's rows."""
        return self(torch.eye(self.n, dtype=torch.float64, device=self.inner_t.device))


class DenseRotation(nn.Module):
    """x -> x M for a dense orthogonal M (sizes with no Hadamard matrix here)."""

    def __init__(self, matrix: torch.Tensor, construction: str):
        super().__init__()
        self.n, self.construction = matrix.shape[0], construction
        self.register_buffer("m", matrix.double(), persistent=False)

    def extra_repr(self) -> str:
        return f"n={self.n}: {self.construction}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.m.to(device=x.device, dtype=x.dtype)

    def matrix(self) -> torch.Tensor:
        return self.m


def random_orthogonal(n: int, seed: int) -> torch.Tensor:
    """A Haar-random orthogonal matrix (QR of a Gaussian, signs fixed by R's diagonal), float64."""
    gen = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=gen))
    return q * torch.sign(torch.diagonal(r)).unsqueeze(0)


def rotation(n: int, seed: int) -> nn.Module:
    """The fast Hadamard of size n, or a seeded dense random orthogonal matrix if none is known."""
    if hadamard_split(n) is not None:
        return Hadamard(n)
    return DenseRotation(random_orthogonal(n, seed), f"random orthogonal (seed {seed}; no Hadamard of order {n} here)")


def describe(t: nn.Module) -> dict:
    if not isinstance(t, Hadamard):
        return {"size": t.n, "construction": t.construction, "runtime": "dense matmul"}
    stages = f"{int(math.log2(t.outer))} butterfly stages"
    return {"size": t.n, "construction": t.construction,
            "runtime": "fast: " + (f"{t.k}x{t.k} matmul + {stages}" if t.k > 1 else stages)}


# ---------------------------------------------------------------- the model's layout

@dataclass
class Block:
    attn_norm: nn.Module
    attn_in: list[nn.Module]  # q, k, v
    v: nn.Module
    o: nn.Module
    mlp_norm: nn.Module
    mlp_in: list[nn.Module]  # gate, up / fc1
    mlp_out: nn.Module  # down_proj / fc2
    attention: nn.Module


@dataclass
class Layout:
    family: str
    embeddings: list[nn.Module]  # residual writers before block 0 (token, position embeddings)
    blocks: list[Block]
    final_norm: nn.Module
    head: nn.Module
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    layernorm: bool  # mean-subtracting norms: residual made zero-mean, norms turned into RMSNorms


def layout(model: nn.Module) -> Layout:
    """Where the norms, readers and writers of the residual stream are; SurgeryError if unsupported."""
    cfg = model.config
    kind = getattr(cfg, "model_type", "")
    if kind in LLAMA_FAMILY:
        base = model.model
        blocks = [Block(l.input_layernorm, [l.self_attn.q_proj, l.self_attn.k_proj, l.self_attn.v_proj],
                        l.self_attn.v_proj, l.self_attn.o_proj, l.post_attention_layernorm,
                        [l.mlp.gate_proj, l.mlp.up_proj], l.mlp.down_proj, l.self_attn) for l in base.layers]
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        out = Layout("llama", [base.embed_tokens], blocks, base.norm, model.lm_head, cfg.hidden_size, heads,
                     getattr(cfg, "num_key_value_heads", None) or heads, head_dim, layernorm=False)
    elif kind == "opt":
        if not cfg.do_layer_norm_before:
            raise SurgeryError("rotate: post-LN OPT (do_layer_norm_before=false, e.g. OPT-350m) has LayerNorms on "
                               "the residual stream itself, so no rotation of the stream passes through them")
        dec = model.model.decoder
        if dec.project_in is not None or dec.project_out is not None:
            raise SurgeryError("rotate: OPT with project_in/project_out (word_embed_proj_dim != hidden_size) is not supported")
        blocks = [Block(l.self_attn_layer_norm, [l.self_attn.q_proj, l.self_attn.k_proj, l.self_attn.v_proj],
                        l.self_attn.v_proj, l.self_attn.out_proj, l.final_layer_norm, [l.fc1], l.fc2, l.self_attn)
                  for l in dec.layers]
        heads = cfg.num_attention_heads
        out = Layout("opt", [dec.embed_tokens, dec.embed_positions], blocks, dec.final_layer_norm, model.lm_head,
                     cfg.hidden_size, heads, heads, cfg.hidden_size // heads, layernorm=True)
    else:
        raise SurgeryError(f"rotate supports Llama-family ({', '.join(LLAMA_FAMILY)}) and pre-LN OPT models, "
                           f"not model_type {kind!r}")
    for b in out.blocks:
        for m in b.attn_in + b.mlp_in + [b.o, b.mlp_out]:
            if not isinstance(m, nn.Linear):
                raise SurgeryError(f"rotate: expected linear layers in the blocks, found {type(m).__name__}")
    return out


# ---------------------------------------------------------------- fusing

class Fused:
    """Working copies (FUSE_DTYPE) of (weight [out, in], bias [out]) for some linears, written back at once."""

    def __init__(self):
        self.work: dict[int, tuple[nn.Module, list]] = {}

    def get(self, m: nn.Module) -> list:
        if id(m) not in self.work:
            b = None if m.bias is None else m.bias.detach().to(FUSE_DTYPE)
            self.work[id(m)] = (m, [m.weight.detach().to(FUSE_DTYPE), b])
        return self.work[id(m)][1]

    @torch.no_grad()
    def write_back(self) -> None:
        for m, (w, b) in self.work.values():
            m.weight.copy_(w.to(m.weight.dtype))  # in place: the version bump drops cached quantized weights
            if b is not None:
                if m.bias is None:
                    m.bias = nn.Parameter(b.to(device=m.weight.device, dtype=m.weight.dtype))
                else:
                    m.bias.copy_(b.to(m.bias.dtype))
        self.work.clear()


def fold_norm(fused: Fused, norm: nn.Module, readers: list[nn.Module]) -> None:
    """W -> W diag(gamma), b -> b + W beta; the norm then holds gamma = 1, beta = 0 (see reset_norm)."""
    gamma = norm.weight.detach().to(FUSE_DTYPE)
    beta = getattr(norm, "bias", None)
    for m in readers:
        wb = fused.get(m)
        if beta is not None:
            shift = wb[0] @ beta.detach().to(FUSE_DTYPE)
            wb[1] = shift if wb[1] is None else wb[1] + shift
        wb[0] = wb[0] * gamma


@torch.no_grad()
def reset_norm(norm: nn.Module) -> None:
    norm.weight.fill_(1.0)
    if getattr(norm, "bias", None) is not None:
        norm.bias.zero_()


class RMSNormFromLayerNorm(nn.LayerNorm):
    """A LayerNorm without the mean subtraction: x / rms(x) * weight + bias (exact on a zero-mean residual)."""

    def forward(self, x):
        y = F.rms_norm(x, self.normalized_shape, self.weight, self.eps)
        return y if self.bias is None else y + self.bias


def per_head(w: torch.Tensor, head_dim: int, t: nn.Module) -> torch.Tensor:
    """t on each head's slice of the last axis."""
    return t(w.reshape(*w.shape[:-1], -1, head_dim)).reshape(w.shape)


# ---------------------------------------------------------------- the stage

class SharedInput(nn.Module):
    """`transform` computed once for layers that read one tensor (q/k/v, gate/up)."""

    def __init__(self, transform: nn.Module):
        super().__init__()
        self.transform = transform
        self._cache = SameInputCache(lambda x: self.transform(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._cache(x)


class RandomizedHadamard(nn.Module):
    """x -> (x * s) M: Q = diag(s) M, random signs s, M the fast Hadamard (QuIP#, QuaRot)."""

    def __init__(self, n: int, seed: int):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.hadamard = Hadamard(n)
        self.register_buffer("signs", torch.randint(0, 2, (n,), generator=gen).double() * 2 - 1, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.hadamard(x * self.signs.to(device=x.device, dtype=x.dtype))


def residual_rotation(n: int, kind: str, seed: int) -> tuple[nn.Module, dict]:
    """The module h -> h Q (fast for a Hadamard Q; None for "none") and its description."""
    if kind == "none":
        return None, {"kind": "none"}
    if kind in ("hadamard", "online") and hadamard_split(n) is not None:
        r = RandomizedHadamard(n, seed)
        return r, {"kind": "hadamard", "size": n, "construction": r.hadamard.construction, "random_signs_seed": seed}
    why = "" if kind == "random" else f" (no Hadamard of order {n} here)"
    return DenseRotation(random_orthogonal(n, seed), "random orthogonal"), {"kind": "random orthogonal" + why,
                                                                           "size": n, "seed": seed}


@torch.no_grad()
def rotate_model(model: nn.Module, rc, bar=None) -> dict:
    """Fold the norms and apply every rotation `rc` (a RotateConfig) asks for; return the facts."""
    lay = layout(model)
    device = lay.head.weight.device
    q, residual_facts = residual_rotation(lay.hidden, rc.residual, rc.seed)
    in_weights = rc.residual in ("hadamard", "random")  # else: norms kept; "online": outputs rotated at readers
    if q is not None:
        q = q.to(device)  # fusing: W -> q(W) = W Q (readers), W -> q(W^T)^T = Q^T W (writers)
    online = rotation(lay.blocks[0].mlp_out.in_features, rc.seed).to(device) if rc.online else None
    head_rot = rotation(lay.head_dim, rc.seed).to(device) if (rc.ov or rc.qk) else None
    reader_transform = SharedInput(q) if rc.residual == "online" else None
    if bar is not None:
        bar.start(len(lay.blocks))
    facts = {"family": lay.family, "seed": rc.seed, "residual": residual_facts}
    names = {id(m): n for n, m in model.named_modules()}
    fused = Fused()
    untied = False
    if in_weights:
        # The head first: if it is tied, its weight is still the embeddings' original.
        untied = lay.head.weight is lay.embeddings[0].weight
        if untied:
            lay.head.weight = nn.Parameter(lay.head.weight.detach().clone())
            model.config.tie_word_embeddings = False
        fold_norm(fused, lay.final_norm, [lay.head])
        fused.get(lay.head)[0] = q(fused.get(lay.head)[0])
        fused.write_back()
        for emb in lay.embeddings:
            w = emb.weight
            for start in range(0, w.shape[0], _EMBEDDING_CHUNK):
                rows = w[start : start + _EMBEDDING_CHUNK].to(FUSE_DTYPE)
                if lay.layernorm:
                    rows = rows - rows.mean(-1, keepdim=True)
                w[start : start + _EMBEDDING_CHUNK] = q(rows).to(w.dtype)

    def online_input(m: nn.Module, transform: nn.Module, sites: list, skipped: list) -> None:
        """x -> transform(x) before m's input quantizer, W -> transform(W rows); only on quantized layers."""
        if not is_quantized_layer(m):  # no hook to run it: left unrotated (exact either way)
            skipped.append(names[id(m)])
            return
        wb = fused.get(m)
        wb[0] = transform(wb[0])
        m.input_transform = transform
        sites.append(names[id(m)])

    online_sites, reader_sites, skipped = [], [], []
    for b in lay.blocks:
        if in_weights:
            fold_norm(fused, b.attn_norm, b.attn_in)
            fold_norm(fused, b.mlp_norm, b.mlp_in)
            for m in b.attn_in + b.mlp_in:
                wb = fused.get(m)
                wb[0] = q(wb[0])
            for m in (b.o, b.mlp_out):
                wb = fused.get(m)
                if lay.layernorm:  # the writer's output zero-mean over the hidden dim
                    wb[0] = wb[0] - wb[0].mean(0, keepdim=True)
                    wb[1] = None if wb[1] is None else wb[1] - wb[1].mean()
                wb[0] = q(wb[0].t()).t()
                wb[1] = None if wb[1] is None else q(wb[1])
        elif reader_transform is not None:
            for m in b.attn_in + b.mlp_in:
                online_input(m, reader_transform, reader_sites, skipped)
        if online is not None:
            online_input(b.mlp_out, online, online_sites, skipped)
        if rc.ov:
            wb = fused.get(b.v)  # output rows per head: W_v -> blockdiag(M)^T W_v
            wb[0] = per_head(wb[0].t(), lay.head_dim, head_rot).t()
            wb[1] = None if wb[1] is None else per_head(wb[1], lay.head_dim, head_rot)
            wb = fused.get(b.o)  # input columns per head: W_o -> W_o blockdiag(M)
            wb[0] = per_head(wb[0], lay.head_dim, head_rot)
        fused.write_back()
        if in_weights:
            reset_norm(b.attn_norm)
            reset_norm(b.mlp_norm)
        if bar is not None:
            bar.advance(1)

    norms = [n for b in lay.blocks for n in (b.attn_norm, b.mlp_norm)] + [lay.final_norm]
    if in_weights:
        reset_norm(lay.final_norm)
        if lay.layernorm:
            for n in norms:
                n.__class__ = RMSNormFromLayerNorm

    qk_sites = []
    if rc.qk:
        blocks_attention = {names[id(b.attention)] for b in lay.blocks}
        for name, aq in attention_quantizers(model):
            if name in blocks_attention:
                aq.qk_transform = head_rot
                qk_sites.append(name)
    applied = (["norm folding", "residual"] if in_weights else ["norm outputs online"] if reader_transform else []) + \
        (["online down_proj"] if online_sites else []) + (["ov head-wise"] if rc.ov else []) + \
        (["qk head-dim"] if qk_sites else [])
    facts.update({
        "rotations": applied,
        "residual_fused": in_weights,
        "norms_folded": len(norms) if in_weights else 0,
        "layernorms_as_rmsnorm": len(norms) if in_weights and lay.layernorm else 0,
        "zero_mean_residual": in_weights and lay.layernorm,
        "untied_lm_head": untied,
        "norm_outputs_online": {"sites": len(reader_sites), "runtime": describe(q.hadamard)["runtime"]
                                if isinstance(q, RandomizedHadamard) else "dense matmul"} if reader_transform else None,
        "online": {**describe(online), "sites": len(online_sites)} if online is not None else None,
        "not_quantized_left_alone": skipped,
        "ov": {**describe(head_rot), "blocks": len(lay.blocks)} if rc.ov else None,
        "qk": {**describe(head_rot), "sites": len(qk_sites)} if qk_sites else
        ({"sites": 0, "reason": "attention matmuls not quantized"} if rc.qk else None),
    })
    return facts


def apply(ctx):
    model, cfg, bar = ctx.model, ctx.cfg, ctx.bar
    with one_thread():  # thousands of small ops: a thread pool costs more than it saves (as in GPTQ)
        return rotate_model(model, cfg.rotate, bar)


def validate(cfg):
    steps = list(cfg.method.steps)
    if steps.count("rotate") > 1 or steps[0] != "rotate":
        raise ConfigError(f"rotate must be the first step, once (later steps see the rotated weights); got {steps}")
    if cfg.rotate.residual not in RESIDUAL_KINDS:
        raise ConfigError(f"unknown rotate.residual {cfg.rotate.residual!r}; valid: {', '.join(RESIDUAL_KINDS)}")
    if cfg.model.source == "tiny-opt" and cfg.model.post_ln:
        raise ConfigError("rotate: post-LN OPT has LayerNorms on the residual stream itself, so no rotation passes them")
    if "smoothquant" in steps and cfg.smoothquant.scope == "all" and cfg.rotate.online:
        raise ConfigError("smoothquant.scope=all would scale down_proj's input before its online Hadamard; "
                          "use smoothquant.scope=norm or rotate.online=false")


register(Method("rotate", apply=apply, validate=validate))
