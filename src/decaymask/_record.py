"""``dm.record()``: the layer classes of the user's own Flax Linen ``init``, seen while it
runs, so that reading its params needs no second (traced) ``init``."""

from __future__ import annotations

import sys
from types import TracebackType
from typing import Any


class Recording:
    """What a ``with dm.record() as seen:`` block saw: the layer classes of every Flax
    Linen ``init`` called inside it.

    Pass it to any ``for_flax`` method and to ``explain`` as ``recorded=seen``: the
    params are read as with ``module=model, args=(x,)``, from the init that made them,
    without tracing ``init`` a second time. Only classes, paths, ranks and shapes are
    kept, never the arrays. A block is entered once; ``inits`` counts the inits it saw
    (in the thread that entered it: Flax keeps its interceptors per thread).
    """

    __slots__ = ("_linen", "_context", "_state")

    def __init__(self) -> None:
        self._linen: Any = None  # the Linen interceptor, where flax.linen was imported
        self._context: Any = None
        self._state = "new"

    def __enter__(self) -> Recording:
        if self._state != "new":
            raise RuntimeError(
                "dm.record(): this recording was already used for a block; start a new "
                "one for each block: `with dm.record() as seen:`."
            )
        self._state = "open"
        # A Linen model exists only once flax.linen is imported: nothing is imported here.
        if "flax.linen" in sys.modules:
            import flax.linen as nn

            from .adapters._linen._trace import LinenRecording

            self._linen = LinenRecording()
            self._context = nn.intercept_methods(self._linen)
            self._context.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._state = "closed"
        context, self._context = self._context, None
        if context is not None:
            context.__exit__(exc_type, exc, traceback)
        if self._linen is not None and exc_type is None:
            from .adapters._linen._traced import prepare

            # Each init's params read once now: reading them later costs a walk.
            prepare(self._linen)

    @property
    def inits(self) -> int:
        """How many Linen inits the block recorded."""
        return 0 if self._linen is None else len(self._linen.traces)

    def __repr__(self) -> str:
        return f"<decaymask Recording: {self.inits} init(s), {self._state}>"


def record() -> Recording:
    """A context manager that records the layer classes of the Flax Linen ``init``
    called inside it, for ``for_flax(..., recorded=)`` and ``explain(..., recorded=)``.

    Reading Linen params with their exact classes otherwise takes
    ``module=model, args=(x,)``, which traces ``model.init`` once more (abstractly, but
    it costs as much Python as the init itself). Recording the init the program runs
    anyway costs little: a method interceptor notes each module's class and the rank
    of each array it holds. The init may be eager or inside a fresh ``jax.jit``; a
    ``jax.jit`` that jax has already compiled for these inputs runs no Python, and
    nothing is recorded.

    Example:
      >>> import decaymask as dm, flax.linen as nn, jax, jax.numpy as jnp
      >>> model = nn.Sequential([nn.Dense(4), nn.LayerNorm()])
      >>> with dm.record() as seen:
      ...     variables = model.init(jax.random.key(0), jnp.ones((1, 3)))
      >>> report = dm.Policy(dm.decay(layer="linear")).explain(variables, recorded=seen)
      >>> [(row.path, row.leaf.layer_type) for row in report]
      [('layers_0/bias', 'Dense'), ('layers_0/kernel', 'Dense'), ('layers_1/bias', 'LayerNorm'), ('layers_1/scale', 'LayerNorm')]
    """
    return Recording()
