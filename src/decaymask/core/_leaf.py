"""The records adapters hand to the core: one per array leaf."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from ._vocab import check_kind, check_role

KIND_SOURCES = ("class", "registered", "name", "content", "ambiguous", "given")
"""How an adapter found a layer's kind: its class is in decaymask's table, the user
registered it, a class or module name said it (the arrays agreeing or silent), the
arrays it owns said it (the name silent or contradicted), names and arrays contradict
and neither settles it (the kind is the arrays' best reading, and a warning says so),
or the caller said so. An ``unknown`` layer whose class decaymask does not know is
``unknown`` via ``name`` (or ``content`` where its arrays were read and fit no kind):
``class`` always means decaymask knows the class (a container such as
``eqx.nn.Sequential`` is ``unknown`` via ``class``)."""


@dataclasses.dataclass(frozen=True)
class Layer:
    """A module that owns or encloses a leaf."""

    kind: str
    type_name: str | None = None
    cls: type | None = dataclasses.field(default=None, compare=True, repr=False)
    source: str = "given"

    def __post_init__(self) -> None:
        # Hashed once: a walk keys every leaf on its owner and the modules around it.
        object.__setattr__(self, "_hash", hash((self.kind, self.type_name, self.cls, self.source)))

    def __hash__(self) -> int:
        return self._hash  # type: ignore[attr-defined]

    def __getstate__(self) -> dict[str, Any]:
        # Strings hash differently in another process: the hash is made again on load.
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        for name, value in state.items():
            object.__setattr__(self, name, value)
        self.__post_init__()

    def matches_class(self, wanted: type) -> bool:
        """Whether this module is an instance of ``wanted``.

        Where the framework gives no class (Linen params by name), a module whose
        inferred class name is ``wanted.__name__`` matches.
        """
        if self.cls is not None:
            return issubclass(self.cls, wanted)
        return self.type_name is not None and self.type_name == wanted.__name__


_FLOATING_PREFIXES = ("float", "bfloat", "complex")


def _vector_layout(kind: str, role: str, one: tuple[int, ...], layout: int) -> int:
    """Layout axes beyond ``layout`` of an array whose one layer's shape is ``one``,
    where its layer kind fixes its logical rank (:attr:`Leaf.layout_axes`)."""
    rank = len(one) - layout
    if rank <= 0:
        return 0
    if kind.endswith("_norm"):
        return rank - 1
    if kind == "prelu":
        return min(rank, sum(1 for size in one if size == 1))
    if kind == "conv" and role == "bias" and rank > 1 and all(size == 1 for size in one[1:rank]):
        return rank - 1
    return 0


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One array of a model, labelled in the framework-neutral vocabulary.

    Adapters make these; :meth:`Policy.decide` reads them. Build them by hand to give a
    new framework an adapter.

    Example:
      >>> import decaymask as dm
      >>> leaf = dm.Leaf("encoder/0/kernel", layer="linear", role="weight", shape=(8, 4))
      >>> leaf.name, leaf.ndim
      ('kernel', 2)
    """

    path: str
    """The canonical path: keys joined with ``/``, each key escaped so that the path
    names one array: a ``/`` inside a key is written ``%2F`` and a ``%`` is written
    ``%25`` (``{"a/b": x}`` is ``a%2Fb``, ``{"a": {"b": x}}`` is ``a/b``). ``path=``
    selectors match this text."""
    layer: str = "unknown"
    """The kind of the layer that owns the array."""
    role: str = "other"
    """What the array is for in that layer."""
    shape: tuple[int, ...] = ()
    dtype: str = "float32"
    name: str = ""
    """The framework's own attribute or key name; the last path key if not given."""
    layer_type: str | None = None
    """The owning layer's class name, ``None`` where unknown."""
    layer_class: type | None = dataclasses.field(default=None, repr=False)
    ancestors: tuple[Layer, ...] = dataclasses.field(default=(), repr=False)
    """The modules enclosing the owner, outermost first."""
    is_param: bool = True
    """False for state (running statistics, ``StateIndex`` values): never decayed."""
    kind_source: str = "given"
    """How the layer kind was found: one of ``KIND_SOURCES``."""
    batch_axes: int = 0
    """Leading axes added by stacking layers (scan, vmap): not part of the layer."""
    layout_axes: int = 0
    """Axes a framework's layout adds beyond the layer's logical rank, not counted by
    :attr:`ndim`: an Equinox conv bias ``(out, 1, 1)`` has 2 (Flax's is ``(out,)``), an
    Equinox WeightNorm gain ``(out, 1)`` has 1 (Flax's is ``(out,)``), a Flax attention
    bias ``(heads, head_dim)`` has 1 and its kernel ``(in, heads, head_dim)`` has 1
    (Equinox's are ``(out,)`` and ``(out, in)``).

    A norm's arrays are one value per feature whatever axes its features take, so
    every framework counts them as vectors: Flax's ``LayerNorm(feature_axes=(-2, -1))``
    scale ``(h, w)`` and Haiku's ``param_axis=(-2, -1)`` scale ``(1, h, w)`` have the
    axes beyond one as layout axes, as Equinox's ``LayerNorm((h, w))`` weight does. So
    do a convolution's bias ``(out, 1, ..., 1)`` its trailing axes (Equinox, Haiku
    over channels-first data) and a PReLU slope its axes of size 1 (Equinox's
    ``(1,)`` is one slope, as Flax's ``()`` is); the record counts these itself, on
    top of what the adapter gives."""
    matrix_axes: tuple[tuple[int, ...], tuple[int, ...]] | None = None
    """(reduction axes, output axes) of the array in one layer, batch axes not counted:
    the layout of a weight matrix, as Muon needs it. ``None`` where the adapter does
    not know the layout or the array is not a matrix."""
    shared_with: tuple[Leaf, ...] = dataclasses.field(default=(), repr=False)
    """Other views of this same array (a tied or shared parameter reached through
    another owner): each is decided too, and a disagreement is reported."""
    module_depths: tuple[int, ...] = dataclasses.field(default=(), repr=False)
    """Where the modules of ``ancestors + (owner,)`` stand in :attr:`path`: for each, the
    number of path keys that name it (``blocks/3/attn/qkv/weight`` owned by ``qkv`` in
    ``attn`` in ``blocks[3]`` in the root: ``(0, 2, 3, 4)``). ``()`` where the adapter
    does not say; ``layer_decay(blocks=cls)`` needs them."""

    def __post_init__(self) -> None:
        check_kind(self.layer, where=f"Leaf({self.path!r}, layer=...)", groups=False)
        check_role(self.role, where=f"Leaf({self.path!r}, role=...)")
        if not self.name:
            object.__setattr__(self, "name", self.path.rsplit("/", 1)[-1])
        if type(self.shape) is not tuple:
            object.__setattr__(self, "shape", tuple(self.shape))
        extra = _vector_layout(self.layer, self.role, self.shape[self.batch_axes:], self.layout_axes)
        if extra:
            object.__setattr__(self, "layout_axes", self.layout_axes + extra)
        if self.module_depths and len(self.module_depths) != len(self.ancestors) + 1:
            raise ValueError(
                f"Leaf({self.path!r}): module_depths has {len(self.module_depths)} entries "
                f"for {len(self.ancestors)} ancestors and the owner; give one per module "
                f"of ancestors + (owner,), or none."
            )

    @property
    def owner(self) -> Layer:
        """The owning layer as a :class:`Layer`."""
        return Layer(self.layer, self.layer_type, self.layer_class, self.kind_source)

    @property
    def ndim(self) -> int:
        """The rank of one layer's array, the same in every framework.

        Stacked leading axes (:attr:`batch_axes`) and layout axes (:attr:`layout_axes`)
        do not count: a bias is 1-D and a weight matrix 2-D in every framework.
        """
        return len(self.shape) - self.batch_axes - self.layout_axes

    def muon_axes(self) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
        """:attr:`matrix_axes` shifted past the stacked leading axes, as optax wants them."""
        if self.matrix_axes is None:
            return None
        reduction, output = self.matrix_axes
        b = self.batch_axes
        return tuple(a + b for a in reduction), tuple(a + b for a in output)

    @property
    def size(self) -> int:
        """The number of elements."""
        return math.prod(self.shape)

    @property
    def floating(self) -> bool:
        """Whether the dtype is floating point (or complex): only those can decay."""
        return str(self.dtype).startswith(_FLOATING_PREFIXES)
