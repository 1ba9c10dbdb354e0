#!/usr/bin/env bash
# LoRA training on the full-size (random) gpt-oss-20b inside a memory budget, through the CLI a
# user runs: peak MLX memory per step (metrics.jsonl) and the process's peak RSS.
#
#   bash benchmarks/lora_20b_memory.sh /tmp/lora20b [SEQ_LEN] [STEPS] [BUDGET]
#
# Writes a random 20b in the released layout (~13 GB), converts it with --preset 16gb, trains
# rank 8 on attention + the experts of the last 4 layers, batch 1, under --memory-budget, then
# deletes both checkpoints. Needs ~27 GB of free disk while it runs.
set -euo pipefail
root=${1:?usage: lora_20b_memory.sh DIR [SEQ_LEN] [STEPS] [BUDGET]}
seq_len=${2:-128}
steps=${3:-3}
budget=${4:-9.5GB}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$root"
[ -d "$root/release" ] || python "$here/make_checkpoint.py" --size 20b --tokenizer "$root/release"
[ -d "$root/converted" ] || mlx-gptoss convert "$root/release" "$root/converted" --preset 16gb --no-progress
rm -rf "$root/release"  # only the converted copy is trained on
# plain-text examples, every token trained, each cut to SEQ_LEN tokens
python - "$root/train.jsonl" <<'EOF'
import json, random, sys
random.seed(0)
words = "the model reads each line of this file and learns to continue it one token after another".split()
with open(sys.argv[1], "w") as f:
    for _ in range(16):
        f.write(json.dumps({"text": " ".join(random.choice(words) for _ in range(400))}) + "\n")
EOF
rm -rf "$root/adapter"
/usr/bin/time -v mlx-gptoss lora train -m "$root/converted" --data "$root/train.jsonl" -o "$root/adapter" \
    --rank 8 --targets attention,experts --layers last:4 --memory-budget "$budget" \
    --max-seq-len "$seq_len" --overflow truncate --train-on assistant --iters "$steps" --save-every 0 \
    --no-progress 2> "$root/time.log" || { tail -20 "$root/time.log"; exit 1; }
python - "$root/adapter/metrics.jsonl" "$root/time.log" "$seq_len" "$budget" <<'EOF'
import json, re, sys
steps = [json.loads(l) for l in open(sys.argv[1]) if '"train"' in l]
rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", open(sys.argv[2]).read()).group(1))
for s in steps:
    print(f"step {s['step']}: loss {s['loss']:.3f}, {s['tokens_per_s']:.2f} tok/s, peak MLX {s['peak_memory_gb']:.2f} GB")
print(f"T={sys.argv[3]}, budget {sys.argv[4]}: peak MLX {max(s['peak_memory_gb'] for s in steps):.2f} GB, "
      f"process peak RSS {rss_kb * 1024 / 1e9:.2f} GB")
EOF
rm -rf "$root/converted"
