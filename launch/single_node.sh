#!/usr/bin/env bash
# Run the pipeline on this machine with N ranks: N GPUs, or N CPU processes where there is no GPU.
#
# Usage: launch/single_node.sh CONFIG N [section.key=value ...] [--from STAGE]
#   launch/single_node.sh configs/llama2-7b.yaml 8
#   launch/single_node.sh configs/tiny.yaml 2 train.steps=40
#
# Extra arguments go to `apt-pipeline run` as they are. Without a visible NVIDIA GPU it sets
# DS_ACCELERATOR=cpu (DeepSpeed then runs gloo ranks). Set APT_PIPELINE to use another executable.
set -euo pipefail

if [[ $# -lt 2 ]]; then
  sed -n '2,9p' "$0" >&2
  exit 2
fi
config=$1
num_ranks=$2
shift 2

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
fi

exec "${APT_PIPELINE:-apt-pipeline}" run --config "$config" "deepspeed.num_gpus=$num_ranks" "$@"
