"""The server's engine against an in-process ChatSession: prompt tokens computed and decode speed.

    python benchmarks/make_checkpoint.py --size 20b --layers 2 --tokenizer /tmp/srv/release
    mlx-gptoss convert /tmp/srv/release /tmp/srv/converted
    python benchmarks/bench_server.py --model /tmp/srv/converted --json bench-out/server.json
    # with a server running (mlx-gptoss serve -m /tmp/srv/converted), through HTTP as well:
    python benchmarks/bench_server.py --model /tmp/srv/converted --base-url http://127.0.0.1:8000/v1

(a) Reuse: ``bench_chat_reuse.py``'s 20-turn conversation (scripted replies, a tool call every
fifth turn), once through one ChatSession with KV reuse and once through the engine as a
stateless client sends it (every request the whole conversation, the reply sent back as harmony
messages): prompt tokens computed per turn, both from the same run.

(b) Decode speed: the same greedy reply (one user message, ``--gen-tokens`` tokens) in process
(``ChatSession.stream``), through the engine (``job.events()``) and, with ``--http``, through
HTTP (the openai client, Chat Completions, streamed, against this process's model served by
uvicorn on a free loopback port), alternating round by round so all see the same machine load.
Random weights do not write harmony, so the model is first rigged (``tests/rig.py``) to answer
in the final channel with a cycle of words: every token is then an event. Each path is timed
where its consumer sees it: time to the first event, then decode tokens/s from the first event
to the end (tokens counted by the model's own statistics, or by ``usage`` over HTTP).
``--base-url`` measures an external server instead (rigged the same way only if it serves a
rigged model; otherwise its token count is whatever greedy decoding wrote).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_chat_reuse import CALL, REPLY, Script, conversation, lookup  # noqa: E402 - the same conversation
from bench_e2e import machine  # noqa: E402 - the same machine record

PROMPT = "Write a long story about a lighthouse keeper."
ANSWER = " The keeper lit lamp nightly above dark sea"  # distinct tokens: a cycle greedy decoding repeats


def rig_for_decode(model) -> None:
    """Make greedy decoding answer in the final channel with ANSWER's words, round and round."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from rig import rig_bigram

    enc = model.tokenizer.encoding
    head = enc.encode("assistant<|channel|>final<|message|>", allowed_special="all")
    words = enc.encode(ANSWER, allowed_special=set())
    if len(set(words)) != len(words) or set(words) & set(head):
        raise RuntimeError("the answer's tokens must be distinct to make a cycle")
    chain = head + words
    nxt = dict(zip(chain, chain[1:]))
    nxt[words[-1]] = words[0]
    rig_bigram(model, nxt)


def reuse(model, turns: int) -> list[dict]:
    """Per turn: prompt tokens, and prefilled tokens in process and through the engine."""
    from openai_harmony import Author, Message, Role

    from mlx_gptoss.chat import ChatSession
    from mlx_gptoss.harmony import developer_message, system_message
    from mlx_gptoss.server.engine import Engine
    from mlx_gptoss.tools import as_tool

    tok = model.tokenizer
    chat = ChatSession(model, instructions="Answer briefly.", tools=[lookup], max_tokens=400)
    engine = Engine(model, max_tokens=400)
    conv = [system_message("medium"), developer_message("Answer briefly.", [as_tool(lookup)])]
    rows = []
    prev = None  # the previous reply, whose tool call a tool turn answers
    try:
        for n, user, think, answer in conversation(turns):
            first = CALL.format(think=think, n=n) if n % 5 == 0 else REPLY.format(think=think, answer=answer)
            steps = [(user, first)] + ([(None, REPLY.format(think="Noted.", answer=answer))] if n % 5 == 0 else [])
            row = {"turn": n, "prompt_tokens": 0, "in_process": 0, "engine": 0}
            for text, script in steps:
                if text is not None:
                    a = chat.send(text, sampler=Script(tok, script))
                    conv = conv + [Message.from_role_and_content(Role.USER, text)]
                else:
                    call = prev.tool_calls[0]
                    a = chat.send_tool_result(call, lookup(f"turn {n}"), sampler=Script(tok, script))
                    result = Message.from_author_and_content(
                        Author.new(Role.TOOL, call.recipient), json.dumps(lookup(f"turn {n}"))
                    )
                    conv = conv + [result.with_recipient("assistant").with_channel("commentary")]
                b = _reply(engine.submit(conv, sampler=Script(tok, script)))
                conv = conv + b.messages  # what a stateless client sends back
                row["prompt_tokens"] = b.stats.prompt_tokens
                row["in_process"] += a.stats.prefill_tokens
                row["engine"] += b.stats.prefill_tokens
                prev = a
            rows.append(row)
    finally:
        engine.close()
    return rows


def _reply(job):
    from mlx_gptoss.chat import Done

    for ev in job.events():
        if isinstance(ev, Done):
            return ev.reply
    raise RuntimeError("the job ended without its reply")


def _timed(events, count) -> dict:
    """Time to the first event and decode tokens/s after it, read where the consumer sees them."""
    t0 = time.perf_counter()
    first = None
    last = None
    for last in events:  # noqa: B007 - the last event is what is kept
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    n = count(last)
    return {"ttft_s": (first or end) - t0, "tokens": n, "decode_tok_s": (n - 1) / (end - first) if first and n > 1 else None}


def decode_in_process(model, gen_tokens: int) -> dict:
    from mlx_gptoss.chat import ChatSession

    chat = ChatSession(model, max_tokens=gen_tokens)  # a fresh session: no KV reuse between rounds
    return _timed(chat.stream(PROMPT), lambda done: done.reply.stats.generation_tokens)


def decode_engine(engine, gen_tokens: int) -> dict:
    from openai_harmony import Message, Role

    from mlx_gptoss.harmony import system_message

    engine.cache.clear()  # as in process: the prompt is computed each round
    job = engine.submit([system_message("medium"), Message.from_role_and_content(Role.USER, PROMPT)], max_tokens=gen_tokens)
    return _timed(job.events(), lambda done: done.reply.stats.generation_tokens)


class LocalServer:
    """``create_app(engine)`` served by uvicorn in a thread on a free loopback port."""

    def __init__(self, engine):
        import socket
        import threading

        import uvicorn

        from mlx_gptoss.server.app import create_app

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        app = create_app(engine, model_id="bench")
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        self.base_url = f"http://127.0.0.1:{port}/v1"
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline:
                raise RuntimeError("the local server did not start")
            time.sleep(0.05)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def decode_http(base_url: str, api_key: str, model_id: str | None, gen_tokens: int) -> dict:
    """The same request through a running server: Chat Completions, streamed, greedy."""
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key=api_key)
    model_id = model_id or client.models.list().data[0].id
    stream = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": PROMPT}], stream=True,
                                            max_tokens=gen_tokens, temperature=0, stream_options={"include_usage": True})  # fmt: skip
    chunks = []

    def events():  # chunks that carry generated text (the first one only announces the role)
        for chunk in stream:
            chunks.append(chunk)
            delta = chunk.choices[0].delta if chunk.choices else None
            if delta is not None and (delta.content or getattr(delta, "reasoning", None)):
                yield chunk

    def count(_):
        usage = next((c.usage for c in reversed(chunks) if getattr(c, "usage", None)), None)
        return usage.completion_tokens if usage else sum(1 for c in chunks if c.choices)

    return _timed(events(), count)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="a converted checkpoint (real widths and few layers, or tiny)")
    ap.add_argument("--turns", type=int, default=20)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--http", action="store_true", help="measure through HTTP too (this model, served in this process)")
    ap.add_argument("--base-url", default=None, help="a running server's /v1 URL: measure through it too")
    ap.add_argument("--api-key", default="none")
    ap.add_argument("--model-id", default=None, help="the served model's id (default: the first in /v1/models)")
    ap.add_argument("--skip-reuse", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    import mlx_gptoss
    from mlx_gptoss.server.engine import Engine

    model = mlx_gptoss.load(args.model)
    out: dict = {"model": args.model, "layers": model.config.num_hidden_layers, "hidden": model.config.hidden_size,
                 "machine": machine(), "gen_tokens": args.gen_tokens, "rounds": args.rounds}  # fmt: skip
    if not args.skip_reuse:
        rows = out["reuse"] = reuse(model, args.turns)
        print("| turn | prompt tokens | computed in process | computed through the engine (stateless) |")
        print("|---|---|---|---|")
        for r in rows:
            print(f"| {r['turn']} | {r['prompt_tokens']} | {r['in_process']} | {r['engine']} |")
        tot = {k: sum(r[k] for r in rows) for k in ("in_process", "engine")}
        print(f"\ntotal computed: {tot['in_process']} in process, {tot['engine']} through the engine "
              f"(the prompts held {sum(r['prompt_tokens'] for r in rows)} tokens)\n")  # fmt: skip
    rig_for_decode(model)
    engine = Engine(model)
    local = LocalServer(engine) if args.http else None
    urls = {"http": (local.base_url, "none", "bench")} if local else {}
    if args.base_url:
        urls["external"] = (args.base_url, args.api_key, args.model_id)
    runs: dict[str, list[dict]] = {"in_process": [], "engine": [], **{k: [] for k in urls}}
    try:
        decode_in_process(model, 4), decode_engine(engine, 4)  # warm-up: compile, caches
        for url, key, mid in urls.values():
            decode_http(url, key, mid, 4)
        for _ in range(args.rounds):
            runs["in_process"].append(decode_in_process(model, args.gen_tokens))
            runs["engine"].append(decode_engine(engine, args.gen_tokens))
            for k, (url, key, mid) in urls.items():
                runs[k].append(decode_http(url, key, mid, args.gen_tokens))
    finally:
        if local is not None:
            local.close()
        engine.close()
    out["decode"] = runs
    med = {
        k: {m: statistics.median(r[m] for r in v if r[m] is not None) for m in ("ttft_s", "decode_tok_s")}
        for k, v in runs.items()
    }
    out["median"] = med
    print("| path | decode tok/s (median) | vs in process | time to first event (s) | tokens |")
    print("|---|---|---|---|---|")
    base = med["in_process"]["decode_tok_s"]
    for k, m in med.items():
        print(f"| {k} | {m['decode_tok_s']:.2f} | {100 * m['decode_tok_s'] / base:.1f} % | {m['ttft_s']:.3f} | "
              f"{runs[k][-1]['tokens']} |")  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
