#!/usr/bin/env bash
# Start an MLflow tracking server with a SQLite backend and artifacts in one directory, for
# multi-node runs or several runs in one place. Point runs at it with tracking.uri=http://HOST:PORT.
#
# Usage: launch/mlflow_server.sh DIR [--host HOST] [--port PORT] [extra `mlflow server` options]
#   launch/mlflow_server.sh /shared/mlflow                     # 127.0.0.1:5000, this machine only
#   launch/mlflow_server.sh /shared/mlflow --host 0.0.0.0      # reachable by the cluster's nodes
#
# It binds 127.0.0.1 by default: the server has no authentication, so anyone who can reach the
# port can read and delete runs. Bind another interface only on a trusted network (with
# --allowed-hosts, see `mlflow server --help`). Runs in the foreground; stop it with Ctrl-C.
set -euo pipefail

if [[ $# -lt 1 || $1 == -* ]]; then
  sed -n '2,11p' "$0" >&2
  exit 2
fi
store_dir=$1
shift
host=127.0.0.1
port=5000
extra=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --host) host=$2; shift 2 ;;
    --port) port=$2; shift 2 ;;
    *) extra+=("$1"); shift ;;
  esac
done

# The server's background job runner serves MLflow's GenAI jobs, not training runs; off, it also
# leaves no worker processes behind on shutdown.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}
mkdir -p "$store_dir/mlartifacts"
store_dir=$(realpath "$store_dir")
echo "mlflow server: http://$host:$port  (store: $store_dir/mlflow.db, artifacts: $store_dir/mlartifacts)" >&2
exec "${MLFLOW:-mlflow}" server --host "$host" --port "$port" \
  --backend-store-uri "sqlite:///$store_dir/mlflow.db" \
  --artifacts-destination "$store_dir/mlartifacts" "${extra[@]}"
