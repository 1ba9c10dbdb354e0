"""Activation patching: which block's residual stream carries the difference between two prompts.

    python examples/activation_patching.py ~/models/gpt-oss-20b

Two prompts of the same length differ in one word ("Paris" / "Rome"). The clean run's residual
stream is captured; the corrupted prompt is then run once per block with that block's output
(``blocks.{i}.resid.post``) patched from the clean run, at the last position only. The logit
difference between the two answers shows where the information has arrived. Public hooks only.
"""

import sys

import mlx.core as mx

import mlx_gptoss
from mlx_gptoss import inspect


def logit_diff(logits: mx.array, a: int, b: int) -> float:
    last = logits[0, -1].astype(mx.float32)
    return (last[a] - last[b]).item()


def patching_curve(model, clean: list[int], corrupt: list[int], a: int, b: int) -> list[float]:
    """Per block: the corrupted run's logit difference (a - b) with that block's output patched from the clean run."""
    if len(clean) != len(corrupt):
        raise ValueError("the two prompts must have the same number of tokens")
    _, cache = inspect.run_with_cache(model, clean, names="blocks.*.resid.post")
    last = len(clean) - 1
    out = []
    for i in range(model.config.num_hidden_layers):
        name = f"blocks.{i}.resid.post"
        with inspect.patch(model, {name: cache[name]}, positions=[last]):
            logits = model(mx.array(corrupt)[None])
        out.append(logit_diff(logits, a, b))
    return out


def main() -> None:
    model = mlx_gptoss.load(sys.argv[1] if len(sys.argv) > 1 else "openai/gpt-oss-20b")
    tok = model.tokenizer
    clean = tok.encode("The Eiffel Tower is in the city of Paris. It is in the country of")
    corrupt = tok.encode("The Eiffel Tower is in the city of Rome. It is in the country of")
    a, b = tok.encode(" France")[0], tok.encode(" Italy")[0]
    base_clean = logit_diff(model(mx.array(clean)[None]), a, b)
    base_corrupt = logit_diff(model(mx.array(corrupt)[None]), a, b)
    print(f"logit(France) - logit(Italy): clean {base_clean:.3f}, corrupted {base_corrupt:.3f}")
    for i, d in enumerate(patching_curve(model, clean, corrupt, a, b)):
        print(f"patch block {i:2d}: {d:.3f}")


if __name__ == "__main__":
    main()
