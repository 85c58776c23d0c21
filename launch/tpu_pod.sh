#!/usr/bin/env bash
# Runs cmr-jax on a Cloud TPU VM slice (e.g. a v4-32: 4 workers x 4 chips). Every worker runs the
# same `python tools/train.py --distributed=auto ...`; JAX finds the other workers from the TPU
# metadata. The run directory is a gs:// URL (WORKDIR=gs://BUCKET/runs/NAME): the trainers and
# orbax write it directly, no mount needed. The data may be a gs:// URL too (each worker then
# stages the shards it reads to its local disk, README "Run and data folders on Cloud Storage"),
# or, for an archive larger than a worker's disk, a path on a Cloud Storage FUSE mount of
# gs://BUCKET at MOUNT (set BUCKET only then); WORKDIR may also be an absolute path on such a
# shared mount.
#
# Usage: launch/tpu_pod.sh COMMAND [ARG...]
#   create     create the slice (ACCELERATOR_TYPE, RUNTIME_VERSION) at once
#   queue      request the slice as a queued resource (QR_NAME; SPOT=1 for Spot capacity): it is
#              created when capacity is free; `supervise` does this itself
#   setup      copy this checkout's HEAD to every worker, install Python PYTHON_VERSION, cmr_jax
#              and jax[tpu] in a venv there, and (when BUCKET is set) mount gs://BUCKET at MOUNT
#   run MODE CONFIG WORKDIR [FLAG...]
#              start `tools/train.py --mode=MODE --config=CONFIG --workdir=WORKDIR FLAG...` on
#              every worker in the background; each worker logs to WORKDIR/logs/HOSTNAME.log
#              (for a gs:// WORKDIR: to ~/cmr-jax-logs/HOSTNAME.log on the worker)
#   supervise MODE CONFIG WORKDIR [FLAG...]
#              run to the end through preemptions: (re)queue the slice until it is ACTIVE, set it
#              up, `run`, and wait; when the trainers stop on a preemption notice (exit 75) or
#              the slice is preempted or lost, delete it, queue it again and resume from the
#              latest checkpoint in WORKDIR; ends when every worker exits 0 (or after
#              MAX_RESTARTS restarts, or on another failure). Run it where it can outlive
#              your session (tmux, or a small VM).
#   status     show whether the trainer runs on each worker (and its exit status when done)
#   stop       send SIGTERM to the trainers: they save a checkpoint and exit (`run` resumes)
#   delete     delete the slice (and its queued resource, if any)
#   runtime    print the TPU VM runtime version used for ACCELERATOR_TYPE
# Settings (environment variables, defaults in the code below): TPU_NAME, ZONE, PROJECT,
# ACCELERATOR_TYPE, RUNTIME_VERSION (default: from ACCELERATOR_TYPE, see `runtime`), QR_NAME,
# SPOT, MAX_RESTARTS, POLL_S, BUCKET, MOUNT, PYTHON_VERSION, JAX_VERSION.
#
# Example (an on-demand v4-32 created at once):
#   export TPU_NAME=cmr-v4-32 ZONE=us-central2-b
#   launch/tpu_pod.sh create && launch/tpu_pod.sh setup
#   launch/tpu_pod.sh run pretrain configs/mvit_b_pretrain.py gs://my-cmr-bucket/runs/mvit_b_pretrain \
#       --config.data.dir=gs://my-cmr-bucket/data/ukbb \
#       --config.text.vocab=gs://my-cmr-bucket/pubmedbert/vocab.txt
# Example (a Spot v5p-64 through queued resources, restarted after every preemption):
#   export TPU_NAME=cmr-v5p-64 ZONE=us-east5-a ACCELERATOR_TYPE=v5p-64 SPOT=1 BUCKET=my-cmr-bucket
#   (data read through a FUSE mount: BUCKET=my-cmr-bucket, data at /mnt/cmr/data/ukbb)
#   launch/tpu_pod.sh supervise pretrain configs/mvit_b_pretrain.py \
#       gs://my-cmr-bucket/runs/mvit_b_pretrain --config.data.dir=/mnt/cmr/data/ukbb \
#       --config.text.vocab=gs://my-cmr-bucket/pubmedbert/vocab.txt

set -euo pipefail

TPU_NAME="${TPU_NAME:-cmr-jax}"
ZONE="${ZONE:-us-central2-b}"
PROJECT="${PROJECT:-}"  # empty: gcloud's configured project
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v4-32}"
RUNTIME_VERSION="${RUNTIME_VERSION:-}"  # empty: the runtime of ACCELERATOR_TYPE's generation
QR_NAME="${QR_NAME:-${TPU_NAME}-qr}"
SPOT="${SPOT:-0}"  # 1: Spot capacity (cheaper, preemptible) for queued resources
MAX_RESTARTS="${MAX_RESTARTS:-50}"
POLL_S="${POLL_S:-60}"
BUCKET="${BUCKET:-}"  # bucket to mount at MOUNT (name without gs://); empty: no mount (gs://
# paths need none; or MOUNT is already shared, e.g. NFS)
MOUNT="${MOUNT:-/mnt/cmr}"
PYTHON_VERSION="${PYTHON_VERSION:-3.11}"  # the project needs >= 3.11; TPU VM images have 3.10
JAX_VERSION="${JAX_VERSION:-}"  # e.g. 0.10.2; empty: the newest jax[tpu]

# Paths on the workers, relative to the remote home directory.
REMOTE_SRC="cmr-jax"
REMOTE_VENV="cmr-venv"
REMOTE_PID="cmr-jax.pid"
REMOTE_EXIT="cmr-jax.exit"
# tools/train.py's exit status after saving on a preemption notice (common.RESUME_EXIT_CODE).
RESUME_EXIT_CODE=75

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LOCATION=(--zone="${ZONE}")
if [[ -n "${PROJECT}" ]]; then
  LOCATION+=(--project="${PROJECT}")
fi

usage() {
  sed -n '2,/^$/s/^# \{0,1\}//p' "${BASH_SOURCE[0]}" >&2
  exit 2
}

# Runs a shell command on every worker of the slice (at the same time).
on_all_workers() {
  gcloud compute tpus tpu-vm ssh "${TPU_NAME}" "${LOCATION[@]}" --worker=all --command="$1"
}

# Copies a local file into the home directory of every worker.
copy_to_all_workers() {
  gcloud compute tpus tpu-vm scp "$1" "${TPU_NAME}:$2" "${LOCATION[@]}" --worker=all
}

# The TPU VM software version for an accelerator type (Cloud TPU's documented runtimes).
runtime_for() {
  case "$1" in
    v2-* | v3-* | v4-*) echo "tpu-ubuntu2204-base" ;;
    v5litepod-* | v5e-*) echo "v2-alpha-tpuv5-lite" ;;
    v5p-*) echo "v2-alpha-tpuv5" ;;
    v6e-*) echo "v2-alpha-tpuv6e" ;;
    *) echo "no default runtime for accelerator type '$1': set RUNTIME_VERSION" >&2; return 1 ;;
  esac
}

runtime() {
  if [[ -n "${RUNTIME_VERSION}" ]]; then
    echo "${RUNTIME_VERSION}"
  else
    runtime_for "${ACCELERATOR_TYPE}"
  fi
}

create() {
  gcloud compute tpus tpu-vm create "${TPU_NAME}" "${LOCATION[@]}" \
    --accelerator-type="${ACCELERATOR_TYPE}" --version="$(runtime)"
}

queue() {
  local spot=()
  if [[ "${SPOT}" == 1 ]]; then
    spot=(--spot)
  fi
  gcloud compute tpus queued-resources create "${QR_NAME}" "${LOCATION[@]}" \
    --node-id="${TPU_NAME}" --accelerator-type="${ACCELERATOR_TYPE}" \
    --runtime-version="$(runtime)" "${spot[@]}"
}

# The queued resource's state (ACCEPTED, PROVISIONING, ACTIVE, SUSPENDED, FAILED, ...) or NONE.
qr_state() {
  gcloud compute tpus queued-resources describe "${QR_NAME}" "${LOCATION[@]}" \
    --format='value(state.state)' 2> /dev/null || echo NONE
}

# Deletes the queued resource and its slice (after a preemption or a failure), if there is one.
unqueue() {
  if [[ "$(qr_state)" != NONE ]]; then
    gcloud compute tpus queued-resources delete "${QR_NAME}" "${LOCATION[@]}" --force \
      --quiet || true
  fi
}

# Prints one line per worker: "running", "exit N" or "none" (never started).
worker_states() {
  on_all_workers "pid=\$(cat ~/${REMOTE_PID} 2> /dev/null || true); \
    if [ -n \"\${pid}\" ] && ps -p \"\${pid}\" > /dev/null; then echo running; \
    elif [ -f ~/${REMOTE_EXIT} ]; then echo \"exit \$(cat ~/${REMOTE_EXIT})\"; \
    else echo none; fi"
}

supervise() {
  if [[ $# -lt 3 ]]; then
    usage
  fi
  local restarts=0 state states
  while true; do
    state="$(qr_state)"
    case "${state}" in
      ACTIVE) ;;
      NONE) queue ;;
      FAILED | SUSPENDED | SUSPENDING)
        echo "queued resource ${QR_NAME} is ${state}: requesting it again" >&2
        unqueue && queue ;;
      *) echo "queued resource ${QR_NAME}: ${state}; waiting" >&2 ;;
    esac
    until [[ "$(qr_state)" == ACTIVE ]]; do
      state="$(qr_state)"
      case "${state}" in
        FAILED | SUSPENDED) continue 2 ;;  # requested again at the top of the loop
      esac
      echo "queued resource ${QR_NAME}: ${state}; waiting" >&2
      sleep "${POLL_S}"
    done
    setup
    run "$@"
    # Wait for the trainers; a lost slice (ssh fails) counts as a preemption.
    while states="$(worker_states 2> /dev/null)" && grep -q running <<< "${states}"; do
      sleep "${POLL_S}"
    done
    if [[ -n "${states}" ]] && ! grep -qv '^exit 0$' <<< "${states}"; then
      echo "the run in $3 finished on every worker"
      return 0
    fi
    if [[ -n "${states}" ]] && grep -v "^exit ${RESUME_EXIT_CODE}\$" <<< "${states}" \
        | grep -qv '^exit 0$'; then
      echo "a trainer failed (not a preemption stop):" >&2
      echo "${states}" >&2
      return 1
    fi
    restarts=$((restarts + 1))
    if [[ "${restarts}" -gt "${MAX_RESTARTS}" ]]; then
      echo "preempted ${restarts} times: giving up (MAX_RESTARTS=${MAX_RESTARTS})" >&2
      return 1
    fi
    echo "preempted (restart ${restarts} of at most ${MAX_RESTARTS}): requesting the slice again"
    unqueue
  done
}

setup() {
  local tmp jax_req
  tmp="$(mktemp -d)"
  trap 'rm -rf "${tmp}"' RETURN
  # Committed files only: commit (or stash) local changes first.
  git -C "${REPO}" archive --format=tar.gz -o "${tmp}/cmr-jax.tar.gz" HEAD
  jax_req="jax[tpu]${JAX_VERSION:+==${JAX_VERSION}}"
  cat > "${tmp}/cmr-setup.sh" <<'EOF'
set -euo pipefail
src="$1" venv="$2" python_version="$3" jax_req="$4" bucket="$5" mount="$6"
rm -rf "${HOME:?}/${src}" && mkdir -p "${HOME}/${src}"
tar -xzf "${HOME}/cmr-jax.tar.gz" -C "${HOME}/${src}"
if ! command -v uv > /dev/null && [[ ! -x "${HOME}/.local/bin/uv" ]]; then
  curl -LsSf https://astral.sh/uv/install.sh | sh
fi
uv="$(command -v uv || echo "${HOME}/.local/bin/uv")"
"${uv}" venv --allow-existing --python "${python_version}" "${HOME}/${venv}"
"${uv}" pip install --python "${HOME}/${venv}/bin/python" "${HOME}/${src}" "${jax_req}"
# jemalloc for launch/with_allocator.sh (XLA compiles faster than on glibc's malloc); optional.
if ! compgen -G "/usr/lib/*-linux-gnu/libjemalloc.so.2" > /dev/null; then
  sudo apt-get install -y -q libjemalloc2 > /dev/null 2>&1 \
    || echo "$(hostname): libjemalloc2 not installed: glibc's malloc"
fi
if [[ -n "${bucket}" ]]; then
  if ! command -v gcsfuse > /dev/null; then
    curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg \
      | sudo tee /usr/share/keyrings/cloud.google.asc > /dev/null
    echo "deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-$(lsb_release -c -s) main" \
      | sudo tee /etc/apt/sources.list.d/gcsfuse.list > /dev/null
    sudo apt-get update -q && sudo apt-get install -y -q gcsfuse
  fi
  sudo mkdir -p "${mount}" && sudo chown "$(id -u):$(id -g)" "${mount}"
  if ! mountpoint -q "${mount}"; then
    gcsfuse --implicit-dirs "${bucket}" "${mount}"
  fi
fi
echo "$(hostname): $("${HOME}/${venv}/bin/python" -c 'import jax; print("jax", jax.__version__)')"
EOF
  copy_to_all_workers "${tmp}/cmr-jax.tar.gz" "cmr-jax.tar.gz"
  copy_to_all_workers "${tmp}/cmr-setup.sh" "cmr-setup.sh"
  on_all_workers "bash ~/cmr-setup.sh $(printf '%q ' "${REMOTE_SRC}" "${REMOTE_VENV}" \
    "${PYTHON_VERSION}" "${jax_req}" "${BUCKET}" "${MOUNT}")"
}

run() {
  if [[ $# -lt 3 ]]; then
    usage
  fi
  local mode="$1" config="$2" workdir="$3"
  shift 3
  case "${mode}" in
    pretrain | finetune) ;;
    *) echo "unknown MODE '${mode}': expected pretrain or finetune" >&2; usage ;;
  esac
  local args logs
  if [[ "${workdir}" == gs://* ]]; then
    logs="~/cmr-jax-logs"  # object storage cannot be appended to: each worker logs locally
  elif [[ "${workdir}" == /* ]]; then
    logs="$(printf '%q' "${workdir}/logs")"
  else
    echo "WORKDIR must be a gs:// URL or an absolute path on a shared mount" \
      "(e.g. gs://BUCKET/runs/NAME or ${MOUNT}/runs/NAME)" >&2
    exit 2
  fi
  args="$(printf '%q ' --distributed=auto --mode="${mode}" --config="${config}" \
    --workdir="${workdir}" "$@")"
  # nohup and full redirection: the trainers outlive this ssh session. A wrapper shell records
  # the trainer's pid (what `stop` signals) and, when it ends, its exit status (`status`).
  on_all_workers "set -e; cd ~/${REMOTE_SRC}; mkdir -p ${logs}; rm -f ~/${REMOTE_EXIT}; \
    nohup bash -c 'launch/with_allocator.sh ~/${REMOTE_VENV}/bin/python tools/train.py ${args} \
      & echo \$! > ~/${REMOTE_PID}; wait \$!; echo \$? > ~/${REMOTE_EXIT}' \
      >> ${logs}/\$(hostname).log 2>&1 < /dev/null &"
  echo "started on every worker of ${TPU_NAME}; logs in ${logs}/ on each worker"
}

status() {
  on_all_workers "pid=\$(cat ~/${REMOTE_PID} 2> /dev/null || true); \
    if [ -n \"\${pid}\" ] && ps -p \"\${pid}\" > /dev/null; then \
      echo \"\$(hostname): running (pid \${pid})\"; \
    elif [ -f ~/${REMOTE_EXIT} ]; then \
      echo \"\$(hostname): exited with status \$(cat ~/${REMOTE_EXIT})\"; \
    else echo \"\$(hostname): not running\"; fi"
}

stop() {
  on_all_workers "pid=\$(cat ~/${REMOTE_PID} 2> /dev/null || true); \
    if [ -n \"\${pid}\" ] && kill -TERM \"\${pid}\" 2> /dev/null; then \
      echo \"\$(hostname): SIGTERM sent\"; else echo \"\$(hostname): not running\"; fi"
}

delete() {
  if [[ "$(qr_state)" != NONE ]]; then
    unqueue
  else
    gcloud compute tpus tpu-vm delete "${TPU_NAME}" "${LOCATION[@]}" --quiet
  fi
}

if [[ $# -lt 1 ]]; then
  usage
fi
command="$1"
shift
case "${command}" in
  create | queue | setup | status | stop | delete | runtime) "${command}" "$@" ;;
  run | supervise) "${command}" "$@" ;;
  -h | --help | help) usage ;;
  *) echo "unknown command '${command}'" >&2; usage ;;
esac
