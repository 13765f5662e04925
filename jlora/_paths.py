"""'/'-joined paths over nested-dict pytrees: the addressing scheme of LoRA targets."""

from collections.abc import Callable, Iterator, Mapping
from typing import Any

Tree = Mapping[str, Any]


def iter_leaves(tree: Tree, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
  """Yields ``(path, leaf)`` for every non-mapping value of a nested mapping, in insertion order."""
  for key, value in tree.items():
    path = prefix + (str(key),)
    if isinstance(value, Mapping):
      yield from iter_leaves(value, path)
    else:
      yield path, value


def iter_dicts(
    tree: Tree, is_node: Callable[[Mapping], bool], prefix: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], Mapping]]:
  """Yields ``(path, node)`` for every mapping that ``is_node`` accepts; does not descend into it."""
  for key, value in tree.items():
    if not isinstance(value, Mapping):
      continue
    path = prefix + (str(key),)
    if is_node(value):
      yield path, value
    else:
      yield from iter_dicts(value, is_node, path)


def join(path: tuple[str, ...]) -> str:
  return "/".join(path)


def get(tree: Tree, path: tuple[str, ...]) -> Any:
  node: Any = tree
  for key in path:
    node = node[key]
  return node


def contains(tree: Tree, path: tuple[str, ...]) -> bool:
  node: Any = tree
  for key in path:
    if not isinstance(node, Mapping) or key not in node:
      return False
    node = node[key]
  return True


def replace(tree: Tree, updates: Mapping[tuple[str, ...], Any]) -> dict:
  """A copy of ``tree`` with the values at ``updates``' paths replaced or added.

  Only the dicts along the updated paths are copied; every other node and leaf is shared, so the
  (possibly huge) frozen arrays are never duplicated.
  """
  out = dict(tree)
  by_head: dict[str, dict[tuple[str, ...], Any]] = {}
  for path, value in updates.items():
    if len(path) == 1:
      out[path[0]] = value
    else:
      by_head.setdefault(path[0], {})[path[1:]] = value
  for head, sub in by_head.items():
    out[head] = replace(out.get(head, {}), sub)
  return out


def nest(flat: Mapping[tuple[str, ...], Any]) -> dict:
  """Builds a nested dict from ``{path: value}``."""
  return replace({}, flat)
