"""The entry points of parameter groups with optax: the wrapped optimizer, its check,
and each framework's way of keeping gradients away from frozen leaves."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar, cast

if TYPE_CHECKING:
    import optax
    from flax import nnx

    from ._face import Policy

from ._needs import needs
from .core._text import visible_errors

M = TypeVar("M", bound=Mapping[Any, Any])


class GroupsFace:
    """Methods of :class:`decaymask.Policy` for training with parameter groups; they
    need jax and optax, imported on first use."""

    __slots__ = ()

    @visible_errors
    def wrap(
        self, tx: optax.GradientTransformation, *, full: Any = None, framework: str | None = None,
        **options: Any,
    ) -> optax.GradientTransformationExtraArgs:
        """``tx`` with this policy's learning-rate multipliers and frozen leaves.

        An ``optax.GradientTransformation``: frozen leaves get a zero update and no
        state in ``tx`` (an ``optax.MaskedNode`` in their place, as ``optax.masked``
        leaves), and every other update is multiplied by its multiplier
        (:meth:`lr_scales`) after ``tx``, so that with ``optax.adamw`` the decay term is
        scaled too: the semantics of a PyTorch parameter group. ``tx``'s own mask
        should be this policy's (``mask=policy.mask``): :meth:`verify` checks both.

        Args:
          tx: any ``optax.GradientTransformation`` (``optax.adamw(...)``,
            ``optax.chain(...)``, ``optax.inject_hyperparams(...)(...)``,
            ``optax.contrib.muon(...)``).
          full: the whole model or params, where ``tx`` is handed a part of them
            (the trainable half of ``eqx.partition`` or :meth:`split`, the state of
            :meth:`trainable_filter`, one branch of ``optax.partition``): layer ids
            number the blocks of the whole model, so the multipliers are worked out
            on ``full`` and looked up by path. Where the policy has
            :func:`layer_decay` and ``tx.init`` is handed such a part without
            ``full=``, ``init`` raises.
          framework: as :meth:`mask`, where the params could be read by several adapters.
          **options: the adapter's options (Linen ``module=``, NNX ``wrt=``...).

        Raises:
          TypeError: ``tx`` is not a gradient transformation.
          ValueError: (at ``init``) the layer-decay blocks cannot be found, or ``tx``
            is handed a part of the model without ``full=``.
        """
        from ._groups import wrap

        return wrap(cast("Policy", self), tx, framework, options, full)

    @visible_errors
    def verify(
        self, tx: optax.GradientTransformation, params: Any, *, full: Any = None,
        framework: str | None = None, **options: Any,
    ) -> None:
        """Checks with one probe that ``tx`` does to ``params`` what this policy says.

        The probe calls ``tx.init(params)`` once and ``tx.update`` three times from that
        state: with zero gradients, with gradients of ones, and with random signs at
        ``2 * params``. It changes nothing: no state is kept, no array is written (an
        NNX State is handed to ``tx.update`` without its Variable boxes, as
        ``nnx.Optimizer`` does). It then compares, leaf by leaf:

        - **decay**: with zero gradients, a leaf the policy decays moves by
          ``-c * m * r * p`` (``c`` the learning rate times the weight decay, the same
          for every leaf; ``m`` its multiplier, ``r`` its decay rate) and every other
          leaf stays where it is;
        - **multipliers**: with gradients of ones, an element-wise optimizer (sgd, adam,
          adamw, lion, with or without a global clip) moves every element of a trainable
          leaf alike, by one value times the leaf's multiplier (per layer for a stacked
          leaf);
        - **frozen leaves**: no update in any probe, and no array of their shape kept
          under their path in the optimizer's state.

        It catches a forgotten :meth:`wrap`, a missing ``mask=`` (every leaf
        decayed), a mask of another policy, a decay without the policy's rates, and
        multipliers applied twice, or where the policy has none.

        What it cannot check: multipliers where the step is not element-wise. Muon
        orthogonalises a matrix and normalises a vector, LAMB scales each leaf by its
        norm (a trust ratio), Adafactor by the params' scale: the probe with signs shows
        such a leaf, whose multiplier is then left unchecked; its decay and freezing are
        still checked. Multipliers are relative: the value most leaves share is taken as
        the base, and a multiplier every leaf shares cannot be told from the learning
        rate. Leaves whose values are all zero cannot show decay. Schedules are probed
        at their first step.

        Args:
          tx: the ``optax.GradientTransformation`` training ``params``.
          params: what ``tx.init`` is handed (Equinox ``eqx.filter(model, eqx.is_array)``,
            a Linen or Haiku params mapping, ``nnx.state(model, nnx.Param)``).
          full: the whole model or params, where ``params`` (and ``tx``) are a part
            of it (see :meth:`wrap`): the layer ids and multipliers expected are the
            whole model's.
          framework: as :meth:`Policy.mask`.
          **options: the adapter's options.

        Raises:
          VerifyError: (a ``ValueError``) the leaves where ``tx`` does not do what the
            policy says, each with its path, what was expected and what happened; or
            ``tx`` cannot be run on ``params`` (built for another structure), moved no
            leaf at all (a learning rate of 0 at the first step), or gave updates that
            are not finite (an eps that float16 rounds to 0).
          TypeError: ``tx`` is not a gradient transformation.

        Example:
          >>> import decaymask as dm, equinox as eqx, jax, optax
          >>> params = eqx.filter(eqx.nn.Linear(2, 2, key=jax.random.key(0)), eqx.is_array)
          >>> policy = dm.Policy(dm.decay(param="weight"), dm.lr(0.5, param="bias"))
          >>> policy.verify(policy.wrap(optax.adamw(0.1, mask=policy.mask)), params)
          >>> try:
          ...     policy.verify(optax.adamw(0.1, mask=policy.mask), params)
          ... except dm.VerifyError as err:
          ...     print(err.mismatches[0])
          bias: multiplier: expected the update times 0.5, got the update times 1 (no multiplier applied)
        """
        from ._verify import verify

        verify(cast("Policy", self), tx, params, full=full, framework=framework, **options)

    @visible_errors
    def trainable_filter(self, model: nnx.Module, **options: Any) -> Callable[[tuple[Any, ...], Any], bool]:
        """An NNX filter of the parameters this policy trains, for
        ``nnx.Optimizer(model, tx, wrt=...)`` and ``nnx.DiffState(0, ...)``, so that
        frozen parameters get neither gradients nor optimizer state.

        Args:
          model: an ``nnx.Module``.
          **options: ``wrt=``, the filter of the variables the optimizer updates
            (default ``nnx.Param``).
        """
        needs("policy.trainable_filter", "flax.nnx")
        from ._groups import trainable_filter

        return trainable_filter(cast("Policy", self), model, options)

    @visible_errors
    def split(self, params: M, *, framework: str | None = None, **options: Any) -> tuple[M, M]:
        """(trainable, frozen): a Linen or Haiku params mapping cut in two, each
        with only its own arrays (the same container types), so that
        ``jax.grad`` is taken with respect to the trainable half alone;
        :func:`decaymask.merge` puts them back together.

        Example:
          >>> import decaymask as dm, jax.numpy as jnp
          >>> policy = dm.Policy(dm.freeze(path="embed/*"))
          >>> params = {"embed": {"embedding": jnp.ones((4, 2))}, "head": {"kernel": jnp.ones((2, 3))}}
          >>> trained, frozen = policy.split(params, framework="linen")
          >>> list(trained), list(frozen)
          (['head'], ['embed'])
        """
        from ._groups import split

        return split(cast("Policy", self), params, framework, options)
