"""Fine-tune gpt-oss on your own chats with LoRA, then chat with the adapter — all on this Mac.

    python examples/finetune.py ~/models/gpt-oss-20b train.jsonl my-adapter
    python examples/finetune.py ~/models/gpt-oss-20b saved-chats/ my-adapter   # a folder of chat.to_json() files
    python examples/finetune.py ~/models/gpt-oss-20b-16gb train.jsonl my-adapter 9.5GB   # a 16 GB Mac

``train.jsonl`` holds one example per line: ``{"messages": [{"role": "user", ...}, {"role":
"assistant", "thinking": ..., "content": ...}]}`` (OpenAI style, tools and tool results allowed),
``{"prompt", "completion"}``, or the harmony JSON an app saved with ``chat.to_json()``. A folder of
saved chats is gathered into one such file first. Ctrl-C stops after the current step and keeps
what was trained (run again with the same arguments to resume).
"""

import signal
import sys
import threading
from pathlib import Path

import mlx_gptoss
from mlx_gptoss.lora.adapters import LoRASpec, apply_lora
from mlx_gptoss.lora.data import load_dataset
from mlx_gptoss.lora.plan import training_plan
from mlx_gptoss.lora.train import TrainConfig, train


def gather(folder: Path, out: Path) -> Path:
    """One JSON line per saved conversation (``chat.to_json()`` writes one JSON object per chat)."""
    lines = [p.read_text().replace("\n", " ") for p in sorted(folder.glob("*.json"))]
    out.write_text("\n".join(lines) + "\n")
    return out


def main() -> None:
    model_path, data, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    if data.is_dir():
        data = gather(data, out.with_suffix(".jsonl"))
    budget = sys.argv[4] if len(sys.argv) > 4 else None
    spec = LoRASpec(rank=8, alpha=16, targets=("attention",))
    cfg = TrainConfig(out, epochs=2, grad_accumulation=4, save_every=25, eval_every=0)
    # under a budget, plan for training (adapters, optimizer, activations), not for inference
    plan = training_plan(model_path, spec, cfg, budget) if budget else None
    model = mlx_gptoss.load(model_path, memory_budget=plan)
    dataset = load_dataset(data, model.tokenizer.encoding, train_on="final", max_seq_len=cfg.max_seq_len)
    print(dataset.summary())  # sequences, tokens, and every skipped line with its reason
    apply_lora(model, spec, seed=0)
    stop = threading.Event()

    def progress(p) -> None:
        if p.kind == "train" and p.loss is not None:
            print(
                f"step {p.step}/{p.total_steps}  loss {p.loss:.3f}  {p.tokens_per_s:.0f} tok/s  peak {p.peak_memory_gb:.1f} GB",
                file=sys.stderr,
            )

    resume = (out / "checkpoints").is_dir()
    signal.signal(signal.SIGINT, lambda *_: stop.set())  # Ctrl-C: finish the step, save, return
    result = train(model, dataset, None, cfg, spec=spec, on_progress=progress, cancel=stop, resume=resume)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    print(f"{result.status}: {result.steps} steps, final loss {result.final_loss}", file=sys.stderr)
    if result.status == "cancelled":
        sys.exit("stopped; run the same command again to resume")

    tuned = mlx_gptoss.load(model_path, adapter=out)  # served unfused: the base stays as stored
    chat = tuned.chat(reasoning_effort="low")
    for line in sys.stdin if not sys.stdin.isatty() else ["Hello! What can you do?"]:
        print(chat.send(line.strip()).final)


if __name__ == "__main__":
    main()
