"""A traced model against the tree it was given: which reading the tree takes, and
whether its params are the model's."""

from __future__ import annotations

import dataclasses
import reprlib
from collections.abc import Mapping
from typing import Any

import jax

from .._common import path_text
from ._arrays import is_array_leaf, is_box, str_keys, unbox
from ._signature import facts_below
from ._trace import LinenRecording, LinenTrace, Wanted, trace_init, wanted_names, warn_unseen
from ._variables import check_not_equinox


def leaf_error(fn: str, names: tuple[str, ...], value: Any) -> TypeError:
    """The error for a leaf that is not an array, at the key path ``names``."""
    return TypeError(
        f"{fn}: leaf {path_text(names)!r} is {reprlib.repr(value)} "
        f"({type(value).__name__}); expected a jax or numpy array, or an "
        f"nn.Partitioned (flax AxisMetadata) box around one. Remove "
        f"non-array entries from the tree before building the mask."
    )


def traced_reading(
    fn: str, tree: Mapping, module: Any, args: Any, kwargs: Any, reading: bool | None
) -> tuple[LinenTrace, bool]:
    """The trace of ``module.init``, and whether ``tree`` is a variables mapping.

    ``module`` is the Linen module to trace, or the :class:`LinenRecording` of a
    ``dm.record()`` block (``recorded=``): then the recorded init whose params are
    ``tree``'s is read instead, exactly as its trace would be.

    The tree's reading (``looks_like_variables``) is kept where the traced params fit
    it; where they fit the other one (or the tree left it open), the trace decides.

    Raises:
      TypeError: an Equinox module or a leaf that is not an array is in ``tree``, or
        ``module=``/``args=``/``kwargs=`` are of the wrong type.
      ValueError: the params differ from the traced model's (from every recorded
        init's), or a recorded init saw no module where the params hold some.
    """
    if isinstance(module, LinenRecording):
        exact = _exactly_recorded(fn, tree, module, reading is not False)
        if exact is not None:
            return exact, False
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_box)
    check_not_equinox(fn, tree, flat)
    keyed = [(str_keys(keys), value) for keys, value in flat]
    for names, value in keyed:
        array = unbox(value) if is_box(value) else value
        if not is_array_leaf(array):
            raise leaf_error(fn, names, array)
    variables = reading is not False
    wanted = wanted_names(keyed, variables)
    if isinstance(module, LinenRecording):
        return _recorded_reading(fn, keyed, module, wanted, variables)
    trace = trace_init(fn, module, args, kwargs, wanted)
    traced = _traced_param_shapes(trace)
    variables, held = _checked(fn, keyed, traced, variables, "module=...")
    if _unseen(trace, held):
        trace = trace_init(fn, module, args, kwargs, wanted, eager=True)
        unseen = _unseen(trace, held)
        if unseen:
            warn_unseen(fn, type(module).__name__, unseen)
    return trace, variables


def _checked(
    fn: str, keyed: list, traced: dict[tuple[str, ...], tuple[int, ...]], variables: bool,
    given_as: str,
) -> tuple[bool, set[tuple[str, ...]]]:
    """The reading of the tree the trace decides, and the module paths its params
    hold, once the params are checked against the ``traced`` param shapes.

    Raises:
      ValueError: the params differ from the traced model's.
    """
    variables = _reading(keyed, traced, variables)
    given: dict[tuple[str, ...], tuple[int, ...]] = {}
    held: set[tuple[str, ...]] = set()
    for names, value in keyed:
        array = unbox(value) if is_box(value) else value
        if variables:
            if names[0] != "params":
                continue
            names = names[1:]
        given[names] = tuple(array.shape)
        held.add(names[:-1])
    _check_trace(fn, given, traced, given_as)
    return variables, held


def _exactly_recorded(
    fn: str, tree: Mapping, recording: LinenRecording, variables: bool
) -> LinenTrace | None:
    """The trace of the recorded init whose params ``tree`` is exactly: the same
    treedef (keys and containers), arrays of the same shapes. It is what reading the
    tree key by key finds (params, not variables: a tree whose paths are all a
    trace's params paths is not also those paths below a ``params`` key), worked out
    once per recorded init from its params' shapes. ``None`` where the tree is not."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    if not all(map(is_array_leaf, leaves)):
        return None
    try:
        shapes = tuple([tuple(leaf.shape) for leaf in leaves])
    except (AttributeError, TypeError):
        return None
    for index, recorded in enumerate(recording.traces):
        exact = recording.exact.get(index)
        if exact is None:
            exact = recording.exact[index] = _exact_entry(recorded)
        if exact[0] != treedef or exact[1] != shapes:
            continue
        found = exact[2].get(variables)
        if found is None:
            try:
                found = exact[2][variables] = _exact_reading(fn, recorded, variables)
            except ValueError:
                return None  # the reading key by key says why
        return found
    return None


def _exact_entry(recorded: LinenTrace) -> tuple[Any, tuple, dict[bool, LinenTrace]]:
    params = recorded.variables.get("params", {})
    return (jax.tree_util.tree_structure(params),
            tuple([tuple(leaf.shape) for leaf in jax.tree_util.tree_leaves(params)]), {})


def _exact_reading(fn: str, recorded: LinenTrace, variables: bool) -> LinenTrace:
    """The trace a tree that is exactly the recorded params is read with: its params'
    keys stand for the tree's."""
    params = recorded.variables.get("params", {})
    flat, _ = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_box)
    keyed = [(str_keys(keys), value) for keys, value in flat]
    held = {names[:-1] for names, _ in keyed}
    return _read_recorded(fn, recorded, wanted_names(keyed, variables), held)


def prepare(recording: LinenRecording) -> None:
    """Works out, for each init recorded, the trace its exact params are read with
    (either reading), so that reading them costs little more than a walk by names."""
    for index, recorded in enumerate(recording.traces):
        exact = recording.exact.get(index)
        if exact is None:
            exact = recording.exact[index] = _exact_entry(recorded)
        for variables in (False, True):
            if variables not in exact[2]:
                try:
                    trace = exact[2][variables] = _exact_reading("recorded=", recorded, variables)
                except ValueError:
                    continue  # read key by key, which says why
                facts_below(trace, ())  # the walk compares blocks by these


def _recorded_reading(
    fn: str, keyed: list, recording: LinenRecording, wanted: Wanted, variables: bool
) -> tuple[LinenTrace, bool]:
    """The recorded init whose params are the tree's, read as its trace would be."""
    errors = []
    for index, recorded in enumerate(recording.traces):
        # Each later read of the same init reuses its param shapes.
        traced = recording.shapes.get(index)
        if traced is None:
            traced = recording.shapes[index] = _traced_param_shapes(recorded)
        try:
            reading, held = _checked(fn, keyed, traced, variables, "recorded=...")
        except ValueError as err:
            errors.append(err)
            continue
        return _read_recorded(fn, recorded, wanted, held), reading
    if len(errors) == 1:
        raise errors[0]
    first = str(errors[0]).split(": the params do not match the recorded init: ", 1)[-1]
    raise ValueError(
        f"{fn}(params, recorded=...): the params match none of the {len(errors)} inits "
        f"recorded; against the first: {first}"
    )


def _read_recorded(
    fn: str, recorded: LinenTrace, wanted: Wanted, held: set[tuple[str, ...]]
) -> LinenTrace:
    """A recorded init's trace for a tree holding the ``wanted`` arrays at the module
    paths ``held``.

    Raises:
      ValueError: the init saw no module where the tree holds params.
    """
    # A trace asks only the ranks of the arrays the tree holds: so does this one.
    ndims = {}
    for path, names in wanted.items():
        for collection, name in names:
            key = (collection, path + (name,))
            if key in recorded.ndims:
                ndims[key] = recorded.ndims[key]
    trace = dataclasses.replace(recorded, ndims=ndims)
    unseen = _unseen(trace, held)
    if unseen:
        raise ValueError(
            f"{fn}(params, recorded=...): the recorded init saw no module at "
            f"{', '.join(unseen[:3])}{' and more' if len(unseen) > 3 else ''}: a "
            f"call compiled by nn.jit that jax had already cached runs no Python, "
            f"and modules inside a custom jax transform run outside Flax's "
            f"interceptor. Run the init inside dm.record() under "
            f"jax.disable_jit(), or pass module=model, args=(x,) instead of "
            f"recorded= (its trace runs with jit disabled where it must)."
        )
    return trace


def _unseen(trace: LinenTrace, held: set[tuple[str, ...]]) -> list[str]:
    """Module paths holding params where the trace saw no module at all."""
    seen = trace.classes
    unseen = []
    for path in held:
        if path and not any(path[:i] in seen for i in range(1, len(path) + 1)):
            unseen.append(path_text(path))
    return sorted(unseen)


def _traced_param_shapes(trace: LinenTrace) -> dict[tuple[str, ...], tuple[int, ...]]:
    """The shape of every param of the traced model, by its path's keys."""
    flat, _ = jax.tree_util.tree_flatten_with_path(
        trace.variables.get("params", {}), is_leaf=is_box
    )
    shapes = {}
    for keys, value in flat:
        array = unbox(value) if is_box(value) else value
        shapes[str_keys(keys)] = tuple(array.shape)
    return shapes


def _reading(
    keyed: list, traced: dict[tuple[str, ...], tuple[int, ...]], variables: bool
) -> bool:
    """Whether the tree is a variables mapping, as the traced model tells."""
    if not variables:
        return False
    as_variables = {names[1:] for names, _ in keyed if names and names[0] == "params"}
    if as_variables == traced.keys():
        return True
    as_params = {names for names, _ in keyed}
    # A model with a top-level submodule named "params": its keys are modules.
    return as_params != traced.keys()


def _check_trace(
    fn: str,
    given: dict[tuple[str, ...], tuple[int, ...]],
    traced: dict[tuple[str, ...], tuple[int, ...]],
    given_as: str = "module=...",
) -> None:
    """Raises where the params (by their paths' keys) differ from the traced ones."""
    if given == traced:
        return
    for path, shape in given.items():
        if path not in traced:
            raise _mismatch(
                fn, f"{path_text(path)!r} is in the params, not in the model's", given_as
            )
        if traced[path] != shape:
            raise _mismatch(
                fn,
                f"{path_text(path)!r} has shape {shape} in the params and {traced[path]} "
                f"in the model's",
                given_as,
            )
    for path in traced:
        if path not in given:
            raise _mismatch(
                fn, f"{path_text(path)!r} is in the model's params, not in these", given_as
            )


def _mismatch(fn: str, what: str, given_as: str) -> ValueError:
    if given_as == "recorded=...":
        return ValueError(
            f"{fn}(params, recorded=...): the params do not match the recorded init: "
            f"{what}. Pass the params (or variables) of the init recorded in the "
            f"`with dm.record()` block, or record the init that made these params."
        )
    return ValueError(
        f"{fn}(params, module=...): the params do not match the traced model: "
        f"{what}. Pass the module that made these params, and args= with the "
        f"feature sizes they were made with."
    )
