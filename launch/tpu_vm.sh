#!/usr/bin/env bash
# Run a deepjax command on every worker of a Cloud TPU VM (single host or pod slice).
#
#   launch/tpu_vm.sh create NAME ZONE ACCELERATOR [VERSION]   # e.g. my-v5p us-east5-a v5p-128 v2-alpha-tpuv5
#   launch/tpu_vm.sh setup  NAME ZONE GIT_URL [REF]           # clone deepjax and install it with the tpu extra
#   launch/tpu_vm.sh run    NAME ZONE -- COMMAND...           # e.g. -- python -m deepjax info configs/bench.py
#   launch/tpu_vm.sh delete NAME ZONE
#
# Every worker runs the same command (SPMD); deepjax.parallel.distributed.initialize() needs no arguments on TPU VMs.
# DRY_RUN=1 prints the gcloud commands instead of running them.
set -euo pipefail

run() {
  if [[ "${DRY_RUN:-0}" == 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi
}

usage() { sed -n '2,12p' "$0" >&2; exit 2; }

[[ $# -ge 3 ]] || usage
action=$1 name=$2 zone=$3
shift 3
case "$action" in
  create)
    [[ $# -ge 1 ]] || usage
    run gcloud compute tpus tpu-vm create "$name" --zone "$zone" --accelerator-type "$1" \
      --version "${2:-tpu-ubuntu2204-base}"
    ;;
  setup)
    [[ $# -ge 1 ]] || usage
    url=$1 ref=${2:-main}
    run gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all --command \
      "git clone -q $url deepjax 2>/dev/null || git -C deepjax fetch -q; git -C deepjax checkout -q $ref && \
python3 -m venv deepjax/.venv && . deepjax/.venv/bin/activate && pip install -q -e 'deepjax[tpu]'"
    ;;
  run)
    [[ "${1:-}" == "--" ]] && shift
    [[ $# -ge 1 ]] || usage
    run gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all --command \
      "cd deepjax && . .venv/bin/activate && $(printf '%q ' "$@")"
    ;;
  delete)
    run gcloud compute tpus tpu-vm delete "$name" --zone "$zone" --quiet
    ;;
  *) usage ;;
esac
