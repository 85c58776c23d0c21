#!/usr/bin/env bash
# Runs cmr-jax on this machine: one process driving all of its GPUs, its TPU chips (a single-host
# TPU VM such as a v4-8) or its CPU. The output goes to the terminal and to WORKDIR/train.log.
# Ctrl-C (SIGINT) or SIGTERM saves a checkpoint and stops; running the same command again resumes.
#
# Usage: launch/local.sh MODE CONFIG WORKDIR [FLAG...]
#   MODE     pretrain | finetune
#   CONFIG   a config file, optionally with its argument (configs/synthetic_pretrain.py:smoke)
#   WORKDIR  the run directory (checkpoints, metrics, logs)
#   FLAG     further tools/train.py flags, e.g. --config.data.dir=runs/synthetic
# Environment: PYTHON, the interpreter with cmr_jax installed (default: the repository's .venv).
#
# Examples:
#   launch/local.sh pretrain configs/synthetic_pretrain.py runs/pretrain \
#       --config.data.dir=runs/synthetic
#   launch/local.sh finetune configs/synthetic_finetune.py runs/finetune \
#       --config.data.dir=runs/synthetic --config.init=pretrain:runs/pretrain

set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-${REPO}/.venv/bin/python}"

usage() {
  sed -n '2,/^$/s/^# \{0,1\}//p' "${BASH_SOURCE[0]}" >&2
  exit 2
}

if [[ $# -lt 3 || "$1" == "-h" || "$1" == "--help" ]]; then
  usage
fi
MODE="$1"
CONFIG="$2"
WORKDIR="$3"
shift 3
case "${MODE}" in
  pretrain | finetune) ;;
  *) echo "unknown MODE '${MODE}': expected pretrain or finetune" >&2; usage ;;
esac
if [[ ! -x "${PYTHON}" ]]; then
  echo "no Python interpreter at ${PYTHON}: create the venv (see README) or set PYTHON" >&2
  exit 1
fi

mkdir -p "${WORKDIR}"
# tee -i ignores the Ctrl-C meant for the trainer, so the log keeps the checkpoint message.
"${REPO}/launch/with_allocator.sh" "${PYTHON}" "${REPO}/tools/train.py" --mode="${MODE}" \
  --config="${CONFIG}" --workdir="${WORKDIR}" "$@" \
  2>&1 | tee -i -a "${WORKDIR}/train.log"
