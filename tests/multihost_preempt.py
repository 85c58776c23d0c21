r"""`tools/train.py` that sends itself SIGTERM during one step, on one process (tests/test_multihost.py).

  python -m tests.multihost_preempt --sigterm_step=2 --sigterm_process=1 <tools/train.py flags>

The signal goes to the process itself, as a scheduler's preemption notice would: with
`--distributed`, JAX's preemption notifier takes it and every process must stop at one agreed
step (the preemption sync point), save a checkpoint there and exit with status 75.
"""

import os
import signal
import time

from absl import flags
import jax

from cmr_jax import logs
from cmr_jax.train import common
from tools import train as train_program

_STEP = flags.DEFINE_integer("sigterm_step", 2, "the step during which the signal is sent")
_PROCESS = flags.DEFINE_integer("sigterm_process", 1, "the process that receives it")
_NOTICE_WAIT_S = 3.0


def main() -> int | None:
  real_check = common.check_finite  # called once per step, when the step's loss is fetched

  def check_finite(step, *args):
    if step == _STEP.value and jax.process_index() == _PROCESS.value:
      os.kill(os.getpid(), signal.SIGTERM)
      # The notice reaches the other process through the coordination service asynchronously,
      # and tiny CPU steps take milliseconds: this process (and so, at the next collective,
      # the other) waits, so the agreed step falls soon after this one, well before the end.
      time.sleep(_NOTICE_WAIT_S)
    return real_check(step, *args)

  common.check_finite = check_finite
  return train_program.main()


if __name__ == "__main__":
  logs.run(main)
