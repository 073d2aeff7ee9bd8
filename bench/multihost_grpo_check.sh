#!/usr/bin/env bash
# GRPO across two processes on one CPU machine (2 x 4 fake devices, gloo collectives) against the same run in
# one process on 8 fake devices: the metrics must agree (docs/LOG.md). About 6 minutes on 2 cores.
#     bash bench/multihost_grpo_check.sh [ROOT]
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=${1:-/tmp/deepjax_multihost}
PY=${PYTHON:-python}
TASK="--config.data.template=plain --config.data.max_digits=1 --config.data.ops=+- --config.data.num_train=150
      --config.data.num_test=20 --config.data.data_dir=$ROOT/tfds"
if [ ! -d "$ROOT/base" ]; then
  JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=8 $PY -m deepjax train tiny \
    --workdir "$ROOT/base" --no-progress $TASK --config.data.seq_len=96 --config.data.global_batch=8 \
    --config.train.steps=40 --config.optim.lr=3e-3 --config.train.checkpoint_every=40 --config.train.plot=false
fi
ARGS="$TASK --config.rl.init_from=$ROOT/base --config.rl.prompts_per_step=4 --config.rl.loss.group_size=4
      --config.rl.loss.mu=2 --config.rl.rollout.max_new_tokens=24 --config.rl.loss.beta=0.05 --config.rl.ref_refresh_every=3
      --config.rl.eval.every=2 --config.rl.eval.problems=4 --config.rl.eval.k=2 --config.rl.steps=3
      --config.train.checkpoint_every=2 --config.train.log_every=1 --config.mesh.data=2 --config.mesh.fsdp=4"
rm -rf "$ROOT/one" "$ROOT/two"
JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=8 $PY -m deepjax grpo tiny \
  --workdir "$ROOT/one" --no-progress $ARGS > "$ROOT/one.log" 2>&1
PORT=$($PY -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
for i in 0 1; do
  JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo \
  JAX_COORDINATOR_ADDRESS=127.0.0.1:$PORT JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=$i \
    $PY -m deepjax grpo tiny --workdir "$ROOT/two" --no-progress $ARGS > "$ROOT/two_$i.log" 2>&1 &
done
wait
$PY - "$ROOT" <<'PYEOF'
import json, sys
root = sys.argv[1]
for name in ("metrics.jsonl", "eval.jsonl"):
    one = [json.loads(l) for l in open(f"{root}/one/{name}")]
    two = [json.loads(l) for l in open(f"{root}/two/{name}")]
    assert len(one) == len(two) > 0, (name, len(one), len(two))
    for a, b in zip(one, two):
        for k, v in a.items():
            if isinstance(v, (int, float)) and not k.endswith(("_s", "per_s")):
                assert abs(v - b[k]) <= 1e-5 * max(1.0, abs(v)), (name, a["step"], k, v, b[k])
    print(f"{name}: {len(one)} rows agree (rel. 1e-5)")
PYEOF
