"""KV reuse: keep what the model computed for a conversation and reuse its longest usable prefix.

Chat sessions and the server share this piece. :class:`KVState` is one conversation's per-layer
caches, the tokens they hold, and snapshots of the sliding-window layers at message boundaries;
:meth:`KVState.reuse` cuts it back to the longest prefix it shares with a new rendering. Full
attention layers cut back anywhere; sliding-window layers have forgotten what left their window,
so they go back only to a snapshot (harmony drops answered reasoning when it re-renders, so a
new rendering usually diverges at a message boundary, where a snapshot was taken).

:class:`PromptCache` keeps the states of recent conversations for a server whose clients resend
the whole conversation: least recently used first out, bounded by bytes.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable

import mlx.core as mx

from .cache import SlidingKVCache

MAX_SNAPSHOTS = 8  # snapshots kept per state, newest positions first
GB = 1 << 30
DEFAULT_CACHE_BYTES = 4 * GB


class KVState:
    """One conversation's KV cache: per-layer caches, the tokens they hold, sliding snapshots.

    Args:
        model: the model whose ``make_cache()`` gives the per-layer caches.
        boundaries: token ids after which :meth:`fed` takes a snapshot; default harmony's
            ``<|start|>`` and ``<|end|>`` (where a later rendering may diverge).
        max_snapshots: snapshots kept (the newest positions).
    """

    def __init__(self, model, boundaries: Iterable[int] | None = None, max_snapshots: int = MAX_SNAPSHOTS):
        self.model = model
        if boundaries is None:
            enc = model.tokenizer.encoding
            boundaries = [enc.encode(t, allowed_special="all")[0] for t in ("<|start|>", "<|end|>")]
        self.boundaries = frozenset(boundaries)
        self.max_snapshots = max_snapshots
        self.reset()

    def reset(self) -> None:
        """Forget everything: empty caches, no tokens, no snapshots."""
        self.cache = self.model.make_cache()
        self.tokens: list[int] = []  # what the cache holds, position by position
        self.snaps: dict[int, list] = {}  # position -> sliding caches' state there

    @property
    def offset(self) -> int:
        """How many positions the caches hold."""
        return self.cache[0].offset if self.cache else 0

    @property
    def nbytes(self) -> int:
        """Memory held: the caches' buffers and the snapshots' arrays (counted as if unshared)."""
        snap = sum(a.nbytes for per_pos in self.snaps.values() for s in per_pos if s is not None for a in s[:2] if a is not None)
        return sum(c.nbytes for c in self.cache) + snap

    def _sliding(self) -> bool:
        return any(isinstance(c, SlidingKVCache) for c in self.cache)

    def _plan(self, ids: list[int]) -> tuple[int, int | None, bool]:
        """For a prompt ``ids``: (tokens kept, snapshot position to restore or None, start over?)."""
        p, limit = 0, min(len(self.tokens), len(ids) - 1)  # the last prompt token is always computed
        while p < limit and self.tokens[p] == ids[p]:
            p += 1
        if p < self.offset and self._sliding():
            # sliding layers go back only to a snapshot
            s = max((k for k in self.snaps if k <= p), default=None)
            return (0, None, True) if s is None else (s, s, False)
        return p, None, False

    def reusable(self, ids: list[int]) -> int:
        """How many leading tokens of ``ids`` :meth:`reuse` would keep (nothing is changed)."""
        return self._plan(ids)[0]

    def reuse(self, ids: list[int]) -> int:
        """Cut the caches back to what the prompt ``ids`` shares with them; returns how many
        tokens they keep. Anything raised here leaves the state empty, never half cut."""
        try:
            p, snap, start_over = self._plan(ids)
            if start_over:
                self.reset()
                return 0
            if snap is not None:
                for c, s in zip(self.cache, self.snaps[snap]):
                    if s is not None:
                        c.restore(s)
            for c in self.cache:
                if not isinstance(c, SlidingKVCache):
                    c.trim(c.offset - p)
            self.snaps = {k: v for k, v in self.snaps.items() if k <= p}
            self.tokens = self.tokens[:p]
            return p
        except BaseException:
            self.reset()
            raise

    def snapshot(self) -> None:
        """Record the sliding caches' state at the current position."""
        pos = self.offset
        self.snaps[pos] = [c.snapshot() if isinstance(c, SlidingKVCache) else None for c in self.cache]
        for old in sorted(self.snaps)[: -self.max_snapshots]:
            del self.snaps[old]

    def fed(self, token: int) -> None:
        """The caches now hold ``token`` (generated): snapshot after a message boundary."""
        if token in self.boundaries:
            self.snapshot()

    def settle(self, fed: list[int]) -> None:
        """Record what the caches hold after a generation (``fed`` is what they were given, in
        order) and leave nothing lazy; a cache left inconsistent by an interruption is dropped."""
        offsets = {c.offset for c in self.cache}
        if len(offsets) != 1:  # interrupted between layers: its state cannot be trusted
            self.reset()
            return
        self.tokens = list(fed[: offsets.pop()])
        self.snaps = {k: v for k, v in self.snaps.items() if k <= len(self.tokens)}
        try:
            self.materialize()
        except Exception:  # noqa: BLE001 - whatever failed the generation may fail here too; start clean
            self.reset()

    def materialize(self) -> None:
        """Evaluate every array: MLX evaluates a lazy array only in the thread that built it, so
        a state left lazy could not be continued from another thread."""
        snaps = [a for per_pos in self.snaps.values() for s in per_pos if s is not None for a in s[:2]]
        mx.eval([c.state for c in self.cache], [a for a in snaps if a is not None])


class PromptCache:
    """The KV states of recent conversations, least recently used out first, at most ``max_bytes``.

    A request :meth:`take` s the state that keeps the longest prefix of its prompt (the state
    leaves the cache while it is in use) and :meth:`put` s it back afterwards. Thread-safe.
    """

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES):
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"max_bytes must be an integer >= 0; got {max_bytes!r}")
        self.max_bytes = max_bytes
        self._states: OrderedDict[int, KVState] = OrderedDict()  # id -> state, oldest first
        self._lock = threading.Lock()
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._states)

    @property
    def nbytes(self) -> int:
        """Memory the cached states hold."""
        with self._lock:
            return sum(s.nbytes for s in self._states.values())

    def take(self, ids: list[int]) -> tuple[KVState | None, int]:
        """Remove and return the state that keeps the most of ``ids`` and how many tokens it
        keeps; (None, 0) when none keeps any."""
        with self._lock:
            best, kept = None, 0
            for key, state in reversed(self._states.items()):  # most recent first wins ties
                n = state.reusable(ids)
                if n > kept:
                    best, kept = key, n
            return (self._states.pop(best), kept) if best is not None else (None, 0)

    def put(self, state: KVState) -> None:
        """Store ``state`` as the most recent; evict the least recently used beyond the bound
        (a state larger than the bound alone is not kept)."""
        if not state.tokens:
            return
        with self._lock:
            self._states[id(state)] = state
            self._states.move_to_end(id(state))
            total = sum(s.nbytes for s in self._states.values())
            while self._states and total > self.max_bytes:
                _, old = self._states.popitem(last=False)
                total -= old.nbytes
                self.evictions += 1

    def clear(self) -> None:
        with self._lock:
            self._states.clear()
