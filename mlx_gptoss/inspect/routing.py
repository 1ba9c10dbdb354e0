"""Routing: which experts each token went to, recorded during generation, and statistics over data.

    with inspect.record_routing(model) as rec:
        result = mlx_gptoss.generate(model, "Hello", max_tokens=50)
    rec.ids, rec.weights                          # [tokens, layers, k] for every computed position
    rec.save("routing.jsonl", tokens=prompt + result.tokens, tokenizer=model.tokenizer)

    stats = RoutingStats.empty(model)
    stats.add(rec.ids, rec.weights, kinds)        # or routing_stats(model, conversations)
    stats.to_json()                               # usage, entropy, co-activation, per token kind

Kinds of token: ``prompt`` (what the model was given: system, developer, user, tool results),
``reasoning`` (the assistant's analysis channel), ``final`` (its answer), ``tool_call`` (its
messages to a tool) and ``header`` (harmony's own tokens of assistant messages).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from openai_harmony import Conversation, Role

from ..chat import ChatSession
from ..fingerprint import base_fingerprint
from ..generate import prefill
from ..harmony import for_rendering
from ..kernels import moe_mxfp4_pairs
from .hooks import Point, hooked

KINDS = ("prompt", "header", "reasoning", "final", "tool_call")


class RoutingRecorder:
    """Routed expert ids and weights of every token the model computes, every layer, in order."""

    def __init__(self, n_layers: int):
        self._calls: list[list[tuple[mx.array, mx.array] | None]] = []
        self._n = n_layers

    def _record(self, pair: tuple[mx.array, mx.array], point: Point) -> None:
        if point.layer == 0:
            self._calls.append([None] * self._n)
        ids, weights = pair[0], pair[1].astype(mx.float32)  # float32: NumPy has no bfloat16
        mx.async_eval(ids, weights)
        self._calls[-1][point.layer] = (ids, weights)

    def _stack(self, which: int) -> np.ndarray:
        rows = [np.stack([np.array(c[i][which]) for i in range(self._n)], axis=1) for c in self._calls if c[-1] is not None]
        return np.concatenate(rows, axis=0) if rows else np.zeros((0, self._n, 0))

    @property
    def ids(self) -> np.ndarray:
        """Expert ids [tokens, layers, k] (uint32), one row per computed position."""
        return self._stack(0).astype(np.uint32)

    @property
    def weights(self) -> np.ndarray:
        """Routing weights [tokens, layers, k] (float32), rows as :attr:`ids`."""
        return self._stack(1).astype(np.float32)

    def save(
        self, path: str | Path, *, tokens: Sequence[int] | None = None, tokenizer: Any = None, first_generated: int | None = None
    ) -> Path:
        """Write the record: ``.jsonl`` (one line per position: position, token and its text when
        given, whether it was generated, experts and weights per layer) or ``.npz`` (the arrays)."""
        path = Path(path)
        ids, weights = self.ids, self.weights
        if path.suffix == ".npz":
            extra = {} if tokens is None else {"tokens": np.asarray(list(tokens)[: len(ids)], dtype=np.int64)}
            np.savez(path, ids=ids, weights=weights, **extra)
            return path
        if path.suffix != ".jsonl":
            raise ValueError(f"{path}: the suffix says the format: .jsonl or .npz")
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "w") as f:
            for p in range(len(ids)):
                row: dict[str, Any] = {"position": p}
                if tokens is not None and p < len(tokens):
                    row["token"] = int(tokens[p])
                    if tokenizer is not None:
                        row["text"] = tokenizer.decode([int(tokens[p])])
                if first_generated is not None:
                    row["generated"] = p >= first_generated
                row["experts"] = ids[p].tolist()
                row["weights"] = [[round(float(w), 6) for w in layer] for layer in weights[p]]
                f.write(json.dumps(row) + "\n")
        tmp.replace(path)  # whole or not at all
        return path


@contextmanager
def record_routing(model: Any) -> Iterator[RoutingRecorder]:
    """Record the routing of every layer for every position computed inside the block."""
    rec = RoutingRecorder(model.config.num_hidden_layers)
    names = [f"blocks.{i}.router.topk" for i in range(model.config.num_hidden_layers)]
    with hooked(model, dict.fromkeys(names, rec._record)):
        yield rec


_HEADER = re.compile(r"<\|start\|>(?P<role>[^\s<]+)(?P<rest>.*)<\|message\|>$", re.S)


def token_kinds(encoding: Any, tokens: Sequence[int]) -> list[str]:
    """The kind of each token of a harmony token sequence (see the module docstring).

    A message's header (``<|start|>`` .. ``<|message|>``) and end token belong to it: ``header``
    for an assistant's, ``prompt`` for any other; an assistant's content is ``tool_call`` when the
    header names a recipient, else ``reasoning`` on the analysis channel, else ``final``. Tokens
    outside any message (and a header never closed) count as ``prompt``."""
    sp = {
        s: encoding.encode(s, allowed_special="all")[0] for s in ("<|start|>", "<|message|>", "<|end|>", "<|call|>", "<|return|>")
    }
    ends = {sp["<|end|>"], sp["<|call|>"], sp["<|return|>"]}
    kinds = ["prompt"] * len(tokens)
    header: list[int] | None = None  # positions of the open header
    content = own = "prompt"  # the kinds of the current message's content and of its own tokens
    for pos, t in enumerate(tokens):
        t = int(t)
        if t == sp["<|start|>"]:
            header, content = [pos], "prompt"
        elif header is not None:
            header.append(pos)
            if t == sp["<|message|>"]:
                m = _HEADER.match(encoding.decode([int(tokens[p]) for p in header]))
                role, rest = (m.group("role"), m.group("rest")) if m else ("", "")
                own = "header" if role == "assistant" else "prompt"
                to = re.search(r"to=(\S+?)(?:<\||\s|$)", rest)
                channel = re.search(r"<\|channel\|>(\w+)", rest)
                if role != "assistant":
                    content = "prompt"
                elif to and to.group(1) != "assistant":
                    content = "tool_call"
                else:
                    content = "reasoning" if channel and channel.group(1) == "analysis" else "final"
                for p in header:
                    kinds[p] = own
                header = None
        elif t in ends:
            kinds[pos], content = own, "prompt"
        else:
            kinds[pos] = content
    return kinds


@dataclass
class RoutingStats:
    """Counts of routing decisions per layer and expert, overall and by kind of token."""

    layers: int
    experts: int
    k: int
    model: str  # the base fingerprint of the model the routing came from
    tokens: int = 0
    counts: np.ndarray = field(default=None)  # [L, E] times each expert was chosen
    weight_sums: np.ndarray = field(default=None)  # [L, E] sum of its routing weights
    coactivation: np.ndarray = field(default=None)  # [L, E, E] tokens routed to both experts
    weight_entropy_sum: np.ndarray = field(default=None)  # [L] sum over tokens of the entropy of their k weights
    by_kind: dict[str, np.ndarray] = field(default_factory=dict)  # kind -> [L, E] counts
    tokens_by_kind: dict[str, int] = field(default_factory=dict)
    saliency: np.ndarray | None = None  # [L, E] sum of weight x |expert output| (when measured)

    @classmethod
    def empty(cls, model: Any) -> RoutingStats:
        c = model.config
        L, E = c.num_hidden_layers, c.num_local_experts
        return cls(L, E, c.num_experts_per_tok, base_fingerprint(model), 0, np.zeros((L, E), np.int64),
                   np.zeros((L, E), np.float64), np.zeros((L, E, E), np.int64), np.zeros(L, np.float64))  # fmt: skip

    def add(self, ids: np.ndarray, weights: np.ndarray, kinds: Sequence[str] | None = None) -> None:
        """Count the routing of ``ids``/``weights`` [tokens, layers, k], each token of ``kinds``."""
        ids = np.asarray(ids, dtype=np.int64)
        weights = np.asarray(weights, dtype=np.float64)
        N = ids.shape[0]
        if N == 0:
            return
        if ids.shape[1:] != (self.layers, self.k):
            raise ValueError(f"routing of shape {ids.shape} does not fit {self.layers} layers x top-{self.k}")
        if kinds is not None and len(kinds) != N:
            raise ValueError(f"{len(kinds)} kinds for {N} tokens")
        self.tokens += N
        onehot = np.zeros((N, self.layers, self.experts), np.int64)
        np.put_along_axis(onehot, ids, 1, axis=2)
        self.counts += onehot.sum(axis=0)
        w = np.zeros((N, self.layers, self.experts))
        np.put_along_axis(w, ids, weights, axis=2)
        self.weight_sums += w.sum(axis=0)
        self.coactivation += np.einsum("nle,nlf->lef", onehot, onehot)
        p = np.clip(weights, 1e-12, 1.0)
        self.weight_entropy_sum += -(weights * np.log2(p)).sum(axis=2).sum(axis=0)
        if kinds is not None:
            for kind in set(kinds):
                sel = np.array([k == kind for k in kinds])
                self.by_kind.setdefault(kind, np.zeros((self.layers, self.experts), np.int64))
                self.by_kind[kind] += onehot[sel].sum(axis=0)
                self.tokens_by_kind[kind] = self.tokens_by_kind.get(kind, 0) + int(sel.sum())

    def usage(self) -> np.ndarray:
        """[L, E]: the share of each layer's routing decisions that went to each expert."""
        return self.counts / np.maximum(self.counts.sum(axis=1, keepdims=True), 1)

    def usage_entropy(self) -> np.ndarray:
        """[L] entropy (bits) of each layer's expert usage; log2(E) when usage is uniform."""
        u = self.usage()
        return -(u * np.log2(np.where(u > 0, u, 1.0))).sum(axis=1)

    def ranking(self, by: str = "usage") -> np.ndarray:
        """[L, E] expert ids per layer, most used (or most salient) first; ties by lower id."""
        if by == "saliency":
            if self.saliency is None:
                raise ValueError("these statistics hold no saliency (collect them with saliency=True / --saliency)")
            score = self.saliency
        elif by == "usage":
            score = self.counts
        else:
            raise ValueError(f"by must be usage or saliency; got {by!r}")
        return np.argsort(-score, axis=1, kind="stable")

    def to_json(self) -> dict:
        """The statistics as JSON: counts, usage, entropies, co-activation, per kind of token."""
        out = {
            "format": "mlx-gptoss-routing-stats", "version": 1, "model": self.model, "layers": self.layers,
            "experts": self.experts, "k": self.k, "tokens": self.tokens, "counts": self.counts.tolist(),
            "usage": np.round(self.usage(), 6).tolist(), "usage_entropy_bits": np.round(self.usage_entropy(), 6).tolist(),
            "usage_entropy_max_bits": float(np.log2(self.experts)),
            "weight_entropy_bits": np.round(self.weight_entropy_sum / max(self.tokens, 1), 6).tolist(),
            "weight_sums": np.round(self.weight_sums, 6).tolist(), "coactivation": self.coactivation.tolist(),
            "by_kind": {k: {"tokens": self.tokens_by_kind[k], "counts": v.tolist()} for k, v in sorted(self.by_kind.items())},
        }  # fmt: skip
        if self.saliency is not None:
            out["saliency"] = np.round(self.saliency, 6).tolist()
        return out

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(self.to_json()) + "\n")
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> RoutingStats:
        """Read statistics written by :meth:`save`; a file of another kind is a ValueError naming it."""
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except (OSError, ValueError, RecursionError) as e:
            raise ValueError(f"{path}: not a routing statistics file ({e})") from None
        if not isinstance(d, dict) or d.get("format") != "mlx-gptoss-routing-stats" or d.get("version") != 1:
            raise ValueError(
                f"{path}: not a routing statistics file of this version (format mlx-gptoss-routing-stats, version 1)"
            )
        try:
            L, E = int(d["layers"]), int(d["experts"])
            counts = np.asarray(d["counts"], dtype=np.int64)
            if counts.shape != (L, E):
                raise ValueError(f"counts has shape {counts.shape}, expected ({L}, {E})")
            stats = cls(L, E, int(d["k"]), str(d["model"]), int(d["tokens"]), counts,
                        np.asarray(d["weight_sums"], dtype=np.float64), np.asarray(d["coactivation"], dtype=np.int64),
                        np.asarray(d["weight_entropy_bits"], dtype=np.float64) * max(int(d["tokens"]), 1))  # fmt: skip
            for kind, v in d.get("by_kind", {}).items():
                stats.by_kind[kind] = np.asarray(v["counts"], dtype=np.int64)
                stats.tokens_by_kind[kind] = int(v["tokens"])
            if "saliency" in d:
                stats.saliency = np.asarray(d["saliency"], dtype=np.float64)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: a damaged routing statistics file ({e})") from None
        return stats

    def check_model(self, model_or_path: Any, what: str = "these statistics") -> None:
        """Refuse a model other than the one the statistics were collected on, naming both."""
        have = base_fingerprint(model_or_path)
        if have != self.model:
            raise ValueError(f"{what} were collected on another model ({self.model}); this one is {have}")


def saliency_hooks(model: Any, stats: RoutingStats) -> dict[str, Any]:
    """Hooks that add each routed expert's weight x the norm of its output to ``stats.saliency``.

    They run the layer's experts once more on the MoE input (the pairs path of the kernels), so a
    pass with saliency costs about one more MoE per layer."""
    if stats.saliency is None:
        stats.saliency = np.zeros((stats.layers, stats.experts), np.float64)
    seen: dict[int, mx.array] = {}

    def keep_input(x: mx.array, point: Point) -> None:
        seen[point.layer] = x

    def measure(pair: tuple[mx.array, mx.array], point: Point) -> None:
        i = point.layer
        layer = model.layers[i]
        mlp = layer.mlp
        x = layer.post_attention_layernorm(seen.pop(i)).reshape(-1, model.config.hidden_size)
        ids, w = pair
        g, d = mlp.gate_up, mlp.down
        if not hasattr(g, "weight"):
            raise ValueError("saliency needs the experts in memory: load the model without a memory budget")
        y = moe_mxfp4_pairs(x, ids, g.weight, g.scales, g.bias, d.weight, d.scales, d.bias, limit=mlp.limit, alpha=mlp.alpha)
        score = w.astype(mx.float32) * mx.linalg.norm(y.astype(mx.float32), axis=-1)  # [N, K]
        s = np.zeros((ids.shape[0], stats.experts))
        np.put_along_axis(s, np.array(ids).astype(np.int64), np.array(score, dtype=np.float64), axis=1)
        stats.saliency[i] += s.sum(axis=0)

    fns: dict[str, Any] = {}
    for i in range(stats.layers):
        fns[f"blocks.{i}.resid.mid"] = keep_input
        fns[f"blocks.{i}.router.topk"] = measure
    return fns


def routing_stats(model: Any, conversations: Iterable[list[Any]], *, generate: bool = False, max_tokens: int = 256,
                  saliency: bool = False, on_example: Callable[[int, int], None] | None = None) -> RoutingStats:  # fmt: skip
    """Routing statistics of ``model`` over ``conversations`` (lists of openai-harmony Messages).

    Without ``generate`` each conversation is rendered as it stands and run through the model once
    (its assistant messages are the data's); with ``generate`` the conversation up to its last user
    message is the prompt and the model writes the reply itself, greedily, up to ``max_tokens``
    (the routing of its own reasoning and answers: what pruning should be calibrated on). Every
    position is counted, with its kind of token. ``saliency`` also measures router weight x expert
    output norm (about one more MoE per layer). ``on_example(done, tokens)`` after each one.
    """
    stats = RoutingStats.empty(model)
    enc = model.tokenizer.encoding
    extra = saliency_hooks(model, stats) if saliency else {}
    with hooked(model, extra):
        for n, messages in enumerate(conversations, 1):
            with record_routing(model) as rec:
                if generate:
                    tokens = _generated(model, messages, max_tokens)
                else:
                    tokens = enc.render_conversation(Conversation.from_messages(for_rendering(list(messages))))
                    prefill(model, tokens, model.make_cache(reserve=len(tokens)))
            ids, weights = rec.ids, rec.weights
            stats.add(ids, weights, token_kinds(enc, tokens)[: len(ids)])
            if on_example is not None:
                on_example(n, stats.tokens)
    return stats


def _generated(model: Any, messages: list[Any], max_tokens: int) -> list[int]:
    """The prompt (the conversation up to its last user message) and the model's greedy reply to it."""
    users = [i for i, m in enumerate(messages) if m.author.role == Role.USER]
    if not users:
        raise ValueError("a conversation to generate from needs a user message")
    session = ChatSession(model, max_tokens=max_tokens)
    *_, done = session.stream_reply(messages[: users[-1] + 1])  # the events, then Done(reply)
    return list(session.last_prompt_ids) + list(done.reply.stats.tokens)
