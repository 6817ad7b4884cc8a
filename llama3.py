"""llama3.py: the Llama 3 text models (3, 3.1, 3.2 and 3.3) in one file.

Run it:    python llama3.py --ckpt DIR --prompt "The capital of France is"
Read it:   top to bottom. Part 1 is the model and nothing else; part 2 runs it;
           the appendices (CPU paths, tensor parallelism, compiled decoding,
           quantized weights, an OpenAI-compatible server, constrained
           decoding) are swapped in after the model is built.
Copy it:   part 1 (ModelArgs to Transformer) imports only torch and the standard
           library; tiktoken and safetensors are imported where they are used.

The whole model, with Llama 3 8B's numbers:

    tokens (B, T)                              ids < vocab_size = 128256
      |
    tok_embeddings                             (B, T, dim = 4096)
      |
      +--> n_layers = 32 blocks, each:
      |      h = x + attention(RMSNorm(x))     32 query heads, 8 K/V heads (GQA),
      |                                        RoPE on q and k, theta 500000
      |      x = h + feed_forward(RMSNorm(h))  SwiGLU, hidden_dim = 14336
      |
    norm (RMSNorm)                             (B, T, dim)
      |
    output (dim -> vocab_size)                 logits (B, T, 128256), float32

Shape symbols used in the comments:
    B           batch size
    T           tokens fed in this call (the whole prompt in prefill, 1 in decode)
    S           start_pos + T, the positions visible to attention (cache + new)
    dim         model width (4096 for 8B)
    n_heads     query heads (32 for 8B); n_kv_heads key/value heads (8 for 8B)
    head_dim    dim // n_heads (128 for every released Llama 3)
    hidden_dim  SwiGLU width (14336 for 8B)
    vocab_size  128256 (128000 BPE tokens + 256 special tokens)

References: Meta's github.com/meta-llama/llama3 and llama-models; "The Llama 3
Herd of Models" (arXiv 2407.21783). Left out: training loops, LoRA, vision models.
Differences from Meta's model.py, each marked where it happens: plain nn.Linear
instead of fairscale's layers; real-valued RoPE computed per call; the 3.1
factor in the config; GQA without copying K/V heads; optional SDPA; a KV cache
made by the caller.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import pickle
import re
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

if __name__ == "__main__":  # Ctrl-C while torch loads ends quietly (exit 130), as it does later; a handler,
    signal.signal(signal.SIGINT, lambda *_: os._exit(130))  # as torch's C++ import can swallow the exception
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:  # type names only: the model runs without tiktoken
    from llama3 import JSONConstraint  # appendix F's: part 2 calls its methods, and gets one through engine_room
    from tokenizer import Tokenizer

# =============================================================================
# Part 1: the model
# =============================================================================

# -----------------------------------------------------------------------------
# Configuration
#
# The first ten fields are named like the keys of Meta's params.json, so one
# maps onto ModelArgs directly; the rest come from the other configs or the
# caller (max_seq_len, SwiGLU width, tied embeddings, the 3.1 constants, the
# attention kernel). The defaults describe Llama 3 8B.
# -----------------------------------------------------------------------------


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None means n_heads (plain multi-head attention)
    vocab_size: int = 128256
    multiple_of: int = 1024  # SwiGLU width is rounded up to a multiple of this
    ffn_dim_multiplier: float | None = 1.3  # scales the SwiGLU width (1.3 for 8B)
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    use_scaled_rope: bool = False  # Llama 3.1+ frequency scaling for long context
    # The four numbers of Llama 3.1's frequency scaling (see RoPE below).
    rope_scaling_factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_seq_len: int = 8192  # Llama 3's pre-training context
    max_seq_len: int = 8192  # positions this model instance accepts (3.1+: up to 131072)
    hidden_dim: int | None = None  # SwiGLU width; None: Meta's rule from multiple_of
    tie_word_embeddings: bool = False  # output layer shares tok_embeddings (3.2 1B/3B)
    use_sdpa: bool = True  # attention through F.scaled_dot_product_attention; False: the explicit definition

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.dim % self.n_heads:
            raise ValueError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}")
        if (self.dim // self.n_heads) % 2:
            raise ValueError(f"head_dim={self.dim // self.n_heads} must be even for RoPE's channel pairs")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_hidden_dim(self) -> int:
        # SwiGLU uses three matrices instead of a plain MLP's two, so Meta shrinks the
        # 4*dim width by 2/3 to keep the parameter count, scales it by ffn_dim_multiplier
        # and rounds up to multiple_of (friendly to GPUs and tensor-parallel splits):
        # 8B 4096 -> 14336, 70B 8192 -> 28672, 405B 16384 -> 53248, 3.2 1B/3B -> 8192.
        if self.hidden_dim is not None:
            return self.hidden_dim
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)


# -----------------------------------------------------------------------------
# RMSNorm
#
# Llama normalises by the root mean square of the features only (no mean
# subtraction, no bias): cheaper than LayerNorm and as good in practice
# (Zhang & Sennrich 2019). eps = 1e-5 comes from params.json's norm_eps.
# -----------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # bf16 keeps only 2-3 significant digits: average the squares in float32,
        # cast back, and only then multiply by the weight (Meta's order of operations).
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


# -----------------------------------------------------------------------------
# Rotary position embedding (RoPE, Su et al. 2021)
#
# Position enters attention by rotating each (even, odd) channel pair of q and
# k by an angle pos * freq_i, with freq_i = theta^(-2i/head_dim). The dot
# product of a rotated q and k then depends only on their distance. Pairs are
# interleaved (channels 2i, 2i+1) as in Meta's weights; Hugging Face permutes
# the rows of wq/wk to rotate halves instead, which the loader undoes.
#
# theta = 500000: Llama 2 used 10000. The Llama 3 paper raised the base so the
# slowest pairs turn more slowly and positions far apart keep distinct angles.
#
# 3.1 frequency scaling stretches the slow pairs to reach 128K tokens. Meta's
# only note on its constants is that a grid search chose them: factor 8,
# low_freq_factor 1, high_freq_factor 4, original context 8192. Pairs whose
# wavelength is under 8192/4 = 2048 tokens are kept, pairs over 8192/1 tokens
# are divided by the factor, pairs in between are blended. For head_dim 128 at
# theta 500000 that is 29 kept, 6 blended and 29 divided. 3.2 1B and 3B use
# factor 32, so the factor is a ModelArgs field.
#
# Meta rotates in complex numbers; real cos and sin give the same numbers on
# every device (MPS has no complex dtype) and show the 2x2 rotation. All of it is
# float32 whatever the weights are: bf16 frequencies move 8B's angles at position
# 4000 by up to 7 radians. Angles are computed per call, for the positions covered.
# -----------------------------------------------------------------------------


def rope_frequencies(args: ModelArgs, device: torch.device | str | None = None) -> torch.Tensor:
    """Angular speed of each channel pair, (head_dim // 2,) float32, 3.1-scaled if asked."""
    dim = args.head_dim
    freqs = 1.0 / (args.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))
    if not args.use_scaled_rope:
        return freqs
    low_freq_wavelen = args.original_max_seq_len / args.low_freq_factor  # 8192 tokens
    high_freq_wavelen = args.original_max_seq_len / args.high_freq_factor  # 2048 tokens
    wavelen = 2 * math.pi / freqs
    # 0 at the low-frequency edge, 1 at the high-frequency edge, linear in 1/wavelength between.
    smooth = (args.original_max_seq_len / wavelen - args.low_freq_factor) / (args.high_freq_factor
                                                                              - args.low_freq_factor)
    blended = (1 - smooth) * freqs / args.rope_scaling_factor + smooth * freqs
    scaled = torch.where(wavelen > low_freq_wavelen, freqs / args.rope_scaling_factor, blended)
    return torch.where(wavelen < high_freq_wavelen, freqs, scaled)


def rope_cos_sin(freqs: torch.Tensor, start_pos: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the angles of positions [start_pos, start_pos + seq_len), each (seq_len, head_dim // 2)."""
    t = torch.arange(start_pos, start_pos + seq_len, dtype=torch.float32, device=freqs.device)
    angles = torch.outer(t, freqs)  # (seq_len, head_dim // 2), exact like a precomputed table: one rounding
    return angles.cos(), angles.sin()


def apply_rotary_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each channel pair of x (B, T, H, head_dim) by the angles in cos/sin (T, head_dim // 2)."""
    pairs = x.float().unflatten(-1, (-1, 2))  # (B, T, H, head_dim // 2, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]  # (B, T, H, head_dim // 2)
    cos, sin = cos[:, None, :], sin[:, None, :]  # (T, 1, head_dim // 2), broadcast over B and H
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)  # (B, T, H, head_dim // 2, 2)
    return out.flatten(-2).type_as(x)  # (B, T, H, head_dim)


# -----------------------------------------------------------------------------
# Grouped-query attention (GQA, Ainslie et al. 2023) with a KV cache
#
# 8B has 32 query heads but only 8 key/value heads; each K/V head serves a group
# of n_rep = 4 query heads. Quality stays close to full multi-head attention,
# while the cache, which stores K/V heads only, is 4x smaller: 2 (K and V) x 32
# layers x 8 heads x 128 x 2 bytes = 128 KiB per token in bf16, 1 GiB at 8K.
#
# The KV cache keeps the keys and values of past positions, so decoding token
# t costs one row of work instead of t. The caller sizes it to its request
# (Transformer.new_cache; Meta allocates the maximum in __init__), stored
# (B, n_kv_heads, max_seq_len, head_dim), the layout attention reads: nothing
# transposes it; a call reads positions [0, S) of it.
#
# Meta's code copies each cached K/V head n_rep times (repeat_kv) so that every
# query head has its own. We stack each group's n_rep query heads as extra rows
# against their one K/V head instead: the same products without n_rep copies.
# -----------------------------------------------------------------------------


class KVCache:
    """Keys and values of one layer for positions [0, max_seq_len) of a batch."""

    def __init__(self, batch_size: int, max_seq_len: int, n_kv_heads: int, head_dim: int,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        shape = (batch_size, n_kv_heads, max_seq_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)

    def update(self, start_pos: int, xk: torch.Tensor, xv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store xk, xv (B, n_kv_heads, T, head_dim) at start_pos; return all S positions so far."""
        B, _, T, _ = xk.shape
        self.k[:B, :, start_pos : start_pos + T] = xk
        self.v[:B, :, start_pos : start_pos + T] = xv
        return self.k[:B, :, : start_pos + T], self.v[:B, :, : start_pos + T]  # (B, n_kv_heads, S, head_dim)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads = args.n_heads
        self.n_kv_heads = args.n_kv_heads
        self.head_dim = args.head_dim
        self.n_rep = args.n_heads // args.n_kv_heads  # query heads per K/V head
        self.use_sdpa = args.use_sdpa
        # Bias-free projections, as in every Llama.
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def forward(self, x: torch.Tensor, start_pos: int, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None, cache: KVCache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        xq = self.wq(x).view(B, T, self.n_heads, self.head_dim)  # (B, T, n_heads, head_dim)
        xk = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, n_kv_heads, head_dim)
        xv = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, n_kv_heads, head_dim)
        xq = apply_rotary_emb(xq, cos, sin)
        xk = apply_rotary_emb(xk, cos, sin)

        # Heads first, the layout attention's products and the cache use.
        q = xq.transpose(1, 2)  # (B, n_heads, T, head_dim)
        k = xk.transpose(1, 2)  # (B, n_kv_heads, T, head_dim)
        v = xv.transpose(1, 2)  # (B, n_kv_heads, T, head_dim)
        if cache is not None:
            k, v = cache.update(start_pos, k, v)  # (B, n_kv_heads, S, head_dim) each

        if self.use_sdpa:
            out = self.sdpa(q, k, v, mask)  # (B, n_heads, T, head_dim)
        else:
            out = self.explicit(q, k, v, mask)  # (B, n_heads, T, head_dim)
        out = out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, dim)
        return self.wo(out)

    def explicit(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """The definition: scores, mask, softmax, weighted sum of the values -> (B, n_heads, T, head_dim).
        mask is added to the scores (0 where a query may look, -inf where not); any float tensor
        that broadcasts to (B, n_heads, T, S), such as Transformer.forward's causal (T, S)."""
        B, _, T, _ = q.shape
        S = k.shape[2]  # q (B, n_heads, T, head_dim); k, v (B, n_kv_heads, S, head_dim)
        # Query head h reads K/V head h // n_rep, so the n_rep adjacent heads of a group share one: reshaped, each
        # group's heads are stacked as n_rep blocks of T rows against their K/V head (head h is block h % n_rep).
        q = q.reshape(B, self.n_kv_heads, self.n_rep * T, self.head_dim)  # (B, n_kv_heads, n_rep * T, head_dim)
        # In float32 at least: exp() of bf16 scores loses the small probabilities (the
        # price: a float32 copy of the visible K/V, 8 MiB a layer for 8B at 1K positions).
        out_dtype = q.dtype
        dtype = torch.promote_types(q.dtype, torch.float32)
        q = q.to(dtype)
        k = k.to(dtype)
        v = v.to(dtype)
        # The 1/sqrt(head_dim) keeps the scores' variance near 1 (Vaswani et al. 2017).
        scores = q @ k.transpose(2, 3) / math.sqrt(self.head_dim)  # (B, n_kv_heads, n_rep * T, S)
        if mask is not None:
            # Viewed per head again, (B, n_heads, T, S), so a (T, S) mask broadcasts over every head.
            scores = (scores.view(B, self.n_heads, T, S) + mask).view_as(scores)
        probs = F.softmax(scores, dim=-1)
        return (probs @ v).to(out_dtype).view(B, self.n_heads, T, self.head_dim)

    def sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """The same four steps fused into one kernel that never stores the (T, S) scores."""
        # Not is_causal=True: SDPA anchors the causal triangle at the top left, right only
        # when T == S; with a cache T < S, so pass the mask, whose first start_pos columns are 0.
        # enable_gqa: SDPA maps query head h to K/V head h // n_rep itself.
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.n_rep > 1)


# -----------------------------------------------------------------------------
# Feed-forward: SwiGLU (Shazeer 2020)
#
# w2(silu(w1 x) * w3 x): w1 is the gate, w3 the up projection and w2 the down
# projection (Hugging Face calls them gate_proj, up_proj, down_proj). The gated
# unit trains better than a ReLU MLP at equal parameters; the width rule lives
# in ModelArgs.ffn_hidden_dim.
# -----------------------------------------------------------------------------


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        hidden_dim = args.ffn_hidden_dim
        self.w1 = nn.Linear(args.dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, args.dim, bias=False)
        self.w3 = nn.Linear(args.dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))  # (B, T, hidden_dim) inside, (B, T, dim) out


# -----------------------------------------------------------------------------
# Transformer block
#
# Pre-norm residual block: normalise, transform, add back. Keeping the residual
# stream itself un-normalised lets gradients pass straight through 16 to 126
# layers, which is why every Llama normalises the input of each sub-layer.
# -----------------------------------------------------------------------------


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def forward(self, x: torch.Tensor, start_pos: int, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None, cache: KVCache | None = None) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), start_pos, cos, sin, mask, cache)
        return h + self.feed_forward(self.ffn_norm(h))


# -----------------------------------------------------------------------------
# The model
#
# tokens -> embedding -> n_layers blocks -> RMSNorm -> output projection -> logits.
#
# Calling it: model(tokens) runs a fresh sequence and can be trained. To decode,
# make cache = model.new_cache(B, max_len), run model(prompt, 0, cache) once
# (prefill), then model(next_token, start_pos, cache) per token. A cached forward
# is inference whatever the grad mode, as Meta's is: the cache outlives the call,
# and autograd would chain every step's graph onto the last.
# -----------------------------------------------------------------------------


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(i, args) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            # Llama 3.2 1B/3B reuse the embedding matrix as the output projection.
            self.output.weight = self.tok_embeddings.weight

    def new_cache(self, batch_size: int, max_seq_len: int | None = None) -> list[KVCache]:
        """One KVCache per layer for batch_size sequences of up to max_seq_len positions."""
        length = min(max_seq_len or self.args.max_seq_len, self.args.max_seq_len)
        n_kv_heads = self.layers[0].attention.n_kv_heads  # the heads this model's attention holds
        like = self.norm.weight  # the activations' dtype and device
        return [KVCache(batch_size, length, n_kv_heads, self.args.head_dim, like.device, like.dtype)
                for _ in range(self.args.n_layers)]

    def forward(self, tokens: torch.Tensor, start_pos: int = 0, cache: list[KVCache] | None = None,
                last_only: bool = False) -> torch.Tensor:
        """tokens (B, T) int64 at positions [start_pos, start_pos + T) -> logits (B, T, vocab_size) float32.

        last_only: return only the last position's logits (B, 1, vocab_size), all that
        sampling needs; it skips the largest matrix product of a prefill.
        """
        T = tokens.shape[1]
        if cache is None and start_pos != 0:
            raise ValueError(f"start_pos={start_pos} needs the cache that holds the earlier positions")
        if start_pos + T > self.args.max_seq_len:
            raise ValueError(f"positions up to {start_pos + T} exceed max_seq_len={self.args.max_seq_len}")
        # No autograd graph through the cache (see "Calling it" above).
        with torch.set_grad_enabled(torch.is_grad_enabled() and cache is None):
            h = self.tok_embeddings(tokens)  # (B, T, dim)
            # Made here, not kept (Meta's plain-attribute table): float32 and on the tokens' device.
            freqs = rope_frequencies(self.args, tokens.device)  # (head_dim // 2,)
            cos, sin = rope_cos_sin(freqs, start_pos, T)  # (T, head_dim // 2) each

            # Causal mask: query i (at position start_pos + i) sees keys 0 .. start_pos + i.
            # The first start_pos columns are the cached past, visible to every query.
            # A single query sees everything cached, so decoding needs no mask.
            mask = None
            if T > 1:
                mask = torch.full((T, T), float("-inf"), device=tokens.device).triu(1)
                mask = torch.hstack([torch.zeros(T, start_pos, device=tokens.device), mask]).to(h.dtype)  # (T, S)

            for i, layer in enumerate(self.layers):
                h = layer(h, start_pos, cos, sin, mask, cache[i] if cache is not None else None)
            if last_only:
                h = h[:, -1:]  # (B, 1, dim)
            h = self.norm(h)
            # Logits in float32: softmax and sampling over 128K entries need the precision.
            return self.output(h).float()  # (B, T, vocab_size)


# =============================================================================
# Part 2: running it
# =============================================================================

# -----------------------------------------------------------------------------
# Doors to the engine room
#
# The appendices at the end of the file are the engine room: faster CPU kernels (A), tensor parallelism (B),
# compiled decoding (C), quantized weights (D), an OpenAI-compatible server (E) and constrained decoding (F,
# JSON schemas). Each can be deleted, from its
# banner to the next, and the rest of the file still loads, generates and passes its tests. So part 2 never names
# an appendix's functions in its code: it asks engine_room for them by name when a call needs one, and ENGINE_ROOM
# lists every name it may ask for. Where the appendix is gone, a speed-up is skipped and a feature (quantize=,
# compile=, torchrun, --serve) fails in one line that says what is missing.
# -----------------------------------------------------------------------------

ENGINE_ROOM = {"use_cpu_speed_paths": "A", "shard_model": "B", "join_process_group": "B", "read_on_rank_0": "B",
               "shared_seed": "B", "static_cache": "C", "compiled_decode": "C", "quantize_weights": "D",
               "serve_socket": "E", "serve": "E", "json_constraint": "F", "tool_call_constraint": "F",
               "read_json_schema": "F"}


def engine_room(name: str, needed_by: str | None = None) -> Callable | None:
    """The function `name` of appendix ENGINE_ROOM[name]. Where that appendix was deleted: None if nothing needs
    it (a speed-up), else ValueError starting with needed_by, the argument (or flag) that asked for it."""
    assert name in ENGINE_ROOM, name  # every way into an appendix is listed above
    found = globals().get(name)
    if found is None and needed_by is not None:
        raise ValueError(f"{needed_by} needs {name}(), from appendix {ENGINE_ROOM[name]}, which was deleted from "
                         "this copy of llama3.py")
    return found


# -----------------------------------------------------------------------------
# Checkpoint loading
#
# For a checkpoint in one file with Meta's names, loading is three lines:
#
#     with torch.device("meta"):  # parameters with shapes and no storage: nothing allocated, nothing initialised
#         model = Transformer(args)
#     state = torch.load("consolidated.00.pth", mmap=True, weights_only=True)  # the file mapped, not read
#     model.load_state_dict(state, strict=True, assign=True)  # the parameters become the file's tensors
#
# Everything below makes those lines work for the three layouts Llama 3 comes in, read into Meta's names:
#   1. Meta's download: params.json + consolidated.00.pth ... consolidated.NN.pth, one file per rank of the
#      tensor parallelism Meta ran (1 for 8B, 8 for 70B, 8 or 16 for 405B): each matrix is merged from its slices.
#   2. convert.py's output: params.json + model.safetensors, one file with Meta's names.
#   3. Hugging Face: config.json + model.safetensors (or the files model.safetensors.index.json lists), with other
#      names, and the rows of wq and wk permuted for another RoPE layout: both are mapped back.
# 3.2 1B and 3B tie their output layer to tok_embeddings: the files store the matrix once.
# Memory: the weights are read, merged and cast one tensor at a time, so they never exist twice in memory.
# -----------------------------------------------------------------------------


class CheckpointError(ValueError):
    """A checkpoint or its config is missing, malformed or doesn't match: the message names the file or tensor."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A file or directory the checkpoint needs does not exist."""


# The configs: Meta's params.json uses ModelArgs' own names, Hugging Face's config.json its own, mapped by
# HF_CONFIG_KEYS. Both readers refuse a key that changes what the tensors compute (a quantized release, another
# activation) and ignore other keys they do not use, with a one-line note on stderr.
# The 3.1 scaling factor: Hugging Face configs state it; Meta's params.json only says use_scaled_rope, and Meta's
# reference code hard-codes 8, right for 3.1 and 3.3 but wrong for 3.2 1B and 3B, whose Hugging Face configs say
# 32 (llama-models issues #166 and #241). So a params.json without a factor gets 32 for the two 3.2 shapes
# (dim, n_layers) and 8 otherwise; load_model(..., rope_scaling_factor=...) or --rope-scaling-factor overrides it.
LLAMA32_ROPE_FACTORS = {(2048, 16): 32.0, (3072, 28): 32.0}


def _note(msg: str) -> None:
    print(f"llama3.py: {msg}", file=sys.stderr)


def args_from_params(params: dict, source: str = "params.json") -> ModelArgs:
    """ModelArgs from Meta's params.json (or the one convert.py writes)."""
    if "quantization_args" in params:  # Meta's -QLORA_INT4_EO8 and -SpinQuant_INT4_EO8 releases
        raise CheckpointError(f"{source}: a quantized release (quantization_args), whose int4 weights llama3.py "
                              "does not run; use the same model without the QLORA/SpinQuant suffix")
    known = {f.name for f in fields(ModelArgs)}
    unused = sorted(k for k in params if k not in known)
    if unused:
        _note(f"{source}: ignoring keys not used by llama3.py: {', '.join(unused)}")
    kw = {k: v for k, v in params.items() if k in known}
    if kw.get("use_scaled_rope") and "rope_scaling_factor" not in kw:
        kw["rope_scaling_factor"] = LLAMA32_ROPE_FACTORS.get((kw.get("dim"), kw.get("n_layers")), 8.0)
    if "max_seq_len" not in kw:  # params.json has no context length: 3.0 has 8K, 3.1+ 128K
        kw["max_seq_len"] = 131072 if kw.get("use_scaled_rope") else 8192
    try:
        return ModelArgs(**kw)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: {e}") from None


HF_CONFIG_KEYS = {"hidden_size": "dim", "num_hidden_layers": "n_layers", "num_attention_heads": "n_heads",
                  "num_key_value_heads": "n_kv_heads", "vocab_size": "vocab_size", "intermediate_size": "hidden_dim",
                  "rms_norm_eps": "norm_eps", "max_position_embeddings": "max_seq_len",
                  "tie_word_embeddings": "tie_word_embeddings"}
# Keys read or checked below, or that say nothing about the tensors (ids, dtypes, versions).
HF_CONFIG_READ_ELSEWHERE = {
    "model_type", "hidden_act", "attention_bias", "mlp_bias", "pretraining_tp", "rope_theta", "rope_scaling",
    "rope_parameters", "head_dim", "architectures", "attention_dropout", "bos_token_id", "eos_token_id",
    "pad_token_id", "initializer_range", "torch_dtype", "dtype", "transformers_version", "use_cache",
}


def args_from_hf_config(config: dict, source: str = "config.json") -> ModelArgs:
    """ModelArgs from a Hugging Face LlamaForCausalLM config.json. Its rope numbers come as `rope_theta` plus a
    `rope_scaling` dict (the hub's Llama 3.x repos) or as one `rope_parameters` dict holding both (transformers 5)."""
    if config.get("model_type", "llama") != "llama":
        raise CheckpointError(f"{source}: model_type is {config['model_type']!r}, expected 'llama'")
    for key, llama3_value in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False),
                              ("pretraining_tp", 1), ("quantization_config", None)):
        if config.get(key, llama3_value) != llama3_value:
            raise CheckpointError(f"{source}: {key} is {config[key]!r}; Llama 3 has {llama3_value!r}, "
                                  "the only value llama3.py runs")
    unused = sorted(set(config) - set(HF_CONFIG_KEYS) - HF_CONFIG_READ_ELSEWHERE)
    if unused:
        _note(f"{source}: ignoring keys not used by llama3.py: {', '.join(unused)}")
    kw = {field: config[key] for key, field in HF_CONFIG_KEYS.items() if config.get(key) is not None}
    rope = dict(config.get("rope_scaling") or {})
    rope.update(config.get("rope_parameters") or {})
    theta = rope.get("rope_theta", config.get("rope_theta"))
    if theta is not None:
        kw["rope_theta"] = theta
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "llama3":
        kw.update(use_scaled_rope=True, rope_scaling_factor=rope["factor"], low_freq_factor=rope["low_freq_factor"],
                  high_freq_factor=rope["high_freq_factor"],
                  original_max_seq_len=rope["original_max_position_embeddings"])
    elif rope_type != "default":
        raise CheckpointError(f"{source}: rope type {rope_type!r} is not Llama 3's ('llama3' or 'default')")
    head_dim = config.get("head_dim")
    if head_dim is not None and head_dim != config["hidden_size"] // config["num_attention_heads"]:
        raise CheckpointError(f"{source}: head_dim={head_dim} differs from hidden_size // num_attention_heads")
    try:
        return ModelArgs(**kw)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: {e}") from None


# Meta trained with Megatron-style tensor parallelism (fairscale): consolidated.NN.pth holds rank NN's slice.
# Column-parallel layers were split along output features (dim 0), row-parallel ones along input features (dim 1),
# norms replicated on every rank. Llama 3 splits the embedding by vocabulary (dim 0); Llama 2 split it along dim 1.
SHARD_DIM = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "tok_embeddings": 0,
             "wo": 1, "w2": 1, "attention_norm": None, "ffn_norm": None, "norm": None}


def shard_dim(name: str) -> int | None:
    """The dim Meta split tensor `name` along; None for replicated norms."""
    part = name.removesuffix(".weight").rsplit(".", 1)[-1]  # layers.0.attention.wq.weight -> wq
    if part not in SHARD_DIM or not name.endswith(".weight"):
        raise CheckpointError(f"unknown tensor name {name!r}: not part of a Llama 3 text model")
    return SHARD_DIM[part]


def merge_shards(name: str, parts: list[torch.Tensor], n_kv_heads: int, source: str = "") -> torch.Tensor:
    """Reassemble tensor `name` from its per-rank slices `parts` (in rank order)."""
    dim = shard_dim(name)
    if dim is None:
        for i, p in enumerate(parts[1:], 1):
            if p.shape != parts[0].shape or not torch.allclose(p.float(), parts[0].float(), atol=1e-3):
                _note(f"{source}: replicated {name} differs between shard 0 and shard {i}; using shard 0")
        return parts[0]
    if len(parts) == 1:
        return parts[0]
    parts = _kv_heads_once(name, parts, n_kv_heads)  # 405B on 16 ranks has 8 K/V heads, each on 2 ranks
    for i, p in enumerate(parts):
        if p.dim() != 2 or p.shape[1 - dim] != parts[0].shape[1 - dim]:
            raise CheckpointError(f"{source}: {name} has shape {tuple(p.shape)} in shard {i} "
                                  f"but {tuple(parts[0].shape)} in shard 0")
    return torch.cat(parts, dim=dim)


def _kv_heads_once(name: str, parts: list[torch.Tensor], n_kv_heads: int) -> list[torch.Tensor]:
    """wk/wv `parts` with each K/V head once: with more ranks than K/V heads, each sat on several consecutive ones."""
    if name.endswith(("wk.weight", "wv.weight")) and len(parts) > n_kv_heads:
        return parts[:: len(parts) // n_kv_heads]
    return parts


def hf_to_meta_name(name: str) -> str | None:
    """Hugging Face tensor name -> Meta's, or None for a tensor to skip."""
    if name.endswith("rotary_emb.inv_freq"):  # older exports save the RoPE table; we compute it
        return None
    fixed = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
             "lm_head.weight": "output.weight"}
    if name in fixed:
        return fixed[name]
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.weight", name)
    parts = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
             "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo",
             "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2", "mlp.up_proj": "feed_forward.w3",
             "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm"}
    if m is None or m.group(2) not in parts:
        raise CheckpointError(f"unknown tensor name {name!r}: not part of a Hugging Face Llama model")
    return f"layers.{m.group(1)}.{parts[m.group(2)]}.weight"


def unpermute_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo Hugging Face's reordering of wq/wk rows (n_heads * head_dim, dim); for wk, n_heads is n_kv_heads.
    Hugging Face rotates the two halves of each head, not Meta's interleaved pairs, so its converter moved row
    2i + j of each head to row j * head_dim/2 + i; viewing each head as (2, head_dim/2) and transposing undoes it."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def _read_json(file: Path) -> dict:
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{file}: cannot read JSON ({e})") from None


def _load_pth(file: Path) -> dict[str, torch.Tensor]:
    # weights_only=True: a .pth is a pickle, and unpickling untrusted files runs code.
    try:
        return torch.load(file, map_location="cpu", mmap=True, weights_only=True)
    except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as e:  # truncated zip, bad pickle
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{file}: cannot read checkpoint, truncated or corrupt? ({msg})") from None


class CheckpointReader:
    """The tensors of a checkpoint directory under Meta's names, read one at a time (by load_model and convert.py):
    `args` is the ModelArgs its config describes, `names` the Meta names it holds, `tensor(name)` one tensor merged
    from the shards (or un-permuted from Hugging Face's layout), still memory-mapped where no merge was needed."""

    def __init__(self, path: str | Path, rope_scaling_factor: float | None = None):
        self.path = path = Path(path)
        if not path.is_dir():
            raise CheckpointNotFoundError(f"{path}: no such checkpoint directory")
        if (path / "params.json").is_file():
            params = _read_json(path / "params.json")
            if not isinstance(params, dict):
                raise CheckpointError(f"{path / 'params.json'}: expected a JSON object")
            if rope_scaling_factor is not None:
                params["rope_scaling_factor"] = rope_scaling_factor
            self.args = args_from_params(params, str(path / "params.json"))
        elif (path / "config.json").is_file():
            self.args = args_from_hf_config(_read_json(path / "config.json"), str(path / "config.json"))
            if rope_scaling_factor is not None:
                self.args.rope_scaling_factor = rope_scaling_factor
        else:
            raise CheckpointNotFoundError(f"{path}: no params.json (Meta) or config.json (Hugging Face) found")
        self.reopen()

    def reopen(self) -> None:
        """(Re)map the files. Pages read through a mapping count in the process's RSS until it is unmapped, so
        load_model and convert.py reopen now and then to keep their RSS small."""
        self.shards = self.handles = None  # drop the old mappings first
        meta = (self.path / "params.json").is_file()
        if meta and not (self.path / "model.safetensors").is_file():
            self._open_pth(self.path)
        else:
            self._open_safetensors(self.path, hf=not meta)

    def _open_pth(self, path: Path) -> None:
        files = sorted(path.glob("consolidated.*.pth"))
        if not files:
            raise CheckpointNotFoundError(f"{path}: no consolidated.*.pth or model.safetensors; "
                                          "expected Meta's download layout or convert.py's output")
        for i, f in enumerate(files):
            if f.name != f"consolidated.{i:02d}.pth":
                raise CheckpointNotFoundError(f"{path}: consolidated.{i:02d}.pth is missing "
                                              f"({len(files)} shards found)")
        self.layout = "meta"
        self.files = files
        self.shards = [_load_pth(f) for f in files]
        names = [k for k in self.shards[0] if k != "rope.freqs"]  # Llama 2 saved its RoPE table
        for f, shard in zip(files[1:], self.shards[1:]):
            missing = set(names) - set(shard)
            if missing:
                raise CheckpointError(f"{f}: tensor {min(missing)} missing (present in {files[0].name})")
        self.names = names

    def _open_safetensors(self, path: Path, hf: bool) -> None:
        from safetensors import SafetensorError, safe_open  # the model needs only torch
        index = path / "model.safetensors.index.json"
        if index.is_file():
            files = [path / f for f in sorted(set(_read_json(index).get("weight_map", {}).values()))]
        elif (path / "model.safetensors").is_file():
            files = [path / "model.safetensors"]
        else:
            files = sorted(path.glob("*.safetensors"))
        if not files:
            raise CheckpointNotFoundError(f"{path}: no *.safetensors files next to config.json")
        self.layout = "hf" if hf else "safetensors"
        self.files = files
        self.handles = []
        self._where = {}  # Meta name -> (handle, the file's own name, file)
        for f in files:
            if not f.is_file():
                raise CheckpointNotFoundError(f"{f}: listed in {index.name} but missing")
            try:
                handle = safe_open(str(f), framework="pt", device="cpu")
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{f}: cannot read safetensors, truncated or corrupt? ({e})") from None
            self.handles.append(handle)
            keys = handle.keys()  # a safe_open handle is not iterable itself
            for key in keys:
                name = hf_to_meta_name(key) if hf else key
                if name is not None:
                    shard_dim(name)  # raises on a name that is not a Llama 3 tensor
                    self._where[name] = (handle, key, f)
        self.names = list(self._where)

    def source(self, name: str) -> str:
        """The file that holds `name`, for error messages."""
        if self.layout == "meta":
            return str(self.files[0]) if len(self.files) == 1 else f"{self.path}/consolidated.*.pth"
        return str(self._where[name][2])

    def expected_tensors(self, model: Transformer) -> dict[str, torch.Tensor]:
        """model's state_dict, less a tied output; raises if this checkpoint lacks one
        of its tensors or holds one it has not (a config that doesn't match the files)."""
        expected = model.state_dict()
        if self.args.tie_word_embeddings:
            del expected["output.weight"]  # shares tok_embeddings; a saved lm_head copy is ignored
        extra = set(self.names) - set(expected) - {"output.weight"}
        if extra:
            name = min(extra)
            raise CheckpointError(f"{self.source(name)}: tensor {name} is not in a {self.args.n_layers}-layer "
                                  f"model (config says n_layers={self.args.n_layers})")
        missing = [name for name in expected if name not in self.names]
        if missing:
            where = self.source(self.names[0]) if self.names else str(self.path)
            raise CheckpointError(f"{missing[0]} missing from {where}")
        return expected

    def dtype(self, name: str) -> torch.dtype:
        """The stored dtype of `name`, without reading its data."""
        if self.layout == "meta":
            return self.shards[0][name].dtype
        handle, key, _ = self._where[name]
        dtypes = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
                  "I64": torch.int64, "I32": torch.int32, "I8": torch.int8, "U8": torch.uint8}
        stored = handle.get_slice(key).get_dtype()
        if stored not in dtypes:
            raise CheckpointError(f"{self.source(name)}: {key} has dtype {stored}, not a float type llama3.py reads")
        return dtypes[stored]

    def tensor_slice(self, name: str, dim: int | None, start: int, stop: int) -> torch.Tensor:
        """Rows (dim 0) or columns (dim 1) [start, stop) of tensor `name` as merged, or all of it for dim None, for
        tensor parallelism. Always a contiguous copy: a view would keep the whole file mapped; columns are strided."""
        if dim is None:
            return self.tensor(name).clone()
        if name not in self.names:
            raise CheckpointError(f"{name} missing from {self.path}")
        if self.layout == "meta":
            pieces = []
            offset = 0  # where shard p's rows (or columns) start in the merged tensor
            for p in _kv_heads_once(name, [s[name] for s in self.shards], self.args.n_kv_heads):
                lo, hi = max(start, offset), min(stop, offset + p.shape[dim])  # the part of [start, stop) p holds
                if lo < hi:
                    pieces.append(p.narrow(dim, lo - offset, hi - lo))  # a view of the shard's map
                offset += p.shape[dim]
            return torch.cat(pieces, dim)  # a copy, even of one piece
        handle, key, _ = self._where[name]
        part = handle.get_slice(key)[start:stop] if dim == 0 else handle.get_slice(key)[:, start:stop]
        if self.layout == "hf" and name.endswith(("wq.weight", "wk.weight")):
            # Hugging Face permutes rows within each head, so whole heads slice the same in both layouts.
            return unpermute_hf(part, (stop - start) // self.args.head_dim)  # a copy
        return part.clone(memory_format=torch.contiguous_format)

    def tensor(self, name: str) -> torch.Tensor:
        if name not in self.names:
            raise CheckpointError(f"{name} missing from {self.path}")
        if self.layout == "meta":
            return merge_shards(name, [s[name] for s in self.shards], self.args.n_kv_heads, self.source(name))
        from safetensors import SafetensorError, safe_open
        handle, key, file = self._where[name]
        permuted = self.layout == "hf" and name.endswith(("wq.weight", "wk.weight"))
        try:
            if not permuted:
                return handle.get_tensor(key)
            # Un-permuting copies the rows, so read them through a map of their own, unmapped when done: through
            # the shared map their pages would stay in our RSS while any other weight (a view into it) is alive.
            with safe_open(str(file), framework="pt", device="cpu") as private:
                t = private.get_tensor(key)
        except (SafetensorError, RuntimeError, OSError) as e:  # data cut short after a valid header
            raise CheckpointError(f"{file}: cannot read {key} ({e})") from None
        n = self.args.n_heads if name.endswith("wq.weight") else self.args.n_kv_heads
        if t.dim() != 2 or t.shape[0] % (2 * n):
            raise CheckpointError(f"{file}: {key} has shape {tuple(t.shape)}, not {n} heads of even size")
        return unpermute_hf(t, n)


class SkipInit(torch.overrides.TorchFunctionMode):
    """Within it, torch.nn.init's random initialisers leave tensors as they are: weights about to be loaded need no
    init, and on the meta device nn.Embedding's normal_ imports torch's compiler stack (~0.8 s, 77 MB)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__module__", None) == "torch.nn.init":
            return args[0] if args else kwargs["tensor"]
        return func(*args, **kwargs)


def check_device(device: torch.device | str) -> torch.device:
    """device as a torch.device; ValueError unless torch knows it and this machine has it."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {str(device)!r}: expected cpu, cuda, cuda:N or mps") from None
    have = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not have.get(device.type, False):
        raise ValueError(f"device {device}: this machine has no such device (torch {torch.__version__} sees none)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def config_hint(name: str, args: ModelArgs) -> str:
    """Which config numbers determine the expected shape of tensor `name`."""
    heads = f"dim={args.dim}, n_heads={args.n_heads}"
    kv_heads = f"{heads}, n_kv_heads={args.n_kv_heads}"
    ffn = f"dim={args.dim}, SwiGLU width {args.ffn_hidden_dim}"
    vocab = f"vocab_size={args.vocab_size}, dim={args.dim}"
    hints = {"wq": heads, "wk": kv_heads, "wv": kv_heads, "wo": heads, "w1": ffn, "w2": ffn, "w3": ffn,
             "tok_embeddings": vocab, "output": vocab}
    return "the config says " + hints.get(name.removesuffix(".weight").rsplit(".", 1)[-1], f"dim={args.dim}")


def read_weights(reader: CheckpointReader, expected: dict[str, torch.Tensor], device: torch.device,
                 dtype: torch.dtype | None, slices: dict | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for each tensor `expected` names (the state_dict of the model to fill), one at a time: read,
    checked against the expected shape, cast to dtype (None: as stored) and moved to device. slices: the part of
    each tensor to read, for tensor parallelism (appendix B)."""
    # Where the weights end up as copies (cast, merged, moved), remap the files every 1/64 of the checkpoint (at
    # least 64 MiB), so the pages already read do not stay in memory beside the copies (see reopen).
    remap_every = max(64 * 2**20, sum(v.numel() for v in expected.values()) * 2 // 64)
    read_bytes = 0
    for name, want in expected.items():
        if slices is None:
            t = reader.tensor(name)
        else:
            t = reader.tensor_slice(name, *slices[name])
        if t.shape != want.shape:
            raise CheckpointError(f"{reader.source(name)}: {name} has shape {tuple(t.shape)}, model expects "
                                  f"{tuple(want.shape)}: {config_hint(name, reader.args)}")
        if not t.is_floating_point():
            raise CheckpointError(f"{reader.source(name)}: {name} has dtype {t.dtype}, expected a float type")
        read_bytes += t.numel() * t.element_size()
        yield name, t.to(device=device, dtype=dtype or t.dtype)
        del t
        if read_bytes > remap_every:
            reader.reopen()
            read_bytes = 0


def load_model(path: str | Path, device: torch.device | str | None = None, dtype: torch.dtype | None = None, *,
               max_seq_len: int | None = None, rope_scaling_factor: float | None = None,
               use_sdpa: bool = True, tensor_parallel: bool = False, quantize: str | None = None) -> Transformer:
    """Load a checkpoint in any of the three layouts above: a folder, or a name as resolve_checkpoint takes it (a
    Hugging Face repo id, a Meta model id). device: where the weights go (default cpu); dtype: cast the weights to
    it (default: keep the checkpoint's). max_seq_len caps the positions the model addresses; rope_scaling_factor
    overrides the 3.1 factor (see LLAMA32_ROPE_FACTORS); use_sdpa: attention through SDPA (ModelArgs' default, the
    faster for prompts on every device measured) or, if False, the explicit definition. tensor_parallel: load only
    this process's part for tensor parallelism across the processes of torch.distributed's default group
    (appendix B). quantize: "int8" or "int4" weights, quantized as they are read (appendix D)."""
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a torch float dtype such as torch.bfloat16, not {dtype!r}")
    if rope_scaling_factor is not None and not 0 < rope_scaling_factor < math.inf:
        raise ValueError(f"rope_scaling_factor must be > 0, not {rope_scaling_factor!r}")
    if quantize is not None and tensor_parallel:
        raise ValueError("quantize: quantized weights and tensor parallelism do not go together here")
    device = check_device(device or "cpu")
    reader = CheckpointReader(resolve_checkpoint(str(path)), rope_scaling_factor)
    args = reader.args
    if max_seq_len is not None:
        if not 0 < max_seq_len <= args.max_seq_len:
            raise ValueError(f"max_seq_len {max_seq_len} is outside the 1..{args.max_seq_len} positions "
                             f"{path} supports")
        args.max_seq_len = max_seq_len
    args.use_sdpa = use_sdpa
    # Parameters without storage or random init; load_state_dict(assign=True) fills them.
    slices = None
    with torch.device("meta"), SkipInit():
        model = Transformer(args)
        if tensor_parallel:  # appendix B: this process's part of every matrix
            shard_model = engine_room("shard_model", "tensor_parallel")
            slices = shard_model(model, dist.get_rank(), dist.get_world_size())
    weights = read_weights(reader, reader.expected_tensors(model), device, dtype, slices)
    if quantize is None:
        state = dict(weights)
    else:  # appendix D: quantized layers swapped in, each matrix quantized as it is read; the rest comes back
        quantize_weights = engine_room("quantize_weights", "quantize")
        state = quantize_weights(model, weights, quantize, device, dtype or reader.dtype("norm.weight"))
    tied = args.tie_word_embeddings and "tok_embeddings.weight" in state  # (a quantized output has its own)
    if tied:
        state["output.weight"] = state["tok_embeddings.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if tied:  # one Parameter, not two views of one tensor
        model.output.weight = model.tok_embeddings.weight
    speed_paths = engine_room("use_cpu_speed_paths")  # appendix A, if this file has it: on a CPU, faster kernels
    if device.type == "cpu" and speed_paths is not None:
        speed_paths(model)
    return model


# -----------------------------------------------------------------------------
# Finding a checkpoint by name
#
# People download Llama 3 with one of two tools, and each keeps models in its own place:
# - Hugging Face (`hf download`, or transformers on first use) keeps repo meta-llama/Llama-3.2-1B in $HF_HUB_CACHE
#   (else $HF_HOME/hub, else ~/.cache/huggingface/hub) as models--meta-llama--Llama-3.2-1B/, where refs/main names
#   a commit and snapshots/<commit>/ holds the files, each a link into blobs/. Meta's own layout sits in original/,
#   which transformers skips, so such a folder often has tokenizer.json and no tokenizer.model.
# - Meta's `llama model download` (from pip install llama-stack) keeps Llama3.2-1B in checkpoints/ under
#   $LLAMA_STACK_CONFIG_DIR, else ~/.llama/.
# resolve_checkpoint turns a folder, a repo id or a Meta model id into a folder; given no name, the one model found.
# -----------------------------------------------------------------------------

# What a Hugging Face download needs: no original/*.pth, which repeat the weights.
HF_DOWNLOAD_PATTERNS = ["config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.json",
                        "tokenizer_config.json", "generation_config.json"]


def hf_hub_cache() -> Path:
    """Where huggingface_hub keeps downloads: $HF_HUB_CACHE, else $HF_HOME/hub, else $XDG_CACHE_HOME/huggingface/hub
    (XDG_CACHE_HOME defaults to ~/.cache)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME") or cache / "huggingface") / "hub")


def meta_checkpoints() -> Path:
    return Path(os.environ.get("LLAMA_STACK_CONFIG_DIR") or Path.home() / ".llama") / "checkpoints"


def hf_snapshot(repo_id: str) -> Path | None:
    """The cached snapshot of repo_id that refs/main names, if it holds a config.json."""
    repo = hf_hub_cache() / ("models--" + repo_id.replace("/", "--"))
    try:
        snapshot = repo / "snapshots" / (repo / "refs" / "main").read_text().strip()
    except OSError:
        return None
    return snapshot if (snapshot / "config.json").is_file() else None


def downloaded_models() -> list[tuple[str, Path]]:
    """(name, folder) of every Llama 3 text model in the Hugging Face cache and Meta's folder. A cache holds other
    models too: Llama 3's are told by their 128,256-token vocabulary (Llama 2 and TinyLlama are model_type llama
    with 32,000), and Meta's vision models by their vision keys (Hugging Face's are model_type mllama)."""
    configs = [(repo.name.removeprefix("models--").replace("--", "/", 1), "config.json")
               for repo in sorted(hf_hub_cache().glob("models--*--*"))]
    configs += [(d.name, "params.json") for d in sorted(meta_checkpoints().glob("*"))]
    found = []
    for name, kind in configs:
        folder = hf_snapshot(name) if kind == "config.json" else meta_checkpoints() / name
        try:
            config = json.loads((folder / kind).read_text()) if folder is not None else {}
        except (OSError, ValueError):
            continue  # not a model we can run: leave it out of the list
        if (isinstance(config, dict) and config.get("vocab_size") == 128256 and "vision_chunk_size" not in config
                and config.get("model_type", "llama") == "llama"):
            found.append((name, folder))
    return found


def download_hf(repo_id: str) -> Path:
    """Fetch what llama3.py needs of repo_id into the hub cache, with huggingface_hub's progress bars."""
    fetch = f"hf download {repo_id} --exclude 'original/*'"
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointNotFoundError(f"{repo_id}: not in the Hugging Face cache {hf_hub_cache()}; fetch it "
                                      f"with: pip install huggingface_hub && {fetch}") from None
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise CheckpointNotFoundError(f"{repo_id}: not in the Hugging Face cache {hf_hub_cache()} and "
                                      f"HF_HUB_OFFLINE is set; fetch it with: {fetch}")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HF_DOWNLOAD_PATTERNS))
    except Exception as e:  # noqa: BLE001 (huggingface_hub's many errors: gated or unknown repo, no network)
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointNotFoundError(f"{repo_id}: download failed ({reason}); for a gated Llama repo accept "
                                      f"its license on the hub, run `hf auth login`, then {fetch}") from None


# Where a checkpoint folder keeps its tokenizer, in the order they are looked for: Meta's file, Meta's file in a
# Hugging Face repo's original/, Hugging Face's own (all a transformers download has).
TOKENIZER_FILES = ("tokenizer.model", "original/tokenizer.model", "tokenizer.json")


def find_tokenizer(folder: str | Path) -> Path | None:
    return next((Path(folder) / f for f in TOKENIZER_FILES if (Path(folder) / f).is_file()), None)


def resolve_checkpoint(name: str | None) -> Path:
    """A checkpoint folder from a folder, a Hugging Face repo id, a Meta model id, or None (the only model found)."""
    if name is None:
        models = downloaded_models()
        if len(models) == 1:
            _note(f"using {models[0][0]} ({models[0][1]}), the one model found")
            return models[0][1]
        if models:
            raise CheckpointNotFoundError(f"several models found: {', '.join(n for n, _ in models)}; "
                                          "choose one with --ckpt NAME")
        raise CheckpointNotFoundError(
            f"no model in {hf_hub_cache()} or {meta_checkpoints()}: download one with `hf download "
            "meta-llama/Llama-3.2-1B-Instruct --exclude 'original/*'` or Meta's `llama model download --source meta "
            "--model-id Llama3.2-1B-Instruct` (pip install llama-stack), or pass --ckpt DIR, a checkpoint folder")
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    # owner/name is a Hugging Face repo id, unless `owner` is a local folder: then it is a mistyped path.
    if re.fullmatch(r"[\w.-]+/[\w.-]+", name) and not path.parent.is_dir():
        return hf_snapshot(name) or download_hf(name)
    if re.fullmatch(r"[\w.-]+", name) and (meta_checkpoints() / name).is_dir():  # a Meta model id
        return meta_checkpoints() / name
    if path.parent.is_dir() and path.parent != Path("."):
        raise CheckpointNotFoundError(f"{path}: no such checkpoint directory")
    raise CheckpointNotFoundError(f"{name}: no such folder, Hugging Face repo id (owner/name) or model in "
                                  f"{meta_checkpoints()}")


# -----------------------------------------------------------------------------
# Sampling
#
# The next token is drawn from softmax(logits / temperature), optionally
# restricted to the k most likely tokens (top-k) and to the smallest set whose
# probabilities add up to top_p (nucleus sampling, Holtzman et al. 2019).
# temperature 0 is greedy. Meta's chat defaults: temperature 0.6, top_p 0.9.
# -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen (generate's arguments of the same names)."""
    temperature: float = 0.6
    top_p: float = 0.9
    top_k: int | None = None
    repetition_penalty: float = 1.0
    seed: int | None = None


def nucleus(probs: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The nucleus of probs (B, vocab_size), sorted descending and renormalised, and the sort's token ids. Meta's
    rule: keep each token whose preceding mass is at most p, so the token crossing p is kept and the nucleus is
    never empty."""
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)  # (B, vocab_size)
    probs_sum = torch.cumsum(probs_sort, dim=-1)
    probs_sort[probs_sum - probs_sort > p] = 0.0
    probs_sort.div_(probs_sort.sum(dim=-1, keepdim=True))
    return probs_sort, probs_idx


def sample_top_p(probs: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Sample from the nucleus of probs (B, vocab_size) -> token ids (B, 1)."""
    probs_sort, probs_idx = nucleus(probs, p)
    next_token = torch.multinomial(probs_sort, num_samples=1, generator=generator)  # (B, 1) index into the sort
    return torch.gather(probs_idx, -1, next_token)  # (B, 1) token ids


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Discourage tokens already in each row: logits (B, vocab_size), seen (B, S) token ids. Hugging Face's rule
    (Keskar et al. 2019, CTRL), so results compare: a seen token's logit is divided by penalty where positive and
    multiplied by it where negative, once however often it occurred. penalty 1.0 changes nothing."""
    score = logits.gather(1, seen)  # (B, S)
    score = torch.where(score > 0, score / penalty, score * penalty)
    return logits.scatter(1, seen, score)


def tempered_probs(logits: torch.Tensor, temperature: float, top_k: int | None) -> torch.Tensor:
    """softmax(logits / temperature) over the top_k largest logits of each row (all if None): (B, vocab_size)."""
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1), the k-th largest logit
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.softmax(logits, dim=-1)


def sample(logits: torch.Tensor, temperature: float = 0.6, top_p: float = 0.9, top_k: int | None = None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick the next token from logits (B, vocab_size) -> (B,) int64."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = tempered_probs(logits, temperature, top_k)  # (B, vocab_size)
    if top_p < 1.0:
        return sample_top_p(probs, top_p, generator).squeeze(-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


# -----------------------------------------------------------------------------
# Generation
#
# Prefill runs the prompt through the model in chunks, filling the KV cache;
# decode then feeds one token per step. Prompts of different lengths share a
# batch by Meta's scheme, which needs no padding mask: every row starts decoding
# at the shortest prompt's length, and while a row still has prompt tokens
# left, its sampled token is replaced by the prompt's own. So position t of
# every row is always a real token, the causal mask hides the unfilled
# positions after it, and greedy results equal running each prompt alone.
# -----------------------------------------------------------------------------

# <|end_of_text|> (base models), <|eom_id|> (hand-over to a tool), <|eot_id|> (end of an instruct turn):
# tokenizer.py's Tokenizer.stop_tokens, repeated so generate runs without tiktoken (a test checks they agree).
LLAMA3_STOP_TOKENS = (128001, 128008, 128009)


# Prompt positions fed per forward: 512 rows keep the matrix products as fast as one call, and memory grows with
# the chunk, not the prompt (see prefill).
PREFILL_CHUNK = 512


def prefill(model: Transformer, tokens: torch.Tensor, start_pos: int, cache: list[KVCache],
            chunk: int = PREFILL_CHUNK) -> torch.Tensor:
    """Feed tokens (B, T) at start_pos through the cache, `chunk` positions per call -> the last position's logits
    (B, vocab_size). Each chunk attends to the cache and itself through a (chunk, S) mask, so a 128K-token prompt
    needs memory in proportion to its length. 512 rows keep the matrix products as fast as one call; on CPU the
    chunks' attention costs 1.03-1.05x one causal call (appendix A)."""
    for i in range(0, tokens.shape[1], chunk):
        logits = model(tokens[:, i : i + chunk], start_pos + i, cache, last_only=True)  # (B, 1, vocab_size)
    return logits[:, -1]


def check_generation_args(max_new_tokens: int, temperature: float, top_p: float, top_k: int | None,
                          repetition_penalty: float, prefill_chunk: int = PREFILL_CHUNK) -> None:
    """Raise ValueError, starting with the argument's name, for the first value out of range."""
    rules = [("max_new_tokens", max_new_tokens, max_new_tokens >= 0, "an int >= 0"),
             ("temperature", temperature, 0 <= temperature < math.inf, ">= 0 and finite (0 is greedy)"),
             ("top_p", top_p, 0 < top_p <= 1, "in (0, 1]"),
             ("top_k", top_k, top_k is None or top_k >= 1, ">= 1, or None for no limit"),
             ("repetition_penalty", repetition_penalty, repetition_penalty > 0, "> 0 (1.0 is off)"),
             ("prefill_chunk", prefill_chunk, prefill_chunk >= 1, ">= 1")]
    whole_numbers = ("max_new_tokens", "top_k", "prefill_chunk")
    for name, value, ok, want in rules:
        if not ok or (name in whole_numbers and not isinstance(value, (int, type(None)))):
            raise ValueError(f"{name} must be {want}, not {value!r}")


@torch.inference_mode()
def generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.6,
             top_p: float = 0.9, top_k: int | None = None, stop_tokens: list[int] | tuple[int, ...] | None = None,
             seed: int | None = None, on_token: Callable[[int, int], bool | None] | None = None,
             cache: list[KVCache] | None = None, cached_len: int = 0, compile: bool = False,
             repetition_penalty: float = 1.0, prefill_chunk: int = PREFILL_CHUNK, draft: Transformer | None = None,
             speculate_k: int = 5, prompt_lookup: int | None = None,
             speculation: Speculation | None = None, constraint: JSONConstraint | None = None) -> list[list[int]]:
    """Continue each prompt (a list of token ids) by up to max_new_tokens tokens -> each prompt's new tokens, without
    the stop token that ended it. Raises ValueError naming the argument that is out of range.
    stop_tokens: ids that end a row (default LLAMA3_STOP_TOKENS; [] never stops). seed: makes sampling repeatable.
    on_token(row, token_id): called with each new token as it is chosen (streaming); True ends the row with it.
    repetition_penalty: > 1 discourages every token already in the row, prompt included; 1.0 is off.
    prefill_chunk: the prompt is fed this many positions at a time (see prefill).
    cache, cached_len: reuse a cache holding prompts[0][:cached_len] (batch size 1; the chat keeps one across turns).
    compile: decode steps run compiled, with CUDA graphs on a GPU, through one cache the model keeps, so later calls
        reuse the compiled step (appendix C). Meant for GPUs, not yet measured on one; on a CPU 1.02-1.06x eager's
        speed after 8-50 s of compiling (benchmarks/README.md).
    draft, speculate_k: speculative decoding (below): draft, a model with the same vocabulary, proposes up to
        speculate_k tokens a round and the model checks them in one forward; prompt_lookup=K instead drafts up to K
        tokens copied from where the last few tokens appeared before. One prompt; the result is the model's own
        (greedy: token for token, up to rounding at near-ties, see below). speculation: a Speculation that counts
        the tokens drafted and accepted.
    constraint: only the tokens it allows are drawn (appendix F: json_constraint, tool_call_constraint), from the
        model's own distribution restricted to them; one prompt, no speculation."""
    check_generation_args(max_new_tokens, temperature, top_p, top_k, repetition_penalty, prefill_chunk)
    stop_tokens = LLAMA3_STOP_TOKENS if stop_tokens is None else stop_tokens
    B = len(prompts)
    lengths = [len(p) for p in prompts]
    max_seq_len = model.args.max_seq_len
    if B == 0 or min(lengths) == 0:
        raise ValueError("prompts: every prompt needs at least one token (start it with <|begin_of_text|>)")
    bad = [t for p in prompts for t in p if not 0 <= t < model.args.vocab_size]
    if bad:
        raise ValueError(f"prompts: token id {bad[0]} is outside the model's vocabulary "
                         f"(0..{model.args.vocab_size - 1})")
    if max_new_tokens == 0:
        return [[] for _ in prompts]
    if max(lengths) >= max_seq_len:
        raise ValueError(f"prompt of {max(lengths)} tokens leaves no room in the {max_seq_len}-position context "
                         "(max_seq_len)")
    device = model.tok_embeddings.weight.device
    total_len = min(max_seq_len, max(lengths) + max_new_tokens)  # clip to the model's context
    if constraint is not None and (B != 1 or draft is not None or prompt_lookup is not None):
        raise ValueError("constraint: constrained decoding takes one prompt and no draft or prompt_lookup")
    if draft is not None or prompt_lookup is not None:  # speculative decoding, below
        check_speculation(model, B, compile, draft, speculate_k, prompt_lookup, total_len)
        generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
        plain = Sampling(temperature, top_p, top_k, repetition_penalty, seed)
        new = speculative_decode(model, prompts[0], total_len, plain, stop_tokens, generator, on_token, cache,
                                 cached_len, draft, prompt_lookup or speculate_k, prompt_lookup is not None,
                                 speculation or Speculation())
        return [new]
    if cache is not None and (B != 1 or not 0 <= cached_len < lengths[0] or cache[0].k.shape[2] < total_len):
        raise ValueError("cache: a reused cache needs one prompt longer than cached_len and room for total_len "
                         "positions")
    step = None  # the compiled decode step, or None for eager steps
    if compile:  # appendix C: a step compiled once per model, over a cache the model keeps (unless one is given)
        if cache is None:
            cache = engine_room("static_cache", "compile")(model, B, total_len)
            cached_len = 0
        step = engine_room("compiled_decode", "compile")(model, cache)
    if cache is None:  # sized to this request, not to max_seq_len
        cache = model.new_cache(B, total_len)
        cached_len = 0
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None

    # (B, total_len): the prompts, padded with 0, and where they are
    tokens = torch.tensor([list(p) + [0] * (total_len - len(p)) for p in prompts], dtype=torch.long, device=device)
    is_prompt = torch.arange(total_len, device=device) < torch.tensor(lengths, device=device)[:, None]
    stop = torch.tensor(list(stop_tokens), dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    # A row ends after max_new_tokens of its own, not the longest prompt's.
    limit = torch.tensor([min(n + max_new_tokens, total_len) for n in lengths], device=device)

    prev_pos = cached_len
    for cur_pos in range(min(lengths), total_len):
        if cur_pos - prev_pos == 1 and step is not None:
            # A fresh (B, 1) tensor: a view of `tokens` has stride total_len, and a new stride recompiles the step.
            token = tokens[:, prev_pos:cur_pos].clone(memory_format=torch.contiguous_format)
            logits = step(model, token, torch.tensor(prev_pos, device=device), cache)
        else:  # the prompt, or one eager decode step (a prefill of one token)
            logits = prefill(model, tokens[:, prev_pos:cur_pos], prev_pos, cache, prefill_chunk)  # (B, vocab_size)
        if not bool(torch.isfinite(logits).all()):  # garbage in greedy, a crash in sampling: say why instead
            cause = ("corrupt weights, or a float16 overflow (past 65504: try --dtype bfloat16)"
                     if model.norm.weight.dtype == torch.float16 else "corrupt weights or settings")
            raise FloatingPointError(f"the logits at position {cur_pos} are NaN or inf: {cause}")
        if repetition_penalty != 1.0:
            logits = apply_repetition_penalty(logits, tokens[:, :cur_pos], repetition_penalty)
        if constraint is not None:  # disallowed tokens -inf before temperature, top-k and top-p (appendix F)
            logits = constraint.mask(logits)
        next_token = sample(logits, temperature, top_p, top_k, generator)  # (B,)
        if constraint is not None:
            constraint.advance(int(next_token[0]))
        next_token = torch.where(is_prompt[:, cur_pos], tokens[:, cur_pos], next_token)
        tokens[:, cur_pos] = next_token
        new = ~is_prompt[:, cur_pos] & ~done & (cur_pos < limit)
        stopped = new & torch.isin(next_token, stop)
        if on_token is not None:
            for i in (new & ~stopped).nonzero().flatten().tolist():
                if on_token(i, int(next_token[i])):
                    limit[i] = cur_pos + 1  # the caller ended this row: it ends with this token
        done |= stopped | (cur_pos + 1 >= limit)
        prev_pos = cur_pos
        if bool(done.all()):
            break

    stops = set(stop_tokens)  # each row ends at its first stop token; the positions after it are unused
    rows = [tokens[i, n : int(limit[i])].tolist() for i, n in enumerate(lengths)]
    return [row[: next((j for j, t in enumerate(row) if t in stops), len(row))] for row in rows]


# -----------------------------------------------------------------------------
# Speculative decoding (Leviathan et al. 2023, Chen et al. 2023)
#
# A decode step reads every weight to make one token, so its speed is bandwidth over the weights' bytes; a forward
# over k + 1 new positions reads them once too, and on a CPU or GPU costs about as much as one. So a cheap drafter
# proposes k tokens, the model scores all of them in one forward, and the longest prefix it agrees with is kept,
# plus one token of the model's own: up to k + 1 tokens for one read of the weights. The drafter is a small model
# with the same vocabulary (3.2 1B for 3.1 8B), or the text itself: prompt lookup copies what followed the last
# few tokens where they appeared before, which pays where text repeats its context (quotes, code edits, loops).
#
# The output is the model's, whatever the drafter: a draft token d, which the drafter chose with probability q(d),
# is kept with probability min(1, p(d) / q(d)), p being the model's probability; at the first rejection the token
# is drawn from max(p - q, 0), normalised, and if all k were kept a bonus token from the model's next p. Each
# token then follows p exactly. Greedy, p and q are one-hot on their argmax: a draft is kept when it is the
# model's argmax, and the rejection draws that argmax. p and q are what plain sampling draws from: the repetition
# penalty, temperature, top-k and top-p applied (sampling_probs). Positions written past the kept tokens are left
# in the caches: the next forward writes over them before anything reads them. One caveat, of floating point: a
# forward over several positions may round differently from one over a single position, so where the two most
# likely tokens are closer than that rounding the greedy choice can differ from plain decoding's (seen with int4
# weights on a random model, whose one-row and six-row logits differed by up to 0.11; exact in float32 here).
# -----------------------------------------------------------------------------


@dataclass
class Speculation:
    """What one speculative generate did: tokens drafted, and how many of them the model accepted."""
    drafted: int = 0
    accepted: int = 0


@dataclass(frozen=True)
class Drafting:
    """How stream() and Chat speculate: generate's arguments of the same names."""
    draft: Transformer | None = None
    speculate_k: int = 5
    prompt_lookup: int | None = None


def check_speculation(model: Transformer, batch_size: int, compile: bool, draft: Transformer | None,
                      speculate_k: int, prompt_lookup: int | None, total_len: int) -> None:
    """Raise ValueError, naming the argument, for a speculative request generate cannot serve."""
    if draft is not None and prompt_lookup is not None:
        raise ValueError("draft: give a draft model or prompt_lookup, not both")
    k = prompt_lookup if prompt_lookup is not None else speculate_k
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"{'prompt_lookup' if prompt_lookup is not None else 'speculate_k'} must be an int >= 1, "
                         f"not {k!r}")
    if batch_size != 1:
        raise ValueError(f"prompts: speculative decoding takes one prompt, not {batch_size}")
    if compile:
        raise ValueError("compile: the compiled step decodes one token at a time; leave it off to speculate")
    if draft is not None and draft.args.vocab_size != model.args.vocab_size:
        raise ValueError(f"draft: its vocabulary of {draft.args.vocab_size} tokens differs from the model's "
                         f"{model.args.vocab_size}")
    if draft is not None and draft.args.max_seq_len < total_len:
        raise ValueError(f"draft: its max_seq_len {draft.args.max_seq_len} is shorter than the {total_len} "
                         "positions of this request")


def sampling_probs(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """The distribution sample() draws from for logits (B, vocab_size) -> (B, vocab_size) float32: top-k, then
    Meta's nucleus rule, renormalised; one-hot on the argmax for temperature 0. (The repetition penalty is applied
    to logits before.)"""
    if sampling.temperature <= 0:
        return F.one_hot(logits.argmax(dim=-1), logits.shape[-1]).float()
    probs = tempered_probs(logits, sampling.temperature, sampling.top_k)  # (B, vocab_size)
    if sampling.top_p < 1.0:
        probs_sort, probs_idx = nucleus(probs, sampling.top_p)
        probs = torch.zeros_like(probs).scatter_(-1, probs_idx, probs_sort)  # back in token order
    return probs


def next_probs(logits: torch.Tensor, seen: list[int], sampling: Sampling) -> torch.Tensor:
    """sampling_probs of one position's logits (vocab_size,) after the tokens `seen` -> (vocab_size,)."""
    logits = logits[None]  # (1, vocab_size)
    if sampling.repetition_penalty != 1.0:
        seen_ids = torch.tensor([seen], device=logits.device)  # (1, S)
        logits = apply_repetition_penalty(logits, seen_ids, sampling.repetition_penalty)
    return sampling_probs(logits, sampling)[0]


def lookup_draft(tokens: list[int], k: int, max_ngram: int = 3) -> list[int]:
    """Up to k tokens that followed the most recent earlier appearance of the text's last n tokens (n = max_ngram
    down to 1), copied on into the draft itself where they run into the end (a loop continues as a loop)."""
    for n in range(min(max_ngram, len(tokens) - 1), 0, -1):
        tail = tokens[-n:]
        for start in range(len(tokens) - n - 1, -1, -1):
            if tokens[start : start + n] == tail:
                draft = []
                for j in range(k):
                    source = start + n + j  # always before the end of tokens + draft
                    draft.append(tokens[source] if source < len(tokens) else draft[source - len(tokens)])
                return draft
    return []


def draw(probs: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> int:
    """One token from probs (vocab_size,): its argmax for temperature 0, else a sample."""
    if sampling.temperature <= 0:
        return int(probs.argmax())
    return int(torch.multinomial(probs, 1, generator=generator))


def speculative_decode(model: Transformer, prompt: list[int], total_len: int, sampling: Sampling,
                       stop_tokens: list[int] | tuple[int, ...], generator: torch.Generator | None,
                       on_token: Callable[[int, int], bool | None] | None, cache: list[KVCache] | None,
                       cached_len: int, draft: Transformer | None, k: int, lookup: bool,
                       speculation: Speculation) -> list[int]:
    """generate for one prompt by speculation, up to total_len positions; draft proposes (or, lookup, the text)."""
    device = model.tok_embeddings.weight.device
    tokens = list(prompt)
    if cache is None:
        cache = model.new_cache(1, total_len)
        cached_len = 0
    fed = cached_len  # tokens[:fed] have their K/V in the model's cache
    draft_cache = draft.new_cache(1, total_len) if draft is not None else None
    draft_fed = 0  # and tokens[:draft_fed] in the draft's
    new = []
    while len(tokens) < total_len:
        if not new:
            # The prompt (what the cache lacks of it) goes in as plain decoding feeds it, so its first token is
            # plain decoding's; from then on one token is unfed at each round's start.
            logits = prefill(model, torch.tensor([tokens[fed:]], device=device), fed, cache)  # (1, vocab_size)
            fed = len(tokens)
            kept = [draw(next_probs(logits[0], tokens, sampling), sampling, generator)]
            if not emit(kept, tokens, new, stop_tokens, on_token, total_len):
                return new
            continue
        k_now = min(k, total_len - len(tokens) - 1)  # the checking forward writes k_now positions ahead
        drafted = []
        q_drafted = []  # the drafter's distribution for each drafted token; None: a looked-up token, chosen surely
        if lookup and k_now > 0:
            drafted = lookup_draft(tokens, k_now)
            q_drafted = [None] * len(drafted)
        elif k_now > 0:
            # The draft catches up on the tokens it has not seen, then proposes one token per forward.
            ahead = torch.tensor([tokens[draft_fed:]], device=device)  # (1, tokens not yet seen)
            logits = prefill(draft, ahead, draft_fed, draft_cache)  # (1, vocab_size)
            draft_fed = len(tokens)
            for i in range(k_now):
                q = next_probs(logits[0], tokens + drafted, sampling)  # (vocab_size,)
                drafted.append(draw(q, sampling, generator))
                q_drafted.append(q)
                if i < k_now - 1:
                    step = torch.tensor([[drafted[-1]]], device=device)  # (1, 1)
                    logits = draft(step, draft_fed + i, draft_cache)[:, -1]  # (1, vocab_size)
        # The model: the last token and the drafts in one forward, whose rows give p after each.
        check = torch.tensor([[tokens[-1], *drafted]], device=device)  # (1, 1 + len(drafted))
        logits = model(check, len(tokens) - 1, cache)[0]  # (1 + len(drafted), vocab_size)
        accepted = 0
        for token, q in zip(drafted, q_drafted):
            p = next_probs(logits[accepted], tokens + drafted[:accepted], sampling)  # (vocab_size,)
            q_token = 1.0 if q is None else float(q[token])
            if float(torch.rand((), generator=generator, device=device)) * q_token < float(p[token]):
                accepted += 1
                continue
            # Rejected: draw from max(p - q, 0), normalised, where the model wants more than the drafter gave.
            residual = p.clone()
            if q is None:
                residual[token] = 0.0
            else:
                residual = (p - q).clamp_(min=0.0)
            if float(residual.sum()) <= 0:  # p == q up to rounding: rejection had no chance; keep to p
                residual = p
            last = int(torch.multinomial(residual / residual.sum(), 1, generator=generator))
            break
        else:  # every draft kept: the model's own next token too
            last = draw(next_probs(logits[accepted], tokens + drafted, sampling), sampling, generator)
        speculation.drafted += len(drafted)
        speculation.accepted += accepted
        kept = drafted[:accepted] + [last]
        fed = len(tokens) + accepted  # the last token and the drafts kept are in the cache; `last` is not
        if drafted and draft is not None:
            draft_fed = len(tokens) + min(accepted, len(drafted) - 1)  # the last draft was never fed to it
        if not emit(kept, tokens, new, stop_tokens, on_token, total_len):
            return new
    return new


def emit(kept: list[int], tokens: list[int], new: list[int], stop_tokens: list[int] | tuple[int, ...],
         on_token: Callable[[int, int], bool | None] | None, total_len: int) -> bool:
    """Append the kept tokens to tokens and new, as generate streams them; False once generation must end (a stop
    token, which is not kept, on_token saying so, or the context full)."""
    for token in kept:
        if token in stop_tokens:
            return False
        tokens.append(token)
        new.append(token)
        if on_token is not None and on_token(0, token):
            return False
        if len(tokens) >= total_len:
            return False
    return True


# -----------------------------------------------------------------------------
# Decoding rows at their own positions (continuous batching, Yu et al. 2022)
#
# A server's requests arrive and finish at different times, so it cannot wait to start them together as generate
# does. A decode step's cost is reading every weight (see speculative decoding), so one step that makes a token for
# each of B requests costs about one request's step where the products are bound by reading: on a 2-core Zen 3, 8
# rows made 3.1x one row's tokens/s in fp32, but 1.26x in bf16, whose products that CPU computes without bf16
# instructions (benchmarks/README.md). Each request holds a slot (row) of one cache of R rows,
# model.new_cache(R, length), whose layers are KVCache (R, n_kv_heads, length, head_dim): slot i holds its request's
# K/V at positions [0, len_i). Joining: prefill_row feeds a prompt into a free slot, part 1's forward on a one-row
# view of the slot (row_cache), a batch-1 prefill bit for bit; no other slot is read or written. Stepping:
# decode_rows feeds one token for each of B slots, row b at its own position positions[b]. Leaving: the caller frees
# the slot; the next request writes over it from position 0 and never reads past its own positions.
#
# decode_rows is part 1's forward with T = 1 for every row (TransformerBlock and Attention.forward line for line),
# only the positions differ: the weight products (wq, wk, wv, wo, the feed-forward, output), which are the cost, run
# on all B rows at once; RoPE turns each row by its own angles; attention runs per row over its own slot's positions
# [0, positions[b]] with no mask, exactly the call a batch-1 decode makes. Attention reads each row's cache once
# either way: one call with a padding mask (B, 1, 1, S) would save only Python calls, and would sum each row's
# softmax over S - positions[b] - 1 extra zeros, in another order.
# Exactness, measured on an AMD EPYC Zen 3 (AVX2, torch 2.13, MKL/oneDNN): in bfloat16 the products of 1 to 8 rows
# gave the same bits per row, and so did decode_rows (appendix A's CPULinear takes another route from 16 rows, see
# FP32_FROM_ROWS, and rounds differently). In float32 MKL multiplies one row and several rows in different orders
# (and 2 or 3 rows otherwise than 4 or more), so a row's logits differ from its batch-1 decode by a few units in the
# last place (under 1e-6 on the tests' tiny model, 1.6e-5 at 1B shape): greedy answers can differ only at such
# near-ties, as in speculative decoding. One row through decode_rows is part 1's decode bit for bit.
# -----------------------------------------------------------------------------


def row_cache(cache: list[KVCache], slot: int) -> list[KVCache]:
    """Slot `slot` of a cache of R rows as a cache of one row: per layer a KVCache whose k and v are the slot's,
    views (1, n_kv_heads, length, head_dim), so that part 1 reads and writes the slot itself."""
    views = []
    for layer in cache:
        view = copy.copy(layer)  # the same kind of cache, holding the slot's rows instead of all R
        view.k = layer.k[slot : slot + 1]  # (1, n_kv_heads, length, head_dim)
        view.v = layer.v[slot : slot + 1]  # (1, n_kv_heads, length, head_dim)
        views.append(view)
    return views


def check_slots(cache: list[KVCache], slots: list[int], ends: list[int]) -> None:
    """Raise ValueError unless the slots are distinct rows of the cache and each row's positions end within it."""
    rows = cache[0].k.shape[0]
    length = cache[0].k.shape[2]
    if len(set(slots)) != len(slots) or not all(0 <= s < rows for s in slots):
        raise ValueError(f"slots: {slots} must be distinct rows of the cache's {rows}")
    if not all(0 < end <= length for end in ends):
        raise ValueError(f"positions: a row would end at {max(ends)}, past the cache's {length} positions")


@torch.inference_mode()
def prefill_row(model: Transformer, cache: list[KVCache], slot: int, tokens: list[int], start_pos: int = 0,
                chunk: int = PREFILL_CHUNK) -> torch.Tensor:
    """Feed one request's tokens at positions [start_pos, start_pos + len(tokens)) into slot `slot` of cache (which
    must hold [0, start_pos) already) -> the last position's logits (vocab_size,) float32."""
    if not tokens or start_pos < 0:
        raise ValueError("tokens: a row's prefill needs at least one token, at start_pos >= 0")
    check_slots(cache, [slot], [start_pos + len(tokens)])
    ids = torch.tensor([tokens], dtype=torch.long, device=model.tok_embeddings.weight.device)  # (1, T)
    return prefill(model, ids, start_pos, row_cache(cache, slot), chunk)[0]  # (vocab_size,)


@torch.inference_mode()
def decode_rows(model: Transformer, cache: list[KVCache], slots: list[int], tokens: list[int] | torch.Tensor,
                positions: list[int] | torch.Tensor) -> torch.Tensor:
    """One decode step for B rows: row b feeds tokens[b] at position positions[b] into slot slots[b], which must
    hold [0, positions[b]) already, and attends to that slot's [0, positions[b]] -> logits (B, vocab_size) float32."""
    slots = [int(s) for s in slots]
    positions = [int(p) for p in positions]
    B = len(slots)
    if B == 0 or len(tokens) != B or len(positions) != B:
        raise ValueError(f"slots, tokens, positions: one of each per row, not {B}, {len(tokens)}, {len(positions)}")
    check_slots(cache, slots, [p + 1 for p in positions])
    if min(positions) < 0 or max(positions) >= model.args.max_seq_len:
        raise ValueError(f"positions: {positions} must lie in [0, max_seq_len={model.args.max_seq_len})")
    device = model.tok_embeddings.weight.device
    ids = torch.as_tensor(tokens, dtype=torch.long, device=device).view(B, 1)  # (B, 1)
    rows = [row_cache(cache, s) for s in slots]
    # Each row's angles as part 1 makes them for its one position: one cos() over all B rows at once can round
    # otherwise, as vectorised kernels hand the last few elements to a scalar routine.
    freqs = rope_frequencies(model.args, device)  # (head_dim // 2,)
    angles = [rope_cos_sin(freqs, pos, 1) for pos in positions]
    cos = torch.cat([c for c, _ in angles])  # (B, head_dim // 2): row b's
    sin = torch.cat([s for _, s in angles])  # (B, head_dim // 2)

    h = model.tok_embeddings(ids)  # (B, 1, dim)
    for i, layer in enumerate(model.layers):  # TransformerBlock.forward, with attend_rows for its attention
        h = h + attend_rows(layer.attention, layer.attention_norm(h), cos, sin, [row[i] for row in rows], positions)
        h = h + layer.feed_forward(layer.ffn_norm(h))
    h = model.norm(h)
    return model.output(h).float()[:, 0]  # (B, vocab_size)


def attend_rows(attention: Attention, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                caches: list[KVCache], positions: list[int]) -> torch.Tensor:
    """Attention.forward for x (B, 1, dim), row b at positions[b] with its own one-row cache caches[b] and the
    angles in row b of cos, sin (B, head_dim // 2) -> (B, 1, dim). Calls the module's own parts, whatever their
    class (appendix A's CPUAttention and CPULinear, appendix D's quantized layers)."""
    B = x.shape[0]
    xq = attention.wq(x).view(B, 1, attention.n_heads, attention.head_dim)  # (B, 1, n_heads, head_dim)
    xk = attention.wk(x).view(B, 1, attention.n_kv_heads, attention.head_dim)  # (B, 1, n_kv_heads, head_dim)
    xv = attention.wv(x).view(B, 1, attention.n_kv_heads, attention.head_dim)  # (B, 1, n_kv_heads, head_dim)
    # apply_rotary_emb turns position t of its T axis by row t of cos and sin: put the rows on that axis.
    xq = apply_rotary_emb(xq.transpose(0, 1), cos, sin).transpose(0, 1)
    xk = apply_rotary_emb(xk.transpose(0, 1), cos, sin).transpose(0, 1)

    out = []
    for b in range(B):  # each row as part 1 decodes it alone: one query, its own keys, no mask
        q = xq[b : b + 1].transpose(1, 2)  # (1, n_heads, 1, head_dim)
        k = xk[b : b + 1].transpose(1, 2)  # (1, n_kv_heads, 1, head_dim)
        v = xv[b : b + 1].transpose(1, 2)  # (1, n_kv_heads, 1, head_dim)
        k, v = caches[b].update(positions[b], k, v)  # (1, n_kv_heads, positions[b] + 1, head_dim) each
        if attention.use_sdpa:
            out.append(attention.sdpa(q, k, v, None))  # (1, n_heads, 1, head_dim)
        else:
            out.append(attention.explicit(q, k, v, None))  # (1, n_heads, 1, head_dim)
    out = torch.cat(out).transpose(1, 2).reshape(B, 1, attention.n_heads * attention.head_dim)  # (B, 1, dim)
    return attention.wo(out)


# -----------------------------------------------------------------------------
# Looking inside: the logit lens (nostalgebraist 2020) and attention
#
# Every block adds its output to one residual stream, and the last RMSNorm and
# output layer read the prediction off its end. Read off after block i instead,
# it shows what the model would predict had it stopped there: early layers
# mostly echo the current token; the answer forms in the last layers. The last
# position's attention (the explicit path's softmax, averaged over heads) shows
# which earlier tokens each layer reads. Hooks capture both, so the model has
# no branch for this.
# -----------------------------------------------------------------------------


def last_position_attention(attention: Attention, x: torch.Tensor, cos: torch.Tensor,
                            sin: torch.Tensor) -> torch.Tensor:
    """The last position's attention probabilities (B, n_heads, T) over a fresh prompt x (B, T, dim) (normed)."""
    B, T, _ = x.shape
    a = attention
    xq = apply_rotary_emb(a.wq(x[:, -1:]).view(B, 1, a.n_heads, a.head_dim), cos[-1:], sin[-1:])  # (B, 1, n_heads, hd)
    xk = apply_rotary_emb(a.wk(x).view(B, T, a.n_kv_heads, a.head_dim), cos, sin)  # (B, T, n_kv_heads, head_dim)
    k = xk.float().repeat_interleave(a.n_rep, dim=2)  # (B, T, n_heads, head_dim), query head h reads h // n_rep
    scores = torch.einsum("bhd,bthd->bht", xq[:, 0].float(), k) / math.sqrt(a.head_dim)  # (B, n_heads, T)
    return F.softmax(scores, dim=-1)  # the last query sees every position: no mask


@torch.inference_mode()
def explain(model: Transformer, prompt: list[int], top: int = 5) -> list[dict]:
    """For each layer, a dict: "top", the `top` most likely (token id, probability) pairs read off after it (the last
    layer's are the model's own prediction); "attends", the `top` (position, weight) pairs the last position attends
    to most, averaged over heads."""
    tokens = torch.tensor([prompt], device=model.tok_embeddings.weight.device)  # (1, T)
    if not 0 < len(prompt) <= model.args.max_seq_len:
        raise ValueError(f"explain needs 1 to {model.args.max_seq_len} prompt tokens, not {len(prompt)}")
    residual = []  # per layer: the block's output at the last position
    attends = []  # per layer: the last position's attention
    hooks = [layer.register_forward_hook(lambda _m, _in, out: residual.append(out[:, -1:])) for layer in model.layers]
    hooks += [layer.attention.register_forward_pre_hook(
        lambda m, args: attends.append(last_position_attention(m, args[0], args[2], args[3]).mean(1)[0]))
        for layer in model.layers]  # args: (x, start_pos, cos, sin, mask, cache)
    try:
        model(tokens, last_only=True)
    finally:
        for h in hooks:
            h.remove()
    rows = []
    for h, weights in zip(residual, attends):
        probs = F.softmax(model.output(model.norm(h)).float()[0, -1], dim=-1)  # (vocab_size,)
        p, ids = probs.topk(min(top, probs.numel()))
        w, pos = weights.topk(min(top, weights.numel()))
        rows.append({"top": list(zip(ids.tolist(), p.tolist())), "attends": list(zip(pos.tolist(), w.tolist()))})
    return rows


# -----------------------------------------------------------------------------
# Perplexity
#
# How well a model predicts a text: the mean negative log-likelihood (NLL, in
# nats) of each token given those before it, and its exp, the perplexity (the
# number of equally likely tokens the model is as unsure as); it shows what a
# change such as quantized weights (appendix D) costs on text you choose. A
# text longer than the context is read in windows of `window` tokens starting
# every `stride`, each token scored once, in the first window that holds it and
# its predecessor: past the first window, every token has at least
# window - stride tokens of context (transformers' documented method; with
# stride = window, each window's first token has none and is not scored).
# -----------------------------------------------------------------------------


# Not the whole context by default: a 3.1 model's 131,072 positions would need 16 GiB of 8B's KV cache per window,
# and a perplexity compares with another only at the same window.
PERPLEXITY_WINDOW = 2048


def perplexity(model: Transformer, tokens: list[int], window: int | None = None, stride: int | None = None,
               chunk: int = PREFILL_CHUNK, log: TextIO | None = None) -> tuple[float, float]:
    """(mean NLL in nats, perplexity) of the tokens scored, each predicted from those before it. window: tokens per
    window (default: PERPLEXITY_WINDOW, or max_seq_len if smaller; --perplexity's too); stride: tokens between window
    starts (default window // 2). Windows run through the KV cache `chunk` tokens at a time, so only `chunk` rows of
    logits exist at once. log: gets a progress line."""
    window = window or min(PERPLEXITY_WINDOW, model.args.max_seq_len)
    stride = stride or max(1, window // 2)
    if len(tokens) < 2:
        raise ValueError(f"perplexity needs at least 2 tokens, not {len(tokens)}")
    if not (0 < stride <= window <= model.args.max_seq_len and window >= 2):  # 1 token predicts nothing
        raise ValueError(f"perplexity needs 0 < stride ({stride}) <= window ({window}) <= max_seq_len "
                         f"({model.args.max_seq_len}) and a window of at least 2 tokens")
    start_time = shown = time.monotonic()
    total = 0.0  # summed NLL
    count = 0  # tokens scored
    scored = 1  # tokens[:scored] are done; the first has nothing to be predicted from
    for begin in range(0, len(tokens) - 1, stride):
        end = min(begin + window, len(tokens))
        ids = torch.tensor([tokens[begin:end]], device=model.tok_embeddings.weight.device)  # (1, end - begin)
        cache = model.new_cache(1, end - begin)
        for start in range(0, end - begin, chunk):
            logits = model(ids[:, start : start + chunk], start, cache)[0]  # (chunk, vocab_size)
            off = begin + start  # row i predicts token off + i + 1; score those not scored before
            lo, hi = max(scored, off + 1), min(off + logits.shape[0], end - 1) + 1
            if lo < hi:
                rows = logits[lo - 1 - off : hi - 1 - off].float()
                total += F.cross_entropy(rows, ids[0, lo - begin : hi - begin], reduction="sum").item()
                count += hi - lo
                scored = hi
        if end == len(tokens):
            break
        if log is not None and time.monotonic() - shown > 1:  # a progress line, redrawn once a second
            shown = time.monotonic()
            print(f"\rperplexity: {scored:,} of {len(tokens):,} tokens, so far {math.exp(total / count):.4f}",
                  end="", file=log, flush=True)
    if log is not None and shown != start_time:
        print(file=log)
    nll = total / count
    return nll, math.exp(nll)

# -----------------------------------------------------------------------------
# Streaming, chat and tools
#
# stream() prints a completion as it is generated. Chat holds a conversation
# with an instruct model, one KV cache across its turns, and lets the model call
# your Python functions as Llama 3.1+ were trained to: the model writes a call,
# the chat runs the function and feeds its result back as an `ipython` message,
# and the model goes on until it ends its turn (tokenizer.py's ChatFormat
# encodes and parses the calls). All of it is callable from a program: text goes
# to the streams given, bad input raises; the command line is a thin loop on it.
# -----------------------------------------------------------------------------


class StopText:
    """Streams text, holding back what may be the start of a stop string, and ends at the first one to be complete,
    so the result is the same however the text was split: with stops "abcd" and "bc", "abcd" ends after "a"."""

    def __init__(self, stops: list[str] | tuple[str, ...]):
        if "" in stops:
            raise ValueError("stops: an empty stop string would end every text before it starts")
        self.stops = list(stops)
        self.pending = ""  # text received but not yet returned
        self.stopped = False

    def push(self, text: str) -> str:
        """Take newly decoded text; return what is safe to print now."""
        if self.stopped:
            return ""
        self.pending += text
        # (end, start) of each stop string's first appearance; the earliest end completed first.
        found = [(i + len(s), i) for s in self.stops if (i := self.pending.find(s)) >= 0]
        if found:
            out = self.pending[: min(found)[1]]
            self.stopped = True
            self.pending = ""
            return out
        # Keep the longest end of the text that a stop string starts with: the next token may complete it.
        keep = max((k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0)
        out = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep :]
        return out

    def finish(self) -> str:
        """The held-back text, once generation has ended without completing a stop string."""
        out = "" if self.stopped else self.pending
        self.pending = ""
        return out


def stream(model: Transformer, tokenizer: Tokenizer, prompt: list[int], max_new_tokens: int = 256,
           sampling: Sampling = Sampling(), *, stops: list[str] | tuple[str, ...] = (), compile: bool = False,
           cache: list[KVCache] | None = None, cached_len: int = 0, out: TextIO | None = None,
           log: TextIO | None = None, drafting: Drafting | None = None,
           constraint: JSONConstraint | None = None) -> tuple[list[int], str, bool]:
    """Generate for one prompt, writing the text to out as it comes and timing to log; it ends at the tokenizer's
    stop tokens or the first of the stop strings (not written). Returns the new tokens (with the stop token that
    ended them, if one did), the text written, and whether Ctrl-C ended generation. Bad arguments: ValueError.
    drafting: decode speculatively (see Speculative decoding); the timing line says how many drafts were kept.
    constraint: decode under it, as generate does (appendix F)."""
    from tokenizer import StreamDecoder

    out = out or sys.stdout
    log = log or sys.stderr
    new = []  # the tokens generated
    shown = []  # the text written
    times = [time.perf_counter()]  # the start, then as each token is chosen
    decoder = StreamDecoder(tokenizer)
    text = StopText(stops)

    def show(piece: str) -> None:
        shown.append(piece)
        out.write(piece)
        out.flush()

    def on_token(_row: int, token: int) -> bool:
        new.append(token)
        times.append(time.perf_counter())
        if token in tokenizer.stop_tokens:  # kept in `new`: <|eom_id|> and <|eot_id|> mean different things
            return True
        show(text.push(decoder.push(token)))
        return text.stopped

    interrupted = False
    drafting = drafting or Drafting()
    speculation = Speculation()
    try:
        generate(model, [prompt], max_new_tokens, sampling.temperature, sampling.top_p, sampling.top_k,
                 stop_tokens=[], seed=sampling.seed, on_token=on_token, cache=cache, cached_len=cached_len,
                 compile=compile, repetition_penalty=sampling.repetition_penalty, draft=drafting.draft,
                 speculate_k=drafting.speculate_k, prompt_lookup=drafting.prompt_lookup, speculation=speculation,
                 constraint=constraint)
    except KeyboardInterrupt:
        interrupted = True
    show(text.push(decoder.finish()) + text.finish())
    fed = len(prompt) - cached_len  # a chat turn feeds only what the cache lacks
    n = len(new)
    prefilled = f", prefill {fed / (times[1] - times[0]):.1f} tok/s; {n} new token{'s' * (n > 1)}" if n else ""
    decoded = f", decode {(n - 1) / (times[-1] - times[1]):.1f} tok/s" if n > 1 else ""
    if drafting.draft is not None or drafting.prompt_lookup is not None:
        decoded += f", {speculation.accepted} of {speculation.drafted} drafted tokens accepted"
    print(f"\n[{len(prompt)} prompt tokens ({fed} fed){prefilled}{decoded}{', interrupted' * interrupted}]", file=log)
    room = model.args.max_seq_len - len(prompt)
    if n == room < max_new_tokens and not text.stopped and new[-1] not in tokenizer.stop_tokens:
        print(f"llama3.py: stopped after {n} of {max_new_tokens} new tokens: the context "
              f"(max_seq_len={model.args.max_seq_len}) is full", file=log)
    return new, "".join(shown), interrupted


class ContextFullError(ValueError):
    """The conversation no longer fits the model's context (max_seq_len)."""


# A tool's parameters are offered to the model as JSON schema types; tool_prompt writes them by Python's names.
PYTHON_TYPE_NAMES = {"string": "str", "integer": "int", "number": "float", "boolean": "bool", "array": "list",
                     "object": "dict"}


def json_schema(hint: object) -> dict:
    """The JSON schema of a parameter's type hint: str, int, float, bool, list[...], dict, Literal[...], X | None
    (Optional), or Any/no hint (a string). ValueError for a hint a JSON value cannot be."""
    import inspect
    import types
    import typing

    origin = typing.get_origin(hint)
    simple = {str: "string", int: "integer", float: "number", bool: "boolean", list: "array", dict: "object"}
    if hint in simple:
        return {"type": simple[hint]}
    if hint is typing.Any or hint is inspect.Parameter.empty:
        return {"type": "string"}
    if origin is typing.Literal:
        values = typing.get_args(hint)
        kinds = {type(v) for v in values}
        if len(kinds) != 1 or next(iter(kinds)) not in simple:
            raise ValueError(f"Literal{list(values)} mixes types or holds a value JSON cannot carry")
        return {"type": simple[next(iter(kinds))], "enum": list(values)}
    if origin in (typing.Union, types.UnionType):
        kept = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(kept) == 1:
            return json_schema(kept[0])
        raise ValueError(f"{hint}: a union of several types; give one type (or X | None)")
    if origin in (list, tuple, set):
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]  # tuple[int, ...]: any number of ints
        if len(set(args)) > 1:
            raise ValueError(f"{hint}: items of different types; a JSON array here holds one type (list[int])")
        return {"type": "array", "items": json_schema(args[0])} if args else {"type": "array"}
    if origin is dict:
        return {"type": "object"}
    raise ValueError(f"{getattr(hint, '__name__', hint)} is not a type a JSON value can be")


def tool_parameter(schema: dict, description: str, required: bool) -> dict:
    """A parameter as tokenizer.tool_prompt takes it, from its JSON schema: the type by Python's name, a Literal's
    values said in the description."""
    if "enum" in schema:
        choices = ", ".join(json.dumps(v) for v in schema["enum"])
        sentence = description.rstrip(".")
        description = f"{sentence}. One of: {choices}." if sentence else f"One of: {choices}."
    kind = schema.get("type")
    if isinstance(kind, list):  # ["string", "null"]: the type that is not null
        kind = next((k for k in kind if k != "null"), None)
    return {"param_type": PYTHON_TYPE_NAMES.get(kind, "str") if isinstance(kind, str) else "str",
            "description": description, "required": required}


def describe_function(fn: Callable) -> dict:
    """A Python function as a tool definition for tokenizer.tool_prompt: its name, its docstring's first paragraph,
    and each parameter's type, default and description (a "name: text" docstring line, Google style, or ":param").
    ValueError, in one line naming the function, for what cannot be a tool: a lambda, an async def, a hint that
    does not resolve or that no JSON value can be, a default that is not JSON."""
    import inspect
    import typing

    if fn.__name__ == "<lambda>":
        raise ValueError("a lambda cannot be a tool: define it with def, a name and a docstring")
    if inspect.iscoroutinefunction(fn):
        raise ValueError(f"{fn.__name__}: an async def cannot be a tool here; define it with def")
    try:
        hints = typing.get_type_hints(fn)
    except Exception as e:  # noqa: BLE001 (NameError, TypeError: whatever evaluating the hints raises)
        raise ValueError(f"{fn.__name__}: its type hints do not resolve ({type(e).__name__}: {e})") from None
    doc = inspect.getdoc(fn) or ""
    params = {}
    for p in inspect.signature(fn).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.kind == p.POSITIONAL_ONLY:  # a model's call names every argument
            raise ValueError(f"{fn.__name__}: parameter {p.name} is positional-only (before /), so no call by name "
                             "can pass it")
        said = re.search(rf"^\s*(?::param\s+)?{p.name}\s*(?:\([^)]*\))?:\s*(.+)$", doc, re.MULTILINE)
        try:
            schema = json_schema(hints.get(p.name, p.empty))
            if p.default is not p.empty:
                json.dumps(p.default)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{fn.__name__}: parameter {p.name}: {e}") from None
        params[p.name] = tool_parameter(schema, said.group(1).strip() if said else "", p.default is p.empty)
        if p.default is not p.empty:
            params[p.name]["default"] = p.default
    return {"name": fn.__name__, "description": " ".join(doc.split("\n\n")[0].split()), "parameters": params}


def convert_argument(value: object, hint: object) -> object:
    """A model's argument as the type its hint names (the model may write 1 as "1"); ValueError if it is not one."""
    import typing

    origin = typing.get_origin(hint)
    if hint is bool:
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and re.fullmatch(r"\s*[-+]?\d+\s*", value):
            return int(value)
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    elif origin is typing.Literal:
        for choice in typing.get_args(hint):
            try:
                if convert_argument(value, type(choice)) == choice:
                    return choice
            except ValueError:
                pass
    elif origin is not None and type(None) in typing.get_args(hint):  # Optional[X], X | None
        kept = [a for a in typing.get_args(hint) if a is not type(None)]
        return None if value is None else convert_argument(value, kept[0])
    elif origin in (list, tuple, set) or hint in (list, tuple, set):
        if isinstance(value, list):
            args = typing.get_args(hint)
            items = [convert_argument(v, args[0]) for v in value] if args else value
            return (origin or hint)(items)
    elif origin is dict or hint is dict:
        if isinstance(value, dict):
            return value
    else:  # no hint, or Any
        return value
    raise ValueError(f"expected {json_schema(hint)['type']}, got {json.dumps(value)}")


def load_tools(path: str | Path) -> list[Callable]:
    """The public functions defined in the Python file at path (--tools FILE.py)."""
    import importlib.util
    import inspect

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such tools file")
    spec = importlib.util.spec_from_file_location(f"llama3_tools_{path.stem}", path)
    if spec is None:
        raise ValueError(f"{path}: not a Python file (tools come from a .py file)")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 (whatever the user's file raises at import)
        raise ValueError(f"{path}: cannot import ({type(e).__name__}: {e})") from None
    tools = [f for name, f in inspect.getmembers(module, inspect.isfunction)
             if not name.startswith("_") and f.__module__ == module.__name__]
    if not tools:
        raise ValueError(f"{path}: defines no public function to offer as a tool")
    for fn in tools:  # refused here, in one line, rather than when the chat describes or calls it
        try:
            describe_function(fn)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
    return tools


def shared_prefix(cached: list[int], prompt: list[int]) -> int:
    """How many leading tokens cached shares with prompt, at most len(prompt) - 1: the last prompt token is always
    fed, as its logits choose the first new token."""
    n = 0
    while n < min(len(cached), len(prompt) - 1) and cached[n] == prompt[n]:
        n += 1
    return n


def reuse_prefix(model: Transformer, cache: list[KVCache], cached: list[int], prompt: list[int],
                 max_new_tokens: int) -> tuple[list[KVCache], int]:
    """How much of a kept cache a new prompt can reuse: the cache, grown if prompt + max_new_tokens needs more room
    (doubling, up to the context, keeping what it holds), and the length of the longest prefix that cached (the
    tokens whose K/V the cache holds) shares with prompt. At most len(prompt) - 1: the last prompt token is always
    fed, as its logits choose the first new token."""
    reuse = shared_prefix(cached, prompt)
    limit = model.args.max_seq_len
    need = min(limit, len(prompt) + max_new_tokens)
    if cache[0].k.shape[2] < need:
        bigger = model.new_cache(1, min(limit, max(need, 2 * cache[0].k.shape[2])))
        for old, new in zip(cache, bigger):
            new.k[:, :, :reuse] = old.k[:, :, :reuse]
            new.v[:, :, :reuse] = old.v[:, :, :reuse]
        cache = bigger
    return cache, reuse


def default_tool_format(args: ModelArgs) -> str:
    """How a model of this shape writes custom calls: python_list for the 3.2 1B and 3B shapes, json for the rest
    (Meta's prompt-format documents)."""
    return "python_list" if (args.dim, args.n_layers) in LLAMA32_ROPE_FACTORS else "json"


class Chat:
    """A conversation with an instruct model. Each answer encodes the whole dialog with ChatFormat but feeds only the
    tokens after the longest prefix already in the cache, so a turn costs its new tokens, not the history; where
    re-encoding the model's answer differs from its own tokens, feeding restarts there. tools are run with the parsed
    arguments (model text is never run as code). builtin_tools: Meta's built-in
    tools (brave_search, wolfram_alpha, code_interpreter) need the network or run model-written code, so each call
    goes to this function, which returns the tool's output or None to decline. tool_format: how custom calls are
    written (tokenizer.TOOL_FORMATS); default python_list for the 3.2 1B and 3B shapes, json for the rest (Meta's
    prompt-format documents). After max_tool_rounds rounds of calls the model's next message ends the turn, its
    calls not run (0: none are run). json_schema: every answer is a JSON document valid for it, then <|eot_id|>
    ({"type": "object"}: any object; appendix F's constrained decoding)."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, system: str | None = None, *,
                 tools: list[Callable] | tuple[Callable, ...] = (),
                 builtin_tools: Callable[[dict], str | None] | None = None, tool_format: str | None = None,
                 max_new_tokens: int = 256, sampling: Sampling = Sampling(), stops: list[str] | tuple[str, ...] = (),
                 compile: bool = False, max_tool_rounds: int = 8, today: str | None = None,
                 out: TextIO | None = None, log: TextIO | None = None, drafting: Drafting | None = None,
                 json_schema: dict | None = None):
        from tokenizer import ChatFormat, tool_prompt

        self.model = model
        self.tokenizer = tokenizer
        self.format = ChatFormat(tokenizer)
        self.functions = {f.__name__: f for f in tools}
        self.builtin_tools = builtin_tools
        self.max_tool_rounds = max_tool_rounds
        self.tool_format = tool_format or default_tool_format(model.args)
        # Calls are read only in the shapes offered: without tools, '{"name": "Alice"}' is an answer.
        self.call_formats = (self.tool_format,) * bool(tools) + ("builtin",) * (builtin_tools is not None)
        self.max_new_tokens = max_new_tokens
        self.sampling = sampling
        self.stops = stops
        self.compile = compile
        self.out = out
        self.log = log
        self.drafting = drafting
        self.json_schema = json_schema
        if json_schema is not None:  # a bad schema fails here, not at the first answer
            engine_room("json_constraint", "json_schema")(tokenizer, json_schema)
        if tools or builtin_tools:
            self.opening = tool_prompt([describe_function(f) for f in tools], self.tool_format,
                                       builtin_tools is not None, system, today or time.strftime("%d %B %Y"))
        else:
            self.opening = [{"role": "system", "content": system}] if system else []
        self.dialog = list(self.opening)
        # 8192 positions, doubled when a turn needs more, up to the context: 128K of 8B's cache is 16 GiB up front.
        self.cache = model.new_cache(1, min(model.args.max_seq_len, 8192))
        self.cached: list[int] = []  # the tokens whose K/V the cache holds

    def reset(self) -> None:
        """Forget the conversation (the system prompt and tools stay)."""
        self.dialog = list(self.opening)
        self.cached = []

    def send(self, text: str) -> dict:
        """Answer one user message; returns the assistant's message (role, content, tool_calls, stop). Raises
        ContextFullError (the dialog as it was) when the conversation no longer fits, and KeyboardInterrupt after
        keeping the answer so far when Ctrl-C stopped it."""
        start = len(self.dialog)
        self.dialog.append({"role": "user", "content": text})
        rounds = 0  # of calls run in this turn
        while True:
            try:
                reply = self.answer()
            except ContextFullError:
                del self.dialog[start:]
                raise
            self.dialog.append(reply)
            if not reply["tool_calls"] or rounds == self.max_tool_rounds:  # a turn ends on the model's message
                return reply
            rounds += 1
            print(file=self.out or sys.stdout)  # the call was streamed as text: the report goes below it
            for call in reply["tool_calls"]:
                result = self.call(call)
                print(f"[{call['name']}({json.dumps(call['arguments'])}) -> {result}]", file=self.out or sys.stdout)
                self.dialog.append({"role": "ipython", "content": result})
        return reply

    def answer(self) -> dict:
        """Generate the assistant's next message for the dialog as it stands."""
        prompt = self.format.encode_dialog_prompt(self.dialog, self.tool_format)
        limit = self.model.args.max_seq_len
        if len(prompt) >= limit:
            raise ContextFullError(f"the conversation ({len(prompt)} tokens) fills the {limit}-token context")
        self.cache, reuse = reuse_prefix(self.model, self.cache, self.cached, prompt, self.max_new_tokens)
        constraint = None
        if self.json_schema is not None:  # one per answer: it holds the answer's state
            constraint = engine_room("json_constraint", "json_schema")(self.tokenizer, self.json_schema,
                                                                       [self.tokenizer.eot_id])
        tokens, shown, interrupted = stream(self.model, self.tokenizer, prompt, self.max_new_tokens, self.sampling,
                                            stops=self.stops, compile=self.compile, cache=self.cache,
                                            cached_len=reuse, out=self.out, log=self.log, drafting=self.drafting,
                                            constraint=constraint)
        # The last token chosen was never fed, so is not cached; with no reply (Ctrl-C) the prompt may be part-fed.
        self.cached = (prompt + tokens)[:-1] if tokens else prompt[:reuse]
        reply = self.format.decode_assistant_message(tokens, self.call_formats)
        if not reply["tool_calls"]:
            reply["content"] = shown  # as shown: cut at a stop string
        if interrupted:
            self.dialog.append(reply)
            raise KeyboardInterrupt
        return reply

    def call(self, call: dict) -> str:
        """Run one tool call; its output, or a short error text for the model to read."""
        name = call["name"]
        args = call["arguments"]
        if name in ("brave_search", "wolfram_alpha", "photogen", "code_interpreter") and self.builtin_tools:
            output = self.builtin_tools(call)
            return "the user declined to run this tool" if output is None else output
        if name not in self.functions:
            return f"error: no function named {name!r}; the functions are: {', '.join(self.functions) or 'none'}"
        import inspect
        import typing

        fn = self.functions[name]
        try:
            bound = inspect.signature(fn).bind(**args) if isinstance(args, dict) else None
        except TypeError as e:
            return f"error: bad arguments for {name}: {args} ({e})"
        if bound is None:
            return f"error: bad arguments for {name}: {args}"
        hints = typing.get_type_hints(fn)  # resolvable: load_tools and describe_function checked
        for key, value in bound.arguments.items():
            try:
                bound.arguments[key] = convert_argument(value, hints.get(key, typing.Any))
            except ValueError as e:
                return f"error: bad arguments for {name}: {key}: {e}"
        try:
            result = fn(*bound.args, **bound.kwargs)
            return result if isinstance(result, str) else json.dumps(result, default=str)
        except Exception as e:  # noqa: BLE001 (the function's own failure, or a result JSON cannot write, goes back)
            return f"error: {name} raised {type(e).__name__}: {e}"


# -----------------------------------------------------------------------------
# Command line
#
#   python llama3.py --ckpt DIR --prompt "The capital of France is"     (base model)
#   python llama3.py --ckpt DIR --chat [--system "Be brief."]           (instruct model)
#
# The completion streams to stdout, timing to stderr. Bad input ends with a one-line message on stderr, exit code 2.
# -----------------------------------------------------------------------------


def _fail(msg: str) -> None:
    print(f"llama3.py: error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def _as_flag(message: str, opts: argparse.Namespace) -> str:
    """A message that starts with an argument's name (load_model's, generate's) with its flag's name instead."""
    name, _, rest = message.partition(" ")
    return f"--{name.replace('_', '-')} {rest}" if hasattr(opts, name) else message


def _pick_device(name: str) -> torch.device:
    if name != "auto":
        try:
            return check_device(name)
        except ValueError as e:
            _fail(f"--{e}")
    has_mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    return torch.device("cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu")


def _pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                "float16": torch.float16, "fp16": torch.float16}[name]
    # bf16 is what Llama 3 was trained in, and Meta's and the hub's files hold it, so loading needs no copy. On CPU
    # too: decode reads every weight per token, and half the bytes decoded 1.2x faster than fp32 on a CPU without
    # bf16 instructions (benchmarks/bench.py), while appendix A keeps prefill at fp32 speed. MPS runs fp16 more
    # reliably than bf16, and so do CUDA GPUs without bf16 (V100, T4).
    if device.type == "mps" or (device.type == "cuda" and not torch.cuda.is_bf16_supported()):
        return torch.float16
    return torch.bfloat16


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llama3.py", description="Run a Llama 3 / 3.1 / 3.2 / 3.3 text model.")
    add = p.add_argument
    add("--ckpt", help="a checkpoint folder (Meta's, convert.py's or Hugging Face's), a Hugging Face repo id such as "
        "meta-llama/Llama-3.2-1B-Instruct (from the hub cache, else downloaded), or a Meta model id such as "
        "Llama3.2-1B-Instruct (from ~/.llama/checkpoints); default: the one model found in those places")
    add("--prompt", help="text to continue; with --chat, one user message to answer, then exit")
    add("--max-new-tokens", type=int, default=256, help="most tokens to generate (default 256)")
    add("--temperature", type=float, default=0.6, help="sampling temperature; 0 = greedy (default 0.6, Meta's)")
    add("--top-p", type=float, default=0.9, help="nucleus sampling mass (default 0.9, Meta's)")
    add("--top-k", type=int, default=None, help="sample only among the k most likely tokens")
    add("--seed", type=int, default=None, help="random seed, for repeatable sampling")
    add("--repetition-penalty", type=float, default=1.0, metavar="F", help="discourage tokens already in the "
        "text: their logits are divided by F (multiplied where negative), as in transformers; 1.0 = off (default), "
        "1.1-1.3 is typical")
    add("--stop", action="append", default=[], metavar="TEXT",
        help="end the output at the first appearance of TEXT, which is not printed; repeatable")
    add("--explain", action="store_true", help="instead of generating, show per layer what the model would predict "
        "next if it stopped there (the logit lens) and which earlier tokens the last position attends to most")
    add("--device", default="auto", help="cpu, cuda, cuda:N or mps (default: cuda, then mps, then cpu)")
    add("--dtype", default="auto", choices=["auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16"],
        help="weight dtype (default: bfloat16; float16 on MPS and on GPUs without bf16)")
    add("--explicit-attention", action="store_true", help="attention by its definition: scores, mask, softmax "
        "(the same numbers, slower for long prompts); by default F.scaled_dot_product_attention computes it")
    add("--compile", action="store_true", help="torch.compile the decode step (meant for GPUs; on a CPU about "
        "eager's speed; the first tokens wait for compilation)")
    add("--max-seq-len", type=int, help="context positions to support (default: the model's, up to 131072 for 3.1+)")
    add("--rope-scaling-factor", type=float, help="override the Llama 3.1 RoPE scaling factor (8; 32 for 3.2 1B/3B)")
    add("--tokenizer", default=None, help="tokenizer.model or tokenizer.json (default: CKPT's tokenizer.model, "
        "else original/tokenizer.model, else tokenizer.json)")
    add("--chat", action="store_true", help="interactive chat in the Llama 3 chat format (instruct models); "
        "/reset clears the history, Ctrl-D quits")
    add("--system", default=None, help="system message for --chat")
    add("--tools", metavar="FILE.py", help="with --chat: offer the public functions of FILE.py to the model as "
        "tools (Llama 3.1+ Instruct); their docstrings and typed parameters describe them")
    add("--builtin-tools", action="store_true", help="with --chat: offer Meta's built-in tools (brave_search, "
        "wolfram_alpha, code_interpreter); you type each call's output")
    add("--quantize", choices=("int8", "int4"), default=None, help="int8 or int4 weights, quantized while loading: "
        "about 1/2 or 1/3 of bf16's memory, and decoding faster on CPU (appendix D)")
    add("--perplexity", metavar="FILE", help="instead of generating, print the model's perplexity on the text of "
        "FILE, in windows of --max-seq-len tokens (default 2048) every half window")
    add("--draft", metavar="CKPT", help="speculative decoding: a smaller model with the same vocabulary (any name "
        "--ckpt takes, loaded with the same --dtype, --device and --quantize) drafts tokens the model checks; the "
        "text is the model's own")
    add("--speculate-k", type=int, metavar="K", help="with --draft: tokens drafted a round (default 5)")
    add("--prompt-lookup", type=int, metavar="K", help="speculative decoding without a draft model: draft up to K "
        "tokens copied from where the last tokens appeared before in the text")
    add("--tool-format", default=None, help="how the model writes custom calls: json (3.1, 3.3), function_tag or "
        "python_list (3.2 1B/3B); default: by the model's shape")
    add("--serve", nargs="?", const="127.0.0.1:8000", default=None, metavar="HOST:PORT", help="serve OpenAI's API "
        "(/v1/chat/completions, /v1/completions, /v1/models) at HOST:PORT (default 127.0.0.1:8000, this machine "
        "only); request fields override the sampling flags (appendix E)")
    add("--api-key", default=None, metavar="KEY", help="with --serve: every request needs Authorization: Bearer KEY")
    add("--timeout", type=float, default=None, metavar="SECONDS", help="with --serve: a client that neither sends "
        "nor reads for this long loses its request, and the next one starts (default 60)")
    add("--max-batch", type=int, default=None, metavar="N", help="with --serve: decode up to N requests together, "
        "one read of the weights per step for all of them; more wait in arrival order (default 8)")
    add("--json-schema", metavar="FILE", help="with --prompt or --chat: the answer is JSON valid for the JSON schema "
        "in FILE, by constrained decoding (appendix F)")
    add("--json", action="store_true", help="with --prompt or --chat: the answer is a JSON object (appendix F)")
    p.error = _fail  # one line, exit code 2, instead of argparse's usage block
    return p


def main(argv: list[str] | None = None) -> None:
    from tokenizer import TOOL_FORMATS, ChatFormat, Tokenizer, TokenizerError

    opts = _parser().parse_args(argv)
    if opts.prompt is None and not opts.chat and not opts.perplexity and not opts.serve:
        _fail("--prompt is required (or --chat for an interactive chat, --serve for a server)")
    text = None
    if opts.perplexity:
        try:
            text = Path(opts.perplexity).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            _fail(f"--perplexity {opts.perplexity}: {getattr(e, 'strerror', None) or e}")
    for flag in ("--system", "--tools", "--builtin-tools", "--tool-format"):
        if getattr(opts, flag[2:].replace("-", "_")) and not opts.chat and not (opts.serve and flag == "--tool-format"):
            _fail(f"{flag} needs --chat")
    for flag in ("--api-key", "--timeout", "--max-batch"):
        if getattr(opts, flag[2:].replace("-", "_")) is not None and not opts.serve:
            _fail(f"{flag} needs --serve")
    if opts.timeout is not None and not 0 < opts.timeout < math.inf:
        _fail(f"--timeout must be a number of seconds > 0, not {opts.timeout}")
    if opts.max_batch is not None and opts.max_batch < 1:
        _fail(f"--max-batch must be >= 1, not {opts.max_batch}")
    if opts.tool_format is not None and opts.tool_format not in TOOL_FORMATS:
        _fail(f"--tool-format must be one of {', '.join(TOOL_FORMATS)}, not {opts.tool_format!r}")
    if "" in opts.stop:
        _fail("--stop needs a non-empty TEXT")
    if opts.draft is not None and opts.prompt_lookup is not None:
        _fail("--draft and --prompt-lookup exclude each other: one drafter at a time")
    for flag, k in (("--speculate-k", opts.speculate_k), ("--prompt-lookup", opts.prompt_lookup)):
        if k is not None and k < 1:
            _fail(f"{flag} must be >= 1, not {k}")
    if opts.compile and (opts.draft is not None or opts.prompt_lookup is not None):
        _fail("--compile decodes one token a step; it does not go with --draft or --prompt-lookup")
    speculating = opts.draft is not None or opts.prompt_lookup is not None
    if speculating and (opts.serve or opts.explain or opts.perplexity):
        _fail("--draft and --prompt-lookup speed up --prompt and --chat, not --serve, --explain or --perplexity")
    if opts.speculate_k is not None and opts.draft is None:
        _fail("--speculate-k needs --draft (with --prompt-lookup K, K is the number drafted)")
    json_flag = "--json-schema" if opts.json_schema is not None else "--json" if opts.json else None
    if opts.json and opts.json_schema is not None:
        _fail("--json and --json-schema exclude each other: --json is the schema {\"type\": \"object\"}")
    if json_flag and (opts.prompt is None and not opts.chat or opts.serve or opts.explain or opts.perplexity):
        _fail(f"{json_flag} constrains the answer of --prompt or --chat (not --serve, --explain or --perplexity)")
    if json_flag and speculating:
        _fail(f"{json_flag} decodes one token a step; it does not go with --draft or --prompt-lookup")
    sampling = Sampling(opts.temperature, opts.top_p, opts.top_k, opts.repetition_penalty, opts.seed)
    try:
        check_generation_args(opts.max_new_tokens, opts.temperature, opts.top_p, opts.top_k, opts.repetition_penalty)
        tools = load_tools(opts.tools) if opts.tools else []
    except (ValueError, OSError) as e:
        _fail(_as_flag(str(e), opts))
    try:
        ckpt = resolve_checkpoint(opts.ckpt)
        CheckpointReader(ckpt)  # a folder that holds no checkpoint says so before its tokenizer is missed
        tokenizer_path = opts.tokenizer or find_tokenizer(ckpt)
        if tokenizer_path is None:
            _fail(f"{ckpt}: no tokenizer.model, original/tokenizer.model or tokenizer.json (pass --tokenizer PATH)")
        tokenizer = Tokenizer(tokenizer_path)
    except (CheckpointError, TokenizerError) as e:
        _fail(str(e))
    if opts.draft is not None:  # a draft that is not there is said before the model loads, not after
        try:
            opts.draft = resolve_checkpoint(opts.draft)
            CheckpointReader(opts.draft)
        except CheckpointError as e:
            _fail(f"--draft: {e}")

    try:  # a flag whose appendix this copy of the file lacks: said before the model loads
        if opts.compile:
            engine_room("compiled_decode", "--compile")
        if opts.quantize:
            engine_room("quantize_weights", "--quantize")
        listening = engine_room("serve_socket", "--serve")(opts.serve) if opts.serve else None  # bound before loading
        json_schema = {"type": "object"} if json_flag else None  # --json: any object
        if opts.json_schema is not None:
            json_schema = engine_room("read_json_schema", "--json-schema")(opts.json_schema)
        if json_flag:
            engine_room("json_constraint", json_flag)
    except ValueError as e:
        _fail(str(e))
    tokens = tokenizer.encode(text, bos=True, eos=False) if text is not None else []
    if text is not None and len(tokens) < 2:  # before loading a model for nothing
        _fail(f"--perplexity {opts.perplexity}: no text to score")
    device = _pick_device(opts.device)
    read = input
    tensor_parallel = int(os.environ.get("WORLD_SIZE", "1")) > 1  # started by torchrun with N processes
    if tensor_parallel and (opts.draft is not None or opts.prompt_lookup is not None):
        _fail("--draft and --prompt-lookup run in one process, not under torchrun")
    if tensor_parallel:  # appendix B: this process is one of N, each holding 1/N of the model
        try:
            device = engine_room("join_process_group", "torchrun")(device)
            read = engine_room("read_on_rank_0", "torchrun")
            # Every rank holds the same full logits, so the same seed draws the same token everywhere.
            sampling = replace(sampling, seed=engine_room("shared_seed", "torchrun")(opts.seed, device))
        except ValueError as e:
            _fail(str(e))
    t0 = time.perf_counter()
    try:
        model = load_model(ckpt, device, _pick_dtype(opts.dtype, device), max_seq_len=opts.max_seq_len,
                           rope_scaling_factor=opts.rope_scaling_factor, use_sdpa=not opts.explicit_attention,
                           tensor_parallel=tensor_parallel, quantize=opts.quantize)
    except (CheckpointError, ValueError, OSError) as e:
        _fail(_as_flag(str(e), opts))
    except RuntimeError as e:  # e.g. CUDA out of memory
        _fail(f"loading {ckpt} on {device}: {str(e).splitlines()[0]}")
    if model.args.vocab_size < tokenizer.n_words:
        _fail(f"{ckpt} has vocab_size={model.args.vocab_size}, fewer than the tokenizer's {tokenizer.n_words} ids")
    quantized = f" with {opts.quantize} weights" if opts.quantize else ""
    print(f"loaded {ckpt} in {time.perf_counter() - t0:.1f}s: {parameter_count(model.args) / 1e9:.2f}B parameters, "
          f"{str(model.norm.weight.dtype).removeprefix('torch.')}{quantized} on {device}", file=sys.stderr)
    drafting = Drafting(speculate_k=opts.speculate_k or 5, prompt_lookup=opts.prompt_lookup)
    if opts.draft is not None:
        try:
            draft = load_model(opts.draft, device, _pick_dtype(opts.dtype, device), quantize=opts.quantize)
        except (CheckpointError, ValueError, OSError) as e:
            _fail(f"--draft {opts.draft}: {e}")
        if draft.args.vocab_size != model.args.vocab_size:
            _fail(f"--draft {opts.draft}: its vocabulary of {draft.args.vocab_size} tokens differs from the "
                  f"model's {model.args.vocab_size}; a draft must share the model's tokenizer")
        if draft.args.max_seq_len < model.args.max_seq_len:
            _fail(f"--draft {opts.draft}: its {draft.args.max_seq_len} positions are fewer than the model's "
                  f"{model.args.max_seq_len} (lower --max-seq-len)")
        print(f"loaded draft {opts.draft}: {parameter_count(draft.args) / 1e9:.2f}B parameters", file=sys.stderr)
        drafting = replace(drafting, draft=draft)

    if opts.compile and device.type == "cpu":
        _note("--compile on a CPU: the compiled step decoded at 1.02-1.06x eager's speed once compiled, after "
              "8-50 s of compiling (benchmarks/README.md); it pays only for long generations")
    try:  # generate()'s NaN or inf logits (FloatingPointError), in a chat or a completion, end in one line too
        if opts.serve:  # appendix E
            name = opts.ckpt if opts.ckpt and not Path(opts.ckpt).exists() else ckpt.name  # a repo id, or the folder
            try:
                engine_room("serve", "--serve")(model, tokenizer, listening, name, api_key=opts.api_key,
                                                tool_format=opts.tool_format, sampling=sampling,
                                                timeout=opts.timeout or 60.0, max_batch=opts.max_batch or 8)
            except ValueError as e:
                _fail(str(e))
        elif text is not None:
            window = opts.max_seq_len or min(PERPLEXITY_WINDOW, model.args.max_seq_len)  # perplexity()'s default
            try:
                nll, ppl = perplexity(model, tokens, window, log=sys.stderr if sys.stderr.isatty() else None)
            except ValueError as e:
                _fail(f"--perplexity {opts.perplexity}: {e}")
            print(f"perplexity {ppl:.4f} (mean NLL {nll:.4f} nats/token) over the {len(tokens):,} tokens of "
                  f"{opts.perplexity}, windows of {window} tokens every {max(1, window // 2)}")
        elif opts.explain:
            if opts.prompt is None:
                _fail("--explain needs --prompt")
            dialog = [{"role": "system", "content": opts.system}] if opts.system else []
            prompt = (ChatFormat(tokenizer).encode_dialog_prompt([*dialog, {"role": "user", "content": opts.prompt}])
                      if opts.chat else tokenizer.encode(opts.prompt, bos=True, eos=False))
            try:
                print_explanation(model, tokenizer, prompt)
            except ValueError as e:
                _fail(str(e))
        elif opts.chat:
            def typed_tool_output(call: dict) -> str | None:
                print(f"[built-in tool call: {call['name']} {json.dumps(call['arguments'])}; type its output, "
                      "or an empty line to decline]", file=sys.stderr)
                return read("tool> ") or None
            chat = Chat(model, tokenizer, opts.system, tools=tools, tool_format=opts.tool_format, sampling=sampling,
                        builtin_tools=typed_tool_output if opts.builtin_tools else None,
                        max_new_tokens=opts.max_new_tokens, stops=opts.stop, compile=opts.compile, drafting=drafting,
                        json_schema=json_schema)
            if opts.prompt is None:
                run_chat(chat, read)
            else:
                try:
                    chat.send(opts.prompt)
                except ContextFullError as e:
                    _fail(f"{e}{'; raise --max-seq-len' * (opts.max_seq_len is not None)}")
                except KeyboardInterrupt:
                    raise SystemExit(130) from None
                print()
        else:
            if opts.prompt != opts.prompt.rstrip():
                print("llama3.py: warning: the prompt ends in whitespace; Llama 3 usually puts spaces at the start "
                      "of the next token, so this prompt is unlike its training text", file=sys.stderr)
            prompt = tokenizer.encode(opts.prompt, bos=True, eos=False)
            if len(prompt) >= model.args.max_seq_len:
                _fail(f"--prompt is {len(prompt)} tokens, too long for the {model.args.max_seq_len}-position context"
                      + " (raise --max-seq-len)" * (opts.max_seq_len is not None))
            constraint = None
            if json_schema is not None:
                constraint = engine_room("json_constraint", json_flag)(tokenizer, json_schema)
            _, _, interrupted = stream(model, tokenizer, prompt, opts.max_new_tokens, sampling, stops=opts.stop,
                                       compile=opts.compile, drafting=drafting, constraint=constraint)
            print()
            if interrupted:
                raise SystemExit(130)
    except FloatingPointError as e:
        _fail(str(e))
    if tensor_parallel:
        dist.barrier()  # no rank tears down while another still talks to it
        dist.destroy_process_group()


def parameter_count(args: ModelArgs) -> int:
    """The model's parameters, from its config: however they are held (quantized, or split over processes)."""
    attention = args.dim * args.head_dim * (2 * args.n_heads + 2 * args.n_kv_heads)  # wq, wo; wk, wv
    feed_forward = 3 * args.dim * args.ffn_hidden_dim  # w1, w2, w3
    per_layer = attention + feed_forward + 2 * args.dim  # and the two RMSNorm weights
    embeddings = args.vocab_size * args.dim * (1 if args.tie_word_embeddings else 2)  # tok_embeddings, output
    return args.n_layers * per_layer + embeddings + args.dim  # and the final norm


def print_explanation(model: Transformer, tokenizer: Tokenizer, prompt: list[int]) -> None:
    """--explain: one line per layer, as explain() returns it; the last line is the model's prediction."""
    for i, row in enumerate(explain(model, prompt)):
        top = "  ".join(f"{tokenizer.decode([t])!r} {100 * p:.3g}%" for t, p in row["top"])
        attends = "  ".join(f"{tokenizer.decode([prompt[j]])!r}@{j} {w:.2f}" for j, w in row["attends"][:3])
        print(f"layer {i:2d}  next: {top}  | attends to: {attends}")


def read_message(read: Callable[[str], str]) -> str:
    """One chat message: a line, or the lines between two lines of three double quotes (as ollama reads them)."""
    first = read("> ").strip()
    if not first.startswith('"""'):
        return first
    if len(first) > 5 and first.endswith('"""'):  # """a message""" on one line
        return first[3:-3]
    lines = [first[3:]] if first != '"""' else []  # text may follow the opening quotes, as in ollama
    try:
        while not (line := read(". ")).rstrip().endswith('"""'):
            lines.append(line)
        lines.append(line.rstrip()[:-3])
    except EOFError:  # Ctrl-D inside a message sends what was typed, then quits
        if not lines:
            raise
        print()
    return "\n".join(lines).strip("\n")


def run_chat(chat: Chat, read: Callable[[str], str] = input, log: TextIO | None = None) -> None:
    """The interactive loop around chat: /reset clears the history, Ctrl-D quits, Ctrl-C ends an
    answer (at the prompt, it raises KeyboardInterrupt)."""
    try:
        import readline  # noqa: F401 (input() then edits lines and keeps a history, where the platform has it)
    except ImportError:
        pass
    log = log or sys.stderr
    print('chat: /reset clears the history, """ starts and ends a message of several lines, Ctrl-D quits', file=log)
    while True:
        try:
            text = read_message(read)
        except EOFError:  # Ctrl-D; Ctrl-C here ends the program (exit 130 on the command line)
            print()  # after the prompt, on stdout
            return
        if text.strip() == "/reset":
            chat.reset()
            print("(history cleared)", file=log)
        elif text.strip():
            try:
                chat.send(text)
            except ContextFullError as e:
                print(f"{e}: /reset to start a new conversation", file=log)
            except KeyboardInterrupt:
                pass  # Ctrl-C ends the answer, not the chat
            print(file=chat.out or sys.stdout)


# =============================================================================
# Appendix A: CPU speed paths
#
# Part 1's nn.Linear and SDPA are the whole story on a GPU. On a CPU, torch's
# own kernels leave speed on the table in some cases, and which cases depends
# on the instructions the CPU has: each path below is taken only at the levels
# where benchmarks/cpu_paths.py measured it faster than torch's own kernel
# (figures in benchmarks/README.md); elsewhere torch's kernels run.
# =============================================================================

# A level is the instruction set torch's CPU kernels use on this machine, lowest first:
#   avx2         AVX2 and FMA, no AVX-512: most laptops (Intel Core, AMD Zen 2 and 3); bf16 products are emulated
#   avx512       AVX-512 without bf16 instructions (Intel Skylake to Ice Lake servers); bf16 products converted
#   avx512_bf16  AVX512-BF16 without AMX (AMD Zen 4 and 5, Intel Cooper Lake)
#   amx          AMX-BF16 tiles (Intel Sapphire Rapids and later)
# Each path's levels: where benchmarks/cpu_paths.py measured it faster, on a CPU of that level or with a higher
# one's kernels capped to it (cpu_level). Left out where measured alike or slower: row blocks at amx; bf16 via
# fp32 wherever bf16 instructions exist (3-5x slower there); the explicit fp32 decode at avx2 (alike); the explicit
# bf16 decode at amx (SDPA 2.4x faster); the split bf16 prefill at avx2 and amx (alike).
CPU_LEVELS = ("avx2", "avx512", "avx512_bf16", "amx")
CPU_PATHS = {"row_blocks": ("avx2", "avx512", "avx512_bf16"), "bf16_via_fp32": ("avx2", "avx512"),
             "explicit_decode_fp32": ("avx512", "avx512_bf16", "amx"),
             "explicit_decode_bf16": ("avx2", "avx512", "avx512_bf16"),
             "split_prefill_fp32": ("avx2", "avx512", "avx512_bf16", "amx"),
             "split_prefill_bf16": ("avx512", "avx512_bf16")}
# What oneDNN's cap (ONEDNN_MAX_CPU_ISA) allows, by the start of its value; AVX10.1 includes AVX512-BF16.
ONEDNN_CAPS = {"SSE": "avx2", "AVX2": "avx2", "AVX512_CORE_BF16": "avx512_bf16", "AVX512_CORE_AMX": "amx",
               "AVX10_1_512_AMX": "amx", "AVX10_1_512": "avx512_bf16", "AVX512": "avx512"}


def cpu_level() -> str | None:
    """This machine's level in CPU_LEVELS, as torch's kernels will see it: the lowest of the CPU's own instructions,
    ATen's (ATEN_CPU_CAPABILITY caps it) and oneDNN's, whose bf16 products decide the bf16 levels
    (ONEDNN_MAX_CPU_ISA caps it). None for a CPU without AVX2 (ARM, Apple, an old x86): never measured."""
    capability = torch.backends.cpu.get_cpu_capability()  # "AVX512", "AVX2" or "DEFAULT" on x86
    if capability not in ("AVX2", "AVX512"):
        return None
    level = capability.lower()
    if level == "avx512" and getattr(torch.cpu, "_is_amx_tile_supported", bool)():
        level = "amx"
    elif level == "avx512" and getattr(torch.cpu, "_is_avx512_bf16_supported", bool)():
        level = "avx512_bf16"
    onednn = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "ALL").upper()
    cap = next((lvl for prefix, lvl in ONEDNN_CAPS.items() if onednn.startswith(prefix)), level)
    return min(level, cap, key=CPU_LEVELS.index)


def cpu_paths(level: str | None) -> frozenset[str]:
    """The paths of CPU_PATHS measured faster at this level; none for None."""
    return frozenset(path for path, levels in CPU_PATHS.items() if level in levels)


def bf16_linear_in_fp32(x: torch.Tensor, w: torch.Tensor, block_numel: int = 1 << 20) -> torch.Tensor:
    """F.linear(x, w) for a bf16 w, computed in fp32 one block of w's rows (block_numel elements) at a time.
    On x86 without bf16 matrix instructions (AVX512-BF16 or AMX), a bf16 product of many rows ran ~4x slower
    than fp32; bf16 kernels accumulate in fp32 too, so only the summation order changes."""
    rows_per_block = max(1, block_numel // w.shape[1])
    # One fp32 buffer, allocated per call (keeping one saved nothing measurable) and reused for every block:
    # a 4 MB block stays in cache, which made prefill 1.2-1.4x faster than converting the whole matrix at once.
    buffer = torch.empty(min(w.numel(), rows_per_block * w.shape[1]), dtype=torch.float32, device=w.device)
    x32 = x.float()
    out = [F.linear(x32, buffer[: block.numel()].view(block.shape).copy_(block))
           for block in w.split(rows_per_block)]  # (..., rows_per_block) each
    return torch.cat(out, dim=-1).to(x.dtype)  # (..., out_features)


def row_block_linear(x: torch.Tensor, w: torch.Tensor, n_blocks: int = 16) -> torch.Tensor:
    """F.linear(x, w) as one batched matmul over n_blocks blocks of w's rows (w's rows divisible by it). On AMD
    EPYC, F.linear's fp32 product of a few rows (decode) kept one of two cores mostly idle; torch spreads this
    matmul over its threads block by block, which ran decode's products 1.3-1.6x faster."""
    blocks = w.view(n_blocks, -1, w.shape[1]).transpose(1, 2)  # (n_blocks, in, out / n_blocks), a view
    out = torch.matmul(x.reshape(1, -1, x.shape[-1]), blocks)  # (n_blocks, rows, out / n_blocks)
    return out.transpose(0, 1).reshape(*x.shape[:-1], w.shape[0])  # (..., out)


def row_block_count(out_features: int, in_features: int, least: int = 16, block_numel: int = 1 << 20) -> int | None:
    """How many blocks row_block_linear cuts a weight (out_features, in_features) into: the fewest multiple of
    `least` that divides out_features and leaves at most block_numel elements a block; None where none does."""
    need = -(-out_features * in_features // block_numel)  # ceil
    counts = range(least, out_features + 1, least)
    return next((n for n in counts if n >= need and out_features % n == 0), None)


class CPULinear(nn.Linear):
    """A bias-free nn.Linear that takes the paths above that its CPU level has (`paths`)."""

    FP32_FROM_ROWS = 16  # via fp32 overtook bf16 between 8 and 16 rows; fewer are memory-bound: bf16 reads less
    ROW_BLOCKS = 16  # at least: 4 to 32 blocks measured alike on 2 cores
    # At most: for several rows, blocks of 16M elements (the 1B output layer's 128,256 rows in 16) ran 2x slower
    # than blocks of 1M (4 MB); one row alike (benchmarks/README.md, Zen 3 row blocks).
    BLOCK_NUMEL = 1 << 20

    def __init__(self, in_features: int, out_features: int, paths: frozenset[str] = frozenset(CPU_PATHS)):
        super().__init__(in_features, out_features, bias=False)
        self.paths = paths
        self.row_blocks = row_block_count(out_features, in_features, self.ROW_BLOCKS, self.BLOCK_NUMEL)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if w.device.type != "cpu":
            return F.linear(x, w)
        # Inference only (no grad): the fp32 copy of w is not a parameter autograd could train.
        if ("bf16_via_fp32" in self.paths and w.dtype == torch.bfloat16 and not torch.is_grad_enabled()
                and x.numel() // x.shape[-1] >= self.FP32_FROM_ROWS):  # x's rows
            return bf16_linear_in_fp32(x, w)
        if "row_blocks" in self.paths and w.dtype == torch.float32 and self.row_blocks:
            return row_block_linear(x, w, self.row_blocks)
        return F.linear(x, w)


class CPUAttention(Attention):
    """Attention whose SDPA setting takes its CPU level's routes (`paths`): the explicit product for one decoded
    token, two unmasked kernel calls merged by their softmax sums for a causal prefill chunk, else part 1's sdpa()."""

    paths = frozenset(CPU_PATHS)  # use_cpu_speed_paths sets each instance's

    def sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        B, _, T, head_dim = q.shape
        past = k.shape[2] - T  # cached positions before this chunk
        if q.device.type != "cpu":  # a model moved with .to() after loading
            return super().sdpa(q, k, v, mask)
        # One decoded token has only S scores to store, so fusing saves nothing: SDPA's CPU kernel was slower
        # than explicit(), the definition, which is exact for any mask.
        dtype = {torch.float32: "fp32", torch.bfloat16: "bf16"}.get(q.dtype)
        if T == 1 and f"explicit_decode_{dtype}" in self.paths:
            return self.explicit(q, k, v, mask)
        # The CPU kernel behind SDPA, which also returns each query's log-sum-exp of scores.
        flash = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
        if T == 1 or f"split_prefill_{dtype}" not in self.paths or flash is None or not is_causal_mask(mask, past):
            return super().sdpa(q, k, v, mask)
        # Under the causal mask each query sees the `past` cached keys and its chunk's keys up to itself. Given a
        # mask, the kernel reads it for every block of every head (1.2x one causal call; README.md, long prompts),
        # so each part goes unmasked: the chunk's own keys with is_causal (its top-left triangle is right for T
        # queries over the same T keys), the past with no mask. The own K/V heads are copied n_rep times (T
        # positions, little to copy): stacking query heads as rows, as below, would misplace the triangle.
        own_k, own_v = (x[:, :, past:].repeat_interleave(self.n_rep, 1) for x in (k, v))  # (B, n_heads, T, hd)
        out, lse = flash(q, own_k, own_v, 0.0, True)  # (B, n_heads, T, head_dim); lse (B, n_heads, T) fp32
        if past == 0:
            return out
        # No mask over the past: each group's n_rep query heads are rows against their K/V head, as in explicit().
        grouped = q.reshape(B, self.n_kv_heads, self.n_rep * T, head_dim)
        out_past, lse_past = flash(grouped, k[:, :, :past], v[:, :, :past], 0.0, False)
        # Each call normalised its softmax by its own sum Z of exp(scores), lse = log Z; over all keys the past's
        # share is Z_past / (Z_past + Z_own) = sigmoid(lse_past - lse). In bf16 or fp16 the partial outputs are
        # rounded before the mix: up to one more unit in the last place.
        share = torch.sigmoid(lse_past.reshape(B, self.n_heads, T) - lse).unsqueeze(-1)  # (B, n_heads, T, 1)
        out_past = out_past.reshape(B, self.n_heads, T, head_dim)
        return torch.lerp(out.float(), out_past.float(), share).to(q.dtype)  # (B, n_heads, T, head_dim)


def is_causal_mask(mask: torch.Tensor | None, past: int) -> bool:
    """Whether mask is Transformer.forward's causal (T, S) mask: zeros over the `past` cached
    columns, -inf above the diagonal of the rest. Costs one read of the mask."""
    if mask is None or mask.dim() != 2 or mask.shape[1] != mask.shape[0] + past or not mask.is_floating_point():
        return False
    T = mask.shape[0]
    own = torch.full((T, T), float("-inf"), device=mask.device, dtype=mask.dtype).triu(1)
    return not mask[:, :past].any() and torch.equal(mask[:, past:], own)


def use_cpu_speed_paths(model: nn.Module, paths: frozenset[str] | None = None) -> nn.Module:
    """Swap every plain bias-free nn.Linear in model for a CPULinear holding the same weight, and every Attention
    for a CPUAttention (the same module with another sdpa method), taking `paths` (default: the CPU_PATHS of this
    CPU's level; none, so no swap, on a CPU never measured). Returns model, changed in place; layers of other
    classes (tensor parallelism's) stay."""
    paths = cpu_paths(cpu_level()) if paths is None else frozenset(paths)
    if not paths:
        return model
    for parent in list(model.modules()):
        if type(parent) is Attention:
            parent.__class__ = CPUAttention  # same parameters and state; only the method differs
            parent.paths = paths
        for name, child in parent.named_children():
            if type(child) is nn.Linear and child.bias is None:
                with torch.device("meta"):  # no storage: the weight is the old layer's
                    fast = CPULinear(child.in_features, child.out_features, paths)
                fast.weight = child.weight  # the same Parameter, so tied weights stay tied
                setattr(parent, name, fast)
    return model


# =============================================================================
# Appendix B: tensor parallelism: torchrun --nproc-per-node N llama3.py --ckpt DIR ...
#
# 70B needs ~140 GB in bf16 and 405B ~810 GB, beyond one GPU. Split N ways as
# Meta trained (Megatron-LM, Shoeybi et al. 2019), each of N processes holds 1/N
# of every matrix, and each sub-layer needs one all-reduce:
#
#   x (replicated on N ranks)            x (replicated on N ranks)
#   | wq,wk,wv rows: rank r's heads      | w1,w3 rows: 1/N of hidden_dim   column-parallel: rank r holds
#   | attention on its own heads         | silu(w1 x) * w3 x               a horizontal strip, no talk
#   | wo columns: partial sums           | w2 columns: partial sums        row-parallel: a vertical strip
#   all-reduce (sum) -> x + attention    all-reduce (sum) -> h + ffn
#
# tok_embeddings and output are split by vocabulary: each rank embeds the tokens
# in its range (zeros elsewhere; an all-reduce sums them) and computes their
# logits, gathered into the full row. Norms are replicated. With more ranks than
# K/V heads (405B on 16 GPUs, 8 K/V heads) each K/V head is replicated on
# N / n_kv_heads ranks, as Meta's 16-shard release does. shard_model swaps in
# the classes below, so part 1 has no branch for this; torchrun's helpers follow.
# =============================================================================


class RowParallelLinear(nn.Linear):
    """Holds a block of the weight's input columns; sums the partial products of all ranks."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        dist.all_reduce(out)
        return out


class VocabParallelEmbedding(nn.Embedding):
    """Holds rows [start, start + num_embeddings) of the embedding."""

    def __init__(self, num_embeddings: int, dim: int, start: int):
        super().__init__(num_embeddings, dim, _weight=torch.empty(num_embeddings, dim))  # no init: it is loaded
        self.start = start

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        local = tokens - self.start
        outside = (local < 0) | (local >= self.num_embeddings)
        h = F.embedding(local.clamp(0, self.num_embeddings - 1), self.weight).masked_fill(outside[..., None], 0.0)
        dist.all_reduce(h)  # (B, T, dim): each token's row from the rank that holds it
        return h


class VocabParallelOutput(nn.Linear):
    """Holds this rank's vocabulary rows of the output layer; gathers all ranks' logits."""

    def __init__(self, dim: int, vocab_rows: int):
        super().__init__(dim, vocab_rows, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        local = super().forward(h).contiguous()  # (B, T, vocab_size / N)
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, local)
        return torch.cat(parts, dim=-1)  # (B, T, vocab_size)


def shard_model(model: Transformer, rank: int, world_size: int) -> dict[str, tuple[int | None, int, int]]:
    """Turn a model built on the "meta" device into rank's 1/world_size part of it. Returns, for each state_dict
    name, the slice of the full tensor this rank holds: (dim, start, stop), or (None, 0, 0) for a replicated norm."""
    a = model.args
    n_kv = a.n_kv_heads
    if a.n_heads % world_size or (n_kv % world_size and world_size % n_kv):
        raise ValueError(f"{world_size} processes can't split n_heads={a.n_heads}, n_kv_heads={n_kv}: use a "
                         f"number that divides n_heads and divides or is a multiple of n_kv_heads")
    for what, n in (("vocab_size", a.vocab_size), ("SwiGLU width", a.ffn_hidden_dim)):
        if n % world_size:
            raise ValueError(f"{world_size} processes can't split {what}={n} evenly")
    heads = a.n_heads // world_size  # this rank's query heads
    kv_heads = max(1, n_kv // world_size)  # and K/V heads
    kv_start = rank * n_kv // world_size  # with replicated K/V heads, rank r reads head r // (N / n_kv_heads)
    hidden = a.ffn_hidden_dim // world_size
    vocab = a.vocab_size // world_size
    hd = a.head_dim
    with torch.device("meta"):
        for layer in model.layers:
            att = layer.attention
            att.n_heads = heads
            att.n_kv_heads = kv_heads
            att.n_rep = heads // kv_heads
            att.wq = nn.Linear(a.dim, heads * hd, bias=False)
            att.wk = nn.Linear(a.dim, kv_heads * hd, bias=False)
            att.wv = nn.Linear(a.dim, kv_heads * hd, bias=False)
            att.wo = RowParallelLinear(heads * hd, a.dim)
            layer.feed_forward.w1 = nn.Linear(a.dim, hidden, bias=False)
            layer.feed_forward.w2 = RowParallelLinear(hidden, a.dim)
            layer.feed_forward.w3 = nn.Linear(a.dim, hidden, bias=False)
        model.tok_embeddings = VocabParallelEmbedding(vocab, a.dim, start=rank * vocab)
        model.output = VocabParallelOutput(a.dim, vocab)
        if a.tie_word_embeddings:
            model.output.weight = model.tok_embeddings.weight
    # This rank's [start, stop) of rows (dim 0) or columns (dim 1): its query heads' rows of wq (columns of wo),
    # its K/V heads' rows of wk and wv, its share of the SwiGLU width and of the vocabulary.
    q = (rank * heads * hd, (rank + 1) * heads * hd)
    kv = (kv_start * hd, (kv_start + kv_heads) * hd)
    hid = (rank * hidden, (rank + 1) * hidden)
    voc = (rank * vocab, (rank + 1) * vocab)
    per_layer = {"attention.wq": (0, *q), "attention.wk": (0, *kv), "attention.wv": (0, *kv), "attention.wo": (1, *q),
                 "feed_forward.w1": (0, *hid), "feed_forward.w3": (0, *hid), "feed_forward.w2": (1, *hid),
                 "attention_norm": (None, 0, 0), "ffn_norm": (None, 0, 0)}
    slices = {f"layers.{i}.{name}.weight": s for i in range(len(model.layers)) for name, s in per_layer.items()}
    return slices | {"tok_embeddings.weight": (0, *voc), "output.weight": (0, *voc), "norm.weight": (None, 0, 0)}


def join_process_group(device: torch.device) -> torch.device:
    """Under torchrun: join the process group (nccl on GPUs, one GPU per process; gloo on CPU); only rank 0 prints."""
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if dist.get_rank() != 0:
        sys.stdout = sys.stderr = open(os.devnull, "w")  # noqa: SIM115 (open for the process's lifetime)
    return device


def shared_seed(seed: int | None, device: torch.device) -> int:
    """Rank 0's seed (a random one if none was given), the same on every rank."""
    import random
    box = torch.tensor([seed if seed is not None else random.randrange(2**62)], device=device)
    dist.broadcast(box, src=0)
    return int(box)


def read_on_rank_0(prompt: str) -> str:
    """input() on rank 0, shared with every rank; EOFError everywhere when rank 0 sees one."""
    box = [None]
    if dist.get_rank() == 0:
        try:
            box = [input(prompt)]
        except (EOFError, KeyboardInterrupt):
            pass
    dist.broadcast_object_list(box, src=0)
    if box[0] is None:
        raise EOFError
    return box[0]


# =============================================================================
# Appendix C: compiled decoding for GPUs (--compile)
#
# A decode step launches ~20 small kernels per layer; on a GPU launching them
# can take longer than running them. A CUDA graph records a whole step once and
# replays it with one launch, but only for fixed shapes and memory addresses,
# while part 1's step reads a cache slice that grows by one position per token.
# So this step, like gpt-fast's, attends over the whole preallocated cache with
# a mask of the positions written so far, takes its position as a tensor and
# writes K/V in place. torch.compile's "reduce-overhead" mode records it as a
# CUDA graph, once per model, over one cache the model keeps (static_cache);
# every later generate call replays it.
# =============================================================================


def decode_step_static(model: Transformer, token: torch.Tensor, pos: torch.Tensor,
                       cache: list[KVCache]) -> torch.Tensor:
    """model(token, pos, cache, last_only=True)[:, -1] with fixed shapes: token (B, 1), pos a 0-d tensor."""
    B = token.shape[0]
    L = cache[0].k.shape[2]  # the cache's positions
    angles = pos.float() * rope_frequencies(model.args, token.device)  # (head_dim // 2,)
    cos, sin = angles.cos()[None], angles.sin()[None]  # (1, head_dim // 2)
    visible = (torch.arange(L, device=token.device) <= pos)[None]  # (1, L): the positions written so far
    h = model.tok_embeddings(token)  # (B, 1, dim)
    for layer, c in zip(model.layers, cache):
        a = layer.attention
        x = layer.attention_norm(h)
        q = apply_rotary_emb(a.wq(x).view(B, 1, a.n_heads, a.head_dim), cos, sin).transpose(1, 2)
        k = apply_rotary_emb(a.wk(x).view(B, 1, a.n_kv_heads, a.head_dim), cos, sin).transpose(1, 2)
        v = a.wv(x).view(B, 1, a.n_kv_heads, a.head_dim).transpose(1, 2)  # (B, n_kv_heads, 1, head_dim)
        c.k[:B].index_copy_(2, pos[None], k)
        c.v[:B].index_copy_(2, pos[None], v)
        out = F.scaled_dot_product_attention(q, c.k[:B], c.v[:B], attn_mask=visible,
                                             enable_gqa=a.n_rep > 1)  # (B, n_heads, 1, head_dim)
        h = h + a.wo(out.transpose(1, 2).reshape(B, 1, -1))
        h = h + layer.feed_forward(layer.ffn_norm(h))
    return model.output(model.norm(h)).float()[:, -1]  # (B, vocab_size)


def static_cache(model: Transformer, batch_size: int, length: int) -> list[KVCache]:
    """The one decode cache a model keeps for compiled generation (gpt-fast's setup_caches), replaced only when a
    request outgrows it (at least 4096 positions, doubling, up to max_seq_len): new shapes and addresses mean a
    recompile or a new CUDA-graph recording. Positions past the current one are masked: leftovers are never read."""
    cache = getattr(model, "decode_cache", None)
    if cache is None or cache[0].k.shape[0] != batch_size or cache[0].k.shape[2] < length:
        grown = 2 * cache[0].k.shape[2] if cache is not None else 0
        model.decode_cache = cache = model.new_cache(batch_size, max(length, 4096, grown))  # new_cache caps it
    return cache


def compiled_decode(model: Transformer, cache: list[KVCache]) -> Callable:
    """decode_step_static compiled for model, once; cache's tensors marked as fixed addresses."""
    cuda = model.tok_embeddings.weight.device.type == "cuda"
    if cuda:
        for c in cache:  # written in place by the graph: CUDA graphs must not copy them per step
            torch._dynamo.mark_static_address(c.k)
            torch._dynamo.mark_static_address(c.v)
    if getattr(model, "compiled_decode", None) is None:
        model.compiled_decode = torch.compile(decode_step_static, mode="reduce-overhead" if cuda else None)
    return model.compiled_decode


# =============================================================================
# Appendix D: quantized weights (--quantize int8 | int4)
#
# A decode step multiplies one row of activations by every weight matrix: it
# reads each weight once and does two flops with it, so its speed is memory
# bandwidth over the weights' bytes. 8B in bf16 is 16.1 GB; at the 24 GB/s that
# two server cores read, that is 1.5 tokens/s at best. Fewer bits per weight make
# fewer bytes, and torch's kernels multiply the weights in their stored form,
# dequantizing in registers, while activations keep the model's dtype:
#
#   int8, one scale per output row: w ~ q * s, q in -127..127, s = max|row| / 127
#     ("absmax"). A weight moves by at most s/2, 1/254 of its row's largest.
#   int4, per group of G = 32 consecutive weights of a row: w ~ (q - 8) * s + z,
#     q in 0..15, s = (max - min) / 15, z = min + 8 s. Sixteen levels spread over
#     a whole row would be set by its largest outlier and too coarse for the rest;
#     each group gets its own range, and the zero point z puts the levels over the
#     group's [min, max] rather than around 0, so none is wasted. s and z add 32
#     bits per group: 5 bits a weight. 8B is 8.6 GB in int8 and 5.7 GB in int4.
#
# What is lost: every weight moves by up to half a step, noise that reaches the
# logits, so a close call between two tokens can go the other way; --perplexity
# measures the cost on a text (README.md, Quantized weights, has the figures).
# Every block matrix is quantized, and the output layer, a fifth of 1B's bytes.
# The embedding, read one row per token, costs memory but no time: it keeps the
# model's dtype, unless tied to the output (3.2 1B and 3B) and then reads rows of
# the quantized output. quantize_model swaps these modules into a model built on
# the "meta" device, and load_model quantizes each weight as it reads it, so no
# full-precision copy of the model exists. The int4 layout is each device's
# kernel's own: quantize on the device you run on.
# =============================================================================

QUANTIZE_MODES = ("int8", "int4")


def quantize_rows(in_features: int) -> int:
    """Rows quantized at a time: 2^18 weights (a multiple of 64 rows), so float32 temporaries
    are 1 MiB, under the 2 MiB from which load_model has glibc map memory afresh."""
    return max(64, (1 << 18) // in_features // 64 * 64)


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w (out, in) -> q (out, in) int8 and s (out,) in w's dtype, w ~ q * s[:, None]."""
    q = torch.empty_like(w, dtype=torch.int8)
    s = torch.empty_like(w[:, 0])
    rows = quantize_rows(w.shape[1])
    for r in range(0, w.shape[0], rows):
        block = w[r : r + rows].to(torch.float32, copy=True)  # (rows, in), worked on in place
        s[r : r + rows] = (block.abs().amax(dim=1) / 127).clamp(min=1e-30)  # an all-zero row gets q = 0
        q[r : r + rows] = block.div_(s[r : r + rows, None].float()).round_().clamp_(-127, 127)  # against s as stored
    return q, s


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w (out, in) -> codes q (out, in) int32 in 0..15 and scales_and_zeros (in / G, out, 2)
    in w's dtype, w ~ (q - 8) * s + z with each group's s and z (the kernels' layout)."""
    q = torch.empty_like(w, dtype=torch.int32)
    rows = quantize_rows(w.shape[1])
    sz = torch.empty(w.shape[1] // group_size, w.shape[0], 2, dtype=w.dtype, device=w.device)
    for r in range(0, w.shape[0], rows):
        groups = w[r : r + rows].to(torch.float32, copy=True).unflatten(1, (-1, group_size))  # (rows, in / G, G)
        lo, hi = torch.aminmax(groups, dim=-1)  # (rows, in / G)
        s = ((hi - lo) / 15).clamp(min=1e-30).to(w.dtype)
        z = (lo + 8 * s.float()).to(w.dtype)  # s and z as stored; the codes are rounded against them
        codes = groups.sub_(z.float()[..., None]).div_(s.float()[..., None]).add_(8).round_().clamp_(0, 15)
        q[r : r + rows] = codes.flatten(1)
        sz[:, r : r + rows] = torch.stack([s, z], -1).transpose(0, 1)
    return q, sz


class Int8Linear(nn.Module):
    """A bias-free nn.Linear whose weight is int8 with one scale per output row."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        # Not in state_dict: they are made from the checkpoint's weight by quantize_().
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8), persistent=False)
        self.register_buffer("scales", torch.empty(out_features), persistent=False)

    def quantize_(self, w: torch.Tensor) -> None:
        self.weight, self.scales = quantize_int8(w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, self.in_features), self.weight, self.scales)
        return y.view(*x.shape[:-1], self.out_features)  # (..., out_features)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows ids of the dequantized weight: (*ids.shape, in_features)."""
        return self.weight[ids].to(self.scales.dtype) * self.scales[ids, None]


def int4_cpu_block() -> int | None:
    """B where torch's CPU int4 layout keeps each block of B rows together, for each input k
    B / 2 bytes, byte d holding row d (low half) and row d + B/2 (high half): its AVX-512
    (B = 64) and AVX2 (B = 32) layouts, checked by packing a probe; None for another layout.
    Int4Linear then packs and reads by rows."""
    q = torch.randint(0, 16, (128, 64), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    for B in (64, 32):
        p = packed.view(128 // B, 64, B // 2).transpose(1, 2)  # (blocks, B / 2, K)
        if torch.equal(torch.cat([p & 15, p >> 4], 1).reshape(128, 64).int(), q):
            return B
    return None


class Int4Linear(nn.Module):
    """A bias-free nn.Linear whose weight is 4-bit codes in groups of GROUP_SIZE inputs,
    each group with a scale and a zero point, packed in the layout of its device's kernel."""

    GROUP_SIZE = 32  # README.md, Quantized weights: 32, 64 and 128 measured
    INNER_K_TILES = 8  # CUDA's packing (gpt-fast's default); the CPU kernel ignores it

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.block = None  # on CPU, int4_cpu_block(): rows can be packed and read a block at a time
        self.register_buffer("weight", torch.empty(0, dtype=torch.uint8), persistent=False)  # set by quantize_
        self.register_buffer("scales_and_zeros", torch.empty(0), persistent=False)

    def _apply(self, fn: Callable, recurse: bool = True) -> nn.Module:
        """Refuse a move to another kind of device (.to, .cuda, .cpu): its kernel would read this layout as other
        numbers. (A model moved that way is left partly moved: load it again on the device it is for.)"""
        here = self.weight.device
        there = fn(torch.empty(0, dtype=torch.uint8, device=here)).device
        if there.type != here.type:
            raise ValueError(f"int4 weights packed for {here.type} cannot move to {there.type}, whose kernel "
                             f"reads another layout: load the model with device={there.type!r}, quantize='int4'")
        return super()._apply(fn, recurse)

    def quantize_(self, w: torch.Tensor) -> None:
        """Quantize and pack w (out_features, in_features)."""
        if w.device.type != "cpu":  # CUDA's kernel takes two codes a byte, the first in the high half
            q, self.scales_and_zeros = quantize_int4(w, self.GROUP_SIZE)
            self.weight = torch.ops.aten._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8),
                                                                     self.INNER_K_TILES)
            return
        # On CPU, a layout of row blocks packs a few rows at a time, into tensors made once
        # (pieces kept between the temporaries would fragment the heap): the int32 codes
        # of a whole output layer (1 GB for 1B) never exist.
        N = self.out_features
        K = self.in_features
        self.block = int4_cpu_block() if N % 64 == 0 else None
        self.weight = torch.empty(N, K // 2, dtype=torch.uint8)
        self.scales_and_zeros = torch.empty(K // self.GROUP_SIZE, N, 2, dtype=w.dtype)
        step = quantize_rows(K) if self.block else N
        for r in range(0, N, step):
            q, sz = quantize_int4(w[r : r + step], self.GROUP_SIZE)  # codes, scales and zeros of these rows
            self.weight[r : r + q.shape[0]] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
            self.scales_and_zeros[:, r : r + q.shape[0]] = sz

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        if x.device.type == "cpu":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.weight, self.GROUP_SIZE, self.scales_and_zeros)
        else:
            y = torch.ops.aten._weight_int4pack_mm(x2, self.weight, self.GROUP_SIZE, self.scales_and_zeros)
        return y.view(*x.shape[:-1], self.out_features)  # (..., out_features)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows ids of the dequantized weight, (*ids.shape, in_features), read from the CPU layout."""
        B = self.block
        flat = ids.flatten()
        p = self.weight.view(-1, self.in_features, B // 2)[flat // B, :, flat % (B // 2)]  # (n, in) bytes
        q = (p >> (4 * (flat % B >= B // 2)).to(torch.uint8)[:, None]) & 15  # each row's half of its byte
        sz = self.scales_and_zeros[:, flat].repeat_interleave(self.GROUP_SIZE, 0)  # (in, n, 2)
        w = (q.T.float() - 8) * sz[..., 0].float() + sz[..., 1].float()  # (in, n), rounded once below
        return w.T.reshape(*ids.shape, self.in_features).to(sz.dtype)


class TiedEmbedding(nn.Module):
    """nn.Embedding for a model whose embedding is its output layer's weight (3.2 1B, 3B):
    the rows of the quantized output layer, shared, not a copy."""

    def __init__(self, output: Int8Linear | Int4Linear):
        super().__init__()
        self.output = output

    @property
    def weight(self) -> torch.Tensor:  # for its device
        return self.output.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.output.rows(tokens)  # (B, T, dim)


def check_quantize(mode: str, device: torch.device, dtype: torch.dtype) -> None:
    """Raise ValueError, in one line, unless this torch can run `mode` weights on device in
    dtype: a small quantized layer's product must be near the unquantized one (quantization
    noise is ~1% of it in int8, ~8% in int4; a wrong layout gives noise of 100% or more)."""
    if mode not in QUANTIZE_MODES:
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZE_MODES)}, not {mode!r}")
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    x = torch.randn(2, 256, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    layer = Int8Linear(256, 64) if mode == "int8" else Int4Linear(256, 64)
    try:
        layer.quantize_(w)
        got = layer(x).float()
    except (RuntimeError, NotImplementedError, AttributeError) as e:
        raise ValueError(f"{mode} weights: torch {torch.__version__} has no {mode} kernel for {dtype} on "
                         f"{device.type} ({str(e).splitlines()[0][:120]})") from None
    want = x.float() @ w.float().T
    if not (got - want).norm() < 0.25 * want.norm():
        raise ValueError(f"{mode} weights: torch {torch.__version__}'s {mode} kernel on {device.type} gave "
                         "other numbers than its weights; quantize on another device or torch version")


def malloc_mmap_threshold(nbytes: int) -> None:
    """glibc: serve allocations of nbytes or more by mmap, returned to the system when freed.
    Quantizing leaves lasting tensors between freed temporaries; under glibc's default (a
    threshold rising to 32 MiB) the heap kept up to 0.7 GB of freed memory after loading 1B
    in int8, in some runs. No-op without glibc."""
    import ctypes

    try:
        ctypes.CDLL(None).mallopt(-3, nbytes)  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError, TypeError):
        pass


def quantize_model(model: Transformer, mode: str, device: torch.device) -> dict[str, nn.Module]:
    """Swap model's block matrices and output layer for Int8Linear or Int4Linear (mode), with
    no weights yet; a tied embedding reads the output's rows (TiedEmbedding). Returns
    {checkpoint name of a weight: the module whose quantize_() takes it}."""
    layer_class = Int8Linear if mode == "int8" else Int4Linear
    tied = model.args.tie_word_embeddings
    block = int4_cpu_block() if mode == "int4" and device.type == "cpu" else None  # rows readable and packable
    names = ["attention.wq", "attention.wk", "attention.wv", "attention.wo",
             "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"]
    swaps = {f"layers.{i}.{name}": layer_class for i in range(model.args.n_layers) for name in names}
    # A tied output stays int8 where int4 rows cannot be read (CUDA's layout, or another CPU's).
    swaps["output"] = Int4Linear if mode == "int4" and (block or not tied) else Int8Linear
    fed = {}
    with torch.device("meta"):
        for path, new in swaps.items():
            parent, _, attr = path.rpartition(".")
            old = model.get_submodule(path)
            setattr(model.get_submodule(parent) if parent else model, attr, new(old.in_features, old.out_features))
            fed[f"{path}.weight"] = model.get_submodule(path)
    if tied:  # the checkpoint stores the output's weight as the embedding's
        model.tok_embeddings = TiedEmbedding(model.output)
        fed["tok_embeddings.weight"] = fed.pop("output.weight")
    return fed


def quantize_weights(model: Transformer, weights: Iterator[tuple[str, torch.Tensor]], mode: str,
                     device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """load_model's way in (quantize=mode): check that this torch runs mode on device in dtype, swap in the
    quantized layers (quantize_model), quantize each matrix as `weights` yields it, and return the other
    tensors (norms, an untied embedding) for load_state_dict, as copies: no view keeps the files in memory."""
    check_quantize(mode, device, dtype)
    fed = quantize_model(model, mode, device)
    state = {}
    malloc_mmap_threshold(2 << 20)  # until the loop ends or fails
    try:
        for name, w in weights:
            if name in fed:
                fed[name].quantize_(w)
            else:
                state[name] = w.clone()
            del w  # before the next read, which may remap the files
    finally:
        malloc_mmap_threshold(32 << 20)  # glibc's own ceiling for its moving threshold
    return state


# =============================================================================
# Appendix E: an OpenAI-compatible server (--serve)
#
# Editors, notebooks, agents, chat UIs and evaluation harnesses talk to a local model through OpenAI's HTTP API.
# This serves GET /v1/models, POST /v1/chat/completions and POST /v1/completions, and the tokenizer as vLLM serves
# it (GET /tokenizer_info, POST /tokenize, POST /detokenize), on the standard library's http.server. A chat
# request's prompt is ChatFormat's encoding of its messages (OpenAI's tools become the tool prompt --tools writes;
# a tool message is an ipython message), so greedy answers equal generate's on the same tokens. The server never
# runs a tool: calls go back to the client as tool_calls.
#
# Two kinds of thread, so that no client can hold up the others:
# - One thread per connection reads and checks the request (a mistake is a 4xx naming the field, before the model
#   sees anything) and writes the answer. Its socket has a timeout (--timeout): a client that neither sends nor
#   reads for that long loses its request, and one that closes its connection is noticed within 0.2 s.
# - One engine thread owns the model and decodes the requests together (continuous batching, with "Decoding rows
#   at their own positions"): a request that arrives joins the running batch at the next step, its prompt fed
#   into a free slot of the cache PREFILL_CHUNK tokens a step (the rows decoding make a token between chunks), and
#   leaves it when it is done, so a short request is never queued behind a long one, nor behind a long prompt;
#   past --max-batch rows, requests wait in arrival order. The engine never touches a socket, so a client
#   that stops reading cannot hold it: tokens wait in the request's queue, and the connection's thread cancels the
#   request (the engine drops its row at the next step) when its client times out or leaves.
# Each slot keeps the tokens whose K/V it holds, and a request takes the free slot that shares the longest prefix
# with its prompt, feeding only what follows (as Chat does): a chat client resends the whole history each turn,
# and a turn then costs its new tokens. A request with a seed is fed whole instead, and decoded in a step of its
# own, as it would be alone: how many positions or rows one forward covers changes how products round, and a seed
# promises the same answer whatever came before or runs beside. Any other row's answer is the one it would get
# alone (its own position, cache, sampling settings, generator, stop strings), up to the rounding of products over
# several rows that decode_rows' comment measures.
# =============================================================================

# Imported here, not at the top: deleting the appendix deletes what only it uses.
import hmac
import queue
import select
import socket
import threading
import uuid
from dataclasses import field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# A body past 8 MiB is refused (413): a 128K-token conversation is about 0.5 MB of text.
MAX_BODY_BYTES = 8 << 20
# OpenAI's "developer" role is its newer name for system messages.
OPENAI_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "ipython"}
# The fields each endpoint honours. Any other field is refused (400 naming it), never silently ignored, except
# those that change nothing about the answer (OpenAI's bookkeeping: who asked, what to store).
CHAT_FIELDS = {"messages", "model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "seed",
               "stop", "stream", "stream_options", "tools", "tool_choice", "parallel_tool_calls", "logprobs",
               "top_logprobs", "frequency_penalty", "presence_penalty", "repetition_penalty", "logit_bias", "n",
               "response_format"}
COMPLETION_FIELDS = {"prompt", "model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream",
                     "stream_options", "logprobs", "echo", "frequency_penalty", "presence_penalty",
                     "repetition_penalty", "logit_bias", "n", "best_of", "suffix"}
INERT_FIELDS = {"user", "metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier"}
# OpenAI's limits: up to 20 alternatives per token in chat, 5 in completions.
MAX_TOP_LOGPROBS = {"chat": 20, "completions": 5}


class APIError(Exception):
    """A request the server refuses: the HTTP status and OpenAI's error object's fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.param = param
        self.code = code

    def body(self) -> dict:
        kind = {401: "authentication_error", 500: "server_error"}.get(self.status, "invalid_request_error")
        return {"error": {"message": str(self), "type": kind, "param": self.param, "code": self.code}}


def _field(body: dict, name: str, kinds: type | tuple[type, ...], default=None):
    """body[name], checked to be of kinds (a bool is not a number); default when absent or null."""
    value = body.get(name)
    if value is None:
        return default
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise APIError(400, f"{name} must be {names}, not {json.dumps(value)[:40]}", name)
    return value


def _number(body: dict, name: str, default: float | None, low: float, high: float) -> float | None:
    """A number field in [low, high] (NaN is not), or default when absent or null."""
    value = _field(body, name, (int, float), default)
    if value is not None and not low <= value <= high:
        raise APIError(400, f"{name} must be between {low} and {high}, not {value}", name)
    return value


def _text(content, where: str) -> str:
    """A message's content: a string, or a list of text parts (joined with newlines, as vLLM joins them)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "\n".join(p["text"] for p in content)
    raise APIError(400, f"{where} must be a string or a list of text parts", where)


def check_fields(body: dict, honoured: set[str]) -> None:
    """Refuse the first field this endpoint does not honour, and the values of honoured fields it cannot meet."""
    for name in body:
        if name not in honoured and name not in INERT_FIELDS:
            raise APIError(400, f"{name} is not supported by this server", name, "unsupported_field")
    for name in ("n", "best_of"):
        if _field(body, name, int, 1) != 1:
            raise APIError(400, f"{name} must be 1: one answer per prompt", name)
    if _field(body, "suffix", str, ""):
        raise APIError(400, "suffix is not supported: Llama 3 text models do not fill in the middle", "suffix")
    _field(body, "model", str)  # any name (the one model answers), but a name


def _schema_type(schema: dict, where: str) -> str | None:
    """A JSON schema's "type": one name, or the first of a list that is not "null" (["string", "null"])."""
    kind = schema.get("type")
    if isinstance(kind, list) and all(isinstance(k, str) for k in kind):
        kind = next((k for k in kind if k != "null"), None)
    if kind is not None and not isinstance(kind, str):
        raise APIError(400, f"{where}.type must be a type name or a list of them", where)
    return kind


def function_definition(tool: dict, where: str) -> dict:
    """An OpenAI tool ({"type": "function", "function": {name, description, parameters: JSON schema}}) as the
    definition tokenizer.tool_prompt takes, the shape describe_function gives for --tools."""
    function = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
        raise APIError(400, f"{where} must be {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}", where)
    description = function.get("description") or ""
    schema = function.get("parameters") or {}
    properties = (schema.get("properties") or {}) if isinstance(schema, dict) else None
    required = (schema.get("required") or []) if isinstance(schema, dict) else None
    if not isinstance(description, str):
        raise APIError(400, f"{where}.function.description must be a string", where)
    if (not isinstance(properties, dict) or not all(isinstance(p, dict) for p in properties.values())
            or not isinstance(required, list) or not all(isinstance(r, str) for r in required)):
        raise APIError(400, f"{where}.function.parameters must be a JSON schema of an object: properties an object "
                       "of schemas, required a list of names", where)
    params = {}
    for name, p in properties.items():
        said = p.get("description") or ""
        enum = p.get("enum")
        if not isinstance(said, str) or not isinstance(enum, (list, type(None))):
            raise APIError(400, f"{where}: parameter {name}: description must be a string, enum a list", where)
        simple = {**p, "type": _schema_type(p, f"{where}.function.parameters.properties.{name}")}
        params[name] = tool_parameter(simple, said, name in required)  # as --tools describes them
        if "default" in p:
            params[name]["default"] = p["default"]
    return {"name": function["name"], "description": description, "parameters": params}


def call_id(stop: str | None) -> str:
    """A tool call's id, carrying the stop token its message ended on ("eom" or "eot"): when the client sends the
    call back, it is encoded as the model's own tokens, so the cache's prefix holds, with no state kept here."""
    return f"call_{stop or 'eom'}_{uuid.uuid4().hex[:24]}"


def chat_dialog(body: dict, tool_format: str, today: str) -> tuple[list[dict], tuple[str, ...], set[str]]:
    """A chat request's messages and tools -> our dialog (tokenizer.py's message dicts), the call formats to read
    in the answer (none unless tools were offered) and the names of the functions offered."""
    from tokenizer import BUILTIN_TOOLS, tool_prompt

    messages = _field(body, "messages", list)
    if not messages:
        raise APIError(400, "messages must be a non-empty list", "messages")
    dialog = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or m["role"] not in OPENAI_ROLES:
            role = m.get("role") if isinstance(m, dict) else m
            raise APIError(400, f"{where}.role must be one of {', '.join(OPENAI_ROLES)}, not {json.dumps(role)[:40]}",
                           where)
        message = {"role": OPENAI_ROLES[m["role"]]}
        calls = m.get("tool_calls") if m["role"] == "assistant" else None
        if calls is not None and not isinstance(calls, list):
            raise APIError(400, f"{where}.tool_calls must be a list", where)
        if calls:
            message["tool_calls"] = [_call(c, f"{where}.tool_calls[{j}]") for j, c in enumerate(calls)]
            first_id = calls[0].get("id")
            message["stop"] = "eot" if isinstance(first_id, str) and first_id.startswith("call_eot_") else "eom"
        message["content"] = "" if m.get("content") is None and calls else _text(m.get("content"), where + ".content")
        dialog.append(message)
    tools = _field(body, "tools", list, [])
    choice = body.get("tool_choice", "auto")
    functions = [function_definition(t, f"tools[{i}]") for i, t in enumerate(tools)]
    if not tools or choice == "none":
        return dialog, (), set()
    builtin = any(f["name"] in BUILTIN_TOOLS for f in functions)  # the built-ins only if the client names them
    custom = [f for f in functions if f["name"] not in BUILTIN_TOOLS]
    system = dialog.pop(0)["content"] if dialog and dialog[0]["role"] == "system" else None
    opening = tool_prompt(custom, tool_format, builtin, system, today)
    formats = (tool_format,) * bool(custom) + ("builtin",) * builtin
    return [*opening, *dialog], formats, {f["name"] for f in functions}


def _call(c: dict, where: str) -> dict:
    """An OpenAI tool call the client sends back -> ours ({"name", "arguments": dict})."""
    from tokenizer import BUILTIN_TOOLS

    function = c.get("function") if isinstance(c, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise APIError(400, f"{where}.function.name must be a string", where)
    try:
        arguments = json.loads(function.get("arguments") or "{}")
    except (TypeError, ValueError, RecursionError):
        arguments = None
    if not isinstance(arguments, dict):
        raise APIError(400, f"{where}.function.arguments must be a JSON object, as a string", where)
    name = function["name"]
    key = "code" if name == "code_interpreter" else "query"
    if name in BUILTIN_TOOLS and not isinstance(arguments.get(key), str):
        raise APIError(400, f"{where}.function.arguments: {name} takes {{\"{key}\": a string}}", where)
    return {"name": name, "arguments": arguments}


def completion_prompts(body: dict, tokenizer: Tokenizer, vocab_size: int) -> list[tuple[list[int], str]]:
    """/v1/completions' prompt as OpenAI's legacy API takes it: a string, a list of token ids, or a list of either
    (several prompts) -> each prompt's token ids and text. A string is encoded as --prompt encodes it (with
    <|begin_of_text|>); token ids are taken as they are."""
    prompt = _field(body, "prompt", (str, list))
    if prompt is None:
        raise APIError(400, "prompt is required: a string, a list of token ids, or a list of either", "prompt")
    if isinstance(prompt, str) or (prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)):
        prompt = [prompt]
    prompts = []
    for i, p in enumerate(prompt):
        if isinstance(p, str):
            prompts.append((tokenizer.encode(p, bos=True, eos=False), p))
        elif isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            if not all(0 <= t < min(vocab_size, tokenizer.n_words) for t in p):
                raise APIError(400, f"prompt[{i}] holds a token id outside the vocabulary "
                               f"(0..{min(vocab_size, tokenizer.n_words) - 1})", "prompt")
            prompts.append((p, tokenizer.decode(p)))
        else:
            raise APIError(400, "prompt must be a string, a non-empty list of token ids, or a non-empty list of "
                           "either", "prompt")
    if not prompts:
        raise APIError(400, "prompt must not be an empty list", "prompt")
    return prompts


@dataclass
class Job:
    """One generation the engine runs, and the queue its results go to (see ServedAnswer.follow)."""
    prompt: list[int]
    max_tokens: int
    sampling: Sampling
    stops: list[str]
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: int | None = None  # alternatives reported per token (0-20); None: no logprobs at all
    echo_logprobs: bool = False  # the prompt's tokens' logprobs too (completions' echo)
    constraint: object = None  # appendix F's JSONConstraint: only the tokens it allows are drawn
    events: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)


def top_logprobs(logprobs: torch.Tensor, token: int, n: int) -> tuple[float, list[tuple[int, float]]]:
    """The chosen token's logprob and the n most likely tokens with theirs, most likely first."""
    values, ids = torch.topk(logprobs, n) if n else (logprobs[:0], logprobs[:0].long())
    return float(logprobs[token]), list(zip(ids.tolist(), values.tolist()))


class ServedRow:
    """A job in the running batch: the cache slot (row) it holds, where its next token goes, and its own sampling
    (seeded generator, penalties, constraint) and text (stop strings) state. Its events go to job.events:
    ("prompt", token, logprobs) for echoed prompt tokens, ("token", token, text, logprobs) for each new token, then
    ("end", text, finish_reason, new tokens); logprobs is (logprob, [(id, logprob), ...]) or None."""

    def __init__(self, server: LlamaServer, job: Job, slot: int, reuse: int):
        from tokenizer import StreamDecoder

        model = server.model
        device = model.tok_embeddings.weight.device
        s = job.sampling
        self.server = server
        self.job = job
        self.slot = slot
        self.reuse = reuse  # prompt positions the slot already held
        self.fed = reuse  # prompt positions in the slot so far: the prompt goes in a chunk a step
        self.position = len(job.prompt)  # where the last token chosen is fed
        self.generator = torch.Generator(device=device).manual_seed(s.seed) if s.seed is not None else None
        self.counts = torch.zeros(model.args.vocab_size, device=device)  # of each token in the answer so far
        self.bias = torch.zeros(model.args.vocab_size, device=device)
        for token, value in job.logit_bias.items():
            self.bias[token] = value
        self.seen = list(job.prompt)  # what the repetition penalty discourages: the prompt and the answer
        self.new: list[int] = []
        self.decoder = StreamDecoder(server.tokenizer)
        self.text = StopText(job.stops)
        self.finish = "length"

    def pick(self, logits: torch.Tensor) -> int:
        """The next token from logits (vocab_size,): sampling as generate's (sample(), the row's own generator)
        after OpenAI's penalties, logit[j] -= count[j] * frequency_penalty + (count[j] > 0) * presence_penalty -
        logit_bias[j] (count[j]: how often token j was generated so far in this answer), and after the job's
        constraint's mask (appendix F)."""
        job = self.job
        s = job.sampling
        chosen_from = logits[None]  # (1, vocab_size)
        if s.repetition_penalty != 1.0:
            seen = torch.tensor([self.seen], device=logits.device)
            chosen_from = apply_repetition_penalty(chosen_from, seen, s.repetition_penalty)
        if job.frequency_penalty or job.presence_penalty:
            chosen_from = chosen_from - self.counts * job.frequency_penalty - (self.counts > 0) * job.presence_penalty
        if job.logit_bias:
            chosen_from = chosen_from + self.bias
        if job.constraint is not None:  # -inf where a token would break the document (appendix F)
            chosen_from = job.constraint.mask(chosen_from)
        token = int(sample(chosen_from, s.temperature, s.top_p, s.top_k, self.generator)[0])
        if job.constraint is not None:
            job.constraint.advance(token)
        return token

    def choose(self, logits: torch.Tensor) -> bool:
        """Choose and send the next token from the model's logits (vocab_size,) at this row's position; True when
        the row is done (a stop token, a stop string, max_tokens, or its client gone): that token is not fed."""
        job = self.job
        if job.cancelled.is_set():
            print(f"llama3.py: a client left; its generation ended after {len(self.new)} tokens", file=self.server.log)
            return True
        if len(self.new) == job.max_tokens:  # 0, with echo: the prompt's logprobs were all that was asked
            return True
        if not bool(torch.isfinite(logits).all()):
            raise FloatingPointError(f"the logits at position {self.position} are NaN or inf: corrupt weights or "
                                     "settings")
        token = self.pick(logits)
        said = None
        if job.logprobs is not None:  # the model's own, before temperature, penalties and the constraint
            said = top_logprobs(torch.log_softmax(logits, dim=-1), token, job.logprobs)
        self.new.append(token)
        self.seen.append(token)
        self.counts[token] += 1
        if token in self.server.tokenizer.stop_tokens:
            self.finish = "stop"
            job.events.put(("token", token, "", said))
            return True
        job.events.put(("token", token, self.text.push(self.decoder.push(token)), said))
        if self.text.stopped:
            self.finish = "stop"
            return True
        return len(self.new) == job.max_tokens

    def end(self) -> None:
        tail = self.text.push(self.decoder.finish()) + self.text.finish()
        self.job.events.put(("end", tail, self.finish, self.new))


class LlamaServer(ThreadingHTTPServer):
    """The served model: the engine thread that generates, and what the connections' threads share."""

    daemon_threads = True  # a client still connected never keeps the process from ending

    def __init__(self, address: tuple[str, int] | socket.socket, model: Transformer, tokenizer: Tokenizer,
                 name: str, *, api_key: str | None = None, tool_format: str | None = None,
                 sampling: Sampling = Sampling(), today: str | None = None, log: TextIO | None = None,
                 timeout: float = 60.0, max_batch: int = 8):
        from tokenizer import ChatFormat

        bound = isinstance(address, socket.socket)  # serve_socket's, bound before the model loaded
        super().__init__(address.getsockname() if bound else address, ServeHandler, bind_and_activate=not bound)
        if bound:
            self.socket.close()
            self.socket = address
        self.model = model
        self.tokenizer = tokenizer
        self.format = ChatFormat(tokenizer)
        self.name = name
        self.api_key = api_key
        self.tool_format = tool_format or default_tool_format(model.args)
        self.sampling = sampling  # the command line's, for fields a request leaves out
        self.today = today
        self.log = log or sys.stderr
        self.client_timeout = timeout
        self.max_batch = max_batch
        self.jobs: queue.Queue[Job | None] = queue.Queue()  # in arrival order; None ends the engine
        # One cache row (slot) per request in the batch, 2048 positions to start with, doubled when a request needs
        # more: 8B's cache is 128 KiB a position, so 8 slots of its 128K context would be 128 GiB up front.
        self.cache = model.new_cache(max_batch, min(model.args.max_seq_len, 2048))
        self.cached: list[list[int]] = [[] for _ in range(max_batch)]  # the tokens whose K/V each slot holds
        self.engine_thread = threading.Thread(target=self.engine, daemon=True)
        self.engine_thread.start()

    def server_close(self) -> None:
        """Stop the engine after its current step and wait for it: a thread still running torch code while the
        interpreter shuts down can abort the process (exit -6 instead of 0 on SIGTERM)."""
        self.jobs.put(None)
        super().server_close()
        self.engine_thread.join(timeout=60)

    def engine(self) -> None:
        """Continuous batching: before each step, jobs waiting in arrival order join the batch in free slots, up to
        --max-batch rows. A step feeds the next PREFILL_CHUNK tokens of one joining prompt, the one fed least so far,
        then one decode_rows step makes a token for every row whose prompt is in; a row that is done leaves, freeing
        its slot. So a short request is never queued behind a long one, not even behind a long prompt (a request
        that arrives while a long prompt goes in is fed at the next step), and the rows decoding make a token
        between any two chunks of it. A failure of the model (NaN logits, out of memory) goes to its rows' clients
        as a 500 and to the log; the engine goes on."""
        rows: list[ServedRow] = []  # decoding
        filling: list[ServedRow] = []  # rows whose prompts are going in, in arrival order
        while True:
            while len(rows) + len(filling) < self.max_batch:
                try:
                    job = self.jobs.get(block=not rows and not filling)  # wait only when nothing runs
                except queue.Empty:
                    break
                if job is None:
                    return
                row = self.join(job, {r.slot for r in rows + filling})
                if row is not None:
                    filling.append(row)
            if filling:  # one chunk a step, of the prompt fed least so far (the oldest of those)
                row = min(filling, key=lambda r: r.fed - r.reuse)
                if not self.fill(row):  # gone
                    filling.remove(row)
                elif row.fed == len(row.job.prompt):  # in: it decodes from this step on
                    filling.remove(row)
                    rows.append(row)
            # A row with a seed decodes in a step of its own: products of several rows can round otherwise than
            # one row's, and a seed promises the answer the request gets alone, to the last bit.
            seeded = [[r] for r in rows if r.job.sampling.seed is not None]
            others = [r for r in rows if r.job.sampling.seed is None]
            going = []
            for step in [*seeded, others]:
                if step:
                    going += self.decode(step)
            rows = going

    def decode(self, rows: list[ServedRow]) -> list[ServedRow]:
        """One decode_rows step that makes each row's next token -> the rows still going."""
        try:
            logits = decode_rows(self.model, self.cache, [r.slot for r in rows], [r.new[-1] for r in rows],
                                 [r.position for r in rows])  # (B, vocab_size)
        except Exception as e:  # noqa: BLE001 (the model's own failure, answered and logged)
            for row in rows:
                self.fail(row.job, e)
                self.cached[row.slot] = row.job.prompt[: row.reuse]
            return []
        going = []
        for row, row_logits in zip(rows, logits):
            row.position += 1
            if self.step(row, row_logits):
                going.append(row)
        return going

    def fail(self, job: Job, error: Exception) -> None:
        print(f"llama3.py: generation failed: {type(error).__name__}: {error}", file=self.log)
        job.events.put(("error", error))

    def step(self, row: ServedRow, logits: torch.Tensor) -> bool:
        """The row's next token; False once it has left the batch (done or failed)."""
        try:
            if not row.choose(logits):
                return True
        except Exception as e:  # noqa: BLE001 (this row's failure only)
            self.fail(row.job, e)
            self.cached[row.slot] = row.job.prompt[: row.reuse]
            return False
        self.cached[row.slot] = (row.job.prompt + row.new)[:-1]  # the last token chosen is not fed
        row.end()
        return False

    def join(self, job: Job, busy: set[int]) -> ServedRow | None:
        """Start a job in a free slot, to be fed from the prefix its kept tokens share with the prompt: the slot where
        the tokens reused most outnumber the kept tokens lost (shared - (kept - shared)), so a chat's next turn finds
        its history, and an unrelated request takes an empty slot rather than another conversation's. A request with
        a seed, or one that wants its prompt's logprobs, is fed whole, as it would be alone. None when the job is
        already done."""
        if job.cancelled.is_set():
            print("llama3.py: a client left before its generation started", file=self.log)
            return None
        fresh = job.sampling.seed is not None or job.echo_logprobs
        shared = {s: 0 if fresh else shared_prefix(self.cached[s], job.prompt) for s in range(self.max_batch)
                  if s not in busy}
        slot = max(shared, key=lambda s: (2 * shared[s] - len(self.cached[s]), -s))
        row = ServedRow(self, job, slot, shared[slot])
        self.cached[slot] = job.prompt[: row.reuse]  # all that is sure to stay if feeding fails
        try:
            self.make_room(len(job.prompt) + job.max_tokens)
        except Exception as e:  # noqa: BLE001 (out of memory: answered and logged)
            self.fail(job, e)
            return None
        return row

    def fill(self, row: ServedRow) -> bool:
        """Feed the row's next chunk of prompt; after the last one, choose its first token. False once the row has
        left (done, failed, or its client gone), else True."""
        job = row.job
        if job.cancelled.is_set():
            print("llama3.py: a client left while its prompt was fed", file=self.log)
            self.cached[row.slot] = job.prompt[: row.fed]
            return False
        try:
            logits = self.feed_chunk(row)
            if logits is None or not row.choose(logits):
                return True
        except Exception as e:  # noqa: BLE001 (the model's own failure, answered and logged)
            self.fail(job, e)
            self.cached[row.slot] = job.prompt[: row.fed]  # the positions fed before the failure stay right
            return False
        self.cached[row.slot] = (job.prompt + row.new)[:-1]
        row.end()
        return False

    def make_room(self, need: int) -> None:
        """Grow every slot to `need` positions (doubling, up to the context), keeping what the slots hold."""
        length = self.cache[0].k.shape[2]
        if need <= length:
            return
        bigger = self.model.new_cache(self.max_batch, min(self.model.args.max_seq_len, max(need, 2 * length)))
        for old, new in zip(self.cache, bigger):
            new.k[:, :, :length] = old.k
            new.v[:, :, :length] = old.v
        self.cache = bigger

    @torch.inference_mode()
    def feed_chunk(self, row: ServedRow) -> torch.Tensor | None:
        """Feed the row's next PREFILL_CHUNK prompt tokens into its slot, at the positions prefill would feed them
        alone -> the last position's logits (vocab_size,) once the whole prompt is in, else None. With echoed
        logprobs every position's logits are computed, and each prompt token after the first is sent with its own."""
        job = row.job
        i = row.fed
        chunk = job.prompt[i : i + PREFILL_CHUNK]
        if job.echo_logprobs:
            tokens = torch.tensor([chunk], device=self.model.tok_embeddings.weight.device)  # (1, T)
            logits = self.model(tokens, i, row_cache(self.cache, row.slot))[0]  # (T, vocab_size)
            logprobs = torch.log_softmax(logits, dim=-1)
            for j, after in enumerate(job.prompt[i + 1 : i + 1 + len(chunk)]):  # position i + j predicts after
                job.events.put(("prompt", after, top_logprobs(logprobs[j], after, job.logprobs)))
            logits = logits[-1]
        else:
            logits = prefill_row(self.model, self.cache, row.slot, chunk, i)
        row.fed += len(chunk)
        return logits if row.fed == len(job.prompt) else None


class ServeHandler(BaseHTTPRequestHandler):
    """One HTTP request: the OpenAI endpoints, JSON in and out, server-sent events when streaming."""

    server: LlamaServer
    server_version = "llama3.py"

    def setup(self) -> None:
        self.timeout = self.server.client_timeout  # the socket's: reads and writes wait at most this long
        self.answering: ServedAnswer | None = None
        self.unread = False  # a body is left unread (too large), see linger
        # A small send buffer, so that writes to a client that stopped reading wait (and time out) after tens of
        # KiB, not after the megabytes the kernel would otherwise take.
        self.request.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 15)
        super().setup()

    def log_message(self, format: str, *args) -> None:
        print(f"{self.address_string()} {format % args}", file=self.server.log)

    def do_GET(self) -> None:
        self.answer(self.info)

    def do_POST(self) -> None:
        self.answer(self.completion)

    def refuse_method(self) -> None:
        self.answer(lambda: self.send_json(405, APIError(405, f"{self.command} is not answered here: the endpoints "
                                                              "take GET or POST").body()))

    do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = refuse_method

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own refusals (a request line it cannot read, headers too long) in OpenAI's error shape
        rather than an HTML page."""
        self.log_error("code %d, message %s", code, message)
        self.close_connection = True
        try:
            self.send_json(code, APIError(code, message or "bad request").body())
        except OSError:
            pass

    def answer(self, handle: Callable[[], None]) -> None:
        """Run handle, and answer any refusal or failure with OpenAI's error object: never a traceback."""
        key = self.server.api_key
        self.answering = None
        try:
            if key is not None and not hmac.compare_digest(self.headers.get("Authorization", "").encode(),
                                                           f"Bearer {key}".encode()):  # in constant time
                raise APIError(401, "a valid API key is needed: Authorization: Bearer KEY (--api-key)",
                               code="invalid_api_key")
            handle()
        except APIError as e:
            self.fail(e)
        except (ConnectionError, TimeoutError):
            self.close_connection = True  # the client has gone or stopped reading: nothing more to say
            self.log_message('"%s" ended: the client left or stopped reading', self.requestline)
        except RecursionError:  # json.dumps of a tool schema nested nearly as deep as json.loads allows
            self.fail(APIError(400, "the request nests too deeply"))
        except Exception as e:  # noqa: BLE001 (NaN logits, out of memory: said to the client and in the log)
            print(f"llama3.py: {self.path}: {type(e).__name__}: {e}", file=self.server.log)
            self.fail(APIError(500, f"{type(e).__name__}: {e}"))

    def fail(self, error: APIError) -> None:
        """The error object as the answer, or, once a stream has started, as its last event before [DONE]."""
        try:
            if self.answering is not None and self.answering.started:
                self.answering.event(error.body())
                self.answering.event("[DONE]")
            else:
                self.send_json(error.status, error.body())
        except OSError:
            pass
        if self.unread:  # a body left unread: closing now could reset the connection before the client reads
            self.linger()

    def linger(self) -> None:
        """Close our side, then read (and drop) what the client still sends, for at most a second and 32 MiB, so
        that it reads our answer rather than a reset."""
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_WR)
            self.connection.settimeout(1.0)
            left = 4 * MAX_BODY_BYTES
            while left > 0 and (chunk := self.connection.recv(1 << 16)):
                left -= len(chunk)
        except OSError:
            pass

    def send_json(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def info(self) -> None:
        path = self.path.rstrip("/")
        tok = self.server.tokenizer
        model = {"id": self.server.name, "object": "model", "created": 0, "owned_by": "llama3.py"}
        if path == "/v1/models":
            self.send_json(200, {"object": "list", "data": [model]})
        elif path == f"/v1/models/{self.server.name}":
            self.send_json(200, model)
        elif path.startswith("/v1/models/"):
            raise APIError(404, f"no model {path[len('/v1/models/'):]!r}; this server serves {self.server.name!r}",
                           code="model_not_found")
        elif path == "/tokenizer_info":  # vLLM's, which lm-evaluation-harness's remote tokenizer reads
            self.send_json(200, {"tokenizer_class": "tiktoken", "bos_token": "<|begin_of_text|>",
                                 "eos_token": "<|end_of_text|>", "pad_token": "<|finetune_right_pad_id|>",
                                 "stop_tokens": [tok.decode([t]) for t in tok.stop_tokens],
                                 "model_max_length": self.server.model.args.max_seq_len})
        else:
            raise APIError(404, f"no endpoint GET {self.path}; this server has GET /v1/models and GET "
                           "/tokenizer_info", code="unknown_url")

    def read_body(self) -> dict:
        """The request's JSON object. The body is read only after its Content-Length is known to be a number within
        MAX_BODY_BYTES: a missing one is 411, a bad one 400, a large one 413."""
        length = self.headers.get("Content-Length")
        if length is None:
            self.close_connection = True
            raise APIError(411, "the request needs a Content-Length (chunked bodies are not read)")
        if not re.fullmatch(r"[0-9]{1,18}", length.strip()):
            self.close_connection = True
            raise APIError(400, f"Content-Length must be a number of bytes, not {length[:20]!r}")
        length = int(length)
        if length > MAX_BODY_BYTES:
            self.close_connection = True
            self.unread = True
            raise APIError(413, f"the body is {length} bytes; this server takes at most {MAX_BODY_BYTES}")
        data = self.rfile.read(length)
        if len(data) < length:
            raise ConnectionAbortedError  # the client closed before its body was sent
        try:
            body = json.loads(data)  # NaN and Infinity parse as floats, and fail every range check
        except (ValueError, RecursionError) as e:
            raise APIError(400, f"the body is not JSON: {str(e)[:200]}") from None
        if not isinstance(body, dict):
            raise APIError(400, "the body must be a JSON object")
        return body

    def completion(self) -> None:
        path = self.path.rstrip("/")
        routes = {"/v1/chat/completions": self.chat, "/v1/completions": self.text_completion,
                  "/tokenize": self.tokenize, "/detokenize": self.detokenize}
        if path not in routes:
            raise APIError(404, f"no endpoint POST {self.path}; this server has POST /v1/chat/completions, "
                           "/v1/completions, /tokenize and /detokenize", code="unknown_url")
        routes[path](self.read_body())

    def tokenize(self, body: dict) -> None:
        """vLLM's POST /tokenize: {"prompt", "add_special_tokens" (default true: <|begin_of_text|>)} -> tokens. Special
        tokens' text becomes their ids, as a Hugging Face tokenizer reads it."""
        check_fields(body, {"prompt", "add_special_tokens", "model"})
        text = _field(body, "prompt", str)
        if text is None:
            raise APIError(400, "prompt must be a string", "prompt")
        tokens = self.server.tokenizer.encode(text, bos=_field(body, "add_special_tokens", bool, True), eos=False,
                                              allowed_special="all")
        self.send_json(200, {"tokens": tokens, "count": len(tokens),
                             "max_model_len": self.server.model.args.max_seq_len})

    def detokenize(self, body: dict) -> None:
        """vLLM's POST /detokenize: {"tokens"} -> {"prompt": the text}."""
        check_fields(body, {"tokens", "model"})
        tokens = _field(body, "tokens", list)
        n = self.server.tokenizer.n_words
        if tokens is None or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < n for t in tokens):
            raise APIError(400, f"tokens must be a list of token ids (0..{n - 1})", "tokens")
        self.send_json(200, {"prompt": self.server.tokenizer.decode(tokens)})

    def job(self, body: dict, prompt: list[int], default_max: int | None, where: str, logprobs: int | None,
            echo: bool = False) -> Job:
        """The request's generation settings for one prompt, each checked; the server's flags fill the gaps."""
        limit = self.server.model.args.max_seq_len
        if len(prompt) >= limit:
            raise APIError(400, f"the prompt is {len(prompt)} tokens; the context holds {limit}", where,
                           "context_length_exceeded")
        max_tokens = _field(body, "max_completion_tokens", int, _field(body, "max_tokens", int, default_max))
        max_tokens = limit - len(prompt) if max_tokens is None else max_tokens
        if max_tokens < (0 if echo else 1):
            raise APIError(400, f"max_tokens must be >= {0 if echo else 1}, not {max_tokens}", "max_tokens")
        if len(prompt) + max_tokens > limit:
            raise APIError(400, f"the prompt's {len(prompt)} tokens and max_tokens {max_tokens} exceed the context of "
                           f"{limit} tokens", "max_tokens", "context_length_exceeded")
        stops = _field(body, "stop", (str, list), [])
        stops = [stops] if isinstance(stops, str) else stops
        if not all(isinstance(s, str) and s for s in stops):
            raise APIError(400, "stop must be a non-empty string or a list of them", "stop")
        d = self.server.sampling
        temperature = _number(body, "temperature", d.temperature, 0.0, 2.0)
        if 0 < temperature < 1e-6:  # logits / 1e-320 overflow: say so rather than sample from NaN
            raise APIError(400, "temperature must be 0 (greedy) or at least 0.000001", "temperature")
        top_k = _field(body, "top_k", int, d.top_k)
        if top_k is not None and top_k < 1:
            raise APIError(400, f"top_k must be >= 1, not {top_k}", "top_k")
        seed = _field(body, "seed", int, d.seed)
        if seed is not None and not -(2**63) <= seed < 2**64:
            raise APIError(400, "seed must be a 64-bit integer", "seed")
        sampling = Sampling(temperature, _number(body, "top_p", d.top_p, 0.0, 1.0), top_k,
                            _number(body, "repetition_penalty", d.repetition_penalty, 0.01, 100.0),
                            None if seed is None else seed % 2**64)
        if sampling.top_p == 0:
            raise APIError(400, "top_p must be greater than 0", "top_p")
        bias = _field(body, "logit_bias", dict, {})
        logit_bias = {}
        for key, value in bias.items():
            if not re.fullmatch(r"[0-9]{1,7}", key) or int(key) >= self.server.model.args.vocab_size:
                raise APIError(400, f"logit_bias keys must be token ids, not {key[:20]!r}", "logit_bias")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not -100 <= value <= 100:
                raise APIError(400, f"logit_bias values must be numbers from -100 to 100, not {value!r}"[:80],
                               "logit_bias")
            logit_bias[int(key)] = float(value)
        return Job(prompt, max_tokens, sampling, stops, _number(body, "frequency_penalty", 0.0, -2.0, 2.0),
                   _number(body, "presence_penalty", 0.0, -2.0, 2.0), logit_bias, logprobs,
                   echo and logprobs is not None)

    def chat(self, body: dict) -> None:
        check_fields(body, CHAT_FIELDS)
        server = self.server
        today = server.today or time.strftime("%d %B %Y")
        dialog, formats, offered = chat_dialog(body, server.tool_format, today)
        prompt = server.format.encode_dialog_prompt(dialog, server.tool_format)
        top = _field(body, "top_logprobs", int)
        if _field(body, "logprobs", bool, False):
            top = top or 0
            if not 0 <= top <= MAX_TOP_LOGPROBS["chat"]:
                raise APIError(400, f"top_logprobs must be between 0 and 20, not {top}", "top_logprobs")
        elif top is not None:
            raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        job = self.job(body, prompt, None, "messages", top)
        job.constraint = self.constraint(body, formats)
        answer = self.start_answer(body, True, hold_text=bool(formats))
        got = answer.follow(0, job, None)
        message = server.format.decode_assistant_message(got["new"], formats)
        calls = message["tool_calls"]
        if not all(c["name"] in offered for c in calls):  # a call of a function not offered is text
            calls = []
        if not _field(body, "parallel_tool_calls", bool, True):
            calls = calls[:1]  # one call per answer, as the client asked
        calls = [(call_id(message["stop"]), c) for c in calls]
        answer.choices[0]["text"] = "" if calls else got["text"]
        answer.choices[0]["calls"] = calls
        answer.choices[0]["finish"] = "tool_calls" if calls else got["finish"]
        answer.finish()

    def constraint(self, body: dict, formats: tuple[str, ...]) -> object:
        """Appendix F's constraint for response_format json_object or json_schema, or for a tool_choice that forces
        a call ("required": any offered function; {"type": "function", "function": {"name": f}}: f), written in
        the server's tool format as the model would write it; None when the model answers freely."""
        from tokenizer import BUILTIN_TOOLS

        response_format = _field(body, "response_format", dict, {"type": "text"})
        kind = response_format.get("type")
        if kind not in ("text", "json_object", "json_schema"):
            raise APIError(400, 'response_format.type must be "text", "json_object" or "json_schema"',
                           "response_format")
        choice = body.get("tool_choice", "auto")
        named = isinstance(choice, dict) and choice.get("type") == "function" and isinstance(
            choice.get("function"), dict) and isinstance(choice["function"].get("name"), str)
        if choice not in ("auto", "none", "required") and not named:
            raise APIError(400, 'tool_choice must be "auto", "none", "required" or {"type": "function", "function": '
                           '{"name": ...}}', "tool_choice")
        forced = choice == "required" or named
        if forced and kind != "text":
            raise APIError(400, "a forced tool call and a response_format other than text exclude each other",
                           "response_format")
        tok = self.server.tokenizer
        try:
            if forced:
                functions = [t["function"] for t in body.get("tools") or [] if t["function"]["name"] not in
                             BUILTIN_TOOLS]
                name = choice["function"]["name"] if named else None
                if not formats or not functions or (named and name not in {f["name"] for f in functions}):
                    raise APIError(400, f"tool_choice names {name!r}, which tools does not offer" if named else
                                   'tool_choice "required" needs a function in tools (built-in tools aside)',
                                   "tool_choice")
                make = engine_room("tool_call_constraint", "tool_choice")
                return make(tok, functions, self.server.tool_format, name)
            if kind == "text":
                return None
            schema = None  # json_object: any JSON object
            if kind == "json_schema":
                spec = response_format.get("json_schema")
                schema = spec.get("schema") if isinstance(spec, dict) else None
                if not isinstance(spec, dict) or not isinstance(schema, (dict, type(None))):
                    raise APIError(400, 'response_format json_schema needs {"json_schema": {"name": ..., '
                                   '"schema": {...}}}', "response_format")
            return engine_room("json_constraint", "response_format")(tok, schema, [tok.eot_id])
        except ValueError as e:  # an unsupported keyword, a broken $ref, or appendix F deleted
            raise APIError(400, str(e), "tool_choice" if forced else "response_format") from None

    def text_completion(self, body: dict) -> None:
        check_fields(body, COMPLETION_FIELDS)
        prompts = completion_prompts(body, self.server.tokenizer, self.server.model.args.vocab_size)
        logprobs = _field(body, "logprobs", int)
        if logprobs is not None and not 0 <= logprobs <= MAX_TOP_LOGPROBS["completions"]:
            raise APIError(400, f"logprobs must be between 0 and 5, not {logprobs}", "logprobs")
        echo = _field(body, "echo", bool, False)
        jobs = [self.job(body, p, 16, "prompt", logprobs, echo) for p, _ in prompts]  # all checked before any runs
        answer = self.start_answer(body, False, hold_text=False)
        for i, ((_, text), job) in enumerate(zip(prompts, jobs)):  # one after another, in prompt order
            answer.follow(i, job, text if echo else None)
        answer.finish()

    def start_answer(self, body: dict, chat: bool, hold_text: bool) -> ServedAnswer:
        stream = _field(body, "stream", bool, False)
        options = _field(body, "stream_options", dict, {})
        if options and not stream:
            raise APIError(400, "stream_options is only allowed with stream: true", "stream_options")
        check_fields(options, {"include_usage"})
        self.answering = ServedAnswer(self, chat, stream, _field(options, "include_usage", bool, False), hold_text)
        return self.answering


class ServedAnswer:
    """One answer, sent whole as JSON or streamed as server-sent events (data: {chunk} lines, then data: [DONE]).
    With tools offered, a chat's text is held until the end: only then is it known to be a call or an answer."""

    def __init__(self, handler: ServeHandler, chat: bool, stream: bool, include_usage: bool, hold_text: bool):
        self.handler = handler
        self.chat = chat
        self.stream = stream
        self.include_usage = include_usage
        self.hold_text = hold_text
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.started = False  # the event stream's headers are sent
        self.choices: list[dict] = []
        self.usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}

    def gone(self) -> bool:
        """Whether the client closed its end: the socket reads as ready, and what it holds is nothing."""
        conn = self.handler.connection
        try:
            return bool(select.select([conn], [], [], 0)[0]) and not conn.recv(1, socket.MSG_PEEK)
        except OSError:
            return True

    def follow(self, index: int, job: Job, echo: str | None) -> dict:
        """Queue job and take its results as they come: streamed at once, or kept for finish(). A client that
        leaves or stops reading cancels the job (ConnectionAbortedError). Returns the choice: its text, finish
        reason, new tokens and logprobs."""
        from tokenizer import StreamDecoder

        tok = self.handler.server.tokenizer
        choice = {"index": index, "text": echo or "", "finish": None, "new": [], "calls": [], "lp": []}
        self.choices.append(choice)
        offsets = StreamDecoder(tok)  # each token's text, for completions' text_offset
        at = 0
        if echo is not None and job.logprobs is not None:  # the first prompt token has no logprob
            first = job.prompt[0]
            width = 0 if first == tok.bos_id and not echo.startswith("<|begin_of_text|>") else len(offsets.push(first))
            choice["lp"].append((first, None, 0))
            at = width
        choice["unsent"] = echo if self.stream else None  # streamed with the prompt's logprobs, once they are in
        self.handler.server.jobs.put(job)
        try:
            self.take(choice, job, at, offsets)
        except ConnectionError:
            job.cancelled.set()  # the engine ends it at the next token
            raise
        n_prompt = len(job.prompt)
        self.usage["prompt_tokens"] += n_prompt
        self.usage["completion_tokens"] += len(choice["new"])
        self.usage["total_tokens"] += n_prompt + len(choice["new"])
        return choice

    def take(self, choice: dict, job: Job, at: int, offsets) -> None:
        """The job's events into choice, streamed as they come unless held; at: the next token's text offset."""
        tok = self.handler.server.tokenizer
        while True:
            try:
                event = job.events.get(timeout=0.2)
            except queue.Empty:
                event = None
            if self.gone():  # checked at every token too: a plain request's client may leave while tokens come
                raise ConnectionAbortedError
            if event is None:
                continue
            kind = event[0]
            if choice["unsent"] is not None and kind != "prompt":  # the echoed prompt, with its tokens' logprobs
                self.send_delta(choice, choice["unsent"], choice["lp"])
                choice["unsent"] = None
            if kind == "error":
                raise APIError(500, f"{type(event[1]).__name__}: {event[1]}")
            if kind == "end":
                _, tail, finish, new = event
                choice["finish"] = finish
                choice["new"] = new
                self.add_text(choice, tail, [])
                break
            token, said = event[1], event[-1]
            logged = []
            if said is not None and not (self.chat and token in tok.stop_tokens):  # chat shows no end token
                logged = [(token, said, at)]
                at += len(offsets.push(token)) if token not in tok.stop_tokens else 0
            choice["lp"] += logged
            if kind == "token":
                self.add_text(choice, event[2], logged)

    def add_text(self, choice: dict, text: str, logged: list) -> None:
        if self.stream and not self.hold_text and (text or logged):
            self.send_delta(choice, text, logged)
        choice["text"] += text

    def send_delta(self, choice: dict, text: str, logged: list) -> None:
        if self.chat:
            if not self.started:
                self.event(self.chunk(0, {"role": "assistant", "content": ""}, None, None))
            self.event(self.chunk(0, {"content": text}, self.logprobs(logged), None))
        else:
            self.event(self.chunk(choice["index"], text, self.logprobs(logged), None))

    def chunk(self, index: int, delta: dict | str, logprobs: dict | None, finish: str | None) -> dict:
        choice = {"index": index, "delta": delta} if self.chat else {"index": index, "text": delta}
        return {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.handler.server.name,
                "choices": [{**choice, "logprobs": logprobs, "finish_reason": finish}],
                **({"usage": None} if self.include_usage else {})}  # as OpenAI's: null until the last event

    def logprobs(self, logged: list[tuple[int, tuple | None, int]]) -> dict | None:
        """(token, (logprob, top), text offset) entries as OpenAI's API shapes them: chat's content list, or
        completions' four parallel lists (top_logprobs a dict per position, the chosen token in it too)."""
        if not logged:
            return None
        tok = self.handler.server.tokenizer

        def token_bytes(t: int) -> bytes:
            return tok.model.decode_single_token_bytes(t)

        def text(t: int) -> str:
            return token_bytes(t).decode("utf-8", errors="replace")

        if self.chat:
            return {"content": [{"token": text(t), "logprob": lp, "bytes": list(token_bytes(t)),
                                 "top_logprobs": [{"token": text(i), "logprob": v, "bytes": list(token_bytes(i))}
                                                  for i, v in top]} for t, (lp, top), _ in logged]}
        return {"tokens": [text(t) for t, _, _ in logged],
                "token_logprobs": [said and said[0] for _, said, _ in logged],
                "top_logprobs": [said and {**{text(i): v for i, v in said[1]}, text(t): said[0]}
                                 for t, said, _ in logged],
                "text_offset": [at for _, _, at in logged]}

    def event(self, body: dict | str) -> None:
        """Send one event; a client gone or not reading for --timeout raises ConnectionAbortedError."""
        h = self.handler
        try:
            if not self.started:
                self.started = True
                h.send_response(200)
                h.send_header("Content-Type", "text/event-stream")
                h.send_header("Cache-Control", "no-cache")
                h.end_headers()
                h.close_connection = True  # the stream ends when the connection does
            data = body if isinstance(body, str) else json.dumps(body)
            h.wfile.write(f"data: {data}\n\n".encode())
            h.wfile.flush()
        except OSError:  # reset, broken pipe, or the socket's timeout
            raise ConnectionAbortedError from None

    def finish(self) -> None:
        """The answer (all of it, or what streaming has not sent), its finish reasons and usage."""
        for c in self.choices:
            c["tool_calls"] = [{"id": i, "type": "function", "function": {
                "name": call["name"], "arguments": json.dumps(call["arguments"], ensure_ascii=False)}}
                for i, call in c["calls"]]
        if not self.stream:
            choices = []
            for c in self.choices:
                if self.chat:
                    message = {"role": "assistant", "content": None if c["calls"] else c["text"]}
                    if c["calls"]:
                        message["tool_calls"] = c["tool_calls"]
                    shown = [entry for entry in c["lp"] if not c["calls"]]
                    choices.append({"index": c["index"], "message": message, "logprobs": self.logprobs(shown),
                                    "finish_reason": c["finish"]})
                else:
                    choices.append({"index": c["index"], "text": c["text"], "logprobs": self.logprobs(c["lp"]),
                                    "finish_reason": c["finish"]})
            self.handler.send_json(200, {"id": self.id, "object": "chat.completion" if self.chat else
                                         "text_completion", "created": self.created,
                                         "model": self.handler.server.name, "choices": choices, "usage": self.usage})
            return
        for c in self.choices:
            if self.chat and self.hold_text and (c["text"] or c["calls"]):  # held until the end: sent as one delta
                delta = {"role": "assistant", "content": c["text"] or None}
                if c["calls"]:
                    delta["tool_calls"] = [{"index": i, **call} for i, call in enumerate(c["tool_calls"])]
                self.event(self.chunk(0, delta, None, None))
            elif self.chat and not self.started:
                self.event(self.chunk(0, {"role": "assistant", "content": ""}, None, None))
            self.event(self.chunk(c["index"], {} if self.chat else "", None, c["finish"]))
        if self.include_usage:
            self.event({"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                        "created": self.created, "model": self.handler.server.name, "choices": [],
                        "usage": self.usage})
        self.event("[DONE]")


def serve_address(address: str) -> tuple[str, int]:
    """--serve's HOST:PORT -> (host, port); ValueError naming the flag."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"--serve takes HOST:PORT, such as 127.0.0.1:8000, not {address!r}")
    return host.strip("[]"), int(port)


def serve_socket(address: str) -> socket.socket:
    """--serve HOST:PORT bound and listening, before the model loads: a port in use is said at once, not after
    minutes of loading. ValueError naming the flag."""
    host, port = serve_address(address)
    try:
        return socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    except OSError as e:
        raise ValueError(f"--serve {address}: {e.strerror or e}") from None


def serve(model: Transformer, tokenizer: Tokenizer, address: str | socket.socket, name: str, *,
          api_key: str | None = None, tool_format: str | None = None, sampling: Sampling = Sampling(),
          timeout: float = 60.0, max_batch: int = 8) -> None:
    """--serve HOST:PORT: answer requests until Ctrl-C (exit 130) or SIGTERM (exit 0). Says where on stderr once it
    accepts requests, with the port it bound (port 0 picks a free one). timeout: seconds a client may neither send
    nor read before it loses its request (--timeout). max_batch: requests decoded together (--max-batch)."""
    sock = serve_socket(address) if isinstance(address, str) else address
    server = LlamaServer(sock, model, tokenizer, name, api_key=api_key, tool_format=tool_format, sampling=sampling,
                         timeout=timeout, max_batch=max_batch)

    def stop(*_) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    bound_host, bound_port = server.server_address[:2]
    print(f"llama3.py: serving {name} at http://{bound_host}:{bound_port}/v1 (Ctrl-C stops)", file=sys.stderr,
          flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()


# =============================================================================
# Appendix F: constrained decoding (JSON schemas): --json, --json-schema FILE
#
# A program that reads the model's answer wants JSON it can parse, of a shape it knows. Asking nicely is not
# enough (a tiny random model never writes JSON on its own), so at each decode step this appendix allows only the
# tokens whose text keeps the output a prefix of a valid document, and the stop token only once the document is
# complete (after that, only stop tokens). Three pieces:
#
# 1. The automaton. A JSON schema is compiled into nodes (one per sub-schema; $ref points at a node, so recursive
#    schemas are cycles, not copies), and a document is read byte by byte by a pushdown automaton: its stack holds
#    what must still come, top last, e.g. for {"a": [1, 2]} after `{"a": [1`:
#        ("props", object, next property 1) ("items", array, 1 item so far) ("num", integer, "1")
#    A step pops or replaces the top. Where the schema leaves a choice (anyOf, a type list, an enum, an optional
#    property, one more array item or "]"), the automaton keeps every open alternative: its state is a frozenset
#    of stacks, and a byte keeps the stacks it can extend. The empty stack is a finished document.
#    The layout is fixed, so the model cannot pad forever: json.dumps' default (", " and ": " between items, no
#    other whitespace outside strings), an object's properties in the schema's order (optional ones may be left
#    out), strings with JSON's escapes (\uXXXX included, but none in D800-DFFF: characters past U+FFFF are written
#    as their UTF-8 bytes) and no raw control characters, enum and const values as json.dumps(v,
#    ensure_ascii=False) writes them. Numbers are JSON numbers of at most 15 integer digits, 15 fraction digits
#    and 2 exponent digits (integers: no fraction or exponent; minimum/maximum checked digit by digit), so every
#    number, and so every document, can end. A branch that admits no finite document (an unsatisfiable optional
#    property, a $ref loop with no way out) is never entered; a root with none is refused.
# 2. The token check. Tokens are byte strings (a token may end inside a UTF-8 character, and the automaton tracks
#    the bytes a character still needs). Outside strings, the allowed tokens are found by walking the vocabulary
#    sorted by bytes as a trie: a prefix the automaton rejects prunes every token under it, and few survive. Inside
#    a string, nearly every token is allowed, so the walk is replaced by tensor arithmetic: each token is split
#    once into its "plain" prefix (no quote, backslash or control byte) and the rest, and a plain prefix is
#    allowed iff its UTF-8 continues the string's (read off columns computed once per tokenizer) and fits
#    maxLength; only the few hundred distinct rests ('"', '", ', '\\n', ...) are walked. Masks are cached per state.
# 3. Exactness. The mask is exact (a token is allowed iff its bytes keep the text a prefix of a document: tests
#    compare with independent enumeration), and sampling is the model's own: the logits of disallowed tokens are
#    set to -inf after the repetition penalty and before temperature, top-k and top-p. With top_p = 1 and no
#    top_k, each token is drawn from softmax(logits / temperature) restricted to the allowed tokens and
#    renormalised, and a document's probability is the product of those per-token probabilities; greedy takes the
#    most likely allowed token; top-k and the nucleus are taken among the allowed tokens, so never empty.
#
# The per-step interface, for a decode loop of your own (generate(constraint=...) runs exactly this):
#     c = json_constraint(tokenizer, schema)      # or tool_call_constraint(...); one per answer
#     logits = c.mask(logits)                     # (1, vocab_size): -inf where c.allowed() (n_words,) is False
#     token = ...choose from logits...
#     c.advance(token)                            # ValueError for a token the mask forbade
#     c.is_complete()                             # the document is whole: its stop tokens are allowed
# =============================================================================

# Imported here, not at the top: deleting the appendix deletes what only it uses.
import bisect

# Keywords the automaton enforces; annotations, which say nothing about validity, are ignored; anything else is
# refused by check_schema, naming the keyword and where it is.
SCHEMA_KEYWORDS = {"type", "properties", "required", "additionalProperties", "enum", "const", "items", "minItems",
                   "maxItems", "anyOf", "$defs", "definitions", "$ref", "minimum", "maximum", "minLength",
                   "maxLength"}
SCHEMA_ANNOTATIONS = {"title", "description", "default", "examples", "$comment", "$schema", "$id"}
JSON_TYPES_ALL = ("string", "integer", "number", "boolean", "null", "object", "array")
# Digits a number may have: 15 integer digits keep integers exact in a double; 2 exponent digits stay finite.
MAX_INT_DIGITS = 15
MAX_FRACTION_DIGITS = 15
MAX_EXPONENT_DIGITS = 2
NUMBER_PARTS = re.compile(r"(-?)(\d*)(\.?)(\d*)([eE]?)([+-]?)(\d*)")


def _where(path: tuple) -> str:
    return ".".join(str(p) for p in path) or "the root"


def check_schema(schema: dict | bool, root: dict | bool | None = None, path: tuple = ()) -> None:
    """ValueError naming the first unsupported keyword, or malformed value, and where it is (a dotted path such as
    properties.city.pattern); None for a schema the automaton enforces. $refs must point inside the schema."""
    root = schema if root is None else root
    if isinstance(schema, bool):
        return
    if not isinstance(schema, dict):
        raise ValueError(  # noqa: TRY004 (a bad schema is a bad value, as every other case here)
            f"JSON schema at {_where(path)}: a schema is an object or true/false, not {schema!r}")
    for key, value in schema.items():
        here = (*path, key)
        if key in SCHEMA_ANNOTATIONS:
            continue
        if key not in SCHEMA_KEYWORDS:
            raise ValueError(f"JSON schema keyword {key!r} at {_where(here)} is not supported")
        if key in ("properties", "$defs", "definitions"):
            if not isinstance(value, dict):
                raise ValueError(f"JSON schema: {_where(here)} must be an object")
            for name, sub in value.items():
                check_schema(sub, root, (*here, name))
        elif key == "items":
            if not isinstance(value, (dict, bool)):
                raise ValueError(f"JSON schema: {_where(here)} must be one schema (a list is prefixItems, not "
                                 "supported)")
            check_schema(value, root, here)
        elif key == "anyOf":
            if not isinstance(value, list) or not value:
                raise ValueError(f"JSON schema: {_where(here)} must be a non-empty list of schemas")
            for i, sub in enumerate(value):
                check_schema(sub, root, (*here, i))
        elif key == "type":
            names = value if isinstance(value, list) else [value]
            if not names or any(t not in JSON_TYPES_ALL for t in names):
                raise ValueError(f"JSON schema: {_where(here)} must name types among {', '.join(JSON_TYPES_ALL)}, "
                                 f"not {value!r}")
        elif key == "required":
            if not isinstance(value, list) or not all(isinstance(r, str) for r in value):
                raise ValueError(f"JSON schema: {_where(here)} must be a list of property names")
        elif key == "additionalProperties":
            if not isinstance(value, bool):
                raise ValueError(f"JSON schema: {_where(here)} must be true or false (a schema there is not "
                                 "supported)")
        elif key == "enum":
            if not isinstance(value, list) or not value:
                raise ValueError(f"JSON schema: {_where(here)} must be a non-empty list")
        elif key in ("minItems", "maxItems", "minLength", "maxLength"):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"JSON schema: {_where(here)} must be an integer >= 0, not {value!r}")
        elif key in ("minimum", "maximum"):
            types = schema.get("type")
            types = types if isinstance(types, list) else [types]
            if "integer" not in types or "number" in types:
                raise ValueError(f"JSON schema: {_where(here)} is supported on integers only (type \"integer\")")
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise ValueError(f"JSON schema: {_where(here)} must be a finite number")
        elif key == "$ref":
            _resolve_ref(root, value, here)
    if "$ref" in schema and set(schema) - SCHEMA_ANNOTATIONS - {"$ref", "$defs", "definitions"}:
        raise ValueError(f"JSON schema: {_where((*path, '$ref'))} has sibling keywords; only annotations may "
                         "stand beside a $ref")
    if "anyOf" in schema and set(schema) - SCHEMA_ANNOTATIONS - {"anyOf", "$defs", "definitions"}:
        raise ValueError(f"JSON schema: {_where((*path, 'anyOf'))} has sibling keywords; put them inside each "
                         "branch")


def _resolve_ref(root: dict, ref: object, path: tuple) -> tuple[object, str]:
    """The schema a local $ref ("#", "#/$defs/x", "#/definitions/x", any "#/..." pointer) names, and the pointer."""
    if not isinstance(ref, str) or not (ref == "#" or ref.startswith("#/")):
        raise ValueError(f"JSON schema: {_where(path)} = {ref!r}: only local references (#/...) are supported")
    target = root
    for part in ref[2:].split("/") if ref != "#" else ():
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(target, dict) and part in target:
            target = target[part]
        elif isinstance(target, list) and part.isdigit() and int(part) < len(target):
            target = target[int(part)]
        else:
            raise ValueError(f"JSON schema: {_where(path)} = {ref!r} points at nothing")
    return target, ref


# -----------------------------------------------------------------------------
# The automaton: schema nodes, and a stack's steps
# -----------------------------------------------------------------------------


@dataclass
class SchemaNode:
    """One compiled sub-schema. kind: "alts" (any of `alts`: anyOf, $ref, a type list), "literal" (one of
    `literals`, bytes), "string", "integer", "number", "object", "array", or "seq" (bytes `open`, a value of
    `items`, bytes `close`: a tool call's frame around its arguments). An object writes `open`, then each chosen
    property as its key bytes (`props`: key bytes when first, key bytes after another, node, required), then
    `close`; free: any keys (an object schema without properties)."""
    kind: str
    alts: tuple[int, ...] = ()
    literals: tuple[bytes, ...] = ()
    props: tuple[tuple[bytes, bytes, int, bool], ...] = ()
    free: bool = False
    open: bytes = b""
    close: bytes = b""
    items: int = -1
    min_items: int = 0
    max_items: int | None = None
    min_len: int = 0
    max_len: int | None = None
    minimum: int = -(10**MAX_INT_DIGITS - 1)
    maximum: int = 10**MAX_INT_DIGITS - 1


def _literal(value: object, python: bool) -> str:
    """A JSON value as the document writes it: json.dumps' layout; in Python syntax (python_list calls) True,
    False and None, with strings and dict keys as JSON writes them (valid Python, as tokenizer.python_literal)."""
    if not python:
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k, ensure_ascii=False)}: {_literal(v, True)}"
                               for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_literal(v, True) for v in value) + "]"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    return repr(value) if isinstance(value, float) else str(value)


class SchemaCompiler:
    """Turns a checked schema into SchemaNodes, one per location ($refs share their target's node)."""

    def __init__(self, root: dict | bool, python: bool):
        self.root = root
        self.python = python
        self.nodes: list[SchemaNode] = []
        self.at: dict[str, int] = {}  # JSON pointer -> node id

    def add(self, node: SchemaNode) -> int:
        self.nodes.append(node)
        return len(self.nodes) - 1

    def any_value(self) -> int:
        """Any JSON value: every type, objects with any keys, arrays of anything."""
        return self.compile(True, "#any")

    def compile(self, schema: dict | bool, pointer: str) -> int:
        pointer = "#any" if schema is True else pointer  # one node for "anything", which holds itself
        if pointer in self.at:
            return self.at[pointer]
        i = self.add(SchemaNode("alts"))
        self.at[pointer] = i
        self.nodes[i] = self.build(schema, pointer)
        return i

    def build(self, schema: dict | bool, pointer: str) -> SchemaNode:
        if schema is False:
            return SchemaNode("alts")  # no alternative: no value
        if schema is True:
            schema = {"type": list(JSON_TYPES_ALL[:1] + JSON_TYPES_ALL[2:])}  # "number" covers "integer"
        if "$ref" in schema:
            target, ref = _resolve_ref(self.root, schema["$ref"], ())
            return SchemaNode("alts", alts=(self.compile(target, ref),))
        if "anyOf" in schema:
            return SchemaNode("alts", alts=tuple(self.compile(s, f"{pointer}/anyOf/{k}")
                                                 for k, s in enumerate(schema["anyOf"])))
        if "const" in schema or "enum" in schema:
            values = [schema["const"]] if "const" in schema else schema["enum"]
            return SchemaNode("literal", literals=tuple(dict.fromkeys(_literal(v, self.python).encode()
                                                                      for v in values)))
        types = schema.get("type")
        if types is None:  # no type: what its keywords describe, else any type (its keywords applying)
            types = "object" if "properties" in schema or "required" in schema else "array" if "items" in schema \
                else ["string", "number", "boolean", "null", "object", "array"]
        if isinstance(types, list):
            if "integer" in types and "number" in types:
                types = [t for t in types if t != "integer"]
            if len(types) > 1:
                return SchemaNode("alts", alts=tuple(self.compile({**schema, "type": t}, f"{pointer}/type/{t}")
                                                     for t in types))
            types = types[0]
        if types in ("boolean", "null"):
            values = (True, False) if types == "boolean" else (None,)
            return SchemaNode("literal", literals=tuple(_literal(v, self.python).encode() for v in values))
        if types == "string":
            return SchemaNode("string", min_len=schema.get("minLength", 0), max_len=schema.get("maxLength"))
        if types == "number":
            return SchemaNode("number")
        if types == "integer":
            lo = math.ceil(schema.get("minimum", -math.inf)) if "minimum" in schema else None
            hi = math.floor(schema.get("maximum", math.inf)) if "maximum" in schema else None
            node = SchemaNode("integer")
            node.minimum = max(node.minimum, lo) if lo is not None else node.minimum
            node.maximum = min(node.maximum, hi) if hi is not None else node.maximum
            return node
        if types == "array":
            items = schema.get("items", True)
            return SchemaNode("array", items=self.compile(items, f"{pointer}/items"),
                              min_items=schema.get("minItems", 0), max_items=schema.get("maxItems"))
        return self.object(schema, pointer, b"{", b"}", python_keywords=False)

    def object(self, schema: dict, pointer: str, open: bytes, close: bytes, python_keywords: bool) -> SchemaNode:
        """An object node; python_keywords: the properties are a Python call's keyword arguments (k=v)."""
        properties = schema.get("properties", {})
        required = set(schema.get("required", []))
        missing = required - set(properties)
        if missing:
            raise ValueError(f"JSON schema: {pointer.lstrip('#/').replace('/', '.') or 'the root'}: required "
                             f"property {min(missing)!r} is not among its properties")
        props = []
        for key, sub in properties.items():
            if python_keywords and not key.isidentifier():
                raise ValueError(f"python_list calls name arguments as Python keywords: {key!r} is not one")
            written = f"{key}=" if python_keywords else f"{json.dumps(key, ensure_ascii=False)}: "
            child = self.compile(sub, f"{pointer}/properties/{key}")
            props.append((written.encode(), f", {written}".encode(), child, key in required))
        free = not properties and schema.get("additionalProperties", True) is not False and not python_keywords
        return SchemaNode("object", props=tuple(props), free=free, open=open, close=close)


def _lit(data: bytes) -> tuple:
    """The frames that write `data`: none for b""."""
    return (("lit", data),) if data else ()


# UTF-8 (RFC 3629), one byte at a time: a lead byte says how many continuation bytes (80-BF) follow, and the range
# of the first, which rules out overlong forms, surrogates (ED A0-BF) and code points past U+10FFFF.
def utf8_step(need: int, lo: int, hi: int, byte: int) -> tuple[int, int, int] | None:
    """(need, lo, hi) after byte, where need continuation bytes are still due, the next in [lo, hi]; None if the
    byte breaks UTF-8."""
    if need:
        return (need - 1, 0x80, 0xBF) if lo <= byte <= hi else None
    if byte < 0x80:
        return (0, 0, 0)
    if 0xC2 <= byte <= 0xDF:
        return (1, 0x80, 0xBF)
    if 0xE0 <= byte <= 0xEF:
        return (2, 0xA0 if byte == 0xE0 else 0x80, 0x9F if byte == 0xED else 0xBF)
    if 0xF0 <= byte <= 0xF4:
        return (3, 0x90 if byte == 0xF0 else 0x80, 0x8F if byte == 0xF4 else 0xBF)
    return None


def number_state(text: str, integer: bool, lo: int, hi: int) -> tuple[bool, bool]:
    """(whether text can begin a number the node allows, whether it is one already)."""
    m = NUMBER_PARTS.fullmatch(text)
    if m is None:
        return False, False
    sign, digits, dot, fraction, e, exp_sign, exponent = m.groups()
    ok = (len(digits) <= MAX_INT_DIGITS and not (digits.startswith("0") and len(digits) > 1)
          and len(fraction) <= MAX_FRACTION_DIGITS and len(exponent) <= MAX_EXPONENT_DIGITS
          and (not dot or digits) and (not fraction or dot) and (not e or (digits and (fraction or not dot)))
          and (not exp_sign or e) and (not exponent or e))
    if not ok or (integer and (dot or e)):
        return False, False
    whole = bool(digits) and (not dot or bool(fraction)) and (not e or bool(exponent))
    if not integer:
        return True, whole
    if not digits:  # "" or "-": some integer of that sign in range? (-0 is 0)
        return (lo <= 0) if sign else (hi >= 0), False
    value = int(digits)
    # The integers this prefix can still become: value * 10^j + [0, 10^j) for j more digits (none after a 0).
    more = 0 if digits == "0" else MAX_INT_DIGITS - len(digits)
    for j in range(more + 1):
        first = value * 10**j
        last = first + 10**j - 1
        a, b = (-last, -first) if sign else (first, last)
        if a <= hi and lo <= b:
            return True, lo <= (-value if sign else value) <= hi
    return False, False


class Automaton:
    """The document's pushdown automaton over a list of SchemaNodes (see the appendix's header). A stack is a
    tuple of frames, top last:
        ("value", node)                  a value of node is due (expanded by settle, never left on top)
        ("props", node, i, first)        an object's properties from the i-th (first: none written yet)
        ("free", first)                  an object with any keys
        ("items", node, count)           an array with count items so far
        ("lit", bytes)                   these bytes come next
        ("str", node, count, need, lo, hi, esc)   inside a string: count characters (kept 0 when unbounded, so
                                         the state repeats), a UTF-8 character needing `need` bytes, the next in
                                         [lo, hi]; esc: "" or "\\" or "u" and the hex digits read
        ("num", node, text)              a number so far
    A state is a frozenset of stacks (the alternatives still open), each settled: its top consumes bytes."""

    def __init__(self, nodes: list[SchemaNode], root: int, key: int, any_value: int, python: bool):
        self.nodes = nodes
        self.key = key  # a free object's key: any string
        self.any_value = any_value
        self.python = python  # Python string literals have no \/ escape
        self.finite = self.finite_nodes()
        if not self.finite[root]:
            raise ValueError("JSON schema admits no finite document (every branch needs itself or nothing fits)")
        self.start = frozenset(self.settle((("value", root),)))

    def finite_nodes(self) -> list[bool]:
        """Which nodes have a finite document: the least fixpoint, from none, of "a node has one if the parts it
        needs have one" (so a $ref loop with no way out has none)."""
        finite = [False] * len(self.nodes)
        changed = True
        while changed:
            changed = False
            for i, n in enumerate(self.nodes):
                if not finite[i] and self.has_document(n, finite):
                    finite[i] = True
                    changed = True
        return finite

    @staticmethod
    def has_document(n: SchemaNode, finite: list[bool]) -> bool:
        if n.kind == "alts":
            return any(finite[a] for a in n.alts)
        if n.kind == "literal":
            return bool(n.literals)
        if n.kind == "string":
            return n.max_len is None or n.min_len <= n.max_len
        if n.kind == "integer":
            return n.minimum <= n.maximum
        if n.kind == "object":
            return all(finite[child] for _, _, child, required in n.props if required)
        if n.kind == "array":
            return (n.max_items is None or n.min_items <= n.max_items) and (n.min_items == 0 or finite[n.items])
        if n.kind == "seq":
            return finite[n.items]
        return True  # number

    def concrete(self, node: int) -> list[int]:
        """The nodes other than "alts" that node may be, finite ones only (a $ref cycle is followed once)."""
        seen = set()
        out = []
        todo = [node]
        while todo:
            i = todo.pop()
            if i in seen or not self.finite[i]:
                continue
            seen.add(i)
            if self.nodes[i].kind == "alts":
                todo.extend(reversed(self.nodes[i].alts))
            else:
                out.append(i)
        return out

    def begin(self, i: int) -> list[tuple]:
        """The ways a value of concrete node i begins: frames to push, top last."""
        n = self.nodes[i]
        if n.kind == "literal":
            return [(("lit", v),) for v in n.literals]
        if n.kind == "string":
            return [(("str", i, 0, 0, 0, 0, ""), ("lit", b'"'))]
        if n.kind in ("integer", "number"):
            return [(("num", i, ""),)]
        if n.kind == "array":
            return [(("items", i, 0), ("lit", b"["))]
        if n.kind == "seq":
            return [(*_lit(n.close), ("value", n.items), *_lit(n.open))]
        first = ("free", True) if n.free else ("props", i, 0, True)
        return [(first, *_lit(n.open))]

    def settle(self, stack: tuple) -> list[tuple]:
        """Expand the top until it consumes bytes: every settled stack the stack may be."""
        if not stack:
            return [stack]
        top = stack[-1]
        rest = stack[:-1]
        kind = top[0]
        if kind == "value":
            return [s for c in self.concrete(top[1]) for frames in self.begin(c) for s in self.settle(rest + frames)]
        if kind == "props":
            n = self.nodes[top[1]]
            out = []
            for j in range(top[2], len(n.props)):
                first_key, next_key, child, required = n.props[j]
                if self.finite[child]:
                    key = first_key if top[3] else next_key
                    out += self.settle(rest + (("props", top[1], j + 1, False), ("value", child), ("lit", key)))
                if required:
                    return out
            return out + self.settle(rest + _lit(n.close))
        if kind == "free":
            member = (("free", False), ("value", self.any_value), ("lit", b": "), ("value", self.key),
                      *_lit(b"" if top[1] else b", "))
            return self.settle(rest + (("lit", b"}"),)) + self.settle(rest + member)
        if kind == "items":
            n = self.nodes[top[1]]
            out = self.settle(rest + (("lit", b"]"),)) if top[2] >= n.min_items else []
            if (n.max_items is None or top[2] < n.max_items) and self.finite[n.items]:
                item = (("items", top[1], top[2] + 1), ("value", n.items), *_lit(b", " * (top[2] > 0)))
                out += self.settle(rest + item)
            return out
        return [stack]

    def step(self, stack: tuple, byte: int) -> list[tuple]:
        """The settled stacks after byte; [] where the byte is not allowed."""
        if not stack:
            return []
        top = stack[-1]
        rest = stack[:-1]
        kind = top[0]
        if kind == "lit":
            if top[1][0] != byte:
                return []
            return self.settle(rest + _lit(top[1][1:]))
        if kind == "num":
            n = self.nodes[top[1]]
            out = []
            can, _ = number_state(top[2] + chr(byte), n.kind == "integer", n.minimum, n.maximum)
            if can:
                out.append(rest + (("num", top[1], top[2] + chr(byte)),))
            if number_state(top[2], n.kind == "integer", n.minimum, n.maximum)[1]:  # the number may end here
                out += [s for r in self.settle(rest) for s in self.step(r, byte)]
            return out
        _, i, count, need, lo, hi, esc = top
        n = self.nodes[i]
        counted = n.min_len > 0 or n.max_len is not None
        if esc == "\\":
            if byte == ord("u"):
                return [rest + (("str", i, count, 0, 0, 0, "u"),)]
            ok = b'"\\bfnrt' if self.python else b'"\\/bfnrt'
            return [rest + (("str", i, count, 0, 0, 0, ""),)] if byte in ok else []
        if esc:  # \u and the hex digits so far; D800-DFFF (surrogates) are not characters
            hex_digits = esc[1:] + chr(byte).lower()
            if chr(byte) not in "0123456789abcdefABCDEF" or (len(hex_digits) == 2 and hex_digits[0] == "d"
                                                             and hex_digits[1] in "89abcdef"):
                return []
            return [rest + (("str", i, count, 0, 0, 0, "" if len(hex_digits) == 4 else "u" + hex_digits),)]
        if need == 0 and byte == ord('"'):
            return self.settle(rest) if count >= n.min_len or not counted else []
        if need == 0 and (byte < 0x20 or byte == ord("\\")):
            if byte < 0x20 or (n.max_len is not None and count >= n.max_len):
                return []
            return [rest + (("str", i, count + counted, 0, 0, 0, "\\"),)]
        utf8 = utf8_step(need, lo, hi, byte)
        starts = need == 0  # a lead or ASCII byte starts a character
        if utf8 is None or (starts and n.max_len is not None and count >= n.max_len):
            return []
        return [rest + (("str", i, count + (counted and starts), *utf8, ""),)]

    def advance(self, state: frozenset, byte: int) -> frozenset:
        return frozenset(s for stack in state for s in self.step(stack, byte))

    def ends(self, stack: tuple) -> bool:
        """Whether the document may end with this stack (nothing due, or a number that may stop here)."""
        if not stack:
            return True
        top = stack[-1]
        if top[0] != "num":
            return False
        n = self.nodes[top[1]]
        return number_state(top[2], n.kind == "integer", n.minimum, n.maximum)[1] and any(
            self.ends(s) for s in self.settle(stack[:-1]))


# -----------------------------------------------------------------------------
# The vocabulary's columns, and the constraint
# -----------------------------------------------------------------------------


class TokenColumns:
    """What the token check needs of a tokenizer's vocabulary, computed once (about a second for 128,256 tokens)
    and kept on the tokenizer. Each text token's bytes are split into a plain prefix (no '"', '\\' or control
    byte) and a rest; of the prefix: `lead`, its leading continuation bytes (80-BF, finishing a character begun
    before), and of what follows them (the tail): whether it is valid UTF-8 (`tail_ok`), ends inside a character
    (`tail_open`), and how many characters it starts (`chars`). `rest` indexes the rests that begin with '"' or
    '\\' (in `rests`, sorted), -1 for none, -2 for a rest no string can hold (a control byte, a special token)."""

    def __init__(self, tokenizer: Tokenizer):
        n = tokenizer.n_words
        special = set(tokenizer.special_tokens.values())
        self.n_words = n
        self.bytes = [b"" if i in special else tokenizer.model.decode_single_token_bytes(i) for i in range(n)]
        text_ids = [i for i in range(n) if i not in special]
        self.order = sorted(text_ids, key=self.bytes.__getitem__)  # token ids by their bytes: a trie as a list
        self.sorted = [self.bytes[i] for i in self.order]
        rests = {}
        columns = {name: [0] * n for name in ("plen", "lead", "tail_ok", "tail_open", "chars", "first", "rest")}
        for i, b in enumerate(self.bytes):
            plen = next((j for j, c in enumerate(b) if c < 0x20 or c in b'"\\'), len(b))
            lead = next((j for j, c in enumerate(b[:plen]) if not 0x80 <= c <= 0xBF), plen)
            state = (0, 0, 0)
            chars = 0
            for c in b[lead:plen]:
                chars += state[0] == 0
                state = utf8_step(*state, c)
                if state is None:
                    break
            rest = -1 if plen == len(b) else -2
            if i in special or not b:
                rest = -2
            elif plen < len(b) and b[plen] in b'"\\':
                rest = rests.setdefault(b[plen:], len(rests))
            for name, value in (("plen", plen), ("lead", lead), ("tail_ok", state is not None),
                                ("tail_open", state is not None and state[0] > 0), ("chars", chars),
                                ("first", b[0] if plen else -1), ("rest", rest)):
                columns[name][i] = value
        self.rests = sorted(rests, key=rests.__getitem__)
        self.rest_order = sorted(range(len(self.rests)), key=self.rests.__getitem__)
        self.rests_sorted = [self.rests[r] for r in self.rest_order]
        for name, values in columns.items():
            setattr(self, name, torch.tensor(values))
        self.tail_ok = self.tail_ok.bool()
        self.tail_open = self.tail_open.bool()


def walk(items: list[bytes], state: frozenset, step: Callable[[frozenset, int], frozenset], lo: int = 0,
         hi: int | None = None, depth: int = 0, found: list[int] | None = None) -> list[int]:
    """Indices into items (sorted bytes) of those the automaton reads from `state` without failing: a trie walk
    where the entries items[lo:hi] share their first `depth` bytes, and a rejected byte skips every entry under
    it (found by bisection)."""
    hi = len(items) if hi is None else hi
    found = [] if found is None else found
    i = lo
    while i < hi:
        b = items[i]
        if len(b) == depth:  # the shared prefix itself: its parent counted it
            i += 1
            continue
        c = b[depth]
        j = bisect.bisect_left(items, b[:depth] + bytes([c + 1]), i, hi) if c < 255 else hi
        after = step(state, c)
        if after:
            if len(b) == depth + 1:
                found.append(i)
            walk(items, after, step, i, j, depth + 1, found)
        i = j
    return found


class JSONConstraint:
    """The constraint one answer is decoded under (make it with json_constraint or tool_call_constraint; one per
    answer, as it keeps the answer's state). allowed() is the bool mask (n_words,) of the next token's choices,
    mask(logits) applies it, advance(token) moves past the token chosen, is_complete() says whether the document
    is whole. Its stop tokens are allowed exactly when it is; after one, only stop tokens are."""

    def __init__(self, tokenizer: Tokenizer, automaton: Automaton, stop_tokens: list[int] | tuple[int, ...]):
        columns = getattr(tokenizer, "token_columns", None)
        if columns is None:  # computed once per tokenizer, whose vocabulary never changes
            columns = TokenColumns(tokenizer)
            tokenizer.token_columns = columns
        self.columns = columns
        self.automaton = automaton
        self.stop_tokens = list(stop_tokens)
        self.state = automaton.start
        self.stopped = False
        self.masks: dict[frozenset, torch.Tensor] = {}  # per state: states repeat (inside a string, every step)
        self.steps: dict[tuple[frozenset, int], frozenset] = {}

    def step(self, state: frozenset, byte: int) -> frozenset:
        key = (state, byte)
        if key not in self.steps:
            self.steps[key] = self.automaton.advance(state, byte)
        return self.steps[key]

    def is_complete(self) -> bool:
        """Whether the text so far is a whole document (its stop tokens are allowed)."""
        return self.stopped or any(self.automaton.ends(s) for s in self.state)

    def allowed(self) -> torch.Tensor:
        """(n_words,) bool: the tokens whose bytes keep the text a prefix of a document, and the stop tokens
        where it is whole."""
        if self.stopped:
            mask = torch.zeros(self.columns.n_words, dtype=torch.bool)
        elif self.state in self.masks:
            mask = self.masks[self.state].clone()
        else:
            mask = self.text_mask(self.state)
            self.masks[self.state] = mask.clone()
        if self.is_complete():
            mask[self.stop_tokens] = True
        return mask

    def text_mask(self, state: frozenset) -> torch.Tensor:
        c = self.columns
        mask = torch.zeros(c.n_words, dtype=torch.bool)
        if all(s and s[-1][0] == "str" and s[-1][6] == "" for s in state):  # inside a string: columns, and the rests
            for stack in state:
                mask |= self.string_mask(stack)
            return mask
        found = walk(c.sorted, state, self.step)  # elsewhere few tokens fit: walk the vocabulary's trie
        mask[[c.order[k] for k in found]] = True
        return mask

    def string_mask(self, stack: tuple) -> torch.Tensor:
        """The tokens allowed inside the string on top of stack: plain prefix, then rest (see TokenColumns)."""
        c = self.columns
        _, i, count, need, lo, hi, _ = stack[-1]
        n = self.automaton.nodes[i]
        short = c.plen <= need  # the whole prefix finishes (part of) the pending character
        ok = torch.where(short, c.lead == c.plen, (c.lead == need) & c.tail_ok)
        if need:
            ok &= (c.plen == 0) | ((c.first >= lo) & (c.first <= hi))
        chars = torch.where(short, 0, c.chars)
        if n.max_len is not None:
            ok &= count + chars <= n.max_len
        on_boundary = torch.where(short, c.plen == need, ~c.tail_open)  # the rest begins a new character
        has_rest = c.rest >= 0
        rest_ok = torch.zeros(c.n_words, dtype=torch.bool)
        counted = n.min_len > 0 or n.max_len is not None
        # The rest is read from the string after the prefix: its count grown by the prefix's characters.
        for k in chars[has_rest].unique().tolist() if counted else [0]:
            after = frozenset([stack[:-1] + (("str", i, count + k, 0, 0, 0, ""),)])
            valid = torch.zeros(len(c.rests) + 1, dtype=torch.bool)
            valid[[c.rest_order[j] for j in walk(c.rests_sorted, after, self.step)]] = True
            here = has_rest & (chars == k) if counted else has_rest
            rest_ok |= valid[c.rest.clamp(min=0)] & here
        return ok & ((c.rest == -1) | (on_boundary & rest_ok))

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """logits (1, vocab_size) with -inf where allowed() is False (and past the tokenizer's ids)."""
        n = min(logits.shape[-1], self.columns.n_words)
        allowed = torch.zeros(logits.shape[-1], dtype=torch.bool)
        allowed[:n] = self.allowed()[:n]
        return logits.masked_fill(~allowed.to(logits.device), float("-inf"))

    def advance(self, token: int) -> None:
        """Move past the chosen token; ValueError if allowed() forbade it."""
        if token in self.stop_tokens and self.is_complete():
            self.stopped = True
            return
        data = self.columns.bytes[token] if 0 <= token < self.columns.n_words else b""
        state = self.state
        for byte in data if not self.stopped else b"":
            state = self.step(state, byte)
        if not data or self.stopped or not state:
            raise ValueError(f"constraint: token {token} is not allowed here")
        self.state = state


def json_constraint(tokenizer: Tokenizer, schema: dict | bool | None = None,
                    stop_tokens: list[int] | tuple[int, ...] | None = None) -> JSONConstraint:
    """A constraint for one JSON document valid for schema (None: any JSON object, as OpenAI's json_object mode),
    ending with one of stop_tokens (default: the tokenizer's). ValueError names an unsupported keyword."""
    schema = {"type": "object"} if schema is None else schema
    check_schema(schema)
    compiler = SchemaCompiler(schema, python=False)
    root = compiler.compile(schema, "#")
    key = compiler.add(SchemaNode("string"))
    automaton = Automaton(compiler.nodes, root, key, compiler.any_value(), python=False)
    return JSONConstraint(tokenizer, automaton, tokenizer.stop_tokens if stop_tokens is None else stop_tokens)


def tool_call_constraint(tokenizer: Tokenizer, functions: list[dict], tool_format: str, name: str | None = None,
                         stop_tokens: list[int] | tuple[int, ...] | None = None) -> JSONConstraint:
    """A constraint for one call, written as tokenizer.encode_tool_calls writes it in tool_format, to the function
    `name`, or to any of them (None: OpenAI's tool_choice "required"). functions: OpenAI function objects, {"name",
    "description"?, "parameters"?: a JSON schema of type object}; the arguments are valid for it, properties in
    its order. python_list writes the declared properties only, as keywords, and dicts and lists inside them in
    Python syntax (True, None), as its parser reads them (tokenizer.python_literal writes a dict as JSON).
    Default stop tokens: <|eom_id|> and <|eot_id|>."""
    from tokenizer import TOOL_FORMATS

    if tool_format not in TOOL_FORMATS:
        raise ValueError(f"tool_format {tool_format!r}: expected one of {', '.join(TOOL_FORMATS)}")
    names = [f.get("name") if isinstance(f, dict) else None for f in functions]
    if not functions or not all(isinstance(f, str) and f for f in names):
        raise ValueError("functions: a non-empty list of {\"name\": str, \"parameters\": schema} objects")
    if name is not None and name not in names:
        raise ValueError(f"name: no function named {name!r}; the functions are: {', '.join(names)}")
    python = tool_format == "python_list"
    compiler = SchemaCompiler({}, python)
    calls = []
    for f in functions:
        if name is not None and f["name"] != name:
            continue
        parameters = f.get("parameters") or {"type": "object", "properties": {}, "additionalProperties": False}
        try:
            check_schema(parameters)
        except ValueError as e:
            raise ValueError(f"function {f['name']!r}: {e}") from None
        if parameters.get("type") != "object":
            raise ValueError(f"function {f['name']!r}: its parameters must be a schema of type \"object\"")
        compiler.root = parameters
        compiler.at = {}  # each function's pointers are its own
        if python:
            if not f["name"].isidentifier():
                raise ValueError(f"python_list calls need a Python name, not {f['name']!r}")
            args = compiler.add(compiler.object(parameters, "#", b"", b"", python_keywords=True))
            open_, close = f"[{f['name']}(", ")]"
        elif tool_format == "json":
            args = compiler.compile(parameters, "#")
            open_, close = f'{{"type": "function", "name": {json.dumps(f["name"])}, "parameters": ', "}"
        else:
            args = compiler.compile(parameters, "#")
            open_, close = f"<function={f['name']}>", "</function>"
        calls.append(compiler.add(SchemaNode("seq", open=open_.encode(), items=args, close=close.encode())))
    root = compiler.add(SchemaNode("alts", alts=tuple(calls)))
    key = compiler.add(SchemaNode("string"))
    automaton = Automaton(compiler.nodes, root, key, compiler.any_value(), python)
    stops = [tokenizer.eom_id, tokenizer.eot_id] if stop_tokens is None else stop_tokens
    return JSONConstraint(tokenizer, automaton, stops)


def read_json_schema(path: str | Path) -> dict:
    """--json-schema FILE: the schema in FILE, checked; ValueError naming the flag, the file and what is wrong."""
    try:
        schema = json.loads(Path(path).read_text(encoding="utf-8"))
        check_schema(schema)
    except OSError as e:
        raise ValueError(f"--json-schema {path}: {e.strerror or e}") from None
    except ValueError as e:  # json.JSONDecodeError and UnicodeDecodeError too
        raise ValueError(f"--json-schema {path}: {e}") from None
    return schema


# =============================================================================
# Run as a script (after the appendices, so that they are defined when main runs)
# =============================================================================

if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)  # torch is loaded: Ctrl-C raises again
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C while loading or waiting: a quiet end, not a traceback
        print("\nllama3.py: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
