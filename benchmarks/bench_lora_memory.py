"""The training memory planner's activation model against measured peaks (real widths, few layers).

    python benchmarks/make_checkpoint.py --size 20b --layers 2 /tmp/rel2
    mlx-gptoss convert /tmp/rel2 /tmp/conv2 --preset 16gb
    python benchmarks/bench_lora_memory.py --model /tmp/conv2 --seq-lens 64,128,256 \\
        --json bench-out/lora-memory.json --markdown bench-out/lora-memory.md

For each sequence length T (batch 1, every position trained): LoRA (rank 8 on attention and the
experts of every layer) on the model, one AdamW step through lora/train.py's layer-wise backward
(:func:`~mlx_gptoss.lora.train.loss_and_grads`: one block's graph at a time, attention and the
loss in chunks, with TrainConfig's default chunk sizes), after a first short step that
allocates the optimizer state. The step's MLX peak (``mx.get_peak_memory`` after
``mx.reset_peak_memory``) minus what was resident before it (weights, adapters, optimizer state)
and the gradients is the measured step peak, set beside the planner's
:func:`mlx_gptoss.memory.training_activation_bytes` plus its AdamW update (16 bytes per parameter). Also printed: the planner's prediction for the
full 20b (``--full-seq-lens``, rank 8 on attention + the experts of the last 4 layers, under
``--budget``) from the converted 2-layer checkpoint's shapes.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_e2e import machine, peak_rss_gb, write_outputs  # noqa: E402


def measure(model_dir: Path, seq_lens: list[int], rank: int, slots: int | None = None) -> list[dict]:
    import mlx.core as mx
    import mlx.optimizers as optim
    import numpy as np
    from mlx.utils import tree_flatten

    import mlx_gptoss
    from mlx_gptoss.lora.adapters import LoRASpec, apply_lora
    from mlx_gptoss.lora.train import Batch, TrainConfig, loss_and_grads, set_attention_chunk
    from mlx_gptoss.memory import training_activation_bytes

    budget = None
    if slots is not None:  # experts streamed: this many resident per layer
        from mlx_gptoss.config import GptOssConfig
        from mlx_gptoss.memory import budget_for_slots, read_tensors

        budget = budget_for_slots(
            GptOssConfig.from_file(model_dir / "config.json"), read_tensors(model_dir), slots, context=max(seq_lens)
        )
    model = mlx_gptoss.load(model_dir, lazy=False, memory_budget=budget, context=max(seq_lens))
    cfg = model.config
    apply_lora(model, LoRASpec(rank=rank, alpha=2.0 * rank, targets=("attention", "experts")), seed=0)
    model.train()
    set_attention_chunk(model, TrainConfig.attention_chunk)  # as train() does
    opt = optim.AdamW(learning_rate=1e-4)
    n_params = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))

    def run(T: int) -> tuple[int, int, float, float]:
        """One AdamW step on T random tokens, all trained: (resident before, MLX peak, seconds, loss)."""
        ids = np.random.default_rng(T).integers(0, cfg.vocab_size, (1, T + 1))
        batch = Batch(mx.array(ids[:, :T]), mx.arange(T), mx.array(ids[0, 1:]), T, T)
        mx.eval(model.parameters(), opt.state)
        mx.clear_cache()
        before = mx.get_active_memory()
        mx.reset_peak_memory()
        t = time.perf_counter()
        loss, grads = loss_and_grads(model, batch, chunk=TrainConfig.loss_chunk)
        opt.update(model, grads)
        mx.eval(loss, model.parameters(), opt.state)
        return before, mx.get_peak_memory(), time.perf_counter() - t, loss.item()

    run(8)  # allocates the optimizer state, so that each measured step starts with it resident
    rows = []
    for T in seq_lens:
        before, peak, secs, loss = run(T)
        predicted = training_activation_bytes(cfg, T, batch_size=1, loss_chunk=TrainConfig.loss_chunk,
                                              attention_chunk=TrainConfig.attention_chunk, float_bytes=2)  # fmt: skip
        predicted["AdamW update"] = 16 * n_params
        # the gradients live at the peak too: the planner counts them beside the adapters
        measured = peak - before - 4 * n_params
        rows.append({"T": T, "resident_gb": before / 1e9, "peak_gb": peak / 1e9, "measured_activations_gb": measured / 1e9,
                     "predicted_activations_gb": sum(predicted.values()) / 1e9, "adapter_params": n_params,
                     "predicted_parts_gb": {k: v / 1e9 for k, v in predicted.items()}, "loss": loss, "step_s": secs})  # fmt: skip
        print(rows[-1], file=sys.stderr, flush=True)
    return rows


def full_20b(model_dir: Path, seq_lens: list[int], rank: int, budget: str) -> list[dict]:
    """The planner's figures for the full 20b (24 layers): the 2-layer checkpoint's tensors repeated."""
    import dataclasses

    from mlx_gptoss.config import GptOssConfig
    from mlx_gptoss.lora.adapters import LoRASpec, last_layers
    from mlx_gptoss.memory import GB, BudgetError, plan_training, read_tensors

    small = read_tensors(model_dir)
    two = GptOssConfig.from_file(model_dir / "config.json")
    full_cfg = dataclasses.replace(GptOssConfig.gpt_oss_20b(), quantization=two.quantization)
    L_small = sum(1 for k in small if k.endswith(".mlp.gate_up.weight"))
    tensors = {}
    for name, info in small.items():
        if name.startswith("layers."):
            i, rest = name.split(".", 2)[1:]
            for j in range(int(i), full_cfg.num_hidden_layers, L_small):
                tensors[f"layers.{j}.{rest}"] = dataclasses.replace(info, name=f"layers.{j}.{rest}")
        else:
            tensors[name] = info
    spec = LoRASpec(
        rank=rank, alpha=2.0 * rank, targets=("attention", "experts"), layers=last_layers(4, full_cfg.num_hidden_layers)
    )
    out = []
    for T in seq_lens:
        try:
            plan = plan_training(full_cfg, tensors, spec, max_seq_len=T, budget=budget)
            out.append({"T": T, "mlx_gb": plan.mlx_bytes / GB, "expert_slots": plan.expert_slots, "table": plan.table()})
        except BudgetError as e:
            out.append({"T": T, "error": str(e)})
        print(out[-1].get("table", out[-1].get("error")), file=sys.stderr, flush=True)
    return out


def markdown(res: dict) -> str:
    lines = ["| T | resident GB | peak GB | step peak measured GB | planned GB | step s |", "|---|---|---|---|---|---|"]
    for r in res["measured"]:
        lines.append(f"| {r['T']} | {r['resident_gb']:.2f} | {r['peak_gb']:.2f} | {r['measured_activations_gb']:.3f} | "
                     f"{r['predicted_activations_gb']:.3f} | {r['step_s']:.1f} |")  # fmt: skip
    lines += ["", f"Full 20b, rank {res['args']['rank']} on attention + experts of 4 layers, budget {res['args']['budget']}:", "",
              "| T | planned MLX GB | expert slots per layer |", "|---|---|---|"]  # fmt: skip
    for r in res["full_20b"]:
        lines.append(
            f"| {r['T']} | {r.get('mlx_gb', float('nan')):.2f} | {r.get('expert_slots', '-')} |"
            if "error" not in r
            else f"| {r['T']} | does not fit | {r['error']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True, help="converted checkpoint with the real widths, few layers")
    ap.add_argument("--seq-lens", default="64,128,256")
    ap.add_argument("--full-seq-lens", default="128,1024,2048")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--budget", default="9.5GB")
    ap.add_argument("--slots", type=int, default=None, help="measure with the experts streamed, this many resident per layer")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--markdown", type=Path, default=None)
    a = ap.parse_args(argv)
    res = {"machine": machine(), "args": {"model": str(a.model), "rank": a.rank, "budget": a.budget, "slots": a.slots},
           "full_20b": full_20b(a.model, [int(t) for t in a.full_seq_lens.split(",")], a.rank, a.budget),
           "measured": measure(a.model, [int(t) for t in a.seq_lens.split(",")], a.rank, a.slots)}  # fmt: skip
    res["peak_rss_gb"] = peak_rss_gb()
    write_outputs(res, markdown(res), a.json, a.markdown)


if __name__ == "__main__":
    main()
