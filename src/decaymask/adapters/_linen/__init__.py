"""The Flax Linen adapter: params or variables -> leaves -> a mask in the same containers.

The input is a params mapping or a whole variables mapping, as ``dict`` or
``FrozenDict``; the mask comes back in exactly the same containers (optax rejects a
mix), with one bool at each ``nn.Partitioned`` box so that it is a prefix of the boxed
params. A mapping is read as variables when it has a ``params`` key, every top-level
value is a mapping and every other top-level key looks like a collection (a Flax
collection name, or a mapping without arrays named like parameters); a key that is an
auto name (``Dense_0``) or holds parameters is a module beside a submodule named
``params``, and where both readings fit, the call asks for ``module=``. With
``module=``, the traced model decides. Equinox modules inside a mapping are turned
away (``for_equinox`` reads them). Canonical paths join keys with ``/``; in
variables, ``params`` paths drop their ``params/`` prefix (a glob written for params
works on both) and other collections keep theirs (``batch_stats/BatchNorm_0/mean``),
where every module but the root stands one key further in (``Leaf.module_depths``).
Other collections are state: never decayed.

Linen params carry no classes, only keys. Without a module, every mapping level is read
as a module, in this order:

1. A Flax auto name (``Dense_3``) gives a class name (``Dense``); a lift prefix is
   dropped (``ScanBlock_0`` is a ``Block`` stacked by ``nn.scan``). A class name the
   user registered with ``dm.register_layer`` gives its kind (``"registered"``), then
   a Linen class name from :data:`KIND_TABLE` (``"name"``).
2. Otherwise the shared inference (:func:`decaymask.core._infer.resolve_kind`) reads
   the class name (or the key: ``ln_f``, ``input_layernorm``) as words together with
   what the module owns: the names of its arrays, the rank each has in one layer and
   the keys of its submodules. Content decides where the two contradict (a
   ``FlaxConv1D`` with a 2-D kernel is linear, a ``ProjNorm`` owning a kernel is not a
   norm), and ``kind_source`` says which did (``"name"`` or ``"content"``). What only
   Linen shows is added: axes stacked by a ``Scan``/``Vmap`` auto name do not count; a
   bias whose leading axes repeat the kernel's shows layers stacked by a user-named
   ``nn.scan``/``nn.vmap`` (their kernels keep one layer's rank) and a bias equal to
   the kernel's last axes a ``DenseGeneral``; where both fit and say different kinds,
   the leaf is ``"ambiguous"``. The ``query``/``key``/``value``/``out`` children of an
   attention layer are its projections.

A user-named ``nn.scan``/``nn.vmap`` shows in no name. Read by names, its stacked axes
are proven by some arrays (a bias repeating the kernel's leading axes, a ``Dense_0``,
``Embed_0`` or attention projection with more axes than its class ever makes, a conv's
bias beyond ``(out,)``), and then given to every array of the lifted module: the
outermost module around the proof all of whose arrays have the same sizes in front and,
where the layer fixes it, one layer's rank behind them (the ``LayerNorm`` beside the
``Dense`` in each block). Where an array disagrees, no module above it is taken
(``adapters/_stacks.py``).

Two kinds of module own the arrays of modules inside them. A recurrent cell (Linen's
cells keep their gates in ``Dense`` or ``Conv`` children such as ``ii``/``hi``) owns
its gates' kernels and biases, with roles ``weight`` and ``bias``, exactly as an
Equinox ``GRUCell`` owns ``weight_ih``: ``layer="recurrent"`` selects the same arrays
in both. ``WeightNorm`` and ``SpectralNorm`` own the arrays they keep for the layer they
wrap, as a layer of that layer's kind. A cell does not own a child of another kind (a
norm inside a user's cell stays a norm).

With ``module=`` and ``args=``, ``model.init`` is traced abstractly (``jax.eval_shape``,
no arrays allocated) with a method interceptor that records the class of every module
path and the rank each array has inside its layer (so arrays stacked by ``nn.scan`` or
``nn.vmap`` get ``batch_axes``; by names alone, layers of a fixed rank under a
``Scan``/``Vmap`` auto name and the arrays of a lifted module a proof finds get them). A
class is looked up
in the registry, then in :data:`KIND_TABLE` (subclasses count); any other class name is
read with the module's arrays as in step 2, so the classes are never worse than the
names. A call compiled by ``nn.jit`` that jax has cached runs no Python: where the
trace saw no module at paths the params hold, it runs again with jit disabled, and a
``PolicyWarning`` names the paths it still misses.

``recorded=`` takes what a ``dm.record()`` block saw of the user's own ``init`` (the
same interceptor, recording every module's arrays' ranks and the variables' shapes) and
reads the recorded init whose params are the tree's exactly as its trace would be read.

Muon layouts (``matrix_axes``) are never guessed: they come from a class of
:data:`KIND_TABLE` (traced, or by its auto name), a registration (checked against each
array's rank, leading axes beyond it stacked), an attention layer's projections or a
Linen cell's gates. A module known by its names or arrays only has none.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from ...core._leaf import Leaf
from ...core._table import LeafTable
from .._contract import TreedefRebuild
from ._tables import KIND_TABLE as KIND_TABLE
from ._tables import WRAPPERS as WRAPPERS
from ._walk import LinenWalk

NON_FLOATING_FIX = "Keep integer and bool arrays out of the params handed to optax."


def walk(
    tree: Any,
    *,
    module: Any = None,
    args: Any = (),
    kwargs: Any = None,
    recorded: Any = None,
    method: str = "for_flax",
) -> tuple[LeafTable, Callable[[list[Any]], Any]]:
    """The leaves of a Linen mapping, and the function that puts one value per leaf back.

    The rebuilt tree has exactly the containers of ``tree`` (``dict`` or
    ``FrozenDict`` at every level) with one value at each array and at each
    ``nn.Partitioned`` box. Arguments as :func:`leaves`; ``recorded`` is what a
    ``dm.record()`` block saw, read in place of a trace of ``module=``; ``method``
    names the entry point in error messages.

    One walk reads every input (:class:`LinenWalk`): alike modules are inferred once,
    and the result is jax's treedef of ``tree`` (a box is a leaf) unflattened.
    """
    if not isinstance(tree, Mapping):
        raise TypeError(
            f"{method}: expected a Linen params or variables mapping (dict or FrozenDict), "
            f"got {type(tree).__name__}."
        )
    given_args = not (isinstance(args, tuple) and not args)
    if recorded is not None:
        from ._trace import recorded_inits

        if module is not None or given_args or kwargs is not None:
            raise TypeError(
                f"{method}(params, recorded=..., module=...): recorded= reads the init "
                f"recorded in a `with dm.record()` block, module=/args=/kwargs= trace "
                f"one more; pass one of them: policy.{method}(params, recorded=seen)."
            )
        module = recorded_inits(method, recorded)
    elif module is None and (given_args or kwargs is not None):
        raise TypeError(
            f"{method}(params, args=..., kwargs=...): these are example inputs for "
            f"tracing module=, but no module= was given. Pass the model too: "
            f"policy.{method}(params, module=model, args=(x,))."
        )
    state = LinenWalk(method, tree, module, args, kwargs)
    return state.leaves, TreedefRebuild(state.treedef)


def leaves(
    tree: Any, *, module: Any = None, args: Any = (), kwargs: Any = None
) -> list[Leaf]:
    """The :class:`Leaf` records of every array in a Linen mapping, in flattening order.

    Args:
      tree: a params mapping or a whole variables mapping (``{"params": ...,
        "batch_stats": ...}``), as ``dict`` or ``FrozenDict``. It is read as variables
        when it has a ``params`` key, every top-level value is a mapping and every
        other top-level key looks like a collection (see the module docstring); with
        ``module=``, the traced model decides (a model may name a submodule
        ``params``). Paths in
        ``params`` drop the ``params/`` prefix; other collections keep theirs
        (``batch_stats/BatchNorm_0/mean``) and are never decayed.
      module: the ``flax.linen.Module`` that made the params, to find the exact class
        of every layer by an abstract trace of ``module.init``.
      args: example inputs for ``module.__call__`` (only shapes and dtypes matter).
      kwargs: example keyword inputs for ``module.__call__``.

    Returns:
      One :class:`Leaf` per array, in ``jax.tree_util`` flattening order.

    Raises:
      TypeError: ``tree`` is not a mapping, holds Equinox modules, a leaf is not an
        array, or ``module=``/``args=``/``kwargs=`` are of the wrong type or missing.
      ValueError: the traced model's params differ from ``tree``'s, or without
        ``module=`` the tree fits both the variables and the params reading.

    Example:
      >>> import flax.linen as nn, jax, jax.numpy as jnp
      >>> from decaymask.adapters import _linen
      >>> model = nn.Sequential([nn.Dense(4), nn.LayerNorm()])
      >>> params = jax.eval_shape(model.init, jax.random.key(0), jnp.ones((1, 3)))
      >>> for leaf in _linen.leaves(params):
      ...     print(leaf.path, leaf.layer, leaf.role)
      layers_0/bias linear bias
      layers_0/kernel linear weight
      layers_1/bias layer_norm bias
      layers_1/scale layer_norm scale
    """
    return list(walk(tree, module=module, args=args, kwargs=kwargs, method="leaves")[0])
