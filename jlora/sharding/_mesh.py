"""make_mesh: a device mesh from named axis sizes, one of which may be -1 (the rest of the devices)."""

from collections.abc import Mapping, Sequence

import jax
from jax.sharding import AxisType, Mesh

from jlora._errors import JloraError


def make_mesh(
    axes: Mapping[str, int],
    devices: Sequence[jax.Device] | None = None,
    *,
    axis_types: AxisType | Sequence[AxisType] = AxisType.Auto,
) -> Mesh:
  """A ``jax.sharding.Mesh`` with named axes, e.g. ``{"data": -1, "fsdp": 1, "tensor": 1}``.

  The product of the sizes must be the number of devices; one size may be ``-1`` and then takes
  whatever the others leave. Devices are ordered by ``jax.make_mesh`` (topology-aware on TPU).

  Axes default to ``AxisType.Auto``: the compiler (GSPMD/Shardy) propagates shardings through the
  unmodified model from the ``in_shardings``/``out_shardings`` of ``jax.jit``. ``jax.make_mesh``'s own
  default, ``Explicit``, puts shardings into array types, which code written without sharding in mind
  (reshapes of sharded axes) may reject.

  Args:
    axes: axis name -> size, in mesh order. The default rules of ``jlora.sharding.rules_for`` name
      ``"fsdp"`` and ``"tensor"``; a batch is split over ``"data"`` (and usually ``"fsdp"``) by the caller.
    devices: the devices to lay out; defaults to ``jax.devices()`` (all devices of all hosts).
    axis_types: one ``jax.sharding.AxisType`` for all axes, or one per axis.

  Returns:
    The mesh.

  Raises:
    JloraError: no axes, a size that is not positive (other than one ``-1``), more than one ``-1``,
      or sizes whose product is not the device count.

  Example:
    >>> import jax
    >>> from jlora import sharding
    >>> mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    >>> dict(mesh.shape) == {"data": jax.device_count(), "fsdp": 1, "tensor": 1}
    True
  """
  if devices is None:
    devices = jax.devices()
  devices = list(devices)
  names, sizes = tuple(axes), [axes[name] for name in axes]
  if not names:
    raise JloraError("make_mesh needs at least one axis, e.g. {'data': -1}.")
  for name, size in zip(names, sizes):
    if not isinstance(name, str) or not isinstance(size, int) or isinstance(size, bool) or (size < 1 and size != -1):
      raise JloraError(f"make_mesh axes must be str -> positive int (or -1), got {name!r}: {size!r} in {dict(axes)}.")
  fill = [name for name, size in zip(names, sizes) if size == -1]
  if len(fill) > 1:
    raise JloraError(f"make_mesh allows one -1 axis (the rest of the devices), got {fill} in {dict(axes)}.")
  known = 1
  for size in sizes:
    known *= size if size != -1 else 1
  if fill:
    if len(devices) % known:
      raise JloraError(f"make_mesh: the fixed axes of {dict(axes)} multiply to {known}, which does not divide the "
                       f"{len(devices)} devices, so '{fill[0]}': -1 has no integer size.")
    sizes[names.index(fill[0])] = len(devices) // known
  elif known != len(devices):
    raise JloraError(f"make_mesh: axes {dict(axes)} multiply to {known}, but there are {len(devices)} devices; "
                     "make the product the device count or use -1 for one axis.")
  if isinstance(axis_types, AxisType):
    axis_types = (axis_types,) * len(names)
  return jax.make_mesh(tuple(sizes), names, axis_types=tuple(axis_types), devices=devices)
