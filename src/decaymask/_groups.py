"""Parameter groups with optax: the wrapped optimizer, and each framework's way of
keeping gradients away from frozen leaves. Imports jax and optax on first use."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .core._text import visible_errors

if TYPE_CHECKING:
    import optax

    from ._face import Policy


def check_transformation(tx: Any, method: str) -> None:
    """Raises unless ``tx`` is an optax gradient transformation (an init/update pair)."""
    init, update = getattr(tx, "init", None), getattr(tx, "update", None)
    if callable(init) and callable(update) and not isinstance(tx, type):
        return
    hint = ""
    if callable(tx) and not isinstance(tx, type):
        hint = (
            " It is callable: if it makes a transformation (optax.adamw itself, or an "
            "inject_hyperparams factory), call it with its hyperparameters first."
        )
    elif isinstance(tx, type):
        hint = " It is a class: pass an instance."
    raise TypeError(
        f"policy.{method}(tx): expected an optax.GradientTransformation (with init and "
        f"update), e.g. optax.adamw(1e-3, weight_decay=0.05, mask=policy.mask); got "
        f"{_described(tx)}.{hint}"
    )


def _described(value: Any) -> str:
    """``value`` as an error shows it: a class or function by its full name, anything
    else by a short repr and its type."""
    import inspect
    import reprlib

    if isinstance(value, type) or inspect.isroutine(value):
        what = "class" if isinstance(value, type) else "function"
        name = getattr(value, "__qualname__", getattr(value, "__name__", "?"))
        return f"the {what} {getattr(value, '__module__', '?')}.{name}"
    return f"{reprlib.repr(value)} ({type(value).__name__})"


def wrap(
    policy: Policy, tx: Any, framework: str | None, options: dict[str, Any], full: Any = None
) -> optax.GradientTransformationExtraArgs:
    """See :meth:`decaymask.Policy.wrap`."""
    check_transformation(tx, "wrap")
    import jax
    import jax.numpy as jnp
    import optax

    reference = None if full is None else Reference(policy, full, framework, options)

    def trainable(tree: Any) -> Any:
        return policy._build("trainable", tree, framework, "wrap", options)

    def scales(tree: Any) -> Any:
        return policy._build("lr_scales", tree, framework, "wrap", options)

    inner = optax.masked(tx, trainable)

    def factors(tree: Any, what: str) -> list[Any]:
        """One multiplier per leaf of ``tree``, in its flattening order."""
        if reference is not None:
            out = reference.factors(tree)
        else:
            out = jax.tree_util.tree_leaves(scales(tree))
        leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
        if len(out) != len(leaves):
            raise ValueError(_not_arrays(leaves, len(out), what))
        return out

    def init_fn(params: Any) -> Any:
        if not _is_placeholder(params):
            if reference is None:
                refused = check_whole(policy, params, framework, options)
                if refused is not None:
                    raise ValueError(refused)
            factors(params, "params")  # a ladder that cannot be found fails here, not at the first step
        return inner.init(params)

    def scale(s: Any, u: Any) -> Any:
        if type(s) is float:
            if s == 1.0:
                return u
            if s == 0.0:
                # Zeros that depend on u, so that jit keeps u's sharding (a constant
                # comes out replicated on every device); not u * 0, which a frozen
                # leaf's inf or nan gradient would turn into nan. To spare the frozen
                # gradients' computation too, take no gradient of frozen leaves (each
                # framework's split: policy.trainable, trainable_filter, split).
                return jnp.zeros_like(u) * jnp.isfinite(u)
            return u * s
        return u * jnp.asarray(s, dtype=u.dtype)

    def update_fn(updates: Any, state: Any, params: Any = None, **extra: Any) -> Any:
        new, state = inner.update(updates, state, params, **extra)
        # One multiplier per array, in the flattening order of both trees: the updates
        # keep their own structure (an NNX State keeps its Variable boxes).
        leaves, treedef = jax.tree_util.tree_flatten(new)
        scaled = [scale(s, u) for s, u in zip(factors(updates, "updates"), leaves)]
        return jax.tree_util.tree_unflatten(treedef, scaled), state

    # Their errors (a tree that is not the policy's, a frozen leaf's update) are shown
    # as visible text, as every entry point's are.
    return optax.GradientTransformationExtraArgs(
        visible_errors(init_fn), visible_errors(update_fn)
    )


class Reference:
    """The multipliers of a whole model, looked up by path for any part of it: a
    part (the trainable half, one branch of ``optax.partition``) lacks blocks, and
    layer ids need them all. Keeps the multipliers by path and, per structure of a
    part, the list it gave; never the model."""

    def __init__(self, policy: Policy, full: Any, framework: str | None, options: dict[str, Any]):
        from ._face import _per_layer_arrays

        report = policy.explain(full, framework=framework, **options)
        values = _per_layer_arrays([row.lr_scale for row in report], [row.leaf for row in report])
        self.by_path: dict[str, Any] = {row.path: v for row, v in zip(report, values)}
        self.framework = framework
        self.options = options
        self.memo: dict[Any, list[Any]] = {}

    def factors(self, tree: Any) -> list[Any]:
        """The multiplier of every array of ``tree``, a part of the whole model."""
        import jax

        from . import adapters

        treedef = jax.tree_util.tree_structure(tree)
        found = self.memo.get(treedef)
        if found is None:
            adapter = adapters.choose(tree, self.framework, "wrap", self.options)
            leaves, _ = adapter.walk(tree, method="wrap", **self.options)
            paths = [leaf.path for leaf in leaves]
            missing = [p for p in paths if p not in self.by_path]
            if missing:
                shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
                raise ValueError(
                    f"policy.wrap(tx, full=...): the params tx is handed hold arrays the "
                    f"full tree does not ({shown}); pass the whole model or params the "
                    f"trained part was cut from."
                )
            found = self.memo[treedef] = [self.by_path[p] for p in paths]
        return found


def check_whole(
    policy: Policy, params: Any, framework: str | None, options: dict[str, Any], method: str = "wrap"
) -> str | None:
    """Layer ids count every block: the message refusing a part of the model (the
    trainable half, a branch of ``optax.partition``) where the policy has layer decay
    and no ``full=`` was given, else ``None``.

    A trainable half is told by its freeze rules: none matches any of its arrays."""
    if policy.layer_decay is None:
        return None
    from . import adapters

    adapter = adapters.choose(params, framework, method, options)
    freezes = [rule for rule in policy.rules if rule.frozen]
    if adapter.is_partial(params):
        why = "one branch of optax.partition (the other branches' arrays masked out)"
    elif freezes:
        leaves, _ = adapter.walk(params, method=method, **options)
        if any(rule.matches(leaf) for leaf in leaves if leaf.is_param for rule in freezes):
            return None
        why = (
            "params that no freeze rule of the policy matches: they look like the "
            "trainable part alone (eqx.partition, policy.split, trainable_filter)"
        )
    else:
        return None
    handed = "tx.init was handed" if method == "wrap" else "it was handed"
    return (
        f"policy.{method}: {handed} {why}, and layer decay numbers the blocks of "
        f"the whole model: ids worked out on a part would shift. Fix: give the whole "
        f"model or params, policy.{method}({'tx' if method == 'wrap' else 'tx, params'}, "
        f"full=model) (full=params where these are the whole model)."
    )


def _not_arrays(leaves: list[tuple[Any, Any]], arrays: int, what: str) -> str:
    """The message for params or updates with leaves the policy does not decide."""
    from .adapters._common import is_array_like, path_text

    found = [
        f"{path_text(path)}: {type(leaf).__name__}"
        for path, leaf in leaves
        if not is_array_like(leaf)
    ]
    if not found:
        return (
            f"policy.wrap: the policy decided {arrays} arrays in {what} of "
            f"{len(leaves)} leaves; pass the params and updates as the framework "
            f"makes them (policy.explain(params) lists what the policy sees)."
        )
    shown = ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
    return (
        f"policy.wrap: the {what} hold leaves that are not arrays ({shown}); the "
        f"policy decides arrays only, and optax would update the others unscaled. "
        f"Fix: keep them out of the params and the updates, e.g. eqx.filter(model, "
        f"eqx.is_inexact_array) rather than eqx.is_inexact_array_like, or mark the "
        f"field static."
    )


def _is_placeholder(params: Any) -> bool:
    """Whether ``params`` is the stand-in ``optax.tree_utils.tree_map_params`` passes to
    ``init`` to find where the state holds params-shaped trees: it has no leaves to
    decide, and ``optax.masked`` passes it through unmasked."""
    try:
        from optax.tree_utils._state_utils import _ParamsPlaceholder
    except ImportError:  # a later optax: let the build say what it makes of it
        return False
    return isinstance(params, _ParamsPlaceholder)


def trainable_filter(policy: Policy, model: Any, options: dict[str, Any]) -> Any:
    """An NNX filter of the trainable parameters of ``model``: see
    :meth:`decaymask.Policy.trainable_filter`."""
    from flax import nnx

    wrt = options.get("wrt", nnx.Param)
    state = nnx.state(model, wrt)
    flags = policy._build("trainable", state, "nnx", "trainable_filter", options)
    trained = frozenset(
        tuple(path) for path, value in nnx.to_flat_state(flags) if _flag(value)
    )
    return _TrainableFilter(trained, wrt)


def _flag(value: Any) -> bool:
    return bool(getattr(value, "value", value))


class _TrainableFilter:
    """An NNX filter: ``True`` for a variable whose path the policy trains."""

    __slots__ = ("paths", "wrt")

    def __init__(self, paths: frozenset[tuple[Any, ...]], wrt: Any):
        self.paths = paths
        self.wrt = wrt

    def __call__(self, path: tuple[Any, ...], value: Any) -> bool:
        return tuple(path) in self.paths

    def __repr__(self) -> str:
        return f"<decaymask trainable filter: {len(self.paths)} variables>"

    def __hash__(self) -> int:
        return hash(self.paths)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _TrainableFilter) and other.paths == self.paths


def split(policy: Policy, params: Any, framework: str | None, options: dict[str, Any]) -> tuple[Any, Any]:
    """(trainable, frozen) halves of a params mapping: see :meth:`decaymask.Policy.split`."""
    if not isinstance(params, Mapping):
        raise TypeError(
            f"policy.split(params): expected a Linen or Haiku params mapping, got "
            f"{type(params).__name__}. For Equinox use eqx.partition(model, "
            f"policy.trainable(model)); for NNX, policy.trainable_filter(model)."
        )
    flags = policy._build("trainable", params, framework, "split", options)
    return _halves(params, flags, True), _halves(params, flags, False)


def _halves(tree: Mapping[str, Any], flags: Any, keep: bool) -> Any:
    out = {}
    for key, value in tree.items():
        flag = flags[key]
        if isinstance(value, Mapping):
            half = _halves(value, flag, keep)
            if half:
                out[key] = half
        elif bool(flag) is keep:
            out[key] = value
    return _like(tree, out)


def _like(tree: Mapping[str, Any], items: dict[str, Any]) -> Any:
    if type(tree) is dict:
        return items
    kind: Any = type(tree)
    try:
        return kind(items)  # FrozenDict, OrderedDict
    except TypeError:
        return items


@visible_errors
def merge(first: Any, second: Any) -> Any:
    """The params mapping that :meth:`decaymask.Policy.split` halved: every key of both.

    Example:
      >>> import decaymask as dm
      >>> dm.merge({"head": {"w": 1}}, {"head": {"b": 2}, "embed": {"e": 3}})
      {'head': {'w': 1, 'b': 2}, 'embed': {'e': 3}}
    """
    if not isinstance(first, Mapping) or not isinstance(second, Mapping):
        raise TypeError(
            f"dm.merge(a, b): expected the two params mappings policy.split gave, got "
            f"{type(first).__name__} and {type(second).__name__}."
        )
    out = dict(first)
    for key, value in second.items():
        if key in out:
            mine = out[key]
            if isinstance(mine, Mapping) and isinstance(value, Mapping):
                out[key] = merge(mine, value)
            else:
                raise ValueError(
                    f"dm.merge: both halves hold {key!r}; merge the two halves of one "
                    f"policy.split."
                )
        else:
            out[key] = value
    return _like(first, out)
