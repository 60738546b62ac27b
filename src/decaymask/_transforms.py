"""An optax transformation that decays every leaf by its own rate."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._needs import needs
from .core._text import visible_errors

if TYPE_CHECKING:
    import optax


def add_decayed_weights(weight_decay: Any, rates: Any) -> optax.GradientTransformation:
    """``optax.add_decayed_weights`` with a rate per leaf: adds ``weight_decay * rate * p``.

    Use it where ``optax.adamw`` would apply its decay, with the rates of a policy whose
    rules carry ``rate=``:
    ``optax.chain(optax.scale_by_adam(), dm.add_decayed_weights(0.1,
    policy.rates_for_equinox), optax.scale_by_learning_rate(lr))``. A leaf of rate 0 is
    left exactly as it is.

    Args:
      weight_decay: the base decay, a float or a scalar array.
      rates: a tree of floats with the params' structure (``None`` where the params have
        none), or a function of the params returning one, such as
        ``policy.rates_for_equinox`` or ``policy.rates_for_flax``. Pass the function for
        Equinox models: a rates tree shaped like a callable module would be called.

    Returns:
      An ``optax.GradientTransformation`` with no state.

    Raises:
      ImportError: jax or optax is not installed; the message names the extras that
        bring them.

    Example:
      >>> import decaymask as dm, jax.numpy as jnp
      >>> tx = dm.add_decayed_weights(0.5, {"w": 2.0, "b": 0.0})
      >>> params = {"w": jnp.ones(2), "b": jnp.ones(2)}
      >>> updates, _ = tx.update({"w": jnp.zeros(2), "b": jnp.zeros(2)}, tx.init(params), params)
      >>> updates["w"].tolist(), updates["b"].tolist()
      ([1.0, 1.0], [0.0, 0.0])
    """
    needs("dm.add_decayed_weights", "jax", "optax")
    import jax
    import optax

    def init_fn(params: Any) -> optax.EmptyState:
        del params
        return optax.EmptyState()

    def update_fn(updates: Any, state: optax.OptState, params: Any = None) -> tuple[Any, optax.OptState]:
        if params is None:
            raise ValueError(
                "dm.add_decayed_weights needs the params: call tx.update(updates, state, "
                "params)."
            )
        tree = rates(params) if callable(rates) else rates

        def one(update: Any, param: Any, rate: Any) -> Any:
            if not isinstance(rate, (int, float)) or isinstance(rate, bool):
                raise TypeError(
                    f"dm.add_decayed_weights: a rate must be a float, got {rate!r} "
                    f"({type(rate).__name__}); build rates with policy.rates_for_*."
                )
            if rate == 0:
                return update
            return update + (weight_decay * rate) * param

        return jax.tree.map(one, updates, params, tree), state

    return optax.GradientTransformation(init_fn, visible_errors(update_fn))
