"""Random models and policies for the property tests, and an oracle that decides them.

Each framework has a small spec language (frozen dataclasses, so that a failing example
prints readably), a Hypothesis strategy that draws specs, a builder that turns a spec
into a real model, and a function that lists, from the spec alone, every array the
model holds: its canonical path, the layer that owns it (kind and class), the modules
around that layer, its role, its name, its rank in one layer, and whether it is a
parameter. The oracle decides a drawn policy on those records with the rules as the
design states them (the last matching rule wins, the default otherwise; state and
non-floating arrays never decay). Nothing here calls decaymask to decide anything.

The generators keep out what the design leaves open, so that the oracle never has to
guess: Equinox stacks hold no PReLU (its slope may be an array of any shape, so a stack
of scalar slopes looks like one vector slope); Linen layers that names alone cannot
tell apart (norms holding only scale and bias) keep Flax's auto names, lifted blocks are
auto-named and hold layers of a fixed rank, and user names say nothing about a kind;
arrays held by user modules are named with the documented standard names (weight, bias,
scale) or with names that are none of them.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from collections import Counter
from collections.abc import Callable
from typing import Any

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from hypothesis import strategies as st

import decaymask as dm

# The vocabulary, written out here rather than read from decaymask.
KINDS = (
    "linear", "conv", "embedding", "layer_norm", "rms_norm", "group_norm", "batch_norm",
    "instance_norm", "attention", "recurrent", "prelu", "lora", "unknown",
)
ROLES = ("weight", "bias", "scale", "embedding", "other")
_STANDARD_ROLES = {"weight": "weight", "bias": "bias", "scale": "scale", "embedding": "embedding"}


# Records and the oracle.


@dataclasses.dataclass(frozen=True)
class Mod:
    """A module on the way to an array: its kind, its class, and the class name a
    reader of names alone knows it by (``None`` where the name says nothing)."""

    kind: str
    cls: type | None
    type_name: str | None

    def __repr__(self) -> str:
        return f"Mod({self.kind}, {self.type_name or getattr(self.cls, '__name__', None)})"


@dataclasses.dataclass(frozen=True)
class Expect:
    """What one array is, as the model was built."""

    path: str
    owner: Mod
    ancestors: tuple[Mod, ...]
    role: str
    name: str
    ndim: int
    is_param: bool = True
    floating: bool = True


@dataclasses.dataclass(frozen=True)
class E:
    """One array of a layer, relative to the layer: path, modules from the layer down
    to the owner (the owner last), name, role, rank in one layer."""

    rel: tuple
    chain: tuple[Mod, ...]
    name: str
    role: str
    ndim: int
    is_param: bool = True
    floating: bool = True


@dataclasses.dataclass(frozen=True)
class RuleSpec:
    decay: bool
    selectors: tuple[tuple[str, Any], ...]

    def build(self) -> dm.Rule:
        make = dm.decay if self.decay else dm.no_decay
        return make(**dict(self.selectors))


@dataclasses.dataclass(frozen=True)
class PolicySpec:
    rules: tuple[RuleSpec, ...]
    default: bool

    def build(self) -> dm.Policy:
        return dm.Policy(*(r.build() for r in self.rules), default=self.default)


def _as_tuple(value: Any) -> tuple:
    return value if isinstance(value, tuple) else (value,)


def _mod_matches(mod: Mod, wanted: tuple) -> bool:
    for item in wanted:
        if isinstance(item, str):
            if mod.kind == item or (item == "norm" and mod.kind.endswith("_norm")):
                return True
        elif mod.cls is not None:
            if issubclass(mod.cls, item):
                return True
        elif mod.type_name is not None and mod.type_name == item.__name__:
            return True
    return False


def _path_matches(path: str, pattern: Any) -> bool:
    if isinstance(pattern, re.Pattern):
        return pattern.search(path) is not None
    return fnmatch.fnmatchcase(path, pattern)


def rule_matches(rule: RuleSpec, leaf: Expect) -> bool:
    for key, value in rule.selectors:
        values = _as_tuple(value)
        if key == "layer":
            ok = _mod_matches(leaf.owner, values)
        elif key == "within":
            ok = _mod_matches(leaf.owner, values) or any(
                _mod_matches(a, values) for a in leaf.ancestors
            )
        elif key == "param":
            ok = leaf.role in values
        elif key == "name":
            ok = leaf.name in values
        elif key == "path":
            ok = any(_path_matches(leaf.path, p) for p in values)
        elif key == "min_ndim":
            ok = leaf.ndim >= value
        else:  # pragma: no cover
            raise AssertionError(key)
        if not ok:
            return False
    return True


def oracle(policy: PolicySpec, leaves: list[Expect]) -> dict[str, bool]:
    """The decision on every array, by path."""
    out = {}
    for leaf in leaves:
        decision = False
        if leaf.is_param and leaf.floating:
            decision = policy.default
            for rule in reversed(policy.rules):
                if rule_matches(rule, leaf):
                    decision = rule.decay
                    break
        out[leaf.path] = decision
    return out


def unknown_role(name: str) -> str:
    """The role of an array a module of unknown kind holds under ``name``."""
    return _STANDARD_ROLES.get(name, "other")


def join(path: tuple) -> str:
    return "/".join(str(k) for k in path)


def key_text(entry: Any) -> str:
    """One jax key-path entry as the canonical path writes it."""
    for attr in ("name", "key", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    raise AssertionError(entry)


def flat_by_path(tree: Any) -> dict[str, Any]:
    """Leaves keyed by canonical path (keys joined with ``/``)."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(key_text(k) for k in path): leaf for path, leaf in flat}


def nonzero(shape: tuple, dtype: Any, seed: int) -> np.ndarray:
    """Distinct values in [0.5, 1.5): a zero would look the same decayed or not."""
    rng = np.random.default_rng(seed)
    if np.issubdtype(np.dtype(dtype), np.integer):
        return rng.integers(1, 9, shape).astype(dtype)
    return rng.uniform(0.5, 1.5, shape).astype(dtype)


# Policies.


def _kinds_and_classes(leaves: list[Expect]) -> tuple[list[str], list[type]]:
    kinds, classes = set(), set()
    for leaf in leaves:
        for mod in (leaf.owner, *leaf.ancestors):
            kinds.add(mod.kind)
            if mod.cls is not None:
                classes.add(mod.cls)
    return sorted(kinds), sorted(classes, key=lambda c: c.__qualname__)


def _globs(path: str) -> st.SearchStrategy:
    parts = path.split("/")
    options = [path, "*/" + parts[-1], "*" + parts[-1][-2:]]
    for i in range(len(parts)):
        options.append("/".join(parts[:i] + ["*"] + parts[i + 1 :]))
        if i:
            options.append("/".join(parts[:i]) + "/*")
    regexes = [re.compile(re.escape(parts[-1]) + "$"), re.compile("^" + re.escape(parts[0]))]
    regexes += [re.compile(re.escape(p)) for p in parts[:-1]]
    return st.sampled_from(options + regexes)


def _one_or_two(first: st.SearchStrategy, second: st.SearchStrategy | None = None):
    """One value, or now and then a pair of distinct values ("any of these")."""

    def pair(values: tuple) -> Any:
        return values[0] if repr(values[0]) == repr(values[1]) else values

    return st.one_of(first, first, st.tuples(first, first if second is None else second).map(pair))


def _selector_strategies(leaves, extra_classes, min_ndim):
    kinds, classes = _kinds_and_classes(leaves)
    classes = sorted(set(classes) | set(extra_classes), key=lambda c: c.__qualname__)
    owner_kinds = sorted({leaf.owner.kind for leaf in leaves}) or ["linear"]
    names = sorted({leaf.name for leaf in leaves}) or ["weight"]
    paths = sorted({leaf.path for leaf in leaves}) or ["weight"]
    any_kind = st.sampled_from(KINDS + ("norm",))
    layer_value = st.one_of(st.sampled_from(owner_kinds), any_kind)
    within_value = st.one_of(st.sampled_from(kinds or ["unknown"]), any_kind)
    if classes:
        layer_value = st.one_of(layer_value, st.sampled_from(classes))
        within_value = st.one_of(within_value, st.sampled_from(classes))
    found = {
        "layer": layer_value,
        "within": within_value,
        "param": st.sampled_from(ROLES),
        "name": st.sampled_from(names),
        "path": st.sampled_from(paths).flatmap(_globs),
        "min_ndim": st.integers(0, 4),
    }
    if not min_ndim:
        del found["min_ndim"]
    return found


_SINGLE = ("path", "min_ndim")  # selectors that take one value here


def _about(leaf: Expect, key: str, anything: dict) -> st.SearchStrategy:
    """Values of selector ``key`` that ``leaf`` matches, now and then paired with any
    other value (a tuple means "any of these")."""
    mods = (leaf.owner, *leaf.ancestors)
    if key == "layer":
        own = [leaf.owner.kind] + (["norm"] if leaf.owner.kind.endswith("_norm") else [])
        own += [c for c in (leaf.owner.cls,) if c is not None]
        own += [b for b in getattr(leaf.owner.cls, "__mro__", ())[1:2] if b is not object]
        if leaf.owner.type_name is not None and leaf.owner.cls is None:
            own += [c for c in anything["classes"] if c.__name__ == leaf.owner.type_name]
        value = st.sampled_from(own)
    elif key == "within":
        own = [m.kind for m in mods] + [m.cls for m in mods if m.cls is not None]
        own += [c for m in mods if m.cls is None and m.type_name is not None
                for c in anything["classes"] if c.__name__ == m.type_name]
        value = st.sampled_from(own)
    elif key == "param":
        value = st.just(leaf.role)
    elif key == "name":
        value = st.just(leaf.name)
    elif key == "path":
        return _globs(leaf.path)
    else:
        return st.integers(max(0, leaf.ndim - 1), leaf.ndim + 1)
    return st.one_of(value, _one_or_two(value, anything[key]))


@st.composite
def rules(draw, leaves: list[Expect], extra_classes: tuple = (), min_ndim: bool = True,
          default: bool = False):
    """A rule: mostly aimed at one array of the model (so that it matches it and maybe
    others), sometimes with values drawn from the whole vocabulary."""
    anything = _selector_strategies(leaves, extra_classes, min_ndim)
    keys = list(anything)
    # Every draw below shrinks towards a rule aimed at one array, with one selector.
    if draw(st.integers(0, 9)) == 9:
        chosen = []  # a rule with no selector: it matches everything
    else:
        chosen = sorted(draw(st.lists(st.sampled_from(keys), min_size=1, max_size=3,
                                      unique=True)))
    if leaves and draw(st.integers(0, 3)) != 3:
        leaf = draw(st.sampled_from(leaves))
        classes = sorted(set(_kinds_and_classes(leaves)[1]) | set(extra_classes),
                         key=lambda c: c.__qualname__)
        context = {**anything, "classes": classes}
        selectors = tuple((key, draw(_about(leaf, key, context))) for key in chosen)
    else:
        selectors = tuple(
            (key, draw(anything[key] if key in _SINGLE else _one_or_two(anything[key])))
            for key in chosen
        )
    # Mostly against the default, so that the rule shows in the mask.
    return RuleSpec(draw(st.sampled_from([not default, not default, not default, default])),
                    selectors)


@st.composite
def policies(draw, leaves: list[Expect], extra_classes: tuple = (), min_ndim: bool = True):
    default = draw(st.booleans())
    drawn = draw(st.lists(rules(leaves, extra_classes, min_ndim, default), min_size=1,
                          max_size=5))
    return PolicySpec(tuple(drawn), default)


# Specs shared by the frameworks.


@dataclasses.dataclass(frozen=True)
class Layer:
    """A layer of the table; ``a`` and ``b`` switch its optional arrays (biases,
    scales) or its depth; ``stack`` > 0 builds that many copies stacked (vmap, scan);
    ``name`` is a Linen user name (``None``: Flax's auto name)."""

    id: str
    a: bool = True
    b: bool = True
    stack: int = 0
    name: str | None = None


@dataclasses.dataclass(frozen=True)
class Raw:
    """An array held directly by a user module."""

    shape: tuple[int, ...]
    dtype: str = "float32"  # "float32", "int32" or "numpy" (a float32 numpy array)


@dataclasses.dataclass(frozen=True)
class Value:
    """A field that is not an array."""

    what: str  # "int", "str", "fn", "none", "float"


@dataclasses.dataclass(frozen=True)
class Seq:
    items: tuple
    kind: str = "list"  # "list" or "tuple" (Equinox); "list" is nnx.List for NNX


@dataclasses.dataclass(frozen=True)
class Map:
    items: tuple  # ((key, node), ...)


@dataclasses.dataclass(frozen=True)
class Node:
    """A user module: ``cls`` names one of the framework's user classes."""

    cls: str
    fields: tuple  # ((name, node), ...)
    name: str | None = None  # Linen user name


_FLAG = st.booleans().map(lambda b: not b)  # shrinks towards True: every optional array
_VALUES = {"int": 3, "str": "relu", "fn": jax.nn.relu, "none": None, "float": 0.5}
_RAW_SHAPES = st.sampled_from([(3,), (2, 3), (2,)])


def _raw_array(raw: Raw, seed: int) -> Any:
    if raw.dtype == "int32":
        return jnp.asarray(nonzero(raw.shape, np.int32, seed))
    value = nonzero(raw.shape, np.float32, seed)
    return value if raw.dtype == "numpy" else jnp.asarray(value)


class _Seeds:
    def __init__(self) -> None:
        self.n = 0

    def __call__(self) -> int:
        self.n += 1
        return self.n


# Equinox.


class Block(eqx.Module):
    body: Any
    extra: Any
    tag: str = eqx.field(static=True)


class Stage(eqx.Module):
    layers: Any
    depth: int


class Holder(eqx.Module):
    """A user module that owns arrays directly: its kind is unknown."""

    weight: Any
    bias: Any
    table: Any
    count: Any
    act: Callable


EQX_CLASSES = {"Block": Block, "Stage": Stage, "Holder": Holder}
EQX_LAYERS = (
    "linear", "conv1d", "conv2d", "conv_t", "embedding", "layer_norm", "rms_norm",
    "group_norm", "batch_norm", "attention", "gru", "lstm", "prelu", "mlp", "sequential",
)
# PReLU is left out of stacks: Equinox's slope may be an array of any shape, so a stack
# of scalar slopes looks like one vector slope.
EQX_STACKABLE = (
    "linear", "conv1d", "layer_norm", "rms_norm", "embedding", "group_norm", "gru", "mlp",
    "attention",
)
EQX_EXTRA_CLASSES = (eqx.nn.Linear, eqx.nn.Conv, eqx.nn.LayerNorm, eqx.nn.MLP)


def _mod(kind: str, cls: type) -> Mod:
    return Mod(kind, cls, cls.__name__)


def _bias_pair(prefix: tuple, chain: tuple, weight: tuple, bias: bool, ndim: int,
               bias_ndim: int = 1) -> list[E]:
    name, role = weight
    out = [E(prefix + (name,), chain, name, role, ndim)]
    if bias:
        out.append(E(prefix + ("bias",), chain, "bias", "bias", bias_ndim))
    return out


def _eqx_state(module: Any, chain: tuple) -> list[E]:
    """The arrays behind the StateIndex fields of a module: state."""
    out = []
    for field in dataclasses.fields(module):
        value = getattr(module, field.name)
        if isinstance(value, eqx.nn.StateIndex):
            for path, leaf in jax.tree_util.tree_flatten_with_path(value)[0]:
                if eqx.is_array(leaf):
                    rel = (field.name, *(key_text(k) for k in path))
                    floating = bool(jnp.issubdtype(leaf.dtype, jnp.floating))
                    out.append(E(rel, chain, field.name, "other", leaf.ndim, False, floating))
    return out


def eqx_layer(layer: Layer, key: jax.Array) -> tuple[Any, list[E]]:
    """One layer of the table, unstacked, and its arrays."""
    n, a, b = eqx.nn, layer.a, layer.b
    lid = layer.id
    if lid == "linear":
        m = n.Linear(2, 3, use_bias=a, key=key)
        return m, _bias_pair((), (_mod("linear", n.Linear),), ("weight", "weight"), a, 2)
    if lid in ("conv1d", "conv2d", "conv_t"):
        cls = {"conv1d": n.Conv1d, "conv2d": n.Conv2d, "conv_t": n.ConvTranspose1d}[lid]
        m = cls(2, 3, 2, use_bias=a, key=key)
        ndim = 4 if lid == "conv2d" else 3
        return m, _bias_pair((), (_mod("conv", cls),), ("weight", "weight"), a, ndim)
    if lid == "embedding":
        m = n.Embedding(5, 3, key=key)
        return m, [E(("weight",), (_mod("embedding", n.Embedding),), "weight", "embedding", 2)]
    if lid in ("layer_norm", "rms_norm", "group_norm", "batch_norm"):
        if lid == "layer_norm":
            m = n.LayerNorm(3, use_weight=a, use_bias=b)
        elif lid == "rms_norm":
            m = n.RMSNorm(3, use_weight=a, use_bias=b)
        elif lid == "group_norm":
            m = n.GroupNorm(2, 4, channelwise_affine=a)
        else:
            m = n.BatchNorm(4, "batch", channelwise_affine=a, mode="batch")
        chain = (_mod(lid, type(m)),)
        out = []
        if m.weight is not None:
            out.append(E(("weight",), chain, "weight", "scale", 1))
        if m.bias is not None:
            out.append(E(("bias",), chain, "bias", "bias", 1))
        return m, out + _eqx_state(m, chain)
    if lid == "attention":
        m = n.MultiheadAttention(
            2, 4, use_query_bias=a, use_key_bias=a, use_value_bias=b, use_output_bias=b, key=key
        )
        att = _mod("attention", n.MultiheadAttention)
        out = []
        for proj in ("query_proj", "key_proj", "value_proj", "output_proj"):
            linear = getattr(m, proj)
            chain = (att, _mod("linear", n.Linear))
            out += _bias_pair((proj,), chain, ("weight", "weight"), linear.bias is not None, 2)
        return m, out
    if lid in ("gru", "lstm"):
        cls = n.GRUCell if lid == "gru" else n.LSTMCell
        m = cls(2, 3, use_bias=a, key=key)
        chain = (_mod("recurrent", cls),)
        out = [E((w,), chain, w, "weight", 2) for w in ("weight_ih", "weight_hh")]
        for name in ("bias", "bias_n"):
            if getattr(m, name, None) is not None:
                out.append(E((name,), chain, name, "bias", 1))
        return m, out
    if lid == "prelu":
        m = n.PReLU()
        return m, [E(("negative_slope",), (_mod("prelu", n.PReLU),), "negative_slope", "other", 0)]
    if lid == "mlp":
        m = n.MLP(2, 2, 3, depth=1 if a else 2, use_bias=b, key=key)
        out = []
        for i, linear in enumerate(m.layers):
            chain = (_mod("unknown", n.MLP), _mod("linear", n.Linear))
            out += _bias_pair(("layers", i), chain, ("weight", "weight"), linear.bias is not None, 2)
        return m, out
    if lid == "sequential":
        k1, _ = jax.random.split(key)
        m = n.Sequential([n.Linear(2, 3, use_bias=a, key=k1), n.Lambda(jax.nn.relu),
                          n.LayerNorm(3, use_bias=b)])
        seq = _mod("unknown", n.Sequential)
        out = _bias_pair(("layers", 0), (seq, _mod("linear", n.Linear)), ("weight", "weight"), a, 2)
        out += _bias_pair(("layers", 2), (seq, _mod("layer_norm", n.LayerNorm)),
                          ("weight", "scale"), b, 1)
        return m, out
    raise AssertionError(lid)


_FIELD_KEYS = ("weight", "bias", "scale", "gain", "misc", "p", "q")


def _eqx_leaf(in_module: bool) -> st.SearchStrategy:
    layers = st.builds(
        Layer, st.sampled_from(EQX_LAYERS), _FLAG, _FLAG, st.sampled_from([0, 0, 0, 2]),
    ).map(lambda l: l if l.id in EQX_STACKABLE else dataclasses.replace(l, stack=0))
    values = st.builds(Value, st.sampled_from(sorted(_VALUES)))
    options = [layers, layers, layers, layers, values]
    if in_module:
        options.append(st.builds(Raw, _RAW_SHAPES, st.sampled_from(["float32", "int32", "numpy"])))
    return st.one_of(*options)


def _eqx_tree(depth: int, in_module: bool) -> st.SearchStrategy:
    if depth == 0:
        return _eqx_leaf(in_module)
    inner = st.deferred(lambda: _eqx_tree(depth - 1, in_module))
    inner_module = st.deferred(lambda: _eqx_tree(depth - 1, True))
    children = st.lists(inner, min_size=1, max_size=3)
    seqs = st.builds(Seq, children.map(tuple), st.sampled_from(["list", "tuple"]))
    maps = st.builds(
        Map,
        st.dictionaries(st.sampled_from(_FIELD_KEYS), inner, min_size=1, max_size=3).map(
            lambda d: tuple(sorted(d.items()))
        ),
    )
    blocks = st.builds(
        lambda body, extra, tag: Node("Block", (("body", body), ("extra", extra), ("tag", tag))),
        inner_module, inner_module, st.sampled_from(["x", "y"]),
    )
    stages = st.builds(lambda layers: Node("Stage", (("layers", layers),)), inner_module)
    holders = st.builds(
        lambda w, b: Node("Holder", (("weight", w), ("bias", b))),
        st.one_of(st.none(), st.builds(Raw, st.sampled_from([(2, 3), (3,)]))),
        st.one_of(st.none(), st.builds(Raw, st.just((3,)))),
    )
    leaf = _eqx_leaf(in_module)
    return st.one_of(leaf, leaf, seqs, maps, blocks, stages, holders)


@st.composite
def eqx_specs(draw, max_depth: int = 3):
    depth = draw(st.integers(1, max_depth))
    root = draw(st.one_of(
        st.builds(
            lambda body, extra: Node("Block", (("body", body), ("extra", extra), ("tag", "root"))),
            st.lists(_eqx_tree(depth - 1, True), min_size=2, max_size=5).map(
                lambda items: Seq(tuple(items))),
            _eqx_tree(depth - 1, True),
        ),
        st.builds(lambda layers: Node("Stage", (("layers", layers),)), _eqx_tree(depth - 1, True)),
        # A plain pytree holding modules: a list, or a dict with at least one layer.
        st.builds(lambda items: Seq(tuple(items)), st.lists(_eqx_tree(depth - 1, False),
                                                             min_size=1, max_size=5)),
        st.builds(
            lambda first, rest: Map((("first", first), *rest)),
            st.builds(Layer, st.sampled_from(EQX_LAYERS)),
            st.dictionaries(st.sampled_from(["p", "q"]), _eqx_tree(depth - 1, False),
                            max_size=2).map(lambda d: tuple(sorted(d.items()))),
        ),
    ))
    return root


def build_eqx(spec: Any) -> tuple[Any, list[Expect]]:
    """The Equinox model of ``spec`` and every array it holds."""
    seeds = _Seeds()
    out: list[Expect] = []

    def build(node, path, owner, ancestors):
        if isinstance(node, Layer):
            key = jax.random.key(seeds())
            module, entries = eqx_layer(node, key)
            if node.stack:
                keys = jax.random.split(key, node.stack)
                module = eqx.filter_vmap(lambda k: eqx_layer(node, k)[0])(keys)
            outer = ancestors + ((owner,) if owner is not None else ())
            for e in entries:
                out.append(Expect(join(path + e.rel), e.chain[-1], outer + e.chain[:-1], e.role,
                                  e.name, e.ndim, e.is_param, e.floating))
            return module
        if isinstance(node, Raw):
            array = _raw_array(node, seeds())
            name = next(str(k) for k in reversed(path) if isinstance(k, str))
            out.append(Expect(join(path), owner, ancestors, unknown_role(name), name,
                              len(node.shape), floating=node.dtype != "int32"))
            return array
        if isinstance(node, Value):
            return _VALUES[node.what]
        if isinstance(node, Seq):
            items = [build(c, path + (i,), owner, ancestors) for i, c in enumerate(node.items)]
            return tuple(items) if node.kind == "tuple" else items
        if isinstance(node, Map):
            return {k: build(c, path + (k,), owner, ancestors) for k, c in node.items}
        if isinstance(node, Node):
            cls = EQX_CLASSES[node.cls]
            me = _mod("unknown", cls)
            outer = ancestors + ((owner,) if owner is not None else ())
            fields = {}
            for name, child in node.fields:
                if name == "tag":
                    fields[name] = child
                elif child is None:
                    fields[name] = None
                else:
                    fields[name] = build(child, path + (name,), me, outer)
            if cls is Stage:
                fields["depth"] = 2
            if cls is Holder:
                fields["table"] = build(Raw((2, 2), "numpy"), path + ("table",), me, outer)
                fields["count"] = build(Raw((2,), "int32"), path + ("count",), me, outer)
                fields["act"] = jax.nn.relu
            return cls(**fields)
        raise AssertionError(node)

    model = build(spec, (), None, ())
    # Distinct nonzero values everywhere: zeros (biases) would decay to themselves.
    flat, treedef = jax.tree_util.tree_flatten(model)
    filled = []
    for i, leaf in enumerate(flat):
        if isinstance(leaf, jax.Array) and jnp.issubdtype(leaf.dtype, jnp.floating):
            leaf = jnp.asarray(nonzero(leaf.shape, leaf.dtype, 1000 + i))
        filled.append(leaf)
    return jax.tree_util.tree_unflatten(treedef, filled), out


# Flax Linen.


LINEN_LAYERS = (
    "dense", "conv", "conv_t", "embed", "layer_norm", "rms_norm", "group_norm",
    "instance_norm", "batch_norm", "attention", "gru", "lstm", "opt_lstm", "mgu", "simple",
    "prelu",
)
LINEN_CLASS = {
    "dense": nn.Dense, "conv": nn.Conv, "conv_t": nn.ConvTranspose, "embed": nn.Embed,
    "layer_norm": nn.LayerNorm, "rms_norm": nn.RMSNorm, "group_norm": nn.GroupNorm,
    "instance_norm": nn.InstanceNorm, "batch_norm": nn.BatchNorm,
    "attention": nn.MultiHeadDotProductAttention, "gru": nn.GRUCell, "lstm": nn.LSTMCell,
    "opt_lstm": nn.OptimizedLSTMCell, "mgu": nn.MGUCell, "simple": nn.SimpleCell,
    "prelu": nn.PReLU,
}
_LINEN_GATES = {
    "gru": {"ir": True, "iz": True, "in": True, "hr": False, "hz": False, "hn": True},
    "lstm": {g: g.startswith("h") for g in ("ii", "if", "ig", "io", "hi", "hf", "hg", "ho")},
    "mgu": {"if": True, "in": True, "hf": False, "hn": True},
    "simple": {"i": True, "h": False},
}
_LINEN_GATES["opt_lstm"] = _LINEN_GATES["lstm"]
# Layers a reader of names alone knows by the arrays they hold, whatever their name:
# the others (the norms holding only scale and bias, say) get Flax's auto names.
LINEN_EVIDENT = ("dense", "conv", "conv_t", "embed", "attention", "gru", "lstm", "opt_lstm",
                 "mgu", "simple", "prelu")
# What a lifted (scanned or vmapped) block may hold: layers of a fixed rank.
LINEN_STACKABLE = ("dense", "layer_norm", "rms_norm", "embed", "prelu")
LINEN_USER_NAMES = ("enc", "dec", "body", "trunk", "proj", "head", "mix", "top")


def _linen_named(layer: Layer) -> bool:
    """Whether a layer may carry a user name (names alone still tell its kind)."""
    if layer.id in LINEN_EVIDENT:
        return True
    return (layer.id == "layer_norm" and layer.a and layer.b) or (
        layer.id == "rms_norm" and layer.a
    )


def linen_layer(layer: Layer) -> tuple[nn.Module, tuple]:
    """The Linen module of one layer and its example arguments."""
    a, b, name = layer.a, layer.b, layer.name
    lid = layer.id
    x = jnp.ones((1, 3))
    if lid == "dense":
        return nn.Dense(3, use_bias=a, name=name), (jnp.ones((1, 2)),)
    if lid in ("conv", "conv_t"):
        return LINEN_CLASS[lid](3, (2,), use_bias=a, name=name), (jnp.ones((1, 4, 2)),)
    if lid == "embed":
        return nn.Embed(5, 3, name=name), (jnp.zeros((1,), jnp.int32),)
    if lid == "layer_norm":
        return nn.LayerNorm(use_scale=a, use_bias=b, name=name), (x,)
    if lid == "rms_norm":
        return nn.RMSNorm(use_scale=a, name=name), (x,)
    if lid == "group_norm":
        return nn.GroupNorm(num_groups=2, use_scale=a, use_bias=b, name=name), (jnp.ones((1, 4)),)
    if lid == "instance_norm":
        return nn.InstanceNorm(use_scale=a, use_bias=b, name=name), (jnp.ones((1, 2, 4)),)
    if lid == "batch_norm":
        module = nn.BatchNorm(use_running_average=False, use_scale=a, use_bias=b, name=name)
        return module, (jnp.ones((2, 4)),)
    if lid == "attention":
        module = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=4, use_bias=a, name=name)
        return module, (jnp.ones((1, 2, 4)),)
    if lid in ("gru", "mgu", "simple"):
        return LINEN_CLASS[lid](4, name=name), (jnp.zeros((1, 4)), x)
    if lid in ("lstm", "opt_lstm"):
        return LINEN_CLASS[lid](4, name=name), ((jnp.zeros((1, 4)), jnp.zeros((1, 4))), x)
    if lid == "prelu":
        return nn.PReLU(name=name), (x,)
    raise AssertionError(lid)


def linen_entries(layer: Layer) -> list[E]:
    """The params of one layer, with the classes that own them (unstacked ranks)."""
    lid, a, b = layer.id, layer.a, layer.b
    cls = LINEN_CLASS[lid]
    me = _mod(_LINEN_KIND[lid], cls)
    if lid in ("dense", "conv", "conv_t"):
        return _bias_pair((), (me,), ("kernel", "weight"), a, 2 if lid == "dense" else 3)
    if lid == "embed":
        return [E(("embedding",), (me,), "embedding", "embedding", 2)]
    if lid in ("layer_norm", "rms_norm", "group_norm", "instance_norm", "batch_norm"):
        scale, bias = (a, False) if lid == "rms_norm" else (a, b)
        out = [E(("scale",), (me,), "scale", "scale", 1)] if scale else []
        return out + ([E(("bias",), (me,), "bias", "bias", 1)] if bias else [])
    if lid == "attention":
        general = _mod("linear", nn.DenseGeneral)
        out = []
        for proj in ("query", "key", "value", "out"):
            # One layer's rank, as in Equinox: a weight matrix and a bias vector.
            out += _bias_pair((proj,), (me, general), ("kernel", "weight"), a, 2)
        return out
    if lid in _LINEN_GATES:
        out = []
        for gate, bias in _LINEN_GATES[lid].items():
            out += _bias_pair((gate,), (me,), ("kernel", "weight"), bias, 2)
        return out
    if lid == "prelu":
        return [E(("negative_slope",), (me,), "negative_slope", "other", 0)]
    raise AssertionError(lid)


_LINEN_KIND = {
    "dense": "linear", "conv": "conv", "conv_t": "conv", "embed": "embedding",
    "layer_norm": "layer_norm", "rms_norm": "rms_norm", "group_norm": "group_norm",
    "instance_norm": "instance_norm", "batch_norm": "batch_norm", "attention": "attention",
    "gru": "recurrent", "lstm": "recurrent", "opt_lstm": "recurrent", "mgu": "recurrent",
    "simple": "recurrent", "prelu": "prelu",
}


@dataclasses.dataclass(frozen=True)
class Lifted:
    """A block lifted by ``nn.scan`` or ``nn.vmap`` (two copies): auto-named."""

    how: str  # "scan" or "vmap"
    children: tuple


@dataclasses.dataclass(frozen=True)
class Chain:
    """An ``nn.Sequential`` built inside a compact method: its layers are the
    parent's children, auto-named there."""

    children: tuple


def _linen_run(children: tuple) -> None:
    for child in children:
        if isinstance(child, Layer):
            module, args = linen_layer(child)
            module(*args)
        elif isinstance(child, Node):
            LINEN_CLASSES[child.cls](spec=child.fields, name=child.name)(jnp.ones((1, 3)))
        elif isinstance(child, Chain):
            layers: list[Any] = []
            for layer in child.children:
                layers += [linen_layer(layer)[0], nn.relu]
            nn.Sequential(layers)(jnp.ones((1, 2)))
        elif isinstance(child, Lifted):
            if child.how == "scan":
                lifted = nn.scan(LinenBlock, variable_axes={"params": 0},
                                 split_rngs={"params": True}, length=2)
                lifted(spec=child.children)(jnp.ones((1, 3)))
            else:
                lifted = nn.vmap(LinenBlock, variable_axes={"params": 0},
                                 split_rngs={"params": True}, in_axes=0)
                lifted(spec=child.children)(jnp.ones((2, 1, 3)))
        else:
            raise AssertionError(child)


class LinenBlock(nn.Module):
    spec: tuple = ()

    @nn.compact
    def __call__(self, x, _=None):
        _linen_run(self.spec)
        return x, None


# The names the models show (Linen auto names read __name__); __qualname__ stays the
# attribute's, so that policies naming these classes round-trip by import path.
LinenBlock.__name__ = "Block"


class LinenStage(LinenBlock):
    """A subclass: ``within=Block`` matches it where classes are known."""


LinenStage.__name__ = "Stage"


class LinenModel(nn.Module):
    spec: tuple = ()

    @nn.compact
    def __call__(self, x):
        _linen_run(self.spec)
        return x


LinenModel.__name__ = "Model"
LINEN_CLASSES = {"Block": LinenBlock, "Stage": LinenStage}
LINEN_EXTRA_CLASSES = (nn.Dense, nn.DenseGeneral, nn.LayerNorm, nn.Conv, LinenBlock,
                       LinenStage, LinenModel)


def _linen_layers(stackable: bool = False) -> st.SearchStrategy:
    ids = LINEN_STACKABLE if stackable else LINEN_LAYERS
    base = st.builds(Layer, st.sampled_from(ids), _FLAG, _FLAG)

    @st.composite
    def named(draw):
        layer = draw(base)
        if _linen_named(layer) and draw(st.booleans()):
            layer = dataclasses.replace(layer, name=draw(st.sampled_from(LINEN_USER_NAMES)))
        return layer

    return named()


def _unique_names(children: list) -> tuple:
    """Drops user names already used in one scope (Flax requires unique names)."""
    seen, out = set(), []
    for child in children:
        name = getattr(child, "name", None)
        if name is not None:
            if name in seen:
                child = dataclasses.replace(child, name=None)
            seen.add(name)
        out.append(child)
    return tuple(out)


def _linen_children(depth: int) -> st.SearchStrategy:
    layers = _linen_layers()
    options = [layers, layers]
    options.append(st.builds(
        Chain, st.lists(st.builds(Layer, st.sampled_from(["dense", "layer_norm", "rms_norm"]),
                                  _FLAG, _FLAG),
                        min_size=1, max_size=2).map(tuple)))
    options.append(st.builds(
        Lifted, st.sampled_from(["scan", "vmap"]),
        st.lists(_linen_layers(stackable=True), min_size=1, max_size=2).map(_unique_names)))
    if depth > 0:
        options.append(st.builds(
            Node, st.sampled_from(["Block", "Stage"]),
            st.deferred(lambda: _linen_children(depth - 1)),
            st.one_of(st.none(), st.sampled_from(LINEN_USER_NAMES))))
    return st.lists(st.one_of(*options), min_size=1, max_size=4).map(_unique_names)


@st.composite
def linen_specs(draw, max_depth: int = 2):
    depth = draw(st.integers(0, max_depth))
    first = draw(_linen_children(depth))
    return _unique_names([*first, *draw(_linen_children(depth))])


def linen_model(spec: tuple) -> tuple[nn.Module, tuple]:
    return LinenModel(spec=spec), (jnp.ones((1, 3)),)


def linen_expects(spec: tuple, traced: bool) -> list[Expect]:
    """Every param of the Linen model of ``spec``.

    ``traced``: read with the classes (``module=``); otherwise by names alone, where a
    module's class is known only by its auto name and the anonymous root is no
    ancestor.
    """
    out: list[Expect] = []

    def known(mod: Mod, auto: bool) -> Mod:
        if traced:
            return mod
        return Mod(mod.kind, None, mod.type_name if auto else None)

    def scope(children, path, ancestors):
        counter: Counter = Counter()

        def auto(class_name):
            name = f"{class_name}_{counter[class_name]}"
            counter[class_name] += 1
            return name

        def layer(child, key):
            is_auto = child.name is None
            for e in linen_entries(child):
                chain = tuple(known(m, is_auto) for m in e.chain)
                out.append(Expect(join(path + (key,) + e.rel), chain[-1],
                                  ancestors + chain[:-1], e.role, e.name, e.ndim))

        for child in children:
            if isinstance(child, Layer):
                layer(child, child.name or auto(LINEN_CLASS[child.id].__name__))
            elif isinstance(child, Node):
                key = child.name or auto(child.cls)
                mod = known(_mod("unknown", LINEN_CLASSES[child.cls]), child.name is None)
                scope(child.fields, path + (key,), ancestors + (mod,))
            elif isinstance(child, Chain):
                for inner in child.children:
                    layer(inner, auto(LINEN_CLASS[inner.id].__name__))
                auto("Sequential")
            elif isinstance(child, Lifted):
                key = auto(("Scan" if child.how == "scan" else "Vmap") + "Block")
                mod = known(_mod("unknown", LinenBlock), True)
                scope(child.children, path + (key,), ancestors + (mod,))

    root = (_mod("unknown", LinenModel),) if traced else ()
    scope(spec, (), root)
    return out


# Flax NNX.


class NBlock(nnx.Module):
    def __init__(self, attrs: dict):
        for name, value in attrs.items():
            setattr(self, name, value)


class NStage(nnx.Module):
    def __init__(self, attrs: dict):
        for name, value in attrs.items():
            setattr(self, name, value)


for _cls, _name in ((NBlock, "Block"), (NStage, "Stage")):
    _cls.__name__ = _name  # as the Linen classes: __qualname__ is the import path
NNX_CLASSES = {"Block": NBlock, "Stage": NStage}
NNX_LAYERS = (
    "linear", "conv", "conv_t", "embed", "layer_norm", "rms_norm", "group_norm",
    "instance_norm", "batch_norm", "attention", "gru", "lstm", "opt_lstm", "simple", "prelu",
    "mlp",
)
NNX_STACKABLE = ("linear", "conv", "layer_norm", "rms_norm", "embed", "prelu")
NNX_EXTRA_CLASSES = (nnx.Linear, nnx.LinearGeneral, nnx.LayerNorm, nnx.Conv, nnx.Sequential,
                     nnx.List, NBlock, NStage)
_NNX_GATES = {
    "gru": {"dense_i": True, "dense_h": False},
    "lstm": {g: g.startswith("h") for g in ("ii", "if_", "ig", "io", "hi", "hf", "hg", "ho")},
    "opt_lstm": {"dense_i": False, "dense_h": True},
    "simple": {"dense_i": True, "dense_h": False},
}
_NNX_CELLS = {"gru": nnx.GRUCell, "lstm": nnx.LSTMCell, "opt_lstm": nnx.OptimizedLSTMCell,
              "simple": nnx.SimpleCell}


def nnx_layer(layer: Layer, seed: int) -> tuple[Any, list[E]]:
    """One NNX layer, unstacked, and its params."""
    r = nnx.Rngs(seed)
    lid, a, b = layer.id, layer.a, layer.b
    if lid == "linear":
        m = nnx.Linear(2, 3, use_bias=a, rngs=r)
        return m, _bias_pair((), (_mod("linear", nnx.Linear),), ("kernel", "weight"), a, 2)
    if lid in ("conv", "conv_t"):
        cls = nnx.Conv if lid == "conv" else nnx.ConvTranspose
        m = cls(2, 3, kernel_size=(2,), use_bias=a, rngs=r)
        return m, _bias_pair((), (_mod("conv", cls),), ("kernel", "weight"), a, 3)
    if lid == "embed":
        m = nnx.Embed(5, 3, rngs=r)
        return m, [E(("embedding",), (_mod("embedding", nnx.Embed),), "embedding", "embedding", 2)]
    if lid in ("layer_norm", "rms_norm", "group_norm", "instance_norm", "batch_norm"):
        if lid == "layer_norm":
            m = nnx.LayerNorm(3, use_scale=a, use_bias=b, rngs=r)
        elif lid == "rms_norm":
            m, b = nnx.RMSNorm(3, use_scale=a, rngs=r), False
        elif lid == "group_norm":
            m = nnx.GroupNorm(4, num_groups=2, use_scale=a, use_bias=b, rngs=r)
        elif lid == "instance_norm":
            m = nnx.InstanceNorm(4, use_scale=a, use_bias=b, rngs=r)
        else:
            m = nnx.BatchNorm(4, use_scale=a, use_bias=b, rngs=r)
        me = (_mod(lid, type(m)),)
        out = [E(("scale",), me, "scale", "scale", 1)] if a else []
        return m, out + ([E(("bias",), me, "bias", "bias", 1)] if b else [])
    if lid == "attention":
        m = nnx.MultiHeadAttention(num_heads=2, in_features=4, qkv_features=4, decode=False,
                                   use_bias=a, rngs=r)
        chain = (_mod("attention", nnx.MultiHeadAttention), _mod("linear", nnx.LinearGeneral))
        out = []
        for proj in ("query", "key", "value", "out"):
            out += _bias_pair((proj,), chain, ("kernel", "weight"), a, 2)
        return m, out
    if lid in _NNX_CELLS:
        cls = _NNX_CELLS[lid]
        m = cls(2, 3, rngs=r)
        out = []
        for gate, bias in _NNX_GATES[lid].items():
            out += _bias_pair((gate,), (_mod("recurrent", cls),), ("kernel", "weight"), bias, 2)
        return m, out
    if lid == "prelu":
        m = nnx.PReLU()
        return m, [E(("negative_slope",), (_mod("prelu", nnx.PReLU),), "negative_slope", "other", 0)]
    if lid == "mlp":
        m = nnx.Sequential(nnx.Linear(2, 3, use_bias=a, rngs=r), nnx.relu,
                           nnx.Linear(3, 2, use_bias=b, rngs=r))
        outer = (_mod("unknown", nnx.Sequential), _mod("unknown", type(m.layers)))
        chain = outer + (_mod("linear", nnx.Linear),)
        return m, (_bias_pair(("layers", 0), chain, ("kernel", "weight"), a, 2)
                   + _bias_pair(("layers", 2), chain, ("kernel", "weight"), b, 2))
    raise AssertionError(lid)


_NNX_ATTRS = ("enc", "body", "head", "mix", "top", "extra")
_NNX_PARAM_NAMES = ("weight", "bias", "scale", "gain")


def _nnx_layers() -> st.SearchStrategy:
    return st.builds(
        Layer, st.sampled_from(NNX_LAYERS), _FLAG, _FLAG, st.sampled_from([0, 0, 0, 0, 2]),
    ).map(lambda l: l if l.id in NNX_STACKABLE else dataclasses.replace(l, stack=0))


def _nnx_module(depth: int) -> st.SearchStrategy:
    """A module: a layer, an nnx.Sequential, or a user module of attributes."""
    options = [_nnx_layers(), _nnx_layers()]
    options.append(st.builds(
        Seq, st.lists(st.builds(Layer, st.sampled_from(["linear", "layer_norm", "prelu"])),
                      min_size=1, max_size=2).map(tuple), st.just("sequential")))
    if depth > 0:
        options.append(_nnx_user(depth - 1))
    return st.one_of(*options)


def _nnx_user(depth: int) -> st.SearchStrategy:
    module = st.deferred(lambda: _nnx_module(depth))
    raw = st.builds(Raw, _RAW_SHAPES)
    value = st.one_of(
        module, module,
        st.builds(Seq, st.lists(st.one_of(module, raw), min_size=1, max_size=3).map(tuple)),
        st.builds(Map, st.dictionaries(st.sampled_from(_NNX_PARAM_NAMES + _NNX_ATTRS),
                                       st.one_of(module, raw), min_size=1, max_size=2).map(
            lambda d: tuple(sorted(d.items())))),
    )
    attrs = st.tuples(
        st.dictionaries(st.sampled_from(_NNX_ATTRS), value, min_size=2, max_size=4),
        st.dictionaries(st.sampled_from(_NNX_PARAM_NAMES), raw, max_size=2),
        st.dictionaries(st.sampled_from(("n", "label", "act")),
                        st.builds(Value, st.sampled_from(["int", "str", "fn"])), max_size=2),
    ).map(lambda t: tuple(sorted({**t[0], **t[1], **t[2]}.items())))
    return st.builds(Node, st.sampled_from(["Block", "Stage"]), attrs)


@st.composite
def nnx_specs(draw, max_depth: int = 2):
    return draw(_nnx_user(draw(st.integers(0, max_depth))))


def build_nnx(spec: Node) -> tuple[Any, list[Expect]]:
    seeds = _Seeds()
    out: list[Expect] = []

    def build(node, path, owner, owner_ancestors, enclosing):
        """``owner``: the module the arrays here belong to, ``owner_ancestors`` the
        modules around it; ``enclosing``: every module around this point."""
        if isinstance(node, Layer):
            module, entries = nnx_layer(node, seeds())
            if node.stack:
                seed = seeds()

                @nnx.split_rngs(splits=node.stack)
                @nnx.vmap(in_axes=(0,), out_axes=0)
                def make(rngs):
                    return _nnx_with_rngs(node, rngs)

                module = make(nnx.Rngs(seed))
            for e in entries:
                out.append(Expect(join(path + e.rel), e.chain[-1], enclosing + e.chain[:-1],
                                  e.role, e.name, e.ndim))
            return module
        if isinstance(node, Raw):
            name = next(str(k) for k in reversed(path) if isinstance(k, str))
            out.append(Expect(join(path), owner, owner_ancestors, unknown_role(name), name,
                              len(node.shape)))
            return nnx.Param(jnp.asarray(nonzero(node.shape, np.float32, seeds())))
        if isinstance(node, Value):
            return _VALUES[node.what]
        if isinstance(node, Seq) and node.kind == "sequential":
            seq_mod = _mod("unknown", nnx.Sequential)
            list_mod = _mod("unknown", nnx.List)
            layers: list[Any] = []
            for i, layer in enumerate(node.items):
                layers += [build(layer, path + ("layers", 2 * i), None, (),
                                 enclosing + (seq_mod, list_mod)), nnx.relu]
            module = nnx.Sequential(*layers)
            assert type(module.layers) is nnx.List
            return module
        if isinstance(node, Seq):
            inner = enclosing + (_mod("unknown", nnx.List),)
            return nnx.List([build(c, path + (i,), owner, owner_ancestors, inner)
                             for i, c in enumerate(node.items)])
        if isinstance(node, Map):
            inner = enclosing + (_mod("unknown", nnx.Dict),)
            return nnx.Dict({k: build(c, path + (k,), owner, owner_ancestors, inner)
                             for k, c in node.items})
        if isinstance(node, Node):
            cls = NNX_CLASSES[node.cls]
            me = _mod("unknown", cls)
            attrs = {name: build(child, path + (name,), me, enclosing, enclosing + (me,))
                     for name, child in node.fields}
            return cls(attrs)
        raise AssertionError(node)

    model = build(spec, (), None, (), ())
    params = nnx.to_flat_state(nnx.state(model, nnx.Param))
    for index, (_, variable) in enumerate(params):
        value = variable.get_value()
        variable.set_value(jnp.asarray(nonzero(value.shape, value.dtype, 2000 + index)))
    return model, out


def _nnx_with_rngs(layer: Layer, rngs: nnx.Rngs) -> Any:
    """The layer of ``layer`` made with the given rngs (for nnx.vmap)."""
    lid, a, b = layer.id, layer.a, layer.b
    if lid == "linear":
        return nnx.Linear(2, 3, use_bias=a, rngs=rngs)
    if lid == "conv":
        return nnx.Conv(2, 3, kernel_size=(2,), use_bias=a, rngs=rngs)
    if lid == "layer_norm":
        return nnx.LayerNorm(3, use_scale=a, use_bias=b, rngs=rngs)
    if lid == "rms_norm":
        return nnx.RMSNorm(3, use_scale=a, rngs=rngs)
    if lid == "embed":
        return nnx.Embed(5, 3, rngs=rngs)
    if lid == "prelu":
        return nnx.PReLU()
    raise AssertionError(lid)
