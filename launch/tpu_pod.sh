#!/usr/bin/env bash
# Runs cmr-jax on a Cloud TPU VM slice (e.g. a v4-32: 4 workers x 4 chips). Every worker runs the
# same `python tools/train.py --distributed=auto ...`; JAX finds the other workers from the TPU
# metadata. The data and the run directory live on a Cloud Storage bucket that every worker
# mounts with Cloud Storage FUSE at the same path (the trainers write metrics, configs and the
# tokenizer with ordinary file I/O, so WORKDIR must be such a mounted path, not a gs:// URL).
#
# Usage: launch/tpu_pod.sh COMMAND [ARG...]
#   create     create the slice (ACCELERATOR_TYPE, RUNTIME_VERSION)
#   setup      copy this checkout's HEAD to every worker, install Python PYTHON_VERSION, cmr_jax
#              and jax[tpu] in a venv there, and mount gs://BUCKET at MOUNT
#   run MODE CONFIG WORKDIR [FLAG...]
#              start `tools/train.py --mode=MODE --config=CONFIG --workdir=WORKDIR FLAG...` on
#              every worker in the background; each worker logs to WORKDIR/logs/HOSTNAME.log
#   status     show whether the trainer runs on each worker
#   stop       send SIGTERM to the trainers: they save a checkpoint and exit (`run` resumes)
#   delete     delete the slice
# Settings (environment variables, defaults in the code below): TPU_NAME, ZONE, PROJECT,
# ACCELERATOR_TYPE, RUNTIME_VERSION, BUCKET, MOUNT, PYTHON_VERSION, JAX_VERSION.
#
# Example:
#   export TPU_NAME=cmr-v4-32 ZONE=us-central2-b BUCKET=my-cmr-bucket
#   launch/tpu_pod.sh create && launch/tpu_pod.sh setup
#   launch/tpu_pod.sh run pretrain configs/mvit_b_pretrain.py /mnt/cmr/runs/mvit_b_pretrain \
#       --config.data.dir=/mnt/cmr/data/ukbb --config.text.vocab=/mnt/cmr/pubmedbert/vocab.txt

set -euo pipefail

TPU_NAME="${TPU_NAME:-cmr-jax}"
ZONE="${ZONE:-us-central2-b}"
PROJECT="${PROJECT:-}"  # empty: gcloud's configured project
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v4-32}"
RUNTIME_VERSION="${RUNTIME_VERSION:-tpu-ubuntu2204-base}"
BUCKET="${BUCKET:-}"  # bucket name without gs://; empty: MOUNT is already shared (e.g. NFS)
MOUNT="${MOUNT:-/mnt/cmr}"
PYTHON_VERSION="${PYTHON_VERSION:-3.11}"  # the project needs >= 3.11; TPU VM images have 3.10
JAX_VERSION="${JAX_VERSION:-}"  # e.g. 0.10.2; empty: the newest jax[tpu]

# Paths on the workers, relative to the remote home directory.
REMOTE_SRC="cmr-jax"
REMOTE_VENV="cmr-venv"
REMOTE_PID="cmr-jax.pid"

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

create() {
  gcloud compute tpus tpu-vm create "${TPU_NAME}" "${LOCATION[@]}" \
    --accelerator-type="${ACCELERATOR_TYPE}" --version="${RUNTIME_VERSION}"
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
  if [[ "${workdir}" != /* ]]; then
    echo "WORKDIR must be an absolute path on the shared mount (e.g. ${MOUNT}/runs/NAME)" >&2
    exit 2
  fi
  local args logs
  args="$(printf '%q ' --distributed=auto --mode="${mode}" --config="${config}" \
    --workdir="${workdir}" "$@")"
  logs="$(printf '%q' "${workdir}/logs")"
  # nohup and full redirection: the trainers outlive this ssh session; $! is the trainer's pid.
  on_all_workers "set -e; cd ~/${REMOTE_SRC}; mkdir -p ${logs}; \
    nohup ~/${REMOTE_VENV}/bin/python tools/train.py ${args} \
      > ${logs}/\$(hostname).log 2>&1 < /dev/null & echo \$! > ~/${REMOTE_PID}"
  echo "started on every worker of ${TPU_NAME}; logs in ${workdir}/logs/"
}

status() {
  on_all_workers "pid=\$(cat ~/${REMOTE_PID} 2> /dev/null || true); \
    if [ -n \"\${pid}\" ] && ps -p \"\${pid}\" > /dev/null; then \
      echo \"\$(hostname): running (pid \${pid})\"; else echo \"\$(hostname): not running\"; fi"
}

stop() {
  on_all_workers "pid=\$(cat ~/${REMOTE_PID} 2> /dev/null || true); \
    if [ -n \"\${pid}\" ] && kill -TERM \"\${pid}\" 2> /dev/null; then \
      echo \"\$(hostname): SIGTERM sent\"; else echo \"\$(hostname): not running\"; fi"
}

delete() {
  gcloud compute tpus tpu-vm delete "${TPU_NAME}" "${LOCATION[@]}" --quiet
}

if [[ $# -lt 1 ]]; then
  usage
fi
command="$1"
shift
case "${command}" in
  create | setup | status | stop | delete) "${command}" "$@" ;;
  run) run "$@" ;;
  -h | --help | help) usage ;;
  *) echo "unknown command '${command}'" >&2; usage ;;
esac
