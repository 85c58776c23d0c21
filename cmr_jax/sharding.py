"""Device mesh, logical axis rules and the shardings of parameters and batches.

The mesh has three axes: `data` (pure data parallelism), `fsdp` (data parallelism with the
parameters and optimizer state sharded over it, ZeRO-3 style) and `model` (tensor parallelism).
Batches are split over ("data", "fsdp"). Models name their parameter axes logically (`embed`,
`mlp`, `heads`, `kv`, `vocab`, ...); `LOGICAL_AXIS_RULES` maps those names onto mesh axes.
A parameter axis whose size the mesh axes do not divide stays replicated (e.g. a 3-wide axis on
a 4-way fsdp mesh), so one rule set serves every model size.

Typical use:

  mesh = make_mesh({"data": -1, "fsdp": 1, "model": 1})
  variables, shardings = init_sharded(lambda rng: model.init(rng, *example), rng, mesh)
  with mesh_rules(mesh):
    step = jax.jit(train_step, in_shardings=(shardings, batch_sharding(mesh)), ...)
    loss = step(variables, shard_batch(batch, mesh))
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "model")
DEFAULT_MESH_SHAPE: dict[str, int] = {"data": -1, "fsdp": 1, "model": 1}
BATCH_AXES: tuple[str, ...] = ("data", "fsdp")

LogicalRules = Sequence[tuple[str, str | tuple[str, ...] | None]]

LOGICAL_AXIS_RULES: LogicalRules = (
    # Activations: batch split over every data-parallel axis, the rest replicated.
    ("activation_batch", BATCH_AXES),
    ("activation_length", None),
    ("activation_embed", None),
    # Parameters.
    ("embed", "fsdp"),  # model width: sharded for FSDP, gathered per layer by XLA
    ("mlp", "model"),  # MLP hidden / projection outputs: tensor parallel
    ("heads", "model"),  # attention heads (q, k, v outputs; proj input)
    ("vocab", "model"),
    ("kv", None),  # per-head channels (pooling kernels, per-head norms)
    ("positions", None),
    ("norm", None),  # LayerNorm scales and biases
)


def make_mesh(mesh_shape: Mapping[str, int] | None = None,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds a (data, fsdp, model) mesh; one entry of `mesh_shape` may be -1 (the rest).

  Args:
    mesh_shape: axis name -> size, over the names in `MESH_AXES` (missing axes get 1).
    devices: devices to use; all devices by default.

  Raises:
    ValueError: on unknown axis names, more than one -1, or sizes that do not multiply to the
      number of devices.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = {**{axis: 1 for axis in MESH_AXES}, **(DEFAULT_MESH_SHAPE if mesh_shape is None
                                                  else mesh_shape)}
  unknown = set(shape) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"unknown mesh axes {sorted(unknown)}; expected names from {MESH_AXES}")
  free = [axis for axis, size in shape.items() if size == -1]
  if len(free) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {free} in {dict(shape)}")
  fixed = math.prod(size for size in shape.values() if size != -1)
  if free:
    if fixed <= 0 or len(devices) % fixed:
      raise ValueError(f"mesh {dict(shape)} does not divide {len(devices)} devices")
    shape[free[0]] = len(devices) // fixed
  sizes = tuple(shape[axis] for axis in MESH_AXES)
  if math.prod(sizes) != len(devices):
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                     f"have {len(devices)}")
  return jax.make_mesh(sizes, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


@contextlib.contextmanager
def mesh_rules(mesh: Mesh, rules: LogicalRules = LOGICAL_AXIS_RULES) -> Iterator[None]:
  """Context in which the models' logical activation constraints apply to `mesh`."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def _fit_to_shape(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
  """Drops the mesh axes of every dimension whose size they do not divide."""
  entries = []
  for size, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    ways = math.prod(mesh.shape[name] for name in names)
    entries.append(axes if names and size % ways == 0 else None)
  return PartitionSpec(*entries)


def logical_shardings(abstract_variables: Any, mesh: Mesh,
                      rules: LogicalRules = LOGICAL_AXIS_RULES) -> Any:
  """NamedShardings for a (boxed) variable tree, e.g. `jax.eval_shape(model.init, ...)`.

  Leaves annotated with `nn.with_logical_partitioning` are sharded by `rules`; unannotated
  leaves are replicated. The result has the structure of the unboxed tree.
  """
  specs = nn.get_partition_spec(abstract_variables)
  shapes = nn.meta.unbox(abstract_variables)

  def to_sharding(logical: PartitionSpec, leaf: Any) -> NamedSharding:
    mesh_spec = nn.logical_to_mesh_axes(logical, rules)
    return NamedSharding(mesh, _fit_to_shape(mesh_spec, np.shape(leaf), mesh))

  return jax.tree.map(to_sharding, specs, shapes,
                      is_leaf=lambda x: isinstance(x, PartitionSpec))


def init_sharded(init_fn: Callable[[jax.Array], Any], rng: jax.Array, mesh: Mesh,
                 rules: LogicalRules = LOGICAL_AXIS_RULES) -> tuple[Any, Any]:
  """Initialises variables directly in their shardings (no full copy on one device).

  Args:
    init_fn: rng -> (boxed) variables, e.g. `lambda rng: model.init(rng, *example_inputs)`.
    rng: the init key.
    mesh: the device mesh.
    rules: logical axis rules.

  Returns:
    (unboxed variables as sharded global arrays, their NamedSharding tree).
  """
  shardings = logical_shardings(jax.eval_shape(init_fn, rng), mesh, rules)
  with mesh_rules(mesh, rules):
    variables = jax.jit(lambda r: nn.meta.unbox(init_fn(r)), out_shardings=shardings)(rng)
  return variables, shardings


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of every batch array: leading (batch) axis over ("data", "fsdp")."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles this process's batch slice into global arrays split over the batch axes.

  On one host `batch` is the whole global batch; on several, each process passes its own slice
  (the input pipeline's shard) and the global batch is their concatenation.

  Raises:
    ValueError: if an array's leading axis is not divisible by the local data-parallel ways.
  """
  sharding = batch_sharding(mesh)
  ways = math.prod(mesh.shape[axis] for axis in BATCH_AXES) // jax.process_count()
  out = {}
  for key, value in batch.items():
    if np.shape(value)[0] % ways:
      raise ValueError(f"batch[{key!r}] has {np.shape(value)[0]} rows, not divisible by the "
                       f"{ways} local data-parallel shards")
    out[key] = jax.make_array_from_process_local_data(sharding, value)
  return out


def global_batches(iterator: Iterator[Mapping[str, np.ndarray]],
                   mesh: jax.sharding.Mesh) -> Iterator[dict[str, jax.Array]]:
  """Process-local batches -> global arrays sharded over the batch axes."""
  for batch in iterator:
    yield shard_batch(batch, mesh)


def per_process_batch(global_batch_size: int) -> int:
  """This process's share of the global batch."""
  if global_batch_size % jax.process_count():
    raise ValueError(f"global batch {global_batch_size} is not divisible by "
                     f"{jax.process_count()} processes")
  return global_batch_size // jax.process_count()
