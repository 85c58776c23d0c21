"""Logging set-up for programs: keep absl INFO for our messages, quiet chatty libraries."""

import logging as py_logging

from absl import logging

# Library modules whose INFO lines (per-array checkpoint chatter) drown the training log.
_QUIET_PATH_PARTS = ("/orbax/", "/jax/_src/", "/grain/")


class _QuietLibraries(py_logging.Filter):
  """Drops records below WARNING that come from the libraries in `_QUIET_PATH_PARTS`."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    if record.levelno >= py_logging.WARNING:
      return True
    return not any(part in record.pathname for part in _QUIET_PATH_PARTS)


def setup() -> None:
  """INFO logging for cmr_jax; libraries' INFO chatter filtered out (idempotent)."""
  logging.set_verbosity(logging.INFO)
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _QuietLibraries) for f in handler.filters):
    handler.addFilter(_QuietLibraries())
