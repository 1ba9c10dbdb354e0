"""A logit lens: what the model would predict if it stopped after each block.

    python examples/logit_lens.py ~/models/gpt-oss-20b "The capital of France is"

Built on the public hooks only: the residual stream after every block (``blocks.*.resid.post``)
is captured in one forward pass, then the model's own final norm and unembedding are applied to
it. Prints, per layer, the most likely next tokens at the last position.
"""

import sys

import mlx.core as mx

import mlx_gptoss
from mlx_gptoss import inspect


def logit_lens(model, ids: list[int], top: int = 3) -> list[list[tuple[str, float]]]:
    """For each block, the ``top`` (token text, probability) pairs at the last position."""
    _, t = inspect.run_with_cache(model, ids, names="blocks.*.resid.post")
    rows = []
    for i in range(model.config.num_hidden_layers):
        h = t[f"blocks.{i}.resid.post"][:, -1:]  # [1, 1, H]
        probs = mx.softmax(model.lm_head(model.norm(h))[0, -1].astype(mx.float32))
        best = mx.argsort(-probs)[:top].tolist()
        rows.append([(model.tokenizer.decode([b]), probs[b].item()) for b in best])
    return rows


def main() -> None:
    model = mlx_gptoss.load(sys.argv[1] if len(sys.argv) > 1 else "openai/gpt-oss-20b")
    text = sys.argv[2] if len(sys.argv) > 2 else "The capital of France is"
    ids = model.tokenizer.encode(text)
    for i, row in enumerate(logit_lens(model, ids)):
        print(f"block {i:2d}: " + "  ".join(f"{tok!r} {p:.3f}" for tok, p in row))


if __name__ == "__main__":
    main()
