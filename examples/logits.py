"""Use the model as a plain function: next-token probabilities for a harmony prompt.

python examples/logits.py ~/models/gpt-oss-20b
"""

import sys

import mlx.core as mx

import mlx_gptoss
from mlx_gptoss.harmony import render_prompt


def main() -> None:
    model = mlx_gptoss.load(sys.argv[1] if len(sys.argv) > 1 else "openai/gpt-oss-20b")
    tok = model.tokenizer
    ids = render_prompt(tok.encoding, "Name a primary colour.", reasoning_effort="low")
    cache = model.make_cache()
    logits = model(mx.array(ids)[None], cache)[0, -1].astype(mx.float32)
    probs = mx.softmax(logits)
    top = mx.argsort(-probs)[:5].tolist()
    for t in top:
        print(f"{probs[t].item():.3f}  {tok.decode([t])!r}")


if __name__ == "__main__":
    main()
