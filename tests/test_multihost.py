"""Multi-process pre-training: two CPU processes equal one process on the same global batches.

Two processes joined by `--distributed=manual` (gloo CPU collectives), one CPU device each, train
on a 2-device mesh whose fsdp axis shards the parameters across them; the reference is one
process with two CPU devices, the same mesh, and the same global batches (it reads both data
shards side by side, see multihost_reference.py). With two devices every cross-device reduction
adds two numbers, which is exact in either order, so the runs must agree bit for bit: the saved
train state (parameters, AdamW moments, step), every logged loss and the zero-shot recall of the
final evaluation (embeddings gathered across processes with process_allgather).

Fine-tuning runs the same way on 5 training studies, 3 on process 0 and 2 on process 1, one bag
per process per step: with the frozen encoder's features cached over finite passes (every
process must run equally many encoder batches, each gathered across processes) and streamed.
"""

import json
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from cmr_jax import checkpoint as checkpoint_lib
from cmr_jax.data import records
from cmr_jax.data import tokenizer as tokenizer_lib
from cmr_jax import runs
from cmr_jax.train import pretrain

import multihost_config
import sweep_testlib

_TESTS = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_TESTS)
_NUM_PROCESSES = 2
_NUM_FINETUNE_TRAIN = 5
# A hang guard for the three runs together (side by side, cold compiles): they take about a
# minute on 2 idle cores and about 2.5 minutes on 2 busy ones.
_TIMEOUT_S = 360
# Compile for speed, not for fast code: all runs use the same flags, so they stay comparable.
_FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


@pytest.fixture(scope="module")
def data_and_vocab(tmp_path_factory):
  """8 fake studies with reports (4 train, 4 val) and one fixed WordPiece vocabulary."""
  out = sweep_testlib.build_records(sweep_testlib.fake_items(range(8)),
                                    str(tmp_path_factory.mktemp("data")),
                                    size=multihost_config.IMAGE_SIZE,
                                    num_frames=multihost_config.NUM_FRAMES)
  counts = {name: s["num_records"] for name, s in records.read_dataset_info(out)["splits"].items()}
  assert counts == {"train": 4, "val": 4}
  return out, sweep_testlib.train_vocab(out, str(tmp_path_factory.mktemp("vocab")))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(num_devices: int) -> dict[str, str]:
  """A subprocess environment with `num_devices` CPU devices and no shared compile cache."""
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
  env.update(JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={num_devices} "
                       f"{_FAST_COMPILE_FLAGS}",
             PYTHONPATH=os.pathsep.join(p for p in (_ROOT, env.get("PYTHONPATH")) if p))
  return env


def _run_all(commands: dict[str, tuple[list[str], dict[str, str]]], logdir: str,
             expected_status: int = 0) -> None:
  """Runs the commands side by side; on a failure (an exit status other than
  `expected_status`) or the timeout kills the rest and reports."""
  procs, logs = {}, {}
  os.makedirs(logdir, exist_ok=True)
  try:
    for name, (argv, env) in commands.items():
      logs[name] = open(os.path.join(logdir, f"{name}.log"), "w+")
      procs[name] = subprocess.Popen(argv, cwd=_ROOT, env=env, stdout=logs[name],
                                     stderr=subprocess.STDOUT)
    deadline = time.monotonic() + _TIMEOUT_S
    failed = None
    while failed is None and any(p.poll() is None for p in procs.values()):
      failed = next((n for n, p in procs.items() if p.poll() not in (None, expected_status)),
                    None)
      if time.monotonic() > deadline:
        failed = "timeout"
      time.sleep(0.2)
    failed = failed or next((n for n, p in procs.items() if p.returncode != expected_status),
                            None)
    if failed:
      report = []
      for name, log in logs.items():
        log.seek(0)
        report.append(f"--- {name} (exit {procs[name].poll()}) ---\n{log.read()[-3000:]}")
      what = (f"timed out after {_TIMEOUT_S} s" if failed == "timeout"
              else f"{failed} exited with {procs[failed].returncode}")
      pytest.fail(f"{what}:\n" + "\n".join(report))
  finally:
    for p in procs.values():
      if p.poll() is None:
        p.kill()
        p.wait()
    for log in logs.values():
      log.close()


@pytest.fixture(scope="module")
def finetune_data(tmp_path_factory):
  """8 labelled fake studies: 5 train (an odd count: unequal shares of 2 processes), 3 val."""
  def split(record) -> str:
    return "train" if int(record.subject_id.rsplit("-", 1)[1]) < _NUM_FINETUNE_TRAIN else "val"

  out = sweep_testlib.build_records(sweep_testlib.fake_items(range(8)),
                                    str(tmp_path_factory.mktemp("finetune_data")), split,
                                    size=multihost_config.IMAGE_SIZE,
                                    num_frames=multihost_config.NUM_FRAMES)
  counts = {name: s["num_records"] for name, s in records.read_dataset_info(out)["splits"].items()}
  assert counts == {"train": _NUM_FINETUNE_TRAIN, "val": 3}
  return out


def _commands(flags: list[str], multi: str, single: str | None,
              program: tuple[str, ...] = ("tools.train",)) -> dict[str, tuple[list[str], dict]]:
  """The two processes of the multi-process run (`python -m program...`) and, unless `single`
  is None, the one-process reference."""
  port = _free_port()
  commands = {
      f"process{i}": ([sys.executable, "-m", *program, f"--workdir={multi}", *flags,
                       "--distributed=manual", f"--coordinator_address=127.0.0.1:{port}",
                       f"--num_processes={_NUM_PROCESSES}", f"--process_id={i}"],
                      _env(multihost_config.NUM_DEVICES // _NUM_PROCESSES))
      for i in range(_NUM_PROCESSES)}
  if single is not None:
    commands["reference"] = ([sys.executable, "-m", "tests.multihost_reference",
                              f"--reference_shards={_NUM_PROCESSES}", f"--workdir={single}",
                              *flags], _env(multihost_config.NUM_DEVICES))
  return commands


def _metrics(workdir: str) -> dict[int, dict[str, float]]:
  """metrics.jsonl rows merged per step, without the wall-clock fields."""
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      out.setdefault(row.pop("step"), {}).update(row)
  for row in out.values():
    for key in ("time", "clips_per_s", "bags_per_s"):
      row.pop(key, None)
  return out


def _state(workdir: str, step: int):
  """The saved train state, restored on this process's device (not the saving processes')."""
  return checkpoint_lib.restore_on_this_host(
      os.path.join(workdir, "checkpoints", str(step), "state"))


def test_two_processes_train_exactly_like_one(data_and_vocab, tmp_path):
  data_dir, vocab = data_and_vocab
  flags = [f"--config={os.path.join(_TESTS, 'multihost_config.py')}",
           f"--config.data.dir={data_dir}", f"--config.text.vocab={vocab}"]
  multi, single = str(tmp_path / "two_processes"), str(tmp_path / "one_process")
  commands = _commands(flags, multi, single)
  _run_all(commands, str(tmp_path))

  total = multihost_config.get_config().total_steps
  got, expected = _metrics(multi), _metrics(single)
  assert sorted(got) == sorted(expected) == list(range(1, total + 1))
  assert any(key.startswith("zero_shot_") for key in got[total])  # the evaluation ran
  assert got == expected
  # Both processes wrote their parts of one checkpoint: it restores to the reference's state.
  got, expected = _state(multi, total), _state(single, total)
  assert int(got["step"]) == total
  jax.tree.map(np.testing.assert_array_equal, got, expected)
  # The compared parameters are trained ones: the last step still changed them.
  before = _state(single, total - 1)["params"]
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before),
                                                       jax.tree.leaves(expected["params"])))


def test_sigterm_on_one_process_stops_both_at_one_step_and_the_resumed_run_is_exact(
    data_and_vocab, tmp_path):
  data_dir, vocab = data_and_vocab
  total = 8
  flags = [f"--config={os.path.join(_TESTS, 'multihost_config.py')}",
           f"--config.data.dir={data_dir}", f"--config.text.vocab={vocab}",
           f"--config.total_steps={total}", f"--config.eval_every={total}",
           "--config.checkpoint.every=100"]
  multi, single = str(tmp_path / "two_processes"), str(tmp_path / "one_process")
  # Process 1 receives SIGTERM during step 2 (a preemption notice); the reference runs unbroken.
  commands = _commands(flags, multi, None, ("tests.multihost_preempt", "--sigterm_step=2",
                                            "--sigterm_process=1"))
  _run_all(commands, str(tmp_path / "stop"), expected_status=75)  # both: "requeue me"
  saved = runs.checkpoint_steps(multi)
  assert len(saved) == 1 and 2 <= saved[0] < total  # one agreed step, saved by both
  assert sorted(_metrics(multi)) == list(range(1, saved[0] + 1))
  assert os.listdir(os.path.join(multi, "xla_cache"))  # the restart reads its compiles here
  # Requeued: the same command resumes and finishes; the result is the unbroken run's.
  commands = _commands(flags, multi, single)
  _run_all(commands, str(tmp_path / "resume"))
  got, expected = _metrics(multi), _metrics(single)
  assert sorted(got) == sorted(expected) == list(range(1, total + 1))
  assert got == expected
  jax.tree.map(np.testing.assert_array_equal, _state(multi, total), _state(single, total))


@pytest.mark.parametrize("variant", ["finetune", "finetune_stream"])
def test_two_processes_fine_tune_exactly_like_one_on_unequal_shares(finetune_data, tmp_path,
                                                                     variant):
  flags = ["--mode=finetune",
           f"--config={os.path.join(_TESTS, 'multihost_config.py')}:{variant}",
           f"--config.data.dir={finetune_data}"]
  multi, single = str(tmp_path / "two_processes"), str(tmp_path / "one_process")
  _run_all(_commands(flags, multi, single), str(tmp_path))  # no process waits forever

  total = multihost_config.FINETUNE_STEPS
  got, expected = _metrics(multi), _metrics(single)
  assert sorted(got) == sorted(expected) == list(range(1, total + 1))
  assert "val_mae" in got[total] and np.isfinite(got[total]["val_mae"])
  assert got == expected
  got_state, expected_state = _state(multi, total), _state(single, total)
  assert int(got_state["step"]) == total
  jax.tree.map(np.testing.assert_array_equal, got_state, expected_state)
  assert runs.read_best(multi) == runs.read_best(single)
  # The head trained: its parameters moved between the last two checkpoints.
  before = _state(single, total - multihost_config.get_config(variant).checkpoint.every)
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before["params"]),
                                                       jax.tree.leaves(expected_state["params"])))


@pytest.mark.parametrize("process", [0, 1])
def test_every_process_tokenizes_with_the_vocabulary_process_0_saved(data_and_vocab, tmp_path,
                                                                      monkeypatch, process):
  data_dir, _ = data_and_vocab
  config = multihost_config.get_config()
  config.data.dir = data_dir
  config.text.vocab = ""  # trained by the run
  workdir = str(tmp_path / "run")
  saved = os.path.join(workdir, runs.TOKENIZER_DIR, tokenizer_lib.VOCAB_FILE)
  source = records.open_split(data_dir, "train")
  reports = [source[i].report for i in range(len(source))]
  barrier = []

  def sync_global_devices(name):  # the other processes wait here until process 0 has saved
    if process != 0:
      real_train(reports, config.text.vocab_size, os.path.dirname(saved))
    barrier.append(name)

  def train_tokenizer(*args, **kwargs):
    assert process == 0, "only process 0 trains a vocabulary"
    return real_train(*args, **kwargs)

  real_train = tokenizer_lib.train_tokenizer
  monkeypatch.setattr(pretrain.jax, "process_index", lambda: process)
  monkeypatch.setattr(pretrain.jax, "process_count", lambda: _NUM_PROCESSES)
  monkeypatch.setattr(pretrain.multihost_utils, "sync_global_devices", sync_global_devices)
  monkeypatch.setattr(pretrain.tokenizer_lib, "train_tokenizer", train_tokenizer)
  tok = pretrain.get_tokenizer(config, workdir, source)
  assert len(barrier) == 1
  # The tokenizer is the saved file's.
  with open(saved) as f:
    assert tok.vocab_size == len(f.read().split())
  from_file = tokenizer_lib.load_tokenizer(saved)
  assert [tok.tokens(t) for t in reports] == [from_file.tokens(t) for t in reports]
