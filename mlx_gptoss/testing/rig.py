"""Rig a tiny random model so greedy decoding writes a chosen reply (random weights almost never
write valid harmony): a bigram chain, one successor per token.

The embedding of every chain token is scaled so far up that the last token dominates the residual
stream through all blocks; the final norm's weights are set to one (it keeps the direction); the
unembedding maps each chain token's direction to its successor. So whatever the prompt, the token
after ``<|start|>assistant`` is the reply's first, and each reply token is followed by the next.

Two ways to apply the same weights: :func:`rig` changes a loaded model in memory (fast; re-rig
between turns to script a tool loop), and :meth:`Rig.edit` changes the tensors
:func:`~.checkpoints.write_release` writes (``tiny_model(rig=...)``: the CLI and the server then
answer with the reply too).
"""

from __future__ import annotations

from collections.abc import Mapping

import mlx.core as mx
import mlx.nn as nn
import numpy as np

EMBED, NORM, HEAD = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"  # Hugging Face names
BOOST = 1e4  # a chain token's embedding norm: far above what any block adds to the residual stream
HEAD_GAIN = 100.0  # the successor's logit margin over every other token


def reply_text(reply: str) -> str:
    """The harmony the model should write after ``<|start|>assistant``: ``reply`` itself when it is
    harmony (it holds ``<|...|>`` tokens, e.g. a tool call ending in ``<|call|>``), else a final
    answer: ``<|channel|>final<|message|>{reply}<|return|>``."""
    return reply if "<|" in reply else f"<|channel|>final<|message|>{reply}<|return|>"


def successors(tokens: list[int]) -> dict[int, int]:
    """The bigram map of a token sequence; a token followed by two different tokens is refused."""
    nxt: dict[int, int] = {}
    for a, b in zip(tokens, tokens[1:]):
        if nxt.setdefault(a, b) != b:
            raise ValueError(
                f"token {a} is followed by both {nxt[a]} and {b}: a bigram rig cannot write this reply "
                f"(each token may be followed by one token only; reword it so no token repeats with another successor)"
            )
    return nxt


def reply_chain(encoding, reply: str, *, loop: bool = False) -> dict[int, int]:  # noqa: ANN001
    """token -> successor, so that greedy decoding writes :func:`reply_text` after ``<|start|>assistant``.
    ``loop``: the reply's last token is followed by itself (a reply that never stops)."""
    start = encoding.encode("<|start|>assistant", allowed_special="all")[-1:]
    toks = start + encoding.encode(reply_text(reply), allowed_special="all")
    nxt = successors(toks)
    if loop:
        nxt[toks[-1]] = toks[-1]
    return nxt


class Rig:
    """The weights that make greedy decoding follow ``nxt`` (token -> successor) for a model of
    ``hidden_size`` and ``vocab_size``."""

    def __init__(self, nxt: Mapping[int, int], hidden_size: int, vocab_size: int, *, seed: int = 0):
        self.nxt, self.H, self.V = dict(nxt), hidden_size, vocab_size
        toks = sorted(set(nxt) | set(nxt.values()))
        if toks[-1] >= vocab_size:
            raise ValueError(f"the reply uses token {toks[-1]}, outside the model's vocabulary of {vocab_size}")
        # directions nearly orthogonal in H dims: random unit vectors
        dirs = np.random.default_rng(seed).standard_normal((len(toks), hidden_size)).astype(np.float32)
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
        self.dirs = {t: dirs[i] for i, t in enumerate(toks)}

    def embed_rows(self, first: int, rows: np.ndarray) -> np.ndarray:
        """Embedding rows ``first..`` with the chain tokens' rows replaced."""
        rows = np.array(rows, dtype=np.float32)
        for t, d in self.dirs.items():
            if first <= t < first + len(rows):
                rows[t - first] = d * BOOST
        return rows

    def head_rows(self, first: int, n: int) -> np.ndarray:
        """Unembedding rows ``first..first+n``: zero, but each successor's row points at its predecessor."""
        rows = np.zeros((n, self.H), dtype=np.float32)
        for a, b in self.nxt.items():
            if first <= b < first + n:
                rows[b - first] += self.dirs[a] * HEAD_GAIN
        return rows

    def edit(self, name: str, first: int, rows: np.ndarray) -> np.ndarray:
        """For :func:`~.checkpoints.write_release`: the rigged values of the embedding, final norm and unembedding."""
        if name == EMBED:
            return self.embed_rows(first, rows)
        if name == NORM:
            return np.ones_like(rows)
        if name == HEAD:
            return self.head_rows(first, len(rows))
        return rows

    def apply(self, model: nn.Module) -> None:
        """Rig a loaded model in memory (float embedding and unembedding: not a quantized or host one)."""
        emb, head = model.embed_tokens, model.lm_head
        if type(emb) is not nn.Embedding or type(head) is not nn.Linear:
            raise ValueError(
                "rig needs a float embedding and unembedding held by MLX: load the model without a memory "
                "budget, from a conversion without --preset/--embedding/--lm-head quantization"
            )
        emb.weight = mx.array(self.embed_rows(0, np.array(emb.weight.astype(mx.float32)))).astype(emb.weight.dtype)
        model.norm.weight = mx.ones_like(model.norm.weight)
        head.weight = mx.array(self.head_rows(0, self.V)).astype(head.weight.dtype)
        mx.eval(model.parameters())


def rig(model: nn.Module, reply: str, *, loop: bool = False, seed: int = 0) -> None:
    """Make greedy decoding of a loaded tiny model write ``reply`` (see :func:`reply_text`) as the
    assistant's next message, whatever the prompt; call again to script the next turn."""
    nxt = reply_chain(model.tokenizer.encoding, reply, loop=loop)
    Rig(nxt, model.config.hidden_size, model.config.vocab_size, seed=seed).apply(model)
