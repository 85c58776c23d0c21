"""Multi-host start-up: `jax.distributed.initialize` from a mode or the environment.

Driven by tools/train.py's flags: `--distributed=auto` lets JAX detect the cluster (TPU VM pods,
SLURM, Open MPI); `manual` takes `--coordinator_address`, `--num_processes`, `--process_id`; `off`
(the default) runs one process.
On CPU, several local processes can be joined for tests with `--distributed=manual` and CPU
collectives (gloo).

`--local_device_ids` picks this process's GPUs (indices among the visible ones). Under SLURM,
JAX's detection gives each process only GPU `SLURM_LOCALID`, i.e. it assumes one task per GPU;
with one task per node (all its GPUs in one process) pass them all, e.g.
`--local_device_ids=0,1,2,3`.
"""

from collections.abc import Sequence

from absl import logging
import jax


def initialize(mode: str, coordinator_address: str | None = None,
               num_processes: int | None = None, process_id: int | None = None,
               local_device_ids: Sequence[int] | None = None) -> None:
  """Joins this process to the others (no-op for mode "off")."""
  if mode == "off":
    return
  if mode == "manual":
    missing = [name for name, v in (("coordinator_address", coordinator_address),
                                    ("num_processes", num_processes),
                                    ("process_id", process_id)) if v is None]
    if missing:
      raise ValueError(f"--distributed=manual needs {', '.join('--' + m for m in missing)}")
    # CPU collectives across processes (used when the processes run on CPUs; harmless on GPU/TPU).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes, process_id,
                               local_device_ids=local_device_ids)
  elif mode == "auto":
    jax.distributed.initialize(local_device_ids=local_device_ids)
  else:
    raise ValueError(f"unknown distributed mode {mode!r}")
  logging.info("joined as process %d of %d", jax.process_index(), jax.process_count())
