"""The adapter contract: what a framework adapter receives, returns and promises.

See ``README.md`` beside this file for the design note. This module imports no
framework: adapters are found and asked to claim a tree before any framework loads.
"""

from __future__ import annotations

import abc
import enum
import importlib
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, ClassVar

from ..core._leaf import Leaf

Rebuild = Callable[[list[Any]], Any]
"""Puts one value per leaf (in the order of the walked leaves) back into a tree of
exactly the structure and container types optax will be handed."""


class TreedefRebuild:
    """A :data:`Rebuild` that unflattens a jax treedef: the values go to the treedef's
    leaves at ``positions`` (all of them, in order, by default), ``None`` to the rest.

    It holds no part of the tree, so that the output cache keeps the treedef and the
    leaves it was given instead of flattening each output it keeps.
    """

    __slots__ = ("fill", "positions", "size", "treedef")

    treedef: Any
    """The jax treedef (``jax.tree_util.PyTreeDef``) of the output."""
    positions: Sequence[int] | None
    """The index among the treedef's leaves of each value; ``None``: all, in order."""
    size: int
    """The treedef's number of leaves, where ``positions`` are given."""
    fill: Any
    """What the treedef's other leaves get (``None``)."""

    def __init__(
        self, treedef: Any, positions: Sequence[int] | None = None, size: int = 0, fill: Any = None
    ):
        self.treedef = treedef
        self.positions = positions
        self.size = size
        self.fill = fill

    def filled(self, fill: Any) -> TreedefRebuild:
        """The same rebuild, with ``fill`` at the treedef's other leaves."""
        return TreedefRebuild(self.treedef, self.positions, self.size, fill)

    def leaves(self, values: list[Any]) -> list[Any]:
        """The treedef's leaves with ``values`` in place."""
        if self.positions is None:
            return list(values)
        out: list[Any] = [self.fill] * self.size
        for position, value in zip(self.positions, values):
            out[position] = value
        return out

    def __call__(self, values: list[Any]) -> Any:
        return self.treedef.unflatten(self.leaves(values))


class Claim(enum.IntEnum):
    """How sure an adapter is that a tree is its own."""

    NO = 0
    """Not this framework's tree; reading it would be a guess."""
    POSSIBLY = 1
    """A tree this adapter can read, which another framework could also have made."""
    CERTAINLY = 2
    """Only this framework makes such a tree (its classes, or naming only it uses)."""


class Adapter(abc.ABC):
    """One framework's reader: claims trees, walks them into :class:`decaymask.Leaf`
    records, and rebuilds per-leaf values. It never decides anything.

    Subclasses set the class attributes and implement :meth:`claim` and :meth:`walk`;
    :func:`decaymask.adapters.register` makes an instance known to every entry point.
    The other methods have defaults that fit most frameworks.
    """

    name: ClassVar[str]
    """The framework's name for ``framework=`` and the CLI's ``--framework``: ``"linen"``."""
    face: ClassVar[str]
    """The ``for_<face>`` entry points that take this adapter's trees: ``"flax"`` for
    both Linen and NNX. ``framework=`` accepts a face too."""
    title: ClassVar[str]
    """The framework as messages name it: ``"Flax Linen"``."""
    requires: ClassVar[str]
    """The module :meth:`walk` imports: ``"flax.linen"``. Its top-level package is what
    a missing-framework message names."""
    extra: ClassVar[str]
    """The pip extra that installs the framework: ``pip install 'decaymask[extra]'``."""
    accepts: ClassVar[str]
    """What the entry point takes, for messages: ``"a Linen params or variables mapping"``."""
    usage: ClassVar[str]
    """How a user of another entry point is sent here; ``{method}`` is filled with this
    adapter's entry point: ``"policy.{method}(params) for Haiku params"``."""
    non_floating_fix: ClassVar[str]
    """The fix a warning about integer or bool leaves gives, in this framework's terms."""
    layout_fix: ClassVar[str] = ""
    """What gives a leaf with no known layout its classes, for Muon's error (e.g. a
    trace), or ``""``."""
    factory_result: ClassVar[str] = ""
    """What a model factory returns for the CLI (``"an NNX module"``), or ``""`` where
    the CLI does not build this framework's models."""

    _installed: bool = False  # once imported, a framework stays installed

    factory_shape: ClassVar[str] = ""
    """Where a factory must return more than a model, the CLI's message saying what:
    ``"for Linen the factory must return (module, args) ..."``."""

    @abc.abstractmethod
    def claim(self, tree: Any) -> Claim:
        """Whether ``tree`` is this framework's. Must not import the framework: a tree
        made by a framework that is not loaded cannot be its (see ``sys.modules``)."""

    @abc.abstractmethod
    def walk(self, tree: Any, *, method: str, **options: Any) -> tuple[Sequence[Leaf], Rebuild]:
        """The leaves of ``tree`` in its flattening order, and their :data:`Rebuild`.

        ``method`` names the user's entry point in error messages; ``options`` are the
        entry point's keyword arguments (Linen's ``module=``, NNX's ``wrt=``). Raises a
        ``TypeError`` naming the option for one it does not take.
        """

    def describe(self, tree: Any) -> str:
        """``tree`` as a message names it after "got ", when this adapter claims it."""
        return f"a {type(tree).__name__} from {self.title}"

    def refusal(self, tree: Any, method: str, claimant: Adapter, claim: Claim) -> str | None:
        """The message for ``method`` of this adapter given a tree ``claimant`` claims,
        or ``None`` to let :meth:`walk` say what it expected."""
        if claim is not Claim.CERTAINLY:
            return None
        return (
            f"{method}: got {claimant.describe(tree)}; use "
            f"{claimant.usage.format(method=entry_point(claimant, method))}."
        )

    def is_partial(self, tree: Any) -> bool:
        """Whether ``tree`` is one branch's view of the params (``optax.partition`` masks
        the other branches' leaves out), so a rule may rightly match nothing in it."""
        holds = _masked_node_check()
        return holds is not None and holds(tree)

    def muon_dims(self, decisions: Sequence[Any], method: str) -> list[Any]:
        """One ``optax.contrib.MuonDimensionNumbers`` per decision (``None`` where the
        policy does not select the leaf), from each leaf's layout fields."""
        from ._common import muon_dimension_numbers

        return [muon_dimension_numbers(d, method, self.layout_fix) for d in decisions]

    def signature(self, tree: Any, options: Mapping[str, Any]) -> Hashable | None:
        """A value equal for two trees exactly when :meth:`walk` gives them the same
        leaves (paths, kinds, roles, shapes, dtypes, layouts): the face then builds an
        output once per signature. ``None`` (the default) where the adapter cannot say
        cheaply, e.g. a trace that reads ``options``. A signature that turns out not to
        be hashable (a static field of the tree that is not) is not cached. It is kept
        as a cache key: it must not hold the tree or its objects (a static field's),
        which :class:`PytreeAdapter`'s holds weakly."""
        return None

    def owns_options(self, options: Mapping[str, Any]) -> bool:
        """Whether an entry point's ``options`` name a model only this framework makes
        (Haiku's ``fn=hk.transform(f)``): a tree that several adapters could read is
        then this adapter's."""
        return False

    def factory_model(self, result: Any) -> bool:
        """Whether a CLI model factory's ``result`` is this framework's model."""
        return False

    def build_model(self, factory: Any, result: Any, concrete: bool) -> tuple[Any, dict[str, Any]]:
        """The tree ``explain`` reads for a factory's model and the options it needs
        (``module=``...), abstract (no parameter memory) unless ``concrete``."""
        raise NotImplementedError(f"the CLI does not build {self.title} models.")

    def installed(self) -> bool:
        """Whether :attr:`requires` imports (importing it if it does)."""
        if self._installed:
            return True
        try:
            importlib.import_module(self.requires)
        except ImportError:
            return False
        self._installed = True
        return True

    @property
    def package(self) -> str:
        """The top-level package of :attr:`requires`, as missing-framework messages name it."""
        return self.requires.split(".")[0]

    def __repr__(self) -> str:
        return f"<decaymask adapter {self.name!r} ({self.title})>"


class PytreeAdapter(Adapter):
    """An adapter of a framework whose trees are jax pytrees, and whose walk without
    options reads nothing but the tree's structure, leaf types, shapes and dtypes, and
    which leaves are one array: its outputs are cached by that signature (not while a
    registered layout is a function of the layer, which may read anything)."""

    flattens_with_paths = False
    """Whether :meth:`walk` flattens the tree with key paths: the signature's flatten
    then takes them, and the walk of the same build reuses it."""

    def signature(self, tree: Any, options: Mapping[str, Any]) -> Hashable | None:
        if options:
            return None  # a trace reads the module and its inputs too
        from ..core import _registry

        if _registry.instance_layouts:
            return None  # a registered function of the layer may read any of its fields
        from ._structure import structure_signature

        return structure_signature(tree, self.flattens_with_paths)


_PREFIXES = ("labels_", "rates_", "muon_dims_", "")
_GENERIC = {"": "mask", "labels_": "labels", "rates_": "rates", "muon_dims_": "muon_dims"}

FACES: set[str] = set()
"""The faces ``decaymask.Policy`` has ``for_<face>`` methods for; filled by the face.
An adapter of another face is reached through the generic methods."""


def entry_point(adapter: Adapter, method: str) -> str:
    """The entry point of ``adapter`` that does what ``method`` does: ``labels_for_flax``
    for ``labels_for_equinox``; the generic methods map to the ``for_`` forms, and where
    Policy has no ``for_<face>`` methods, to the generic ones."""
    if method == "explain":
        return method
    prefix = next(
        (p for p in _PREFIXES if method.startswith(p + "for_")),
        next((p for p, g in _GENERIC.items() if g == method), ""),
    )
    if adapter.face in FACES:
        return f"{prefix}for_{adapter.face}"
    return _GENERIC[prefix]


def call(adapter: Adapter, method: str, argument: str) -> str:
    """How a message writes the call that reads the tree: ``policy.for_flax(params)``,
    or ``policy.mask(params, framework='bags')`` for an adapter Policy has no face for."""
    name = entry_point(adapter, method)
    if adapter.face in FACES:
        return f"policy.{name}({argument})"
    return f"policy.{name}({argument}, framework={adapter.name!r})"


def _masked_node_check() -> Callable[[Any], bool] | None:
    import sys

    if "optax" not in sys.modules:
        return None
    from ._common import holds_masked_node

    return holds_masked_node


def is_plain_mapping(tree: Any) -> bool:
    """A mapping no framework made: not a FrozenDict, not an nnx.State."""
    return isinstance(tree, Mapping) and not type(tree).__module__.startswith("flax.")
