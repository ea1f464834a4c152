#!/usr/bin/env bash
# `make demo`: build the embedded corpus and tokenizer, then train configs/demo.yaml on 2 CPU ranks
# with DeepSpeed (ep_size 2), and print where everything was written.
set -euo pipefail
cd "$(dirname "$0")/.."
export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
RUN_DIR=runs/demo
PORT="${MASTER_PORT:-$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"

echo "== 1/2 embedded corpus and tokenizer -> data/embedded"
python -m data_prep.embedded --out data/embedded

echo "== 2/2 training configs/demo.yaml: deepspeed --num_gpus 2 (CPU, gloo), ep_size 2"
rm -rf "$RUN_DIR"
start=$(date +%s)
deepspeed --num_gpus 2 --master_port "$PORT" launch/pretrain.py --config configs/demo.yaml "$@" 2>&1 \
  | grep -v -E '^\[[0-9-]+ [0-9:,]+\] \[(INFO|WARNING)\] \[(real_accelerator|runner|launch|config_utils|logging|comm|engine|checkpointing|utils|torch_checkpoint_engine|stage_1_and_2|moe|groups)' || true
test -f "$RUN_DIR/metrics.jsonl" || { echo "demo failed: no $RUN_DIR/metrics.jsonl"; exit 1; }

python - "$RUN_DIR" "$(( $(date +%s) - start ))" <<'PY'
import json, os, sys
run, secs = sys.argv[1], int(sys.argv[2])
rows = [json.loads(l) for l in open(os.path.join(run, "metrics.jsonl")) if l.strip()]
train = [r for r in rows if "loss" in r]
val = [r for r in rows if "val_loss" in r]
first, last = train[0], train[-1]
ckpts = os.path.join(run, "checkpoints")
tags = sorted(t for t in os.listdir(ckpts) if os.path.exists(os.path.join(ckpts, t, "COMPLETE")))
print()
print("== demo summary")
print(f"  trained {last['step']} steps in {secs}s on 2 ranks")
print(f"  loss {first['loss']:.3f} (step {first['step']}) -> {last['loss']:.3f} (step {last['step']})")
if val:
    print(f"  validation loss {val[0]['val_loss']:.3f} (step {val[0]['step']}) -> {val[-1]['val_loss']:.3f} "
          f"(step {val[-1]['step']}), perplexity {val[-1]['val_ppl']:.1f}")
print(f"  metrics:     {run}/metrics.jsonl")
print(f"  tensorboard: {run}/tensorboard   (tensorboard --logdir {run}/tensorboard)")
print(f"  checkpoints: {ckpts}/{{{','.join(tags)}}} (resume: add --resume auto)")
print(f"  job:         {run}/job.yaml")
if not last["loss"] < first["loss"] - 0.5:
    sys.exit("demo: the loss did not fall clearly")
PY
python -m molm_ds.report "$RUN_DIR"
