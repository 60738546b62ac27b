"""Layer classes taught to decaymask by the user."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Mapping
from typing import Any, cast

from ._vocab import LayerKind, Role, check_kind, check_role


@dataclasses.dataclass(frozen=True)
class Registration:
    """What :func:`register_layer` recorded for one class."""

    kind: str
    roles: tuple[tuple[str, str], ...] = ()
    matrix_axes: tuple[tuple[str, Any], ...] = ()
    """(name, axes) pairs: axes are (reduction, output), or a function of the layer
    instance returning them."""

    def role_of(self, name: str) -> str | None:
        for key, role in self.roles:
            if key == name:
                return role
        return None

    def matrix_axes_of(
        self, name: str, layer: Any = None
    ) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
        """The registered (reduction, output) axes of the array ``name``; a function's
        are those it returns for ``layer``, ``None`` where there is no instance to ask
        (a layer known only by its params).

        Raises:
          ValueError: the function returned something else than two disjoint tuples of
            non-negative ints, or raised; the message names the class and the layer.
        """
        for key, axes in self.matrix_axes:
            if key == name:
                if not callable(axes):
                    return axes
                return None if layer is None else _called_axes(name, axes, layer)
        return None


# Masks are built while other threads (data loaders, checkpointing) import modules and
# register layers: the tables are never changed in place. A write replaces a table by an
# updated copy under the lock, so a reader holding a table iterates a snapshot.
_by_class: dict[type, Registration] = {}
_by_name: dict[str, Registration] = {}
_lock = threading.Lock()
# Adapters cache per-class answers; they compare this counter to know when to drop them.
# It moves after the tables: a cache made under the old count is dropped once it moves.
generation = 0
# Whether a registered layout is a function of the layer: it may read any attribute of
# an instance, which no tree signature holds, so outputs are then not cached.
instance_layouts = False


def register_layer(
    cls_or_class_name: type | str,
    kind: LayerKind,
    roles: Mapping[str, Role] | None = None,
    matrix_axes: Mapping[str, tuple[Any, Any]] | None = None,
) -> type | str:
    """Teaches decaymask the kind of a layer class it does not know.

    Subclasses of a registered class count as registered too. A class name (a string)
    matches classes of that ``__name__`` in any module, and Linen modules whose auto
    name is that class name (``MyProj_0``).

    Args:
      cls_or_class_name: the layer class, or its class name.
      kind: a layer kind from ``dm.KINDS``.
      roles: the role of each array attribute (or Flax param name) the layer owns,
        e.g. ``{"w": "weight", "b": "bias"}``. Names left out are inferred from
        standard names (``weight``, ``kernel``, ``bias``, ``scale``, ...).
      matrix_axes: for Muon, the ``(reduction axes, output axes)`` of each weight
        matrix the layer owns, e.g. ``{"w": ((0,), (1,))}`` for an ``(in, out)`` matrix;
        the same for every instance of the class. Where they differ between instances
        (an einsum's equation, a configurable number of input axes), a function of the
        layer instance returning them: ``{"w": lambda layer: ((0,), (1, 2))}``. A
        function is asked where the adapter has the instance (Equinox modules, NNX
        modules); where it has only params, the layout stays unknown. A registered
        layout that contradicts one decaymask reads off an instance is an error.

    Returns:
      ``cls_or_class_name`` unchanged, so this can be used as a class decorator through
      ``functools.partial``.

    Raises:
      TypeError: ``cls_or_class_name`` is neither a class nor a string, or ``roles`` is
        not a mapping of strings.
      ValueError: ``kind`` or a role is not in the vocabulary.

    Example:
      >>> import decaymask as dm
      >>> class Projection: ...
      >>> _ = dm.register_layer(Projection, "linear", roles={"w": "weight"})
      >>> dm.unregister_layer(Projection)
    """
    global _by_class, _by_name, generation, instance_layouts
    where = "register_layer"
    check_kind(kind, where=f"{where}(kind=...)", groups=False)
    if roles is None:
        roles = {}
    if not isinstance(roles, Mapping):
        raise TypeError(
            f"{where}(roles=...): expected a mapping from attribute name to role, "
            f"e.g. {{'w': 'weight'}}, got {type(roles).__name__}."
        )
    items = []
    for name, role in roles.items():
        if not isinstance(name, str):
            raise TypeError(
                f"{where}(roles=...): attribute names must be strings, got {name!r}."
            )
        items.append((name, check_role(role, where=f"{where}(roles={{{name!r}: ...}})")))
    axes_items = []
    for name, axes in (matrix_axes or {}).items():
        axes_items.append((name, _check_axes(name, axes)))
    registration = Registration(kind, tuple(items), tuple(axes_items))
    if not isinstance(cls_or_class_name, type) and not (
        isinstance(cls_or_class_name, str) and cls_or_class_name
    ):
        raise TypeError(
            f"{where}: expected a layer class or a class name, got "
            f"{cls_or_class_name!r} ({type(cls_or_class_name).__name__})."
        )
    with _lock:
        if isinstance(cls_or_class_name, type):
            _by_class = {**_by_class, cls_or_class_name: registration}
        else:
            _by_name = {**_by_name, cls_or_class_name: registration}
        instance_layouts = _any_function()
        generation += 1
    return cls_or_class_name


def _called_axes(name: str, function: Callable[[Any], Any], layer: Any) -> Any:
    where = f"the matrix_axes function of {type(layer).__name__}.{name}"
    try:
        axes = function(layer)
    except Exception as err:
        raise ValueError(
            f"register_layer: {where} raised {type(err).__name__}: {err}. Fix the "
            f"function; it is called with each {type(layer).__name__} instance."
        ) from err
    return _check_axes(name, axes, where=f"{where} returned")


def _check_axes(
    name: str, axes: Any, where: str | None = None
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    if where is None and callable(axes) and not isinstance(axes, (tuple, list)):
        return cast(Any, axes)  # asked per instance, checked then

    def as_ints(value: Any) -> tuple[int, ...] | None:
        items = value if isinstance(value, (tuple, list)) else (value,)
        if items and all(isinstance(a, int) and not isinstance(a, bool) and a >= 0 for a in items):
            return tuple(items)
        return None

    if isinstance(axes, (tuple, list)) and len(axes) == 2:
        reduction, output = as_ints(axes[0]), as_ints(axes[1])
        if reduction is not None and output is not None and not set(reduction) & set(output):
            return reduction, output
    what = where or f"register_layer(matrix_axes={{{name!r}: {axes!r}}})"
    got = f" {axes!r}" if where else ""
    raise ValueError(
        f"{what}{got}: expected (reduction axes, output axes) as two disjoint tuples of "
        f"non-negative ints, e.g. ((0,), (1,)) for an (in, out) matrix, or a function of "
        f"the layer returning them."
    )


def unregister_layer(cls_or_class_name: type | str) -> None:
    """Forgets what :func:`register_layer` recorded for a class or class name.

    Raises:
      KeyError: nothing was registered under that class or name.
    """
    global _by_class, _by_name, generation, instance_layouts
    with _lock:
        by_class = isinstance(cls_or_class_name, type)
        table: dict = _by_class if by_class else _by_name
        if cls_or_class_name not in table:
            raise KeyError(f"unregister_layer: {cls_or_class_name!r} is not registered.")
        rest = {key: value for key, value in table.items() if key != cls_or_class_name}
        if by_class:
            _by_class = rest
        else:
            _by_name = rest
        instance_layouts = _any_function()
        generation += 1


def _any_function() -> bool:
    return any(
        callable(axes)
        for registration in (*_by_class.values(), *_by_name.values())
        for _, axes in registration.matrix_axes
    )


def lookup_class(cls: type) -> Registration | None:
    """The registration of ``cls`` or of its nearest registered base class."""
    by_class, by_name = _by_class, _by_name
    if not by_class and not by_name:
        return None
    for base in cls.__mro__:
        found = by_class.get(base) or by_name.get(base.__name__)
        if found is not None:
            return found
    return None


def lookup_name(class_name: str) -> Registration | None:
    """The registration for a class known only by name (Linen auto names)."""
    found = _by_name.get(class_name)
    if found is None:
        for cls, registration in _by_class.items():  # a snapshot: never changed in place
            if cls.__name__ == class_name:
                return registration
    return found


def lookup_spelled(name: str, spell: Callable[[str], str]) -> Registration | None:
    """The registration whose class name, spelled as a framework names its module
    instances, is ``name``: with Haiku's spelling, ``my_proj`` finds ``MyProj``.

    Args:
      name: the module's name in the params, numbering removed (``my_proj``, not
        ``my_proj_1``).
      spell: the framework's spelling of a class name, e.g. CamelCase to snake_case.
    """
    by_class, by_name = _by_class, _by_name
    if not by_class and not by_name:
        return None
    for class_name, registration in by_name.items():
        if spell(class_name) == name:
            return registration
    for cls, registration in by_class.items():
        if spell(cls.__name__) == name:
            return registration
    return None
