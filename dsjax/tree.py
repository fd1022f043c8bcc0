"""Nested containers: pytree paths as tuples of names (the one helper every package uses to find leaves
by name), and the one reader of config keys."""

from __future__ import annotations

from typing import Any, Iterator, Mapping

import jax


def path_names(path) -> tuple[str, ...]:
    """A `tree_flatten_with_path` path as names: dict keys and attribute names, sequence indices as str."""
    names = []
    for key in path:
        if isinstance(key, jax.tree_util.DictKey):
            names.append(str(key.key))
        elif isinstance(key, jax.tree_util.GetAttrKey):
            names.append(key.name)
        elif isinstance(key, jax.tree_util.SequenceKey):
            names.append(str(key.idx))
        elif isinstance(key, jax.tree_util.FlattenedIndexKey):
            names.append(str(key.key))
        else:
            names.append(str(key))
    return tuple(names)


def leaf_name(path) -> str | None:
    """The last dict key or attribute name of a path, skipping Flax boxes' `value` attribute."""
    for key in reversed(path):
        if isinstance(key, jax.tree_util.DictKey):
            return str(key.key)
        if isinstance(key, jax.tree_util.GetAttrKey) and key.name != "value":
            return key.name
    return None


def named_leaves(tree: Any) -> dict[tuple[str, ...], Any]:
    """{path names: leaf} for every leaf of a pytree."""
    return {path_names(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def dict_paths(tree: dict, prefix: tuple = ()) -> Iterator[tuple[tuple, Any]]:
    """(path tuple, leaf) for every leaf of a nested dict (no JAX flattening: leaves may be anything)."""
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from dict_paths(value, prefix + (key,))
        else:
            yield prefix + (key,), value


_MISSING = object()


def config_get(config: Any, key: str, default: Any = _MISSING) -> Any:
    """`config[key]` for a ConfigDict or mapping, an object's attribute otherwise; `default` when the
    key is absent (KeyError when no default is given)."""
    if isinstance(config, Mapping) or hasattr(config, "keys"):  # ConfigDicts are not Mappings
        if key in config:
            return config[key]
    elif config is not None and hasattr(config, key):
        return getattr(config, key)
    if default is _MISSING:
        raise KeyError(key)
    return default
