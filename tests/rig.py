"""Rig a tiny random model so greedy decoding writes a chosen reply (random weights almost never
write valid harmony): a bigram chain, one successor per token.

The embedding of every chain token is scaled so far up that the last token dominates the residual
stream through all blocks; the unembedding maps each chain token's direction to its successor.
"""

from __future__ import annotations

from collections.abc import Mapping

import mlx.core as mx
import numpy as np


def successors(tokens: list[int]) -> dict[int, int]:
    """The bigram map of a token sequence; a token followed by two different tokens is refused."""
    nxt: dict[int, int] = {}
    for a, b in zip(tokens, tokens[1:]):
        if nxt.setdefault(a, b) != b:
            raise ValueError(f"token {a} is followed by both {nxt[a]} and {b}: not a bigram chain")
    return nxt


def rig_bigram(model, nxt: Mapping[int, int], *, seed: int = 0, boost: float = 1e4) -> None:
    """Make greedy decoding follow ``nxt`` (token -> successor) for every token in it (float models)."""
    H = model.config.hidden_size
    rng = np.random.default_rng(seed)
    toks = sorted(set(nxt) | set(nxt.values()))
    # directions nearly orthogonal in H dims: random unit vectors
    dirs = rng.standard_normal((len(toks), H)).astype(np.float32)
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    row = {t: i for i, t in enumerate(toks)}
    emb = np.array(model.embed_tokens.weight.astype(mx.float32))
    for t in toks:
        emb[t] = dirs[row[t]] * boost
    head = np.zeros((model.config.vocab_size, H), dtype=np.float32)
    for a, b in nxt.items():
        head[b] += dirs[row[a]] * 100.0
    dtype = model.embed_tokens.weight.dtype
    model.embed_tokens.weight = mx.array(emb).astype(dtype)
    # the final RMSNorm keeps the direction; undo its learned per-channel weights
    model.norm.weight = mx.ones_like(model.norm.weight)
    model.lm_head.weight = mx.array(head).astype(model.lm_head.weight.dtype)
    mx.eval(model.parameters())
