"""Streaming typed events from a chat session: reasoning, answer and tool calls as they arrive.

python examples/streaming.py ~/models/gpt-oss-20b
"""

import sys

import mlx_gptoss
from mlx_gptoss.chat import Done
from mlx_gptoss.harmony import FinalDelta, ReasoningDelta, ToolCallCompleted, ToolCallStarted


def main() -> None:
    model = mlx_gptoss.load(sys.argv[1] if len(sys.argv) > 1 else "openai/gpt-oss-20b")
    chat = model.chat(reasoning_effort="medium")
    for question in ["Give me three names for a grey cat.", "Which one would you pick, and why?"]:
        print(f"\n> {question}")
        for event in chat.stream(question, max_tokens=600):
            if isinstance(event, ReasoningDelta):
                print(f"\033[2m{event.text}\033[0m", end="", flush=True)
            elif isinstance(event, FinalDelta):
                print(event.text, end="", flush=True)
            elif isinstance(event, ToolCallStarted):
                print(f"\n[tool call: {event.name}]", end="")
            elif isinstance(event, ToolCallCompleted):
                print(f" {event.call.arguments}")
            elif isinstance(event, Done):
                s = event.reply.stats
                # turn 2 prefills only what is new: compare prefill_tokens with prompt_tokens
                print(f"\n[{s.prefill_tokens} of {s.prompt_tokens} prompt tokens computed, {s.generation_tps:.1f} tok/s]")


if __name__ == "__main__":
    main()
