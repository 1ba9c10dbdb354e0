"""gpt-oss in MLX: the architecture, nothing else.

Parameter names are the keys of the converted checkpoint (see ``convert/layout.py``), so loading
needs no renaming. Shape legend: B batch, T tokens, H hidden, E experts, K experts per token,
Hq/Hkv query/key-value heads, D head dim.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from . import decode, kernels
from .cache import KVCache, SlidingKVCache, causal_mask, window_mask
from .config import FULL, SLIDING, GptOssConfig
from .layers import QuantLinear, embedding, linear
from .rope import YarnRope

Tap = Callable[[str, Any], Any]  # a block's hook tap: (point, value) -> value (see :mod:`mlx_gptoss.inspect.hooks`)


class Attention(nn.Module):
    """GQA with biases, learned per-head sinks and an optional sliding window."""

    def __init__(self, cfg: GptOssConfig, rope: YarnRope):
        super().__init__()
        self.n_q, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        # q, k and v stacked on rows (as in openai's original layout): one matmul instead of three.
        q = cfg.quant("attention")
        self.qkv = linear(cfg.hidden_size, cfg.qkv_dim, True, q)
        self.o_proj = linear(self.n_q * self.head_dim, cfg.hidden_size, True, q)
        self.sinks = mx.zeros((self.n_q,))
        self._rope = rope
        self._scale = rope.logit_scale / math.sqrt(self.head_dim)
        # training's seam: a cache-less pass attends this many queries at a time, each chunk
        # recomputed in the backward, so its gradient holds [c, T] scores per head, not [T, T]
        self.query_chunk: int | None = None

    def project(self, x: mx.array, offset: int | mx.array) -> tuple[mx.array, mx.array, mx.array]:
        """q [B, Hq, T, D], k and v [B, Hkv, T, D] for tokens at positions offset.., RoPE applied."""
        B, T, _ = x.shape
        nq, nqk = self.n_q, self.n_q + self.n_kv
        qkv = self.qkv(x).reshape(B, T, -1, self.head_dim).transpose(0, 2, 1, 3)  # [B, Hq+2Hkv, T, D]
        qk = self._rope(qkv[:, :nqk], offset)  # one RoPE call for q and k (few ops: decode is launch-bound)
        return qk[:, :nq], qk[:, nq:], qkv[:, nqk:]

    def attend(self, q: mx.array, k: mx.array, v: mx.array, mask: Any, tap: Tap | None = None) -> mx.array:
        """Attention (with sinks) of q over k/v, then the output projection: [B, T, H]."""
        B, _, T, _ = q.shape
        o = mx.fast.scaled_dot_product_attention(q, k, v, scale=self._scale, mask=mask, sinks=self.sinks)
        if tap is not None:
            o = tap("attn.heads", o)  # [B, Hq, T, D]
        return self.o_proj(o.transpose(0, 2, 1, 3).reshape(B, T, -1))

    def __call__(self, x: mx.array, mask: Any, cache: KVCache | SlidingKVCache | None, tap: Tap | None = None) -> mx.array:
        q, k, v = self.project(x, cache.offset if cache is not None else 0)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        elif self.query_chunk and q.shape[2] > self.query_chunk:
            return self._attend_chunked(q, k, v, mask, self.query_chunk)
        return self.attend(q, k, v, mask, tap)

    def _attend_chunked(self, q: mx.array, k: mx.array, v: mx.array, mask: Any, c: int) -> mx.array:
        """:meth:`attend` of a cache-less pass, ``c`` queries at a time over the keys up to the chunk's end."""
        B, _, T, _ = q.shape

        def chunk(m: Any) -> Any:
            # the sinks enter as an input: an array a checkpointed function closes over gets no gradient
            def run(qc: mx.array, kc: mx.array, vc: mx.array, sinks: mx.array) -> mx.array:
                return mx.fast.scaled_dot_product_attention(qc, kc, vc, scale=self._scale, mask=m, sinks=sinks)

            return mx.checkpoint(run)

        outs = []
        for s in range(0, T, c):
            e = min(s + c, T)
            # "causal" aligns the queries with the last keys: query s + i sees keys 0..s + i
            m = mask if mask is None or isinstance(mask, str) else mask[s:e, :e]
            outs.append(chunk(m)(q[:, :, s:e], k[:, :, :e], v[:, :, :e], self.sinks))
        o = mx.concatenate(outs, axis=2)
        return self.o_proj(o.transpose(0, 2, 1, 3).reshape(B, T, -1))


class MXFP4Experts(nn.Module):
    """E stacked linear maps stored as released MXFP4: codes [E, out, in/8] u32, scales [E, out, in/32] u8."""

    def __init__(self, n_experts: int, d_in: int, d_out: int):
        super().__init__()
        self.weight = mx.zeros((n_experts, d_out, d_in // 8), dtype=mx.uint32)
        self.scales = mx.zeros((n_experts, d_out, d_in // 32), dtype=mx.uint8)
        self.bias = mx.zeros((n_experts, d_out))


class MoE(nn.Module):
    """Router (top-k, softmax over the selected) and MXFP4 experts with the clamped SwiGLU."""

    def __init__(self, cfg: GptOssConfig):
        super().__init__()
        self.k, self.limit, self.alpha = cfg.num_experts_per_tok, cfg.swiglu_limit, cfg.swiglu_alpha
        E, H, I = cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size
        self.router = linear(H, E, True, cfg.quant("router"))  # quantized in mlx-community's MXFP4-Q8 exports
        # gate_up keeps the released interleaving: row 2j is gate j, row 2j+1 is up j.
        self.gate_up = MXFP4Experts(E, H, 2 * I)
        self.down = MXFP4Experts(E, I, H)
        # the adapters' seam: a module whose delta() is a kernels.ExpertsDelta for the routed experts
        self.experts_lora: nn.Module | None = None

    def __call__(self, x: mx.array, residual: mx.array | None = None, tap: Tap | None = None) -> mx.array:
        """The routed experts' sum for x [..., H], plus ``residual`` when given (fused on GPUs)."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [N, H]
        logits = self.router(x)
        if tap is not None:
            logits = tap("router.logits", logits)
        indices, weights = kernels.route_topk_softmax(logits, self.k)
        if tap is not None:
            indices, weights = tap("router.topk", (indices, weights))
        g, d, lora = self.gate_up, self.down, self.experts_lora
        y = kernels.moe_mxfp4_swiglu(
            x, indices, weights, g.weight, g.scales, g.bias, d.weight, d.scales, d.bias,
            limit=self.limit, alpha=self.alpha, residual=None if residual is None else residual.reshape(x.shape),
            delta=None if lora is None else lora.delta(),
        )  # fmt: skip
        return y.reshape(shape)


class Block(nn.Module):
    def __init__(self, cfg: GptOssConfig, rope: YarnRope):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, rope)
        self.post_attention_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.mlp = MoE(cfg)

    def __call__(self, x: mx.array, mask: Any, cache: Any, tap: Tap | None = None) -> mx.array:
        if tap is None:  # the plain pass: no hook anywhere in this block
            x = x + self.self_attn(self.input_layernorm(x), mask, cache)
            return self.mlp(self.post_attention_layernorm(x), residual=x)
        x = tap("input", x)
        x = tap("resid.mid", x + tap("attn.out", self.self_attn(self.input_layernorm(x), mask, cache, tap)))
        return tap("resid.post", x + tap("moe.out", self.mlp(self.post_attention_layernorm(x), tap=tap)))


class GptOss(nn.Module):
    """The gpt-oss language model: ``model(ids[B, T], cache) -> logits[B, T, V]``.

    ``make_cache()`` gives one cache per layer (sliding layers keep only their window); passing
    it continues from where the previous call stopped.
    """

    def __init__(self, config: GptOssConfig):
        super().__init__()
        self.config = config
        rope = YarnRope(config.head_dim, config.rope_theta, config.rope_scaling)
        self.embed_tokens = embedding(config.vocab_size, config.hidden_size, config.quant("embed_tokens"))
        self.layers = [Block(config, rope) for _ in range(config.num_hidden_layers)]
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.lm_head = linear(config.hidden_size, config.vocab_size, False, config.quant("lm_head"))
        self.tokenizer: Any = None  # set by the loader
        # the research hooks' seam (mlx_gptoss.inspect): None runs the plain pass; when set, each
        # block asks hooks.block(i) for a tap and the model calls hooks.at(name, value) at its points
        self.hooks: Any = None
        self._decoder: decode.CompiledDecode | None = None

    def make_cache(self, reserve: int = 0) -> list[KVCache | SlidingKVCache]:
        """Fresh per-layer KV caches; ``reserve`` allocates that many positions up front."""
        W, c = self.config.sliding_window, self.config
        dtype = self.layers[0].input_layernorm.weight.dtype
        shape = (1, c.num_key_value_heads, c.head_dim)
        return [SlidingKVCache(W) if t == SLIDING else KVCache(reserve, shape, dtype) for t in c.layer_types]

    def masks(self, T: int, cache: list | None = None) -> dict[str, Any]:
        """The attention mask of each layer type for T new tokens after what ``cache`` holds."""
        types = self.config.layer_types
        sliding = cache[types.index(SLIDING)] if cache is not None and SLIDING in types else None
        n_before = sliding.n_fetched_before(T) if sliding is not None else 0
        return {FULL: causal_mask(T), SLIDING: window_mask(T, n_before, self.config.sliding_window)}

    def hidden_states(self, ids: mx.array, cache: list | None = None) -> mx.array:
        """The final-norm hidden states [B, T, H]. Token ids outside the vocabulary raise ValueError,
        except in a one-token step with a cache (the decode loop's, which checks its own ids: a
        check here would make every step wait for the previous one)."""
        if cache is None or ids.ndim != 2 or ids.shape[1] != 1:
            self._check_ids(ids)
        hooks = self.hooks
        x = self.embed_tokens(ids)
        if hooks is not None:
            x = hooks.at("embed.out", x)
        masks = self.masks(ids.shape[1], cache)
        for i, layer in enumerate(self.layers):
            tap = None if hooks is None else hooks.block(i)
            x = layer(x, masks[self.config.layer_types[i]], cache[i] if cache is not None else None, tap)
        x = self.norm(x)
        return x if hooks is None else hooks.at("final.norm", x)

    def __call__(self, ids: mx.array, cache: list | None = None) -> mx.array:
        if decode.enabled() and cache is not None and ids.shape == (1, 1) and self._plain():
            if self._decoder is None:
                self._decoder = decode.CompiledDecode(self)
            if self._decoder.supports(ids, cache):
                return self._decoder(ids, cache)
        logits = self.lm_head(self.hidden_states(ids, cache))
        return logits if self.hooks is None else self.hooks.at("logits", logits)

    def _check_ids(self, ids: mx.array) -> None:
        # the embedding's gather does not check: an id past the table reads garbage or crashes the process
        V = self.config.vocab_size
        if not mx.issubdtype(ids.dtype, mx.integer):
            raise ValueError(f"token ids must be integers; got an array of {ids.dtype}")
        if ids.size:
            lo, hi = mx.stack([ids.min(), ids.max()]).tolist()  # one host sync per call
            if lo < 0 or hi >= V:
                raise ValueError(f"token ids must be in 0..{V - 1} (the model's vocabulary); got ids in {lo}..{hi}")

    def _plain(self) -> bool:
        # the compiled step traces MLX ops only: not the streamed experts' or host embedding's Python;
        # and it captures the weights it reads when traced: adapters (added or changed later) stay eager
        plain = (nn.Linear, QuantLinear)
        return self.hooks is None and isinstance(self.embed_tokens, nn.Module) and all(
            type(layer.mlp) is MoE and layer.mlp.experts_lora is None and isinstance(layer.mlp.router, plain)
            and isinstance(layer.self_attn.qkv, plain) and isinstance(layer.self_attn.o_proj, plain)
            for layer in self.layers
        )  # fmt: skip
