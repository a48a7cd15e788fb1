#!/usr/bin/env bash
# The first check on a GPU machine: the tiny chain (configs/tiny.yaml, prep -> eval) on every visible GPU under
# ZeRO-3 bf16, ZeRO-2 bf16, ZeRO-2 fp16 and ZeRO-3 fp16; each export must load in plain transformers with the
# parameter count finalize/masks.json reports. One line per case; exit 1 if any case fails.
#
# Usage: launch/gpu_smoke.sh [RUN_ROOT] [section.key=value ...]     (make gpu-smoke; RUN_ROOT default runs/gpu-smoke)
# Without a visible NVIDIA GPU it says so and exits 0 without running anything.
set -euo pipefail
cd "$(dirname "$0")/.."

root=${1:-runs/gpu-smoke}
shift $(( $# > 0 ? 1 : 0 ))
python=${PYTHON:-python}
gpus=$("$python" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")
if [[ $gpus -eq 0 ]]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu-smoke: nvidia-smi sees GPUs but this torch does not (a CPU build?); install a CUDA build:" \
         "make clean && make TORCH_SPEC='torch>=2.13' gpu-smoke" >&2
    exit 1
  fi
  echo "gpu-smoke: no GPU visible (torch.cuda.is_available() is False); nothing run"
  exit 0
fi
unset DS_ACCELERATOR  # DeepSpeed picks CUDA, and the process group NCCL

cases=("zero3_bf16 ds_configs/zero3_bf16.json bf16" "zero2_bf16 ds_configs/zero2_bf16.json bf16"
       "zero2_fp16 ds_configs/zero2_bf16.json fp16" "zero3_fp16 ds_configs/zero3_bf16.json fp16")
failed=0
for case in "${cases[@]}"; do
  read -r name template precision <<<"$case"
  log="$root/$name.log"
  mkdir -p "$root"
  started=$SECONDS
  if "$python" -m pipeline.cli run --config configs/tiny.yaml "run.root=$root" "run.name=$name" \
      "deepspeed.config=$template" "deepspeed.num_gpus=$gpus" "train.precision=$precision" "$@" >"$log" 2>&1 \
     && line=$("$python" - "$root/$name" <<'EOF'
import json, sys
from pathlib import Path

from transformers import AutoModelForCausalLM

run = Path(sys.argv[1])
masks = json.loads((run / "finalize" / "masks.json").read_text())
model = AutoModelForCausalLM.from_pretrained(run / "merge" / "model")
params = sum(p.numel() for p in model.parameters())
finetune = json.loads((run / "finetune" / "manifest.json").read_text())["summary"]
metrics = json.loads((run / "eval" / "metrics.json").read_text())
assert params == masks["remaining_params"], f"export: {params} parameters; masks.json: {masks['remaining_params']}"
print(f"export {params:,} params = masks.json, {finetune['overflow_steps']} overflow steps, perplexity "
      f"{metrics['base']['val_perplexity']:.2f} -> {metrics['pruned']['val_perplexity']:.2f}")
EOF
); then
    echo "gpu-smoke: $name on $gpus GPU(s): ok in $((SECONDS - started)) s; $line"
  else
    echo "gpu-smoke: $name on $gpus GPU(s): FAILED after $((SECONDS - started)) s; see $log"
    tail -n 20 "$log" | sed 's/^/    /'
    failed=1
  fi
done
exit $failed
