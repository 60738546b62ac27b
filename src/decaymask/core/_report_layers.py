"""The per-layer summary of a report, and the table helpers its views share."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._report import Decision


def _dims(row: Decision) -> str:
    if not row.decay:
        return "-"
    axes = row.leaf.muon_axes()
    if axes is None:
        return "unknown"
    reduction, output = axes
    return f"{reduction}->{output}"


def _notes(row: Decision, ranks: bool) -> str:
    """Marks where a selector reads framework-specific facts."""
    notes = ""
    leaf = row.leaf
    if ranks and leaf.ndim != len(leaf.shape):
        notes += f" [min_ndim counts {leaf.ndim} of its {len(leaf.shape)} axes]"
    if row.rule is not None and row.rule.name is not None:
        notes += " [name= is framework vocabulary]"
    return notes


def _ids_text(ids: int | tuple[int, ...] | None) -> str:
    """A layer id, or a stacked leaf's ids as runs: ``"3"``, ``"1-12"``, ``"1-3,7"``."""
    if ids is None:
        return "-"
    if not isinstance(ids, tuple):
        return str(ids)
    runs: list[list[int]] = []
    for i in ids:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def _scale_text(scale: float | tuple[float, ...]) -> str:
    """A multiplier to three significant digits; several as their range, ``"0.0317-0.75"``."""
    if isinstance(scale, tuple):
        low, high = min(scale), max(scale)
        return f"{low:.3g}" if low == high else f"{low:.3g}-{high:.3g}"
    return f"{scale:.3g}"


def _plural(count: int, one: str, many: str) -> str:
    return f"{count:,} {one if count == 1 else many}"


@dataclasses.dataclass(frozen=True)
class LayerRow:
    """One layer of the layer-decay ladder, as :meth:`Report.layers` sums it up."""

    id: int
    """The layer id: 0 the stem, 1 to n the blocks, n + 1 the rest."""
    leaves: int
    """The leaves in the layer; a leaf stacked along the layer axis counts once in each
    of its layers."""
    parameters: int
    """Their elements; a stacked leaf's share is its size over its number of layers."""
    multiplier: float | tuple[float, float]
    """The learning-rate multiplier of the layer's trained leaves: one float where
    they all agree, else ``(min, max)`` (an :func:`lr` rule on some of them); 0 where
    none is trained."""
    frozen: int
    """How many of the layer's leaves are frozen."""

    @property
    def frozen_text(self) -> str:
        """``"none"``, ``"all"``, or ``"k of n"``."""
        if self.frozen == 0:
            return "none"
        if self.frozen == self.leaves:
            return "all"
        return f"{self.frozen} of {self.leaves}"

    def cells(self) -> list[str]:
        """The row as :meth:`Report.layer_rows` shows it."""
        return [
            str(self.id),
            f"{self.leaves:,}",
            f"{self.parameters:,}",
            _scale_text(self.multiplier),
            self.frozen_text,
        ]

    def to_dict(self) -> dict[str, Any]:
        scale = self.multiplier
        return {
            "id": self.id,
            "leaves": self.leaves,
            "parameters": self.parameters,
            "lr": list(scale) if isinstance(scale, tuple) else scale,
            "frozen": self.frozen,
        }


_LAYER_HEADER = ["layer id", "leaves", "parameters", "lr", "frozen"]
_LAYER_NUMERIC = (True, True, True, False, False)


def _text_table(
    header: list[str], cells: list[list[str]], right: Sequence[bool] = ()
) -> list[str]:
    """Aligned columns, two spaces apart; the last column ragged (no trailing spaces)."""
    widths = [len(h) for h in header]
    for line in cells:
        widths = [max(w, len(c)) for w, c in zip(widths, line)]
    widths[-1] = 0
    right = list(right) + [False] * (len(header) - len(right))

    def fmt(line: list[str]) -> str:
        return "  ".join(
            c.rjust(w) if r else c.ljust(w) for c, w, r in zip(line, widths, right)
        ).rstrip()

    return [fmt(header), fmt(["-" * len(h) for h in header])] + [fmt(line) for line in cells]


def _markdown_table(header: list[str], cells: list[list[str]]) -> list[str]:
    def line(items: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in items) + " |"

    return [line(header), "| " + " | ".join("---" for _ in header) + " |"] + [
        line(c) for c in cells
    ]


def layer_rows_of(decisions: Iterable[Decision]) -> tuple[LayerRow, ...]:
    """The :class:`LayerRow` of every layer id the decisions hold, in id order."""
    found: dict[int, list[Any]] = {}
    for row in decisions:
        if row.layer_id is None:
            continue
        leaf = row.leaf
        trained = leaf.is_param and leaf.floating and not row.frozen
        if isinstance(row.layer_id, tuple):
            n = len(row.layer_id)
            scales = row.lr_scale if isinstance(row.lr_scale, tuple) else (row.lr_scale,) * n
            parts = [(i, leaf.size // n, s) for i, s in zip(row.layer_id, scales)]
        else:
            value = row.lr_scale
            parts = [(row.layer_id, leaf.size, min(value) if isinstance(value, tuple) else value)]
        for i, size, scale in parts:
            entry = found.setdefault(i, [0, 0, [], 0])
            entry[0] += 1
            entry[1] += size
            if trained:
                entry[2].append(float(scale))
            entry[3] += row.frozen
    out = []
    for i in sorted(found):
        leaves, size, scales, frozen = found[i]
        low, high = (min(scales), max(scales)) if scales else (0.0, 0.0)
        multiplier: float | tuple[float, float] = low if low == high else (low, high)
        out.append(LayerRow(i, leaves, size, multiplier, frozen))
    return tuple(out)
