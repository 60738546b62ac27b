"""check_mask: whether a weight-decay mask fits the params optax will be handed."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Mapping
from typing import Any

from ._needs import needs
from .core._text import visible_errors
from ._describe import (
    _static_differences,
    _same_data,
    _is_bool,
    _leaf_trouble,
    _is_array,
    _is_variable,
    _is_axis_box,
    _is_nnx_module,
    _is_nnx,
    _is_equinox,
    _is_mapping,
    _type_name,
    _describe,
    _some,
    _short,
)

ROOT = "<root>"
"""How a message names the root of the trees, where the path has no keys."""


_FIX_EQUINOX = (
    "build the mask from the params you hand optax, mask = policy.for_equinox(params), "
    "or pass mask=policy.for_equinox (the function) so that optax builds it from what it gets."
)
_FIX_EQUINOX_FILTER = (
    "hand optax the arrays only, params = eqx.filter(model, eqx.is_inexact_array), and "
    "build the mask from those params: policy.for_equinox(params), or pass "
    "mask=policy.for_equinox."
)
_FIX_MAPPING = (
    "build the mask from the same tree you hand optax, mask = policy.for_{face}(params) for "
    "tx.init(params), or pass mask=policy.for_{face} so that optax builds it from what it gets."
)
_FIX_TREE = (
    "build the mask from the same tree you hand optax, or pass a function "
    "(mask=lambda params: ...) so that optax builds it from what it gets."
)
_FIX_NNX_WRT = (
    "build the mask with the filter the optimizer uses: policy.for_flax(model, wrt=F) for "
    "nnx.Optimizer(model, tx, wrt=F)."
)
_FIX_NNX_BOXES = (
    "build the mask as an nnx.State of plain bools, policy.for_flax(model) or "
    "nnx.map_state(lambda path, value: ..., state); jax.tree.map over nnx.state(...) keeps "
    "the nnx.Variable boxes, which fit tx.init but not tx.update."
)
_FIX_NNX_MODULE = (
    "check the mask against the state optax is handed, check_mask(mask, nnx.state(model, F)) "
    "for nnx.Optimizer(model, tx, wrt=F)."
)
_FIX_LINEN_VARIABLES = (
    'build the mask from the params collection alone: policy.for_flax(variables["params"]).'
)
_FIX_LINEN_PARAMS_KEY = (
    'hand optax the params collection alone, tx.init(variables["params"]), and build the '
    'mask from the same tree: policy.for_flax(variables["params"]).'
)
_FIX_BOXED = (
    "build the mask from the tree you hand optax, boxed or unboxed alike: both from "
    "params or both from nn.unbox(params)."
)
_FIX_CONTAINER = (
    "build the mask from the same object you hand optax (decaymask returns the container "
    "type it was given)"
)
_FIX_NOT_BOOL = {
    "nnx": "build the mask as an nnx.State of plain bools: policy.for_flax(model), or "
    "nnx.map_state(lambda path, value: ..., state) returning True or False.",
    "equinox": "use policy.for_equinox(params), or return bool(...) from the function you "
    "map over the params.",
    "mapping": "use policy.for_{face}(params), or return bool(...) from the function you map "
    "over the params.",
    "tree": "return bool(...) from the function you map over the params.",
}
_FIX_FOR = {"nnx": _FIX_NNX_WRT, "equinox": _FIX_EQUINOX, "mapping": _FIX_MAPPING, "tree": _FIX_TREE}

_UPDATE_NOTE = (
    "at tx.update: nnx.Optimizer hands optax nnx.as_pure(state), the arrays without their "
    "nnx.Variable boxes"
)


class MaskMismatchError(ValueError):
    """A weight-decay mask that optax cannot lay over the params it is handed."""


@visible_errors
def check_mask(mask: Any, params: Any) -> None:
    """Check that ``mask`` fits ``params`` the way ``optax.masked`` will use it.

    ``optax.adamw(..., mask=mask)`` maps the mask over the params it is handed. When the
    two disagree, optax fails at ``init`` or ``update`` with a pytree structure error about
    a "prefix pytree". This check walks both trees in flattening order and stops at the
    first place where optax would fail, naming it by its canonical path (keys joined with
    ``/``, ``<root>`` for the root, NNX's trailing ``value`` and Linen's box ``value``
    dropped), what each side has there, and the likely fix.

    It accepts what optax accepts: a mask of the params' structure, or a prefix of it (a
    bool standing for a whole subtree, or for a ``None`` in the params), with ``None``
    wherever the params have ``None``. Where they differ is the leaves: optax tests each
    leaf with ``if``, so it takes any truthy value, but here a leaf must be a bool (a
    Python or numpy bool, or a one-element bool array), since a string, a number or an
    elementwise array there is almost never meant.

    A function (what optax calls a callable mask) is called with the params and its result
    is checked. An ``nnx.State`` of ``nnx.Variable`` boxes is checked twice, as
    ``nnx.Optimizer`` hands it to optax: as it is (``tx.init``) and through
    ``nnx.as_pure`` (``tx.update``). ``mask=None`` is no mask at all in
    ``optax.adamw`` and passes.

    Args:
      mask: the ``mask=`` argument for optax: a tree of bools, a function of the params,
        or ``None``.
      params: the tree handed to ``tx.init``: Equinox params, a Linen params mapping, or
        an ``nnx.State``.

    Returns:
      ``None``, silently, when optax will accept the mask.

    Raises:
      MaskMismatchError: the mask does not fit the params; the message says where, what
        each side has there, and how to build a mask that fits.
      ImportError: jax is not installed; the message names the extras that bring it.

    Example:
      >>> import decaymask as dm, jax.numpy as jnp
      >>> params = {"Dense_0": {"kernel": jnp.ones((2, 3)), "bias": jnp.zeros(3)}}
      >>> dm.check_mask({"Dense_0": {"kernel": True, "bias": False}}, params)
      >>> dm.check_mask({"Dense_0": False}, params)  # a prefix: one bool for the whole layer
      >>> dm.check_mask({"params": {"Dense_0": True}}, params)
      Traceback (most recent call last):
      ...
      decaymask._check.MaskMismatchError: mask does not match params at <root>:
        mask has a dict with 1 key
        params have a dict with 1 key
        keys only in the mask (1): 'params'
        keys only in params (1): 'Dense_0'
      Fix: build the mask from the params collection alone: policy.for_flax(variables["params"]).
    """
    needs("check_mask", "jax")

    if mask is None:
        return
    called = _optax_calls(mask)
    if called and not callable(mask):
        raise MaskMismatchError(
            f"mask does not match params at {ROOT}:\n"
            f"  mask has {_describe(mask)} whose every leaf is a function\n"
            f"  params have {_describe(params)}\n"
            "  optax then calls the mask itself with the params, and it cannot be called\n"
            "Fix: pass one function of the params (mask=policy.for_equinox or "
            "mask=policy.for_flax), or a tree of bools."
        )
    for view, note in _views(params):
        tree = mask(view) if called else mask
        site = _PairWalk().first_difference(tree, view)
        if site is not None:
            raise MaskMismatchError(site.message(note, called))


def _optax_calls(mask: Any) -> bool:
    import jax

    # optax.masked's own test: a mask is called when every leaf of it is callable.
    flags = jax.tree_util.tree_leaves(jax.tree_util.tree_map(callable, mask))
    return bool(flags) and all(flags)


def _views(params: Any) -> list[tuple[Any, str | None]]:
    """The trees optax sees: NNX states once boxed (init) and once unboxed (update)."""
    views: list[tuple[Any, str | None]] = [(params, None)]
    nnx = sys.modules.get("flax.nnx")
    if nnx is not None:
        import jax

        boxes = jax.tree_util.tree_leaves(params, is_leaf=lambda x: isinstance(x, nnx.Variable))
        if any(isinstance(x, nnx.Variable) for x in boxes):
            views.append((nnx.as_pure(params), _UPDATE_NOTE))
    return views


@dataclasses.dataclass(frozen=True)
class _Node:
    """One pytree node opened one level: its type, static data and keyed children."""

    type: type
    data: Any
    keys: list[Any]
    children: list[Any]

    @property
    def raw_keys(self) -> list[Any]:
        return [_raw_key(k) for k in self.keys]


def _raw_key(entry: Any) -> Any:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return getattr(entry, attr)
    return entry


@dataclasses.dataclass
class _Site:
    """The first place where optax would fail, and what is known around it."""

    path: tuple[str, ...]
    mask: Any
    params: Any
    problem: str  # "leaf", "type", "keys", "length" or "data"
    context: str  # "nnx", "equinox", "mapping" or "tree": which fixes apply
    mask_node: _Node | None = None
    params_node: _Node | None = None
    face: str = "flax"  # for a mapping: the for_<face> entry point of its framework

    def message(self, note: str | None, called: bool) -> str:
        where = "/".join(self.path) if self.path else ROOT
        subject = "mask (as returned by the mask function)" if called else "mask"
        lines = [
            f"{subject} does not match params at {where}:",
            f"  mask has {_describe(self.mask)}",
            f"  params have {_describe(self.params)}",
        ]
        lines += [f"  {line}" for line in self._details()]
        if note is not None:
            lines.append(f"  ({note})")
        lines.append(f"Fix: {self._fix()}")
        return "\n".join(lines)

    def _keys(self) -> tuple[list[Any], list[Any]]:
        """(keys only the mask has, keys only the params have) at this node."""
        if self.mask_node is None or self.params_node is None:
            return [], []
        mask_keys, params_keys = self.mask_node.raw_keys, self.params_node.raw_keys
        return (
            [k for k in mask_keys if k not in params_keys],
            [k for k in params_keys if k not in mask_keys],
        )

    def _details(self) -> list[str]:
        if self.problem == "leaf":
            return [f"a mask leaf must be True or False: {_leaf_trouble(self.mask)}"]
        if self.problem == "keys":
            only_mask, only_params = self._keys()
            lines = []
            if only_mask:
                lines.append(f"keys only in the mask ({len(only_mask)}): {_some(only_mask)}")
            if only_params:
                lines.append(f"keys only in params ({len(only_params)}): {_some(only_params)}")
            return lines
        if self.problem == "data" and self.mask_node is not None and self.params_node is not None:
            named = _static_differences(self.mask, self.params)
            if named:
                return [f"static fields differ: {named}"]
            return [
                "same type, different static data: "
                f"mask {_short(self.mask_node.data)}, params {_short(self.params_node.data)}"
            ]
        return []

    def _fix(self) -> str:
        mask_type = self.mask_node.type if self.mask_node is not None else None
        params_type = self.params_node.type if self.params_node is not None else None
        if self.problem == "leaf":
            return _FIX_NOT_BOOL[self.context].format(face=self.face)
        if _is_nnx_module(params_type):
            return _FIX_NNX_MODULE
        if _is_variable(mask_type):
            return _FIX_NNX_BOXES
        if _is_axis_box(mask_type) or _is_axis_box(params_type):
            return _FIX_BOXED
        if self.problem == "type" and _is_mapping(mask_type) and _is_mapping(params_type):
            if "FrozenDict" in (_type_name(mask_type), _type_name(params_type)):
                return (
                    _FIX_CONTAINER + ", or make both the same type with flax.core.unfreeze "
                    "(dicts) or flax.core.freeze (FrozenDicts)."
                )
            return _FIX_CONTAINER + "."
        if self.problem == "keys" and self.context != "nnx":
            only_mask, only_params = self._keys()
            if "params" in only_mask:
                return _FIX_LINEN_VARIABLES
            if "params" in only_params:
                return _FIX_LINEN_PARAMS_KEY
        if self.context == "equinox" and self.mask is None and self.params_node is None:
            # A non-array leaf in the params: optax was handed the unfiltered model.
            if not _is_array(self.params):
                return _FIX_EQUINOX_FILTER
        return _FIX_FOR[self.context].format(face=self.face)


class _PairWalk:
    """Both trees in parallel, one level at a time, in flattening order."""

    def __init__(self) -> None:
        import jax

        from .adapters._common import key_name

        self.tree_util = jax.tree_util
        self.key_name = key_name

    def first_difference(self, mask: Any, params: Any) -> _Site | None:
        if _is_nnx(mask) or _is_nnx(params):
            context = "nnx"
        elif isinstance(mask, Mapping) or isinstance(params, Mapping):
            context = "mapping"
        else:
            context = "tree"
        site = self._compare(mask, params, (), context)
        if site is not None and site.context == "mapping":
            site.face = _mapping_face(params if isinstance(params, Mapping) else mask)
        return site

    def _open(self, x: Any) -> _Node | None:
        """``x`` opened one level, or ``None`` when jax treats it as a leaf."""
        # is_leaf sees the node itself first, then each child: every child stays whole.
        entries, treedef = self.tree_util.tree_flatten_with_path(x, is_leaf=lambda y: y is not x)
        # mypy cannot resolve jaxlib's PyTreeDef (its stub lives in a compiled module).
        if treedef.num_nodes == 1 and treedef.num_leaves == 1:  # type: ignore[attr-defined, unused-ignore]
            return None
        node_type, data = treedef.node_data()  # type: ignore[attr-defined, unused-ignore]
        return _Node(node_type, data, [path[0] for path, _ in entries], [c for _, c in entries])

    def _compare(self, mask: Any, params: Any, path: tuple[str, ...], context: str) -> _Site | None:
        mask_node = self._open(mask)
        if mask_node is None:
            # A mask leaf stands for the whole params subtree under it: optax's prefix rule.
            if _is_bool(mask):
                return None
            return _Site(path, mask, params, "leaf", context)
        params_node = self._open(params)
        if context != "nnx" and (
            _is_equinox(mask_node.type)
            or (params_node is not None and _is_equinox(params_node.type))
        ):
            context = "equinox"

        def site(problem: str) -> _Site:
            return _Site(path, mask, params, problem, context, mask_node, params_node)

        if params_node is None or params_node.type is not mask_node.type:
            return site("type")
        mask_keys, params_keys = mask_node.raw_keys, params_node.raw_keys
        if mask_keys != params_keys:
            first = (mask_node.keys or params_node.keys)[0]
            if not isinstance(first, (self.tree_util.DictKey, self.tree_util.GetAttrKey)):
                return site("length")
            if set(mask_keys) != set(params_keys):
                return site("keys")
        if not _same_data(mask_node.data, params_node.data):
            return site("data")
        # A box's one child is its value: the box's path is the parameter's path.
        boxed = _is_variable(mask_node.type) or _is_axis_box(mask_node.type)
        for key, m, p in zip(mask_node.keys, mask_node.children, params_node.children):
            found = self._compare(m, p, path if boxed else (*path, self.key_name(key)), context)
            if found is not None:
                return found
        return None


def _mapping_face(tree: Any) -> str:
    """The entry point a mapping's framework has: the one adapter that claims it most
    surely (Flax where none does, or several do)."""
    from . import adapters

    claims = [(adapters._claim(a, tree, "check_mask"), a.face) for a in adapters.registered()]
    best = max(claim for claim, _ in claims)
    faces = {face for claim, face in claims if claim == best}
    if best == adapters.Claim.NO or len(faces) != 1:
        return "flax"
    return faces.pop()
