"""Multi-host start-up: `jax.distributed.initialize` from flags or the environment.

`--distributed=auto` lets JAX detect the cluster (TPU VM pods, SLURM, Open MPI); `manual` takes
`--coordinator_address`, `--num_processes`, `--process_id` (and optionally `--local_device_ids`);
`off` (the default) runs one process. On CPU, several local processes can be joined for tests
with `--distributed=manual` and CPU collectives (gloo).
"""

from absl import flags
from absl import logging
import jax

_MODE = flags.DEFINE_enum("distributed", "off", ["off", "auto", "manual"],
                          "how to join the processes of a multi-host run")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "number of processes")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's index")


def initialize(mode: str, coordinator_address: str | None = None,
               num_processes: int | None = None, process_id: int | None = None) -> None:
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
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  elif mode == "auto":
    jax.distributed.initialize()
  else:
    raise ValueError(f"unknown distributed mode {mode!r}")
  logging.info("joined as process %d of %d", jax.process_index(), jax.process_count())


def initialize_from_flags() -> None:
  """`initialize` with the values of the --distributed flags."""
  initialize(_MODE.value, _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
