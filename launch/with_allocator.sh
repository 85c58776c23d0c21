#!/usr/bin/env bash
# Runs a command with jemalloc (else tcmalloc) as the C heap where one is installed: XLA compiles
# ~1.3-1.7x faster than under glibc's malloc (README "Step speed options"; tools/bench_model.py
# reports which allocator a run had). Values are bit for bit the same (tests/test_speed.py).
#
#   launch/with_allocator.sh .venv/bin/python tools/train.py ...
#
# CMR_JAX_MALLOC chooses: "auto" (default: jemalloc, then tcmalloc, else glibc), "glibc" (no
# preload), or the path of an allocator library. Debian/Ubuntu: apt install libjemalloc2.
# jemalloc keeps freed pages (MALLOC_CONF dirty/muzzy decay -1, as cmr_jax.cpu_runtime keeps
# glibc's): a step's buffers are not faulted in again every step.
set -euo pipefail
choice="${CMR_JAX_MALLOC:-auto}"
lib=""
if [[ "${LD_PRELOAD:-}" == *jemalloc* || "${LD_PRELOAD:-}" == *tcmalloc* ]]; then
  choice=glibc  # an allocator is preloaded already: the caller's choice stands
fi
case "${choice}" in
  glibc) ;;
  auto)
    for candidate in /usr/lib/{x86_64,aarch64}-linux-gnu/libjemalloc.so.2 \
                     /usr/lib/{x86_64,aarch64}-linux-gnu/libtcmalloc_minimal.so.4 \
                     /usr/lib64/libjemalloc.so.2 /usr/lib64/libtcmalloc_minimal.so.4; do
      if [[ -f "${candidate}" ]]; then lib="${candidate}"; break; fi
    done ;;
  *)
    if [[ ! -f "${choice}" ]]; then
      echo "with_allocator.sh: CMR_JAX_MALLOC=${choice}: no such file" \
        "(auto, glibc or a library path)" >&2
      exit 2
    fi
    lib="${choice}" ;;
esac
if [[ -n "${lib}" ]]; then
  export LD_PRELOAD="${lib}${LD_PRELOAD:+:${LD_PRELOAD}}"
  if [[ "${lib}" == *jemalloc* ]]; then
    export MALLOC_CONF="${MALLOC_CONF:-dirty_decay_ms:-1,muzzy_decay_ms:-1}"
  fi
fi
exec "$@"
