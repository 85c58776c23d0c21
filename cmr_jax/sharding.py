"""Device mesh, logical axis rules and the shardings of parameters and batches.

The mesh has three axes: `data` (pure data parallelism), `fsdp` (data parallelism with the
parameters and optimizer state sharded over it, ZeRO-3 style) and `model` (tensor parallelism).
`fsdp=0` (`PER_HOST`) keeps FSDP within one host and `data=-1` spans the hosts; on several TPU
slices the mesh is hybrid (data over DCN). Batches are split over ("data", "fsdp"), or over
"data" alone when the batch is smaller than the devices (`batch_axes`: e.g. 16 bags on 64
devices), with an error naming the minimum batch when even that does not fit. Models name their
parameter axes logically (`embed`, `mlp`, `heads`, `kv`, `vocab`, ...); `LOGICAL_AXIS_RULES`
maps those names onto mesh axes.
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
from jax.experimental import mesh_utils
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "model")
# `fsdp: PER_HOST`: the devices of one host over `model`.
PER_HOST = 0
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
    ("layers", None),  # the stacked axis of a scanned run of blocks (`MViTConfig.scan_blocks`)
)


def resolve_mesh_shape(mesh_shape: Mapping[str, int] | None, num_devices: int, *,
                       ici_devices: int) -> dict[str, int]:
  """The mesh axis sizes of `mesh_shape` on `num_devices` devices (a pure rule, no devices).

  Args:
    mesh_shape: axis name -> size over `MESH_AXES` (missing axes: 1). One axis may be -1 (the
      devices left over); `fsdp` may be `PER_HOST` (0): the devices of one host over `model`,
      so FSDP's per-layer weight gathers stay within a host (NVLink, or a TPU host's ICI
      neighbours) and only the data-parallel gradient reduction crosses hosts (and slices).
    num_devices: devices in the mesh.
    ici_devices: devices of one host (one process's local devices).

  Raises:
    ValueError: on unknown axis names, more than one -1, or sizes that do not multiply to
      `num_devices`.
  """
  shape = {**{axis: 1 for axis in MESH_AXES}, **(DEFAULT_MESH_SHAPE if mesh_shape is None
                                                  else mesh_shape)}
  unknown = set(shape) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"unknown mesh axes {sorted(unknown)}; expected names from {MESH_AXES}")
  if shape["fsdp"] == PER_HOST:
    if shape["model"] < 1 or ici_devices % shape["model"]:
      raise ValueError(f"mesh model={shape['model']} does not divide the {ici_devices} devices "
                       "of one host (fsdp=0 puts fsdp x model on one host)")
    shape["fsdp"] = ici_devices // shape["model"]
  free = [axis for axis, size in shape.items() if size == -1]
  if len(free) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {free} in {dict(shape)}")
  fixed = math.prod(size for size in shape.values() if size != -1)
  if free:
    if fixed <= 0 or num_devices % fixed:
      raise ValueError(f"mesh {dict(shape)} does not divide {num_devices} devices")
    shape[free[0]] = num_devices // fixed
  sizes = {axis: shape[axis] for axis in MESH_AXES}
  if math.prod(sizes.values()) != num_devices:
    raise ValueError(f"mesh {sizes} needs {math.prod(sizes.values())} devices, "
                     f"have {num_devices}")
  return sizes


def num_slices(devices: Sequence[jax.Device]) -> int:
  """TPU slices among `devices` (multi-slice runs; 1 on a single slice, GPUs and CPUs)."""
  return len({getattr(d, "slice_index", 0) for d in devices})


def make_mesh(mesh_shape: Mapping[str, int] | None = None,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds a (data, fsdp, model) mesh (sizes: `resolve_mesh_shape`).

  On several TPU slices the mesh is hybrid: `data` spans the slices over the data-centre
  network (DCN), and within each slice the devices are laid out over ICI
  (`mesh_utils.create_hybrid_device_mesh`); `data` must then be a multiple of the slices.

  Args:
    mesh_shape: axis name -> size, over the names in `MESH_AXES` (see `resolve_mesh_shape`).
    devices: devices to use; all devices by default.

  Raises:
    ValueError: on a shape that does not fit the devices (see `resolve_mesh_shape`).
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = resolve_mesh_shape(mesh_shape, len(devices), ici_devices=ici_devices(devices))
  axis_types = (AxisType.Auto,) * len(MESH_AXES)
  if num_slices(devices) > 1:
    return Mesh(hybrid_device_grid(devices, sizes), MESH_AXES, axis_types=axis_types)
  return jax.make_mesh(tuple(sizes.values()), MESH_AXES, axis_types=axis_types,
                       devices=devices)


def ici_devices(devices: Sequence[Any]) -> int:
  """Devices of one host: the devices of the first device's process (what fsdp=0 spans)."""
  return sum(d.process_index == devices[0].process_index for d in devices)


def hybrid_device_grid(devices: Sequence[Any], sizes: Mapping[str, int]) -> np.ndarray:
  """Devices of several TPU slices laid out [data, fsdp, model]: `data` spans the slices (DCN),
  each slice holds data/slices rows of the grid (ICI).

  Raises:
    ValueError: if `data` is not a multiple of the slices.
  """
  slices = num_slices(devices)
  if sizes["data"] % slices:
    raise ValueError(f"mesh {dict(sizes)}: data={sizes['data']} must be a multiple of the "
                     f"{slices} slices it spans")
  return mesh_utils.create_hybrid_device_mesh(
      (sizes["data"] // slices, sizes["fsdp"], sizes["model"]), (slices, 1, 1), devices)


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


def batch_axes(mesh_shape: Mapping[str, int], global_batch: int,
               num_processes: int = 1) -> tuple[str, ...]:
  """The mesh axes a global batch of `global_batch` rows is split over (a pure rule).

  ("data", "fsdp") when data x fsdp divides the batch (every device its own rows), else "data"
  alone when `data` divides it: the devices of one fsdp group then hold the same rows, and the
  models' activation constraints still split the work inside the step (e.g. the cines of a
  fine-tuning bag over the host's devices), so a batch needs only one row per data-parallel
  group, e.g. 16 bags on 16 hosts of 4 devices (data=16, fsdp=4). The split must give every
  process its own rows (each reads its own share of the data).

  Raises:
    ValueError: naming the smallest batch the mesh takes, when the batch fits neither way.
  """
  data, fsdp = mesh_shape.get("data", 1), mesh_shape.get("fsdp", 1)
  for axes, ways in ((BATCH_AXES, data * fsdp), (("data",), data)):
    if global_batch % ways == 0 and ways % num_processes == 0:
      return axes
  minimum = math.lcm(data, num_processes)
  raise ValueError(
      f"a global batch of {global_batch} does not fit the mesh {dict(mesh_shape)} on "
      f"{num_processes} process(es): it must be a multiple of {minimum} (the data axis, with "
      f"at least one row per process), so the minimum batch is {minimum}; "
      f"{math.lcm(data * fsdp, num_processes)} or a multiple gives every device its own rows. "
      f"Change the batch size or config.mesh (e.g. fsdp=0: FSDP over one host's devices, data "
      f"over the hosts)")


def batch_sharding(mesh: Mesh, global_batch: int | None = None) -> NamedSharding:
  """Sharding of a batch array's leading (batch) axis: over ("data", "fsdp"), or over the axes
  `batch_axes` picks for a batch of `global_batch` rows."""
  axes = (BATCH_AXES if global_batch is None
          else batch_axes(dict(mesh.shape), global_batch, jax.process_count()))
  return NamedSharding(mesh, PartitionSpec(axes))


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles this process's batch slice into global arrays split over the batch axes.

  On one host `batch` is the whole global batch; on several, each process passes its own slice
  (the input pipeline's shard) and the global batch is their concatenation. The axes are those
  `batch_axes` picks for the global row count.

  Raises:
    ValueError: if the global batch does not fit the mesh (`batch_axes`).
  """
  out = {}
  for key, value in batch.items():
    rows = np.shape(value)[0] * jax.process_count()
    try:
      sharding = batch_sharding(mesh, rows)
    except ValueError as e:
      raise ValueError(f"batch[{key!r}]: {e}") from None
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


def check_batches(mesh: Mesh, **global_batches_by_name: int) -> None:
  """Fails early, naming the setting, if a configured global batch does not fit the mesh."""
  for name, size in global_batches_by_name.items():
    try:
      batch_axes(dict(mesh.shape), size, jax.process_count())
    except ValueError as e:
      raise ValueError(f"config.{name}={size}: {e}") from None
