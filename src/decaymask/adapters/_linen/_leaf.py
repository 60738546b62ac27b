"""The :class:`Leaf` record of one array: its role, stacked axes and matrix layout."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ...core._leaf import Leaf
from ...core._roles import role_from_name
from .._common import path_text
from .._einsum import einsum_matrix_axes
from .._stacks import Proof, agrees, lifted_at
from ._arrays import cached_dtype_name
from ._infer import LinenInference, LinenModule
from ._tables import ATTENTION_LAYOUT, layout_base, natural_ndim


class LinenReader(LinenInference):
    """What the walk reads of a module: its kind (:class:`LinenInference`) and the
    :class:`Leaf` record of one array."""

    lifted: dict[tuple[str, ...], Proof]  # by names: lifted modules (adapters/_stacks.py)

    def leaf_record(
        self,
        collection: str,
        path: tuple[str, ...],
        key: str,
        array: Any,
        module: LinenModule,
        direct: Mapping[str, Any],
    ) -> Leaf:
        """The record of the array ``key`` of the module ``module`` at ``path``, which
        owns ``direct`` in ``params``."""
        owner = module.absorbed_by or module
        layer = owner.layer
        # WeightNorm names its variables by path (`Dense_0/kernel/scale`).
        name = key.rsplit("/", 1)[-1]
        role = None
        if owner.registration is not None:
            role = owner.registration.role_of(name)
        if role is None:
            if module.wrapper and name == "scale" and "/" in key:
                # WeightNorm's gain (`Dense_0/kernel/scale`), not a norm's scale:
                # Equinox's WeightNorm calls it `g`, and both are gains.
                role = "gain"
            else:
                role = role_from_name(layer.kind, name, owner.key)
        shape = tuple(array.shape)
        batch_axes, known_rank = self._batch_axes(collection, path, key, name, shape, module)
        if collection == "params":
            text = path_text(path + (key,))
            depths = owner.depths
        else:
            # The collection's key comes first: every module but the root (which the
            # whole mapping names) stands one key further in.
            text = path_text((collection, *path, key))
            depths = tuple([d + 1 if d else 0 for d in owner.depths])
        matrix_axes = None
        if owner.registration is not None and collection == "params":
            axes = owner.registration.matrix_axes_of(name)
            if axes is not None:
                batch_axes = self._registered_batch(text, shape, axes, batch_axes, known_rank)
                matrix_axes = axes
        elif collection == "params" and known_rank:
            matrix_axes = self._kernel_matrix_axes(
                owner, module, path, name, len(shape) - batch_axes, direct
            )
        # A linear layer's kernel is one matrix and its bias one vector, however many
        # axes a DenseGeneral's (or an attention projection's) features take.
        layout_axes = 0
        if layer.kind == "linear" and collection == "params":
            if name == "kernel" and matrix_axes is not None:
                layout_axes = len(matrix_axes[0]) + len(matrix_axes[1]) - 2
            elif name == "kernel":
                layout_axes = max(0, len(shape) - batch_axes - 2)
            elif name == "bias":
                layout_axes = max(0, len(shape) - batch_axes - 1)
        elif collection == "params" and module.layout:
            # Axes a layout its arrays showed adds (a bias (out, 1, ..., 1)).
            layout_axes = dict(module.layout).get(name, 0)
        return Leaf(
            layout_axes=layout_axes,
            path=text,
            layer=layer.kind,
            role=role,
            shape=shape,
            dtype=cached_dtype_name(array),
            name=name,
            layer_type=layer.type_name,
            layer_class=layer.cls,
            ancestors=owner.ancestors,
            module_depths=depths,
            is_param=collection == "params",
            kind_source=layer.source,
            batch_axes=batch_axes,
            matrix_axes=matrix_axes,
        )

    def _batch_axes(
        self,
        collection: str,
        path: tuple[str, ...],
        key: str,
        name: str,
        shape: tuple[int, ...],
        module: LinenModule,
    ) -> tuple[int, bool]:
        """(stacked leading axes, whether one layer's rank is known) of an array.

        Traced, the rank the trace saw. By names: under a ``Scan``/``Vmap`` auto name,
        the axes beyond one layer's rank where the layer fixes it; the axes its own
        module's arrays prove (:attr:`LinenModule.batch`); and the axes of the lifted
        module around it (``lifted``), where the array agrees with them.
        """
        batch_axes = 0
        known_rank = True
        if self.trace is not None:
            inner = self.trace.ndims.get((collection, path + (key,)))
            if inner is not None:
                batch_axes = max(0, len(shape) - inner)
            return batch_axes, known_rank
        natural = self.one_layer_ndim(path, name, module)
        if module.stacked:
            if natural is not None:
                batch_axes = min(module.stacked, max(0, len(shape) - natural))
            known_rank = natural is not None
        elif module.batch is not None:
            # Its arrays proved layers stacked by a user-named nn.scan or nn.vmap (a
            # conv's bias beyond (out,), a bias repeating the kernel's leading axes),
            # which must not widen a conv kernel's window.
            batch_axes = min(module.batch, len(shape))
        proof = lifted_at(self.lifted, path) if self.lifted else None
        if proof is not None and agrees(shape, natural, proof, self.own_proof(shape, module)):
            # Inside a module whose arrays all agree with a stack that some of them prove.
            batch_axes, known_rank = max(batch_axes, proof[0]), True
        return batch_axes, known_rank

    @staticmethod
    def one_layer_ndim(path: tuple[str, ...], key: str, module: LinenModule) -> int | None:
        """The rank an array has in one layer known by its names, or ``None``: with the
        axes a layout its arrays showed adds (a conv bias (out, 1, ..., 1))."""
        name = key.rsplit("/", 1)[-1]
        ndim = natural_ndim(module.layer, path[-1] if path else "", name)
        return None if ndim is None else ndim + dict(module.layout).get(name, 0)

    @staticmethod
    def own_proof(shape: tuple[int, ...], module: LinenModule) -> Proof | None:
        """The stack an array's own module proves (:attr:`LinenModule.batch`), if any."""
        return (module.batch, tuple(shape[: module.batch])) if module.batch else None

    def _registered_batch(
        self,
        text: str,
        shape: tuple[int, ...],
        axes: tuple[tuple[int, ...], tuple[int, ...]],
        batch_axes: int,
        known_rank: bool,
    ) -> int:
        """The stacked axes of an array whose layout was registered, checked against it.

        The registered axes describe one layer's array: leading axes beyond them are
        stacked layers (``nn.scan``/``nn.vmap``), where the trace has not said so.

        Raises:
          ValueError: the array has fewer axes than the registered layout names.
        """
        needed = max((*axes[0], *axes[1])) + 1
        if self.trace is None or not known_rank:
            batch_axes = max(batch_axes, len(shape) - needed)
        if len(shape) - batch_axes < needed:
            where = f" ({batch_axes} of them stacked)" if batch_axes else ""
            raise ValueError(
                f"{self.fn}: {text} has shape {shape}{where}, but its layer was "
                f"registered with matrix_axes {axes}, which name axis {needed - 1} of "
                f"one layer's array. Fix: register the (reduction axes, output axes) of "
                f"one layer's array of rank {len(shape) - batch_axes}, e.g. "
                f"dm.register_layer(cls, kind, matrix_axes={{{text.rsplit('/', 1)[-1]!r}: "
                f"((0,), (1,))}}) for an (in, out) matrix."
            )
        return batch_axes

    def _general_sizes(
        self, direct: Mapping[str, Any], rank: int
    ) -> tuple[int, int, int] | None:
        """A DenseGeneral's axis counts read off its bias: the kernel's last axes."""
        kernel, bias = direct.get("kernel"), direct.get("bias")
        if kernel is None or bias is None:
            return None
        features = len(bias.shape)
        stacked = len(kernel.shape) - rank
        if not 0 < features < rank or bias.shape[stacked:] != kernel.shape[-features:]:
            return None
        return 0, rank - features, features

    def _kernel_matrix_axes(
        self,
        owner: LinenModule,
        module: LinenModule,
        path: tuple[str, ...],
        name: str,
        rank: int,
        direct: Mapping[str, Any],
    ) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
        """(reduction, output) axes of a weight matrix in Linen's (in, out) layouts.

        Only where a layout is known, never guessed: a class of :data:`KIND_TABLE` (by
        the trace or by its auto name; an ``Einsum`` by the equation the trace saw), an
        attention layer's projections and a Linen cell's gates. A module known by its names or arrays only (a user-named module,
        a third-party class such as GPT-2's ``(out, in)`` ``FlaxConv1D``) has none.
        """
        if name not in ("kernel", "embedding"):
            return None
        layer = module.layer
        base = layout_base(layer)
        if base is None and owner.cell and owner.trusted and name == "kernel":
            # Linen's cells build their gates as Dense (ConvLSTMCell: Conv) layers.
            base = {"linear": "Dense", "conv": "Conv"}.get(layer.kind)
        if base in ("Dense", "Embed") and rank == 2:
            return (0,), (1,)
        if base == "Conv" and rank >= 2:
            # (*window, in, out): a window position is part of the input of the matmul.
            return tuple(range(rank - 1)), (rank - 1,)
        if base == "ConvLocal" and rank >= 2:
            # (*out_window, window * in, out): one matrix per output position.
            return (rank - 2,), (rank - 1,)
        if base == "Einsum":
            # Traced, the equation it was called with says which axes contract.
            equation = self.trace.equations.get(path) if self.trace is not None else None
            return einsum_matrix_axes(equation, rank) if equation is not None else None
        if base == "DenseGeneral":
            sizes = self.trace.general.get(path) if self.trace is not None else None
            if sizes is None and layer.cls is None:
                if layer.type_name == "DenseGeneral" and path and path[-1] in ATTENTION_LAYOUT:
                    sizes = ATTENTION_LAYOUT[path[-1]]
                else:
                    sizes = self._general_sizes(direct, rank)
            if sizes is not None and sum(sizes) == rank:
                batch, reduction, _ = sizes
                return (
                    tuple(range(batch, batch + reduction)),
                    tuple(range(batch + reduction, rank)),
                )
        return None
