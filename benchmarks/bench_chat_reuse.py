"""KV reuse across chat turns: tokens prefilled per turn with reuse vs re-prefilling everything.

    python benchmarks/bench_chat_reuse.py --model CONVERTED_DIR --turns 20 --json bench-out/chat-reuse.json

Replays a synthetic conversation: each assistant reply is scripted (reasoning, an answer, and a
tool call every fifth turn) so that both runs see the same tokens; the model still computes every
step. "Without reuse" renders the whole conversation and prefills it from scratch each turn,
which is what a stateless server does.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import mlx.core as mx

import mlx_gptoss
from mlx_gptoss.chat import ChatSession

REPLY = "<|channel|>analysis<|message|>{think}<|end|><|start|>assistant<|channel|>final<|message|>{answer}<|return|>"
CALL = ("<|channel|>analysis<|message|>{think}<|end|><|start|>assistant<|channel|>commentary to=functions.lookup "
        '<|constrain|>json<|message|>{{"topic": "turn {n}"}}<|call|>')  # fmt: skip


def lookup(topic: str) -> dict:
    """Look a topic up in the local notes."""
    return {"topic": topic, "notes": "Nothing unusual was recorded."}


class Script:
    def __init__(self, tok, text: str):
        self.tokens, self.i = tok.encode(text, allow_special=True), 0

    def __call__(self, logits: mx.array) -> mx.array:
        t = self.tokens[self.i] if self.i < len(self.tokens) else 0
        self.i += 1
        return mx.array([t])


def conversation(turns: int):
    for n in range(1, turns + 1):
        user = f"Question {n}: tell me something about topic {n}, in a sentence or two."
        think = f"The user asks about topic {n}. " + "Consider the options carefully. " * 4
        answer = f"Topic {n} is interesting because of reasons {n} and {n + 1}. " * 2
        yield n, user, think, answer


def run(model, turns: int, reuse: bool) -> list[dict]:
    tok = model.tokenizer
    # without reuse = a stateless server: every call prefills the whole conversation again
    chat = ChatSession(model, instructions="Answer briefly.", tools=[lookup], max_tokens=400, reuse_kv=reuse)
    rows = []
    for n, user, think, answer in conversation(turns):
        t = time.perf_counter()
        if n % 5 == 0:
            r = chat.send(user, sampler=Script(tok, CALL.format(think=think, n=n)))
            pre = r.stats.prefill_tokens
            r = chat.send_tool_result(
                r.tool_calls[0], lookup(f"turn {n}"), sampler=Script(tok, REPLY.format(think="Noted.", answer=answer))
            )
            pre += r.stats.prefill_tokens
        else:
            r = chat.send(user, sampler=Script(tok, REPLY.format(think=think, answer=answer)))
            pre = r.stats.prefill_tokens
        rows.append(
            {"turn": n, "prompt_tokens": r.stats.prompt_tokens, "prefill_tokens": pre, "seconds": time.perf_counter() - t}
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--turns", type=int, default=20)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    model = mlx_gptoss.load(args.model)
    with_reuse, without = run(model, args.turns, True), run(model, args.turns, False)
    print("| turn | prompt tokens | prefilled with reuse | prefilled without | time with / without (s) |")
    print("|---|---|---|---|---|")
    for a, b in zip(with_reuse, without):
        print(f"| {a['turn']} | {a['prompt_tokens']} | {a['prefill_tokens']} | {b['prefill_tokens']} | "
              f"{a['seconds']:.2f} / {b['seconds']:.2f} |")  # fmt: skip
    total = lambda rows: sum(r["prefill_tokens"] for r in rows)  # noqa: E731
    print(
        f"\ntotal prefilled: {total(with_reuse)} with reuse, {total(without)} without "
        f"({total(without) / max(1, total(with_reuse)):.1f}x)",
        file=sys.stderr,
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"model": args.model, "with_reuse": with_reuse, "without_reuse": without}, indent=2))


if __name__ == "__main__":
    main()
