"""Layers stacked by a user-named lift (Linen ``nn.scan``/``nn.vmap``, Haiku
``hk.layer_stack(n, name=...)``), read by names alone.

No name shows such a stack; some arrays prove it (a bias repeating its kernel's leading
axes, a ``Dense`` or ``Linear`` kernel of three axes). The stack is
the whole lifted module, not the layers that happen to prove it: the layer norm beside
the ``Dense`` in each block is stacked too. The lifted module is taken to be the
outermost module all of whose arrays agree with the proof (the same leading sizes, and
one layer's rank where the layer fixes it); its arrays are all stacked alike. Where an
array disagrees (a leading size that differs, a norm's scale of the wrong rank, another
proof), no module above it is taken: never a guess.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

# (stacked leading axes, their sizes).
Proof = tuple[int, tuple[int, ...]]
# One array: (its module's path, its shape, its rank in one layer where the layer fixes
# it, the proof its own module gives).
Array = tuple[tuple[str, ...], tuple[int, ...], int | None, Proof | None]


def agrees(shape: tuple[int, ...], natural: int | None, proof: Proof, own: Proof | None) -> bool:
    """Whether an array can be stacked as ``proof`` says: its own module proves the same
    or nothing, its leading sizes are the stacked ones, and its rank in one layer (where
    known) is then right."""
    stacked, sizes = proof
    if own is not None and own != proof:
        return False
    if tuple(shape[:stacked]) != sizes:
        return False
    return natural is None or len(shape) - stacked == natural


def lifted_modules(arrays: Iterable[Array]) -> dict[tuple[str, ...], Proof]:
    """The lifted modules of a tree read by names, each with the axes it stacks.

    For each module whose arrays prove a stack, the outermost module around it (the
    root excluded: by names, the root owns what no module does) all of whose arrays
    agree with that proof. Two proofs never share a lifted module: each disagrees with
    the other's arrays.
    """
    arrays = list(arrays)
    proofs: dict[tuple[str, ...], Proof] = {
        path: own for path, _, _, own in arrays if own is not None
    }
    lifted: dict[tuple[str, ...], Proof] = {}
    for proof in set(proofs.values()):
        refused: set[tuple[str, ...]] = set()
        for path, shape, natural, own in arrays:
            if not agrees(shape, natural, proof, own):
                refused.update(path[:end] for end in range(1, len(path) + 1))
        for path, own in proofs.items():
            if own != proof:
                continue
            for end in range(1, len(path) + 1):
                if path[:end] not in refused:
                    lifted[path[:end]] = proof
                    break
    return lifted


def lifted_at(lifted: Mapping[tuple[str, ...], Proof], path: tuple[str, ...]) -> Proof | None:
    """The proof of the lifted module around the module at ``path``, if any."""
    for end in range(1, len(path) + 1):
        found = lifted.get(path[:end])
        if found is not None:
            return found
    return None
