"""The program convention and its logging: every program is a `tools/*.py` file whose flags
are its own, ending in `logs.run(main)`; library modules define no flags.

`run` parses the absl flags (grain's worker processes need them parsed), refuses positional
arguments unless the program takes them, keeps absl INFO for our messages while quieting chatty
libraries, applies the CPU runtime settings (`cpu_runtime.configure`: synchronous dispatch and a
heap that keeps its pages, where JAX computes on the CPU), and calls `main()` (or
`main(arguments)`), whose return value is the exit status.
"""

from collections.abc import Callable
import logging as py_logging
import os
import sys

from absl import app
from absl import logging

from cmr_jax import cpu_runtime

# Library modules whose INFO lines (per-array checkpoint chatter) drown the training log.
_QUIET_PATH_PARTS = ("/orbax/", "/jax/_src/", "/grain/")
# orbax WARNINGs that every restore of a run prints and that say nothing is wrong: (path part,
# message start). Our registration of jax.Array's type handler (`checkpoint.py`), and the
# metadata file that orbax's own StandardCheckpointHandler never writes for a pytree item.
_HARMLESS_WARNINGS = (("/orbax/", "Type handler registry type"),
                      ("/orbax/", "Metadata file does not exist: "))


class _QuietLibraries(py_logging.Filter):
  """Drops records below WARNING that come from the libraries in `_QUIET_PATH_PARTS`, and the
  library warnings in `_HARMLESS_WARNINGS`."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    if record.levelno >= py_logging.WARNING:
      return not any(part in record.pathname and str(record.msg).startswith(start)
                     for part, start in _HARMLESS_WARNINGS)
    return not any(part in record.pathname for part in _QUIET_PATH_PARTS)


def setup() -> None:
  """INFO logging for cmr_jax; libraries' INFO chatter filtered out (idempotent)."""
  logging.set_verbosity(logging.INFO)
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _QuietLibraries) for f in handler.filters):
    handler.addFilter(_QuietLibraries())


def run(main: Callable[..., int | None], *, positional: bool = False) -> None:
  """Runs a program's `main()` under `absl.app.run` (see the module docstring); with
  `positional`, `main` receives the positional arguments (e.g. input paths) as a list."""

  def _main(argv: list[str]) -> int | None:
    try:
      if len(argv) > 1 and not positional:
        raise app.UsageError(f"unexpected arguments: {argv[1:]} (--help lists the flags)")
      setup()
      cpu_runtime.configure()
      return main(argv[1:]) if positional else main()
    except app.UsageError as e:  # one line naming the problem, not absl's page of flag help
      sys.stderr.write(f"{os.path.basename(argv[0])}: error: {e}\n")
      sys.stderr.flush()
      sys.exit(e.exitcode)

  app.run(_main)
