"""Load gpt-oss and answer one question, streaming the answer as it is generated.

    python examples/quickstart.py ~/models/gpt-oss-20b "Why is the sky blue?"

The model argument may also be a Hugging Face repo id (downloaded and converted once).
"""

import sys

import mlx_gptoss


def main() -> None:
    model_path = sys.argv[1] if len(sys.argv) > 1 else "openai/gpt-oss-20b"
    question = sys.argv[2] if len(sys.argv) > 2 else "Why is the sky blue? Two sentences."
    model = mlx_gptoss.load(model_path)

    def show(channel, text):
        # the reasoning (analysis channel) dimmed on stderr, the answer on stdout
        if channel == "final":
            print(text, end="", flush=True)
        else:
            print(f"\033[2m{text}\033[0m", end="", file=sys.stderr, flush=True)

    result = mlx_gptoss.generate(model, question, reasoning_effort="low", max_tokens=400, on_text=show)
    print()
    print(
        f"[{result.generation_tokens} tokens at {result.generation_tps:.1f} tok/s, "
        f"finish: {result.finish_reason}, peak memory {result.peak_memory_gb:.1f} GB]",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
