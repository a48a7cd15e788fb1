#!/usr/bin/env bash
# Run the pipeline on several nodes. Start it on the head node: the driver runs the single-process
# stages there and starts each distributed stage on every host of the hostfile through DeepSpeed's
# multi-node runner (pdsh over ssh by default).
#
# Usage: launch/multi_node.sh --config FILE --hostfile FILE --nodes N [--gpus-per-node G]
#                             [--master-addr HOST] [--master-port PORT] [section.key=value ...]
#   launch/multi_node.sh --config configs/llama2-7b.yaml --hostfile hosts --nodes 4 \
#       --master-addr node001 tracking.uri=http://node001:5000
#
#   --hostfile       one `hostname slots=G` line per node; this (head) node first
#   --gpus-per-node  default 8
#   --master-addr    rank 0's address, reachable from every node; default: the hostfile's first host
#   --master-port    default 29500
# --master-addr sets deepspeed.launcher_args: a launcher_args override of your own replaces that
# list, so put `--master_addr HOST` in it too.
#
# Requirements, as for any DeepSpeed multi-node run:
#   - The run directory (run.root), the repository and the data are on storage that every node
#     sees at the same path (NFS, Lustre, ...): stages write checkpoints, datasets and manifests
#     there, and the runner starts each rank in this directory on its node.
#   - Passwordless ssh from this node to every host, and the same Python environment on each.
#   - The runner forwards NCCL_*, PYTHON*, MLFLOW* and UCX* variables itself; the driver adds
#     DS_ACCELERATOR, TORCH_*, OMP_*, HF_HUB_*, HF_DATASETS_*, HF_HOME, TOKENIZERS_PARALLELISM and PATH
#     (the venv's bin first), then the lines of ~/.deepspeed_env and ./.deepspeed_env
#     (pipeline/nodes.py).
#   - Only this node talks to MLflow: the embedded store in the run directory works; a server
#     (launch/mlflow_server.sh, tracking.uri=http://...) lets others watch the run.
set -euo pipefail

usage() {
  sed -n '2,28p' "$0" >&2
  exit 2
}

config="" hostfile="" nodes="" gpus_per_node=8 master_addr="" master_port=29500
overrides=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --config) config=$2; shift 2 ;;
    --hostfile) hostfile=$2; shift 2 ;;
    --nodes) nodes=$2; shift 2 ;;
    --gpus-per-node) gpus_per_node=$2; shift 2 ;;
    --master-addr) master_addr=$2; shift 2 ;;
    --master-port) master_port=$2; shift 2 ;;
    -h | --help) usage ;;
    *) overrides+=("$1"); shift ;;
  esac
done
if [[ -z $config || -z $hostfile || -z $nodes ]]; then
  usage
fi
if [[ ! -f $hostfile ]]; then
  echo "multi_node.sh: hostfile $hostfile not found" >&2
  exit 2
fi

if [[ -n $master_addr ]]; then
  overrides=("deepspeed.launcher_args=[--master_addr, $master_addr]" "${overrides[@]}")
fi

"${APT_PIPELINE:-apt-pipeline}" run --config "$config" \
  "deepspeed.num_nodes=$nodes" "deepspeed.num_gpus=$gpus_per_node" \
  "deepspeed.hostfile=$(realpath "$hostfile")" "deepspeed.master_port=$master_port" "${overrides[@]}"
