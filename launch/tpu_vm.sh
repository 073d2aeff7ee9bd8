#!/usr/bin/env bash
# Train deepjax on a Cloud TPU VM: one host, a pod slice, or several slices (multislice).
#
#   launch/tpu_vm.sh [OPTIONS] ACTION NAME ZONE [ARGS]
#     create NAME ZONE ACCELERATOR [RUNTIME]  request a queued resource, e.g. v5p-128 (--wait: until ACTIVE)
#     setup  NAME ZONE GIT_URL [REF]          on every worker: clone, Python 3.12 venv (uv), pip install deepjax[tpu]
#                                             (GIT_URL `-`: install the ~/deepjax that copy put there)
#     copy   NAME ZONE SRC [DEST]             scp a local file / folder to every worker (DEST relative to ~)
#     run    NAME ZONE -- COMMAND...          start COMMAND on every worker, detached from ssh, logged per worker
#     exec   NAME ZONE -- COMMAND...          run COMMAND on every worker in the foreground
#     logs   NAME ZONE [LINES]                the last LINES (50) of each worker's log of --run
#     status NAME ZONE                        the queued resource's state; each worker's runs
#     stop   NAME ZONE                        stop --run on every worker (its process group)
#     delete NAME ZONE                        delete the queued resource and its TPU VMs
#
# Options (any position before `--`):
#   --dry-run (or DRY_RUN=1)  print every gcloud command instead of running it
#   --slices N      multislice: N slices named NAME-0 .. NAME-{N-1} in one queued resource NAME (create: --node-count)
#   --run ID        run id (run: default run-YYYYmmdd-HHMMSS; logs / stop: required; status: all runs when absent)
#   --env K=V       export K=V for the command (run / exec; repeatable), e.g. --env LIBTPU_INIT_ARGS=...
#   --worker W      workers to reach (default all; logs / status / exec may name one, e.g. 0)
#   --spot | --reserved | --best-effort   create: capacity tier (--best-effort goes through `gcloud alpha`)
#   --wait          create: poll the queued resource until it is ACTIVE (fails on FAILED / SUSPENDED)
#   --project P     pass --project P to gcloud (default: gcloud config)
#   --internal-ip   ssh / scp over internal IPs (from a VM in the same network)
#
# Runtime versions (create's RUNTIME default): v6e -> v2-alpha-tpuv6e, v5p -> v2-alpha-tpuv5,
# v5e (v5litepod) -> v2-alpha-tpuv5-lite, v4 / v3 / v2 -> tpu-ubuntu2204-base. The images' system Python (3.10 on Ubuntu
# 22.04) is not used: setup installs uv with pip --user and makes ~/deepjax/.venv with Python 3.12 (uv downloads it); it
# also turns on transparent hugepages (jax asks for them on v5e and newer; until the VM reboots).
#
# A run lives in ~/deepjax_logs/ID/ on each worker: run.sh (what ran), worker-HOSTNAME.log (stdout and stderr),
# .pid (the process group) and .exit (the exit code, or `stopped`). It is started with setsid nohup, so it survives
# the ssh session. Every worker runs the same command (SPMD); pass a gs:// --workdir on pods so all hosts share it.
# Multislice: the queued resource writes MEGASCALE_* into each VM's tpu-env metadata, which jax and libtpu read; if
# it is absent there (slices made separately), run exports MEGASCALE_COORDINATOR_ADDRESS (NAME-0 worker 0),
# MEGASCALE_NUM_SLICES, MEGASCALE_SLICE_ID and MEGASCALE_PORT itself.
set -eo pipefail  # no -u: macOS's bash 3.2 calls an empty array unbound

MEGASCALE_PORT=8081
DEFAULT_LINES=50

usage() { awk 'NR > 1 && !/^#/ { exit } NR > 1' "$0" >&2; exit 2; }
die() { echo "tpu_vm.sh: $*" >&2; exit 2; }

# --- options -----------------------------------------------------------------------------------------------------
dry=${DRY_RUN:-0} slices=1 run_id="" worker=all tier="" project="" internal_ip=0 wait=0
envs=() pos=() cmd=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) dry=1 ;;
    --slices) [[ $# -ge 2 ]] || usage; slices=$2; shift ;;
    --slices=*) slices=${1#*=} ;;
    --run) [[ $# -ge 2 ]] || usage; run_id=$2; shift ;;
    --run=*) run_id=${1#*=} ;;
    --env) [[ $# -ge 2 ]] || usage; envs+=("$2"); shift ;;
    --env=*) envs+=("${1#*=}") ;;
    --worker) [[ $# -ge 2 ]] || usage; worker=$2; shift ;;
    --worker=*) worker=${1#*=} ;;
    --spot|--reserved|--best-effort) tier=$1 ;;
    --project) [[ $# -ge 2 ]] || usage; project=$2; shift ;;
    --project=*) project=${1#*=} ;;
    --internal-ip) internal_ip=1 ;;
    --wait) wait=1 ;;
    --) shift; cmd=("$@"); break ;;
    -h|--help) usage ;;
    -) pos+=("$1") ;;
    -*) die "unknown option $1" ;;
    *) pos+=("$1") ;;
  esac
  shift
done
[[ ${#pos[@]} -ge 3 ]] || usage
action=${pos[0]} name=${pos[1]} zone=${pos[2]}
args=("${pos[@]:3}")
[[ "$slices" =~ ^[1-9][0-9]*$ ]] || die "--slices $slices: a positive integer"
[[ -z "$run_id" || "$run_id" =~ ^[A-Za-z0-9._-]+$ ]] || die "--run $run_id: letters, digits, . _ - only"
[[ "$worker" =~ ^(all|[0-9][0-9,-]*)$ ]] || die "--worker $worker: all, an index, a list (1,4) or a range (1-3)"
for e in "${envs[@]}"; do [[ "$e" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env $e: KEY=VALUE"; done

# --- printing / running gcloud -------------------------------------------------------------------------------------
exec 3>&1  # dry-run prints here, also from inside $(...)

plain='^[A-Za-z0-9_./:=@,+%-]+$'
quote() {  # shell words, quoted only where needed (copy-pasteable)
  local a out=()
  for a in "$@"; do
    if [[ "$a" =~ $plain ]]; then out+=("$a"); else out+=("'${a//\'/\'\\\'\'}'"); fi
  done
  echo "${out[*]}"
}

run() { if [[ "$dry" == 1 ]]; then quote "$@" >&3; else "$@"; fi; }

words() { local w; w=$(printf '%q ' "$@"); echo "${w% }"; }  # bash-quoted words, one line

gflags=()
[[ -n "$project" ]] && gflags+=(--project "$project")
sshflags=()
[[ "$internal_ip" == 1 ]] && sshflags+=(--internal-ip)

nodes=()  # the TPU VMs (one per slice)
if [[ "$slices" == 1 ]]; then nodes=("$name"); else for ((i = 0; i < slices; i++)); do nodes+=("$name-$i"); done; fi

ssh_all() {  # ssh_all NODE REMOTE_COMMAND: the command on the --worker workers of one node
  run gcloud compute tpus tpu-vm ssh "$1" --zone "$zone" --worker="$worker" "${sshflags[@]}" "${gflags[@]}" \
    --command "$2"
}

pids=()
ssh_bg() {  # ssh_all, in the background when several slices must run at once (collect with wait_all)
  if [[ "$dry" == 1 || "$slices" == 1 ]]; then ssh_all "$@"; else ssh_all "$@" & pids+=($!); fi
}
wait_all() { local p rc=0; for p in "${pids[@]}"; do wait "$p" || rc=1; done; return $rc; }

need_run() { [[ -n "$run_id" ]] || die "$action needs --run ID (see: launch/tpu_vm.sh status $name $zone)"; }

runtime_for() {
  case "$1" in
    v6e-*) echo v2-alpha-tpuv6e ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v5litepod-*|v5e-*) echo v2-alpha-tpuv5-lite ;;
    v4-*|v3-*|v2-*) echo tpu-ubuntu2204-base ;;
    *) die "no default runtime version for $1: pass it (create NAME ZONE ACCELERATOR RUNTIME)" ;;
  esac
}

# Remote shell text: ~, $(hostname) and $1 expand on the worker, not here.
# shellcheck disable=SC2088,SC2016
logdir="~/deepjax_logs/$run_id"
# shellcheck disable=SC2016
me='$(hostname)'
# alive PID: a process of the run's session (setsid: session id = the run's pid) is still running, zombies aside
# shellcheck disable=SC2016
alive='alive() { ps -o stat= -s "$1" 2>/dev/null | grep -qv "^Z"; }'

case "$action" in
  create)
    [[ ${#args[@]} -ge 1 ]] || usage
    acc=${args[0]} rt=${args[1]:-$(runtime_for "${args[0]}")}
    gc=(gcloud); [[ "$tier" == --best-effort ]] && gc=(gcloud alpha)  # best-effort is an alpha flag
    shape=(--node-id "$name")
    [[ "$slices" == 1 ]] || shape=(--node-count "$slices" --node-prefix "$name")
    run "${gc[@]}" compute tpus queued-resources create "$name" --zone "$zone" --accelerator-type "$acc" \
      --runtime-version "$rt" "${shape[@]}" ${tier:+"$tier"} "${gflags[@]}"
    state=(gcloud compute tpus queued-resources describe "$name" --zone "$zone" "${gflags[@]}"
           --format 'value(state.state)')
    if [[ "$wait" != 1 ]]; then echo "# ready when ACTIVE: launch/tpu_vm.sh status $name $zone" >&3
    elif [[ "$dry" == 1 ]]; then quote "${state[@]}" >&3; echo "# ... every 30 s until ACTIVE" >&3
    else
      while st=$("${state[@]}"); [[ "$st" != ACTIVE ]]; do
        case "$st" in FAILED|SUSPENDED|SUSPENDING) die "queued resource $name is $st";; esac
        echo "$name: ${st:-?}, waiting"; sleep 30
      done
      echo "$name: ACTIVE"
    fi
    ;;

  setup)
    [[ ${#args[@]} -ge 1 ]] || usage
    url=${args[0]} ref=${args[1]:-main}
    if [[ "$url" == - ]]; then
      src="test -f deepjax/pyproject.toml || { echo \"$me: no ~/deepjax (copy it first)\" >&2; exit 1; }"
    else
      src="if [ -d deepjax/.git ]; then git -C deepjax remote set-url origin $(printf %q "$url"); \
else git clone -q $(printf %q "$url") deepjax; fi; \
git -C deepjax fetch -q origin $(printf %q "$ref"); git -C deepjax checkout -q --detach FETCH_HEAD"
    fi
    # uv: from the package index with pip --user (the official installer where pip is missing or refused)
    remote="set -e; cd ~; $src; export PATH=\$HOME/.local/bin:\$PATH; \
command -v uv >/dev/null || python3 -m pip install -q --user uv || curl -LsSf https://astral.sh/uv/install.sh | sh; \
uv venv -q --allow-existing --python 3.12 deepjax/.venv; \
uv pip install -q --python deepjax/.venv/bin/python -e './deepjax[tpu]'; \
sudo -n sh -c 'echo always > /sys/kernel/mm/transparent_hugepage/enabled' 2>/dev/null || true; \
echo $me: \$(deepjax/.venv/bin/python -c \
'import sys, jax; print(\"python\", sys.version.split()[0], \"jax\", jax.__version__)')"
    for n in "${nodes[@]}"; do ssh_bg "$n" "$remote"; done
    wait_all
    ;;

  copy)
    [[ ${#args[@]} -ge 1 ]] || usage
    src=${args[0]} dest=${args[1]:-}
    for n in "${nodes[@]}"; do
      run gcloud compute tpus tpu-vm scp --recurse "$src" "$n:$dest" --zone "$zone" --worker="$worker" \
        "${sshflags[@]}" "${gflags[@]}"
    done
    ;;

  run|exec)
    [[ ${#cmd[@]} -ge 1 ]] || die "$action needs -- COMMAND..."
    [[ -n "$run_id" || "$action" == exec ]] || run_id=run-$(date +%Y%m%d-%H%M%S)
    # shellcheck disable=SC2088
    logdir="~/deepjax_logs/$run_id"
    coord=""
    if [[ "$slices" -gt 1 ]]; then  # fallback MEGASCALE_* (used where the tpu-env metadata lacks them)
      describe=(gcloud compute tpus tpu-vm describe "${nodes[0]}" --zone "$zone" "${gflags[@]}"
                --format 'value(networkEndpoints[0].ipAddress)')
      if [[ "$dry" == 1 ]]; then quote "${describe[@]}" >&3; coord=COORDINATOR_IP; else coord=$("${describe[@]}"); fi
      [[ -n "$coord" ]] || die "no IP address for ${nodes[0]} worker 0"
    fi
    for i in "${!nodes[@]}"; do
      # the command's shell lines, as they run on the worker ($$, $? and $(hostname) are the worker's)
      lines=()
      [[ "$action" == run ]] && lines+=("echo \$\$ > $logdir/worker-$me.pid")
      lines+=('cd ~/deepjax && . .venv/bin/activate || { echo "no ~/deepjax/.venv: run setup first" >&2; exit 1; }')
      for e in "${envs[@]}"; do lines+=("export $(printf %q "$e")"); done
      if [[ "$slices" -gt 1 ]]; then
        lines+=("curl -sf -m 5 -H Metadata-Flavor:Google \
http://metadata.google.internal/computeMetadata/v1/instance/attributes/tpu-env | grep -q MEGASCALE_COORDINATOR_ADDRESS \
|| export MEGASCALE_COORDINATOR_ADDRESS=$coord:$MEGASCALE_PORT MEGASCALE_NUM_SLICES=$slices MEGASCALE_SLICE_ID=$i \
MEGASCALE_PORT=$MEGASCALE_PORT")
      fi
      lines+=("$(words "${cmd[@]}")")
      if [[ "$action" == exec ]]; then  # all slices at once: each waits for the others to join
        ssh_bg "${nodes[$i]}" "$(printf '%s\n' "${lines[@]}")"
        continue
      fi
      lines+=("echo \$? > $logdir/worker-$me.exit")
      ssh_all "${nodes[$i]}" "set -e
$alive
mkdir -p $logdir
f=$logdir/worker-$me
if [ -f \$f.pid ] && alive \$(cat \$f.pid); then echo \"$me: $run_id is already running\" >&2; exit 1; fi
rm -f \$f.exit
cat > $logdir/run.sh <<'DEEPJAX_RUN'
$(printf '%s\n' "${lines[@]}")
DEEPJAX_RUN
setsid nohup bash $logdir/run.sh > \$f.log 2>&1 < /dev/null &
echo \"$me: started $run_id, log \$f.log\""
    done
    wait_all
    if [[ "$action" == run ]]; then
      echo "# logs: launch/tpu_vm.sh --run $run_id logs $name $zone (stop: ... --run $run_id stop $name $zone)" >&3
    fi
    ;;

  logs)
    need_run
    count=${args[0]:-$DEFAULT_LINES}
    [[ "$count" =~ ^[0-9]+$ ]] || die "logs LINES: a number"
    for n in "${nodes[@]}"; do
      ssh_all "$n" "tail -n $count $logdir/worker-$me.log | sed \"s/^/$me| /\""
    done
    ;;

  status)
    run gcloud compute tpus queued-resources describe "$name" --zone "$zone" "${gflags[@]}" \
      --format 'value(state.state)'
    pattern=${run_id:-*}
    remote="$alive; for d in ~/deepjax_logs/$pattern/; do [ -d \"\$d\" ] || continue; \
r=\$(basename \$d); f=\$d/worker-$me; \
if [ -f \$f.exit ]; then s=\"exited \$(cat \$f.exit)\"; \
elif [ -f \$f.pid ] && alive \$(cat \$f.pid); then s=\"running (pid \$(cat \$f.pid))\"; \
else s='not running'; fi; echo \"$me \$r: \$s\"; done"
    for n in "${nodes[@]}"; do ssh_all "$n" "$remote"; done
    ;;

  stop)
    need_run
    remote="$alive; f=$logdir/worker-$me; [ -f \$f.pid ] || { echo \"$me: no run $run_id\"; exit 0; }; \
p=\$(cat \$f.pid); \
kill -TERM -- -\$p 2>/dev/null || true; for i in \$(seq 30); do alive \$p || break; sleep 1; done; \
kill -KILL -- -\$p 2>/dev/null || true; [ -f \$f.exit ] || echo stopped > \$f.exit; rm -f /tmp/libtpu_lockfile; \
echo \"$me: stopped $run_id\""
    for n in "${nodes[@]}"; do ssh_all "$n" "$remote"; done
    ;;

  delete)
    run gcloud compute tpus queued-resources delete "$name" --zone "$zone" --force --quiet "${gflags[@]}"
    ;;

  *) usage ;;
esac
