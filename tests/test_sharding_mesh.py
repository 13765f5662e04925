"""jlora.sharding.make_mesh: named axes, one -1, loud errors."""

import jax
import pytest
from jax.sharding import AxisType

from jlora import JloraError, sharding


def test_minus_one_takes_the_remaining_devices():
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  assert dict(mesh.shape) == {"data": 8, "fsdp": 1, "tensor": 1}
  assert mesh.axis_names == ("data", "fsdp", "tensor")
  assert mesh.axis_types == (AxisType.Auto,) * 3
  assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in jax.devices())


@pytest.mark.parametrize("axes, shape", [
    ({"fsdp": 2, "tensor": -1}, {"fsdp": 2, "tensor": 4}),
    ({"data": 2, "fsdp": 2, "tensor": 2}, {"data": 2, "fsdp": 2, "tensor": 2}),
    ({"x": -1}, {"x": 8}),
])
def test_sizes(axes, shape):
  assert dict(sharding.make_mesh(axes).shape) == shape


def test_explicit_devices_and_axis_types():
  mesh = sharding.make_mesh({"data": -1, "tensor": 2}, devices=jax.devices()[:4], axis_types=AxisType.Explicit)
  assert dict(mesh.shape) == {"data": 2, "tensor": 2}
  assert mesh.axis_types == (AxisType.Explicit,) * 2
  assert {d.id for d in mesh.devices.flat} == {d.id for d in jax.devices()[:4]}


@pytest.mark.parametrize("axes, message", [
    ({"data": -1, "fsdp": -1}, "one -1"),
    ({"data": 3}, "multiply to 3, but there are 8 devices"),
    ({"data": 2, "tensor": 2}, "multiply to 4, but there are 8 devices"),
    ({"data": 3, "fsdp": -1}, "does not divide"),
    ({"data": 0, "fsdp": -1}, "positive int"),
    ({}, "at least one axis"),
])
def test_errors(axes, message):
  with pytest.raises(JloraError, match=message):
    sharding.make_mesh(axes)
