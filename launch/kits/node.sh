#!/usr/bin/env bash
# One node of an eossl training run: `accelerate launch` for this node, from the scheduler's variables.
# The SLURM script (slurm.sbatch) and the Kubernetes Job (k8s-job.yaml) both start it once per node, so a
# run on 127.0.0.1 (tests), on SLURM and on Kubernetes goes through the same lines.
#
#   node.sh METHOD --data URL --out RUN_DIR [--set KEY=VALUE ...]      (the arguments of eossl.train)
#
#   NNODES          nodes in the run            (default: SLURM_NNODES, else 1)
#   NODE_RANK       this node, 0..NNODES-1      (default: SLURM_NODEID, else JOB_COMPLETION_INDEX, else 0)
#   MASTER_ADDR     address of node 0           (required)
#   MASTER_PORT     rendezvous port             (default 29500)
#   PROCS_PER_NODE  processes per node (GPUs)   (default 8)
#   ACCELERATE_CONFIG  accelerate config file   (default launch/accelerate/multinode_8gpu.yaml: bf16, c10d)
#   EOSSL_DRY_RUN=1 print the command instead of running it (how tests render the per-node commands)
#
# Pre-emption: SIGTERM or SIGUSR1 to this script is passed to the training processes as SIGUSR1; they
# checkpoint at the next step boundary and stop; the script then exits 75 so the caller can requeue
# (SLURM) or the pod restarts (Kubernetes), and the rerun resumes from the checkpoint.
#
# Data unavailable: when the ranks cannot read their data (object storage down after its retries, a dead
# reader worker) they checkpoint at the last completed step and exit 76; the launcher reports any failed
# rank as 1, so the ranks also write their code to EOSSL_EXIT_CODE_FILE (a temporary file unless the caller
# sets one) and this script exits with it. Callers requeue on 76 a bounded number of times.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
NNODES="${NNODES:-${SLURM_NNODES:-1}}"
NODE_RANK="${NODE_RANK:-${SLURM_NODEID:-${JOB_COMPLETION_INDEX:-0}}}"
MASTER_ADDR="${MASTER_ADDR:?set MASTER_ADDR to the address of node 0}"
MASTER_PORT="${MASTER_PORT:-29500}"
PROCS_PER_NODE="${PROCS_PER_NODE:-8}"
ACCELERATE_CONFIG="${ACCELERATE_CONFIG:-$here/../accelerate/multinode_8gpu.yaml}"
ACCELERATE="${ACCELERATE:-accelerate}"
PREEMPTED_EXIT_CODE=75
DATA_UNAVAILABLE_EXIT_CODE=76

if (( NODE_RANK < 0 || NODE_RANK >= NNODES )); then
    echo "node.sh: NODE_RANK=$NODE_RANK is outside 0..$((NNODES - 1))" >&2
    exit 2
fi

cmd=("$ACCELERATE" launch --config_file "$ACCELERATE_CONFIG"
     --num_machines "$NNODES" --machine_rank "$NODE_RANK" --num_processes "$((NNODES * PROCS_PER_NODE))"
     --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT"
     -m eossl.train "$@")

if [[ "${EOSSL_DRY_RUN:-0}" == 1 ]]; then
    # One write per line: the nodes of a job print into the same output at the same time.
    quoted=$(printf ' %q' "${cmd[@]}")
    printf 'node %s/%s:%s\n' "$NODE_RANK" "$NNODES" "$quoted"
    exit 0
fi

echo "node.sh: node $NODE_RANK of $NNODES, $PROCS_PER_NODE processes, rendezvous $MASTER_ADDR:$MASTER_PORT" >&2
if [[ -z "${EOSSL_EXIT_CODE_FILE:-}" ]]; then
    EOSSL_EXIT_CODE_FILE="$(mktemp "${TMPDIR:-/tmp}/eossl-exit.XXXXXX")"
    trap 'rm -f "$EOSSL_EXIT_CODE_FILE"' EXIT
fi
export EOSSL_EXIT_CODE_FILE
: > "$EOSSL_EXIT_CODE_FILE"
preempted=0
forward() {
    preempted=1
    # The training processes are the children of the accelerate launcher (its agent would answer SIGTERM
    # by killing them after a short grace period: signal them directly so they can checkpoint).
    pkill -USR1 -P "$launcher" 2>/dev/null || true
}
"${cmd[@]}" &
launcher=$!
trap forward TERM USR1
status=0
while true; do
    wait "$launcher" && status=0 || status=$?
    kill -0 "$launcher" 2>/dev/null || break   # a trapped signal interrupts wait: wait again
done
if (( preempted )); then
    echo "node.sh: pre-empted; the checkpoint is written, rerun to resume" >&2
    exit "$PREEMPTED_EXIT_CODE"
fi
ranks_code="$(tr -dc '0-9' < "$EOSSL_EXIT_CODE_FILE" || true)"
if (( status != 0 )) && [[ "$ranks_code" == "$DATA_UNAVAILABLE_EXIT_CODE" ]]; then
    echo "node.sh: the training data could not be read; the checkpoint is written, rerun to resume" >&2
    exit "$DATA_UNAVAILABLE_EXIT_CODE"
fi
exit "$status"
