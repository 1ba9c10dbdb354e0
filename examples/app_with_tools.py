"""A minimal "app": a chat session with two local Python tools, run until the model answers.

    python examples/app_with_tools.py ~/models/gpt-oss-20b "How many km is 26.2 miles? Also, which of my notes mention MLX?"

Tools are plain functions: the schema comes from the type hints and the docstring. Everything
stays on this machine; the file search only reads the folder you point it at.
"""

import sys
from pathlib import Path
from typing import Literal

import mlx_gptoss

NOTES = Path.home() / "Documents"


def convert_units(value: float, unit: Literal["mi", "km", "lb", "kg", "F", "C"]) -> dict:
    """Convert a value between miles/km, pounds/kg and Fahrenheit/Celsius.

    Args:
        value: the number to convert.
        unit: the unit the value is in.
    """
    table = {
        "mi": lambda v: (v * 1.609344, "km"), "km": lambda v: (v / 1.609344, "mi"),
        "lb": lambda v: (v * 0.45359237, "kg"), "kg": lambda v: (v / 0.45359237, "lb"),
        "F": lambda v: ((v - 32) * 5 / 9, "C"), "C": lambda v: (v * 9 / 5 + 32, "F"),
    }  # fmt: skip
    result, to = table[unit](value)
    return {"value": round(result, 4), "unit": to}


def search_files(query: str, max_results: int = 5) -> list[str]:
    """Find local text files whose contents mention a phrase (case-insensitive).

    Args:
        query: the phrase to look for.
        max_results: how many file paths to return at most.
    """
    hits = []
    for path in NOTES.rglob("*"):
        if path.suffix in (".txt", ".md") and path.is_file():
            try:
                if query.lower() in path.read_text(errors="ignore").lower():
                    hits.append(str(path))
            except OSError:
                continue
        if len(hits) >= max_results:
            break
    return hits


def main() -> None:
    model = mlx_gptoss.load(sys.argv[1] if len(sys.argv) > 1 else "openai/gpt-oss-20b")
    question = sys.argv[2] if len(sys.argv) > 2 else "How many km is 26.2 miles?"
    chat = model.chat(instructions="You are a helpful assistant on the user's Mac. Use the tools when they help.",
                      reasoning_effort="low", tools=[convert_units, search_files])  # fmt: skip
    reply = chat.run(question, max_steps=6)  # call -> execute -> feed back, until an answer
    for m in chat.messages:
        if m["role"] == "tool":
            print(f"[{m['name']}] -> {m['content'][0]['text']}", file=sys.stderr)
    if reply.finish_reason == "max_steps":
        # the model still wanted tools when the loop stopped: there may be no answer yet
        print(f"warning: stopped after 6 tool calls without a final answer ({reply.problems[-1]})", file=sys.stderr)
    elif reply.finish_reason == "length":
        print("warning: the answer was cut off at max_tokens", file=sys.stderr)
    print(reply.final)


if __name__ == "__main__":
    main()
