"""The model side of the server: one worker thread, a bounded queue of jobs, a prompt cache.

    engine = Engine(model, max_queue=16, cache_bytes=4 << 30)
    job = engine.submit(messages, max_tokens=256, temperature=0.7, stop=["\\n\\n"])
    async for ev in job.aevents(): ...      # harmony events, then Done(reply)
    engine.close()

Each job is one :meth:`ChatSession.stream_reply <mlx_gptoss.chat.ChatSession.stream_reply>` on
the engine's session, so a client that resends the whole conversation gets exactly the tokens
an in-process chat session computes: the same rendering (answered reasoning dropped), the same
options, the same events. The KV state of each conversation goes back into a
:class:`~mlx_gptoss.kvreuse.PromptCache` afterwards; the next request continues the state that
keeps the longest prefix of its prompt, and computes only the rest.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

from ..chat import ChatSession, Done, Reply
from ..harmony import Event
from ..kvreuse import DEFAULT_CACHE_BYTES, KVState, PromptCache
from ..memory import kv_cache_bytes

DEFAULT_MAX_QUEUE = 16


def default_cache_bytes(model) -> int:
    """The prompt cache's default bound: 4 GiB, or the KV cache a memory plan reserved."""
    plan = getattr(model, "memory_plan", None)
    if plan is None:
        return DEFAULT_CACHE_BYTES

    return kv_cache_bytes(model.config, plan.context)


class QueueFull(RuntimeError):
    """The engine's queue is at its bound: retry later (HTTP 429)."""


class EngineClosed(RuntimeError):
    """The engine was closed: it takes no more jobs."""


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


class Job:
    """One request: its events arrive through :meth:`events` (blocking) or :meth:`aevents`
    (asyncio), one of them, once. The last event is :class:`~mlx_gptoss.chat.Done`; a failure
    raises from the iterator instead. Leaving either iterator before ``Done`` cancels the job.
    """

    def __init__(self, messages: list, options: dict, ids: list[int]):
        self.messages, self.options, self.ids = messages, options, ids
        self._cancel = threading.Event()
        self._lock = threading.Lock()
        self._q: queue.SimpleQueue = queue.SimpleQueue()  # events until a loop listens
        self._loop: asyncio.AbstractEventLoop | None = None
        self._aq: asyncio.Queue | None = None
        self._taken = False

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def cancel(self) -> None:
        """Stop the job (from any thread): a waiting job never starts, a running one stops within
        a token; its ``Done`` reply then has finish_reason "cancelled"."""
        self._cancel.set()

    def _put(self, item: Any) -> None:
        """Called by the worker with each event, then Done or a failure."""
        with self._lock:
            if self._loop is None:
                self._q.put(item)
                return
            try:
                self._loop.call_soon_threadsafe(self._aq.put_nowait, item)
            except RuntimeError:  # the loop is closed: nobody listens any more
                self._cancel.set()

    def events(self) -> Iterator[Event | Done]:
        """The job's events as they come (blocking); the last is ``Done(reply)``."""
        with _Reading(self) as r:
            while r.more():
                yield r.took(self._q.get())

    async def aevents(self) -> AsyncIterator[Event | Done]:
        """The job's events in an asyncio loop, which never waits on the model; the last is
        ``Done(reply)``. Events cross from the worker with ``call_soon_threadsafe``."""
        r = _Reading(self)
        aq: asyncio.Queue = asyncio.Queue()
        with self._lock:
            self._loop, self._aq = asyncio.get_running_loop(), aq
            while True:  # what arrived before this loop listened
                try:
                    aq.put_nowait(self._q.get_nowait())
                except queue.Empty:
                    break
        with r:
            while r.more():
                yield r.took(await aq.get())


class _Reading:
    """The one reading of a job's events, shared by both iterators: a worker's failure is raised,
    and a reader that leaves before the end (resuming past ``Done``, or a failure) cancels the job."""

    def __init__(self, job: Job) -> None:
        if job._taken:
            raise RuntimeError("a job's events can be read once, by events() or aevents()")
        job._taken = True
        self.job, self.over, self._last = job, False, None

    def more(self) -> bool:
        """Whether to read on; asked after each yield, so a reader leaving at ``Done`` still cancels."""
        self.over = isinstance(self._last, Done)
        return not self.over

    def took(self, item: Any) -> Event | Done:
        """The event to yield; a failure is raised instead (the job is over: nothing to cancel)."""
        if isinstance(item, _Failed):
            self.over = True
            raise item.error
        self._last = item
        return item

    def __enter__(self) -> _Reading:
        return self

    def __exit__(self, *exc: Any) -> None:
        if not self.over:
            self.job.cancel()


class Engine:
    """Serves one model to many clients: jobs run one at a time, in submission order, in a
    worker thread; a prompt cache keeps recent conversations' KV states (see the module doc).

    Create it in the thread that loaded the model: it reads every weight there (MLX evaluates a
    lazy array only in the thread that built it), so the worker can use them.

    Args:
        model: a loaded model (``mlx_gptoss.load``).
        max_queue: jobs that may wait (besides the one running); :meth:`submit` raises
            :class:`QueueFull` beyond it.
        cache_bytes: memory the prompt cache may hold (KV states of finished requests); default
            4 GiB, or for a model loaded under a memory budget the KV cache its plan reserved
            (one more full context: the budget did not count more).
        context_policy, context: as :class:`~mlx_gptoss.chat.ChatSession` ("error" by default:
            a conversation that does not fit is refused, not silently shortened).
        defaults: default options for every job (max_tokens, temperature, top_p, ...).
    """

    def __init__(self, model, *, max_queue: int = DEFAULT_MAX_QUEUE, cache_bytes: int | None = None,
                 context_policy: str = "error", context: int | None = None, **defaults: Any):  # fmt: skip
        if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 1:
            raise ValueError(f"max_queue must be an integer >= 1; got {max_queue!r}")
        self.model = model
        self.cache = PromptCache(default_cache_bytes(model) if cache_bytes is None else cache_bytes)
        try:
            # built here, in the caller's thread: the session reads every weight at creation
            self.session = ChatSession(model, context_policy=context_policy, context=context, **defaults)
        except RuntimeError as e:
            if "Stream" not in str(e):
                raise
            raise RuntimeError(f"create the Engine in the thread that loaded the model (MLX evaluates a lazy array only "
                               f"in the thread that built it): {e}") from None  # fmt: skip
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._lock = threading.Lock()
        self._closed = False
        self._running: Job | None = None
        self._worker = threading.Thread(target=self._work, name="mlx-gptoss-engine", daemon=True)
        self._worker.start()

    @property
    def queued(self) -> int:
        """Jobs waiting to start."""
        return self._queue.qsize()

    def submit(self, messages: Sequence[Any], **options: Any) -> Job:
        """Queue a reply to ``messages`` (the whole conversation, openai-harmony Messages: system,
        developer, turns) and return its :class:`Job`.

        Options as :meth:`ChatSession.send <mlx_gptoss.chat.ChatSession.send>`: max_tokens,
        temperature, top_p, top_k, min_p, seed, stop, sampler, prefill_step. Raises here, before
        anything is queued: TypeError/ValueError for bad options or messages,
        :class:`~mlx_gptoss.generate.PromptTooLongError` (a ValueError) for a conversation that
        does not fit, :class:`QueueFull` at the bound, :class:`EngineClosed` after :meth:`close`.
        """
        ids = self.session.reply_prompt(messages, **options)  # renders: about a millisecond per 10k tokens
        job = Job(list(messages), dict(options), ids)
        with self._lock:
            if self._closed:
                raise EngineClosed("the engine is closed")
            try:
                self._queue.put_nowait(job)
            except queue.Full:
                raise QueueFull(f"{self._queue.maxsize} requests are already waiting") from None
        return job

    def close(self, timeout: float | None = 30.0) -> None:
        """Cancel every job (waiting ones end with a "cancelled" reply) and stop the worker."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            running = self._running
        if running is not None:
            running.cancel()
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            job.cancel()
            self._finish_cancelled(job)
        self._queue.put(None)  # wakes the worker; it ends
        self._worker.join(timeout)
        self.cache.clear()

    # -- the worker ------------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            with self._lock:
                self._running = job
            try:
                if job.cancelled:
                    self._finish_cancelled(job)
                else:
                    self._run(job)
            except BaseException as e:  # noqa: BLE001 - the job's consumer raises it; the engine goes on
                job._put(_Failed(e))
            finally:
                with self._lock:
                    self._running = None

    def _run(self, job: Job) -> None:
        state, _ = self.cache.take(job.ids)
        if state is None:
            state = KVState(self.model)
        try:
            for ev in self.session.stream_reply(job.messages, kv=state, cancel=job._cancel, **job.options):
                job._put(ev)
        finally:
            self.cache.put(state)  # settled by the turn, whatever happened: reusable

    @staticmethod
    def _finish_cancelled(job: Job) -> None:
        reply = Reply(finish_reason="cancelled")
        reply.stats.finish_reason = "cancelled"
        job._put(Done(reply))
