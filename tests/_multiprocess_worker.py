"""One of the two jax processes of tests/test_multiprocess_groups.py.

``python _multiprocess_worker.py PROCESS_ID PORT OUT`` joins the other process over
127.0.0.1:PORT, places the params of two tiny models (Equinox and Linen) on a 1-D mesh
of both processes' devices, builds the policy's outputs on them, runs one jitted step of
``policy.wrap(optax.adamw(...))`` and writes what it saw to OUT as JSON. The test
imports the models, the policy and the step from here to run them in one process.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from typing import Any

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import decaymask as dm

LR = 0.1
WEIGHT_DECAY = 0.5
RATE = 0.5
LINEAR_LR = 0.5
FRAMEWORKS = ("equinox", "linen")

POLICY = dm.Policy(
    *dm.presets.standard().rules,
    dm.freeze(layer="embedding"),
    dm.lr(LINEAR_LR, layer="linear"),
    dm.layer_decay(RATE),
)


class Block(eqx.Module):
    norm: eqx.nn.LayerNorm
    linear: eqx.nn.Linear

    def __init__(self, key: Any):
        self.norm = eqx.nn.LayerNorm(4)
        self.linear = eqx.nn.Linear(4, 4, key=key)


class Net(eqx.Module):
    embed: eqx.nn.Embedding
    blocks: list[Block]
    norm: eqx.nn.LayerNorm
    head: eqx.nn.Linear

    def __init__(self, key: Any):
        keys = jax.random.split(key, 4)
        self.embed = eqx.nn.Embedding(8, 4, key=keys[0])
        self.blocks = [Block(keys[1]), Block(keys[2])]
        self.norm = eqx.nn.LayerNorm(4)
        self.head = eqx.nn.Linear(4, 2, key=keys[3])


class LinenBlock(nn.Module):
    @nn.compact
    def __call__(self, x: Any) -> Any:
        return nn.Dense(4)(nn.LayerNorm()(x))


class LinenNet(nn.Module):
    @nn.compact
    def __call__(self, tokens: Any) -> Any:
        x = nn.Embed(8, 4)(tokens)
        for _ in range(2):
            x = LinenBlock()(x)
        return nn.Dense(2)(nn.LayerNorm()(x))


def _values(tree: Any, offset: int) -> Any:
    """Fixed nonzero float32 numpy values in ``tree``'s shapes, different per leaf."""

    def one(i: int, leaf: Any) -> np.ndarray:
        values = ((np.arange(int(np.prod(leaf.shape))) + 3 * i + offset) % 11 - 5.5) / 10
        return values.reshape(leaf.shape).astype(np.float32)

    leaves, treedef = jax.tree.flatten(tree)
    return jax.tree.unflatten(treedef, [one(i, leaf) for i, leaf in enumerate(leaves)])


def params(framework: str) -> Any:
    """The model's params as numpy arrays, the same in every process.

    Traced, never run: an eager random init compiles a dozen small programs per process.
    """
    if framework == "equinox":
        return _values(eqx.filter_eval_shape(Net, jax.random.key(0)), 0)
    tokens = jnp.zeros((3,), jnp.int32)
    return _values(jax.eval_shape(LinenNet().init, jax.random.key(0), tokens)["params"], 0)


def gradients(framework: str) -> Any:
    return _values(params(framework), 4)


def optimizer() -> Any:
    return POLICY.wrap(optax.adamw(LR, weight_decay=WEIGHT_DECAY, mask=POLICY.mask))


def step(tx: Any, p: Any, state: Any, grads: Any) -> tuple[Any, Any, Any]:
    updates, state = tx.update(grads, state, p)
    return optax.apply_updates(p, updates), updates, state


def flat(tree: Any) -> list[tuple[str, Any]]:
    """(path, leaf) of every leaf, paths as "blocks/0/linear/weight"."""
    pairs = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [(jax.tree_util.keystr(path, simple=True, separator="/"), leaf) for path, leaf in pairs]


def weighted_sum(x: Any) -> Any:
    """A sum that changes when elements move, not only when values change."""
    weights = jnp.arange(1, x.size + 1, dtype=jnp.float32).reshape(x.shape)
    return jnp.sum(x.astype(jnp.float32) * weights)


def spec(shape: tuple[int, ...], devices: int) -> Any:
    """Split the first axis that the devices divide; replicate where none does."""
    from jax.sharding import PartitionSpec as P

    for axis, size in enumerate(shape):
        if size % devices == 0:
            return P(*[None] * axis, "d")
    return P()


def _global(tree: Any, shardings: Any) -> Any:
    def put(host: np.ndarray, sharding: Any) -> Any:
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(put, tree, shardings)


def _shards(x: Any) -> list[Any]:
    """This process's shards of ``x``: [[start, stop] per axis], values."""
    return [
        [
            [list(s.indices(size)[:2]) for s, size in zip(shard.index, x.shape)],
            np.asarray(shard.data).tolist(),
        ]
        for shard in x.addressable_shards
    ]


def _kept(before: Any, after: Any) -> dict[str, bool]:
    """Per leaf: ``after`` has the sharding of ``before``."""
    pairs = zip(flat(before), flat(after), strict=True)
    return {path: a.sharding == b.sharding for (path, b), (_, a) in pairs}


def run(framework: str, mesh: Any) -> dict[str, Any]:
    from jax.sharding import NamedSharding

    host = params(framework)
    shardings = jax.tree.map(lambda leaf: NamedSharding(mesh, spec(leaf.shape, mesh.size)), host)
    sharded = _global(host, shardings)
    grads = _global(gradients(framework), shardings)
    for _, leaf in flat(sharded) + flat(grads):
        assert not leaf.is_fully_addressable
        assert len(leaf.sharding.device_set) == mesh.size

    report: dict[str, Any] = {
        "specs": {path: str(leaf.sharding.spec) for path, leaf in flat(sharded)},
        "mask": dict(flat(POLICY.mask(sharded))),
        "lr_scales": dict(flat(POLICY.lr_scales(sharded))),
        "trainable": dict(flat(POLICY.trainable(sharded))),
        "rows": POLICY.explain(sharded).to_dicts(),
    }

    tx = optimizer()
    state = tx.init(sharded)
    placed = dict(flat(sharded))
    moments = [(path.split("/mu/")[1], leaf) for path, leaf in flat(state) if "/mu/" in path]
    for path, leaf in moments:
        assert leaf.sharding == placed[path].sharding, (path, leaf.sharding)
    report["moments"] = [path for path, _ in moments]

    new, updates, _ = jax.jit(lambda p, s, g: step(tx, p, s, g))(sharded, state, grads)
    kept = _kept(sharded, new)
    assert all(kept.values()), [
        (path, leaf.sharding, dict(flat(new))[path].sharding) for path, leaf in flat(sharded)
    ]
    for _, leaf in flat(new):
        assert not leaf.is_fully_addressable
    report["params_keep_sharding"] = kept
    report["updates_keep_sharding"] = _kept(grads, updates)
    report["new"] = {path: _shards(leaf) for path, leaf in flat(new)}
    # A reduction over both processes' shards: every process gets the same replicated sum.
    sums = jax.jit(lambda tree: jax.tree.map(weighted_sum, tree))(new)
    report["checksums"] = {
        path: float(np.asarray(leaf.addressable_data(0))) for path, leaf in flat(sums)
    }
    return report


def main(process_id: int, port: int, out: str) -> None:
    jax.config.update("jax_numpy_rank_promotion", "raise")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=2,
        process_id=process_id,
        initialization_timeout=60,
    )
    from jax.sharding import Mesh

    mesh = Mesh(np.array(jax.devices()), ("d",))
    report = {
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "devices": jax.device_count(),
        "local_devices": jax.local_device_count(),
        "frameworks": {framework: run(framework, mesh) for framework in FRAMEWORKS},
    }
    with open(out, "w") as f:
        json.dump(report, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    try:
        main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        # Not through jax's exit hook: its shutdown barrier would wait for the other
        # process, which waits for this one in a collective.
        os._exit(1)
