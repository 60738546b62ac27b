"""Parameter groups on params sharded over two jax processes.

Two processes (tests/_multiprocess_worker.py, two CPU devices each, gloo collectives)
join over the loopback address and place the params of an Equinox and a Linen model on a
1-D mesh of all four devices, so that no process holds a whole array. Each builds the
policy's mask, multipliers, trainable flags and explain rows on those arrays and runs a
jitted step of ``policy.wrap(optax.adamw(...))``. Here both are compared with each other,
with the same step run in this process on unsharded arrays, and with adamw's first step
written out by hand.
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import _multiprocess_worker as worker

TIMEOUT = 120  # seconds, for both workers together
WORKER = pathlib.Path(__file__).with_name("_multiprocess_worker.py")

# path: (decayed, lr multiplier, trainable, layer id). Blocks 1 and 2 of a ladder of
# rate 0.5 learn 0.25 and 0.5 times as fast, the final norm and the head 1 times;
# linear layers learn 0.5 times as fast again; the embedding (id 0) is frozen.
EXPECTED = {
    "equinox": {
        "embed/weight": (False, 0.0, False, 0),
        "blocks/0/norm/weight": (False, 0.25, True, 1),
        "blocks/0/norm/bias": (False, 0.25, True, 1),
        "blocks/0/linear/weight": (True, 0.125, True, 1),
        "blocks/0/linear/bias": (False, 0.125, True, 1),
        "blocks/1/norm/weight": (False, 0.5, True, 2),
        "blocks/1/norm/bias": (False, 0.5, True, 2),
        "blocks/1/linear/weight": (True, 0.25, True, 2),
        "blocks/1/linear/bias": (False, 0.25, True, 2),
        "norm/weight": (False, 1.0, True, 3),
        "norm/bias": (False, 1.0, True, 3),
        "head/weight": (True, 0.5, True, 3),
        "head/bias": (False, 0.5, True, 3),
    },
    "linen": {
        "Dense_0/bias": (False, 0.5, True, 3),
        "Dense_0/kernel": (True, 0.5, True, 3),
        "Embed_0/embedding": (False, 0.0, False, 0),
        "LayerNorm_0/bias": (False, 1.0, True, 3),
        "LayerNorm_0/scale": (False, 1.0, True, 3),
        "LinenBlock_0/Dense_0/bias": (False, 0.125, True, 1),
        "LinenBlock_0/Dense_0/kernel": (True, 0.125, True, 1),
        "LinenBlock_0/LayerNorm_0/bias": (False, 0.25, True, 1),
        "LinenBlock_0/LayerNorm_0/scale": (False, 0.25, True, 1),
        "LinenBlock_1/Dense_0/bias": (False, 0.25, True, 2),
        "LinenBlock_1/Dense_0/kernel": (True, 0.25, True, 2),
        "LinenBlock_1/LayerNorm_0/bias": (False, 0.5, True, 2),
        "LinenBlock_1/LayerNorm_0/scale": (False, 0.5, True, 2),
    },
}

# Over 4 devices: the first axis that 4 divides is split, else the array is replicated.
SPLIT = "P('d',)"
SPECS = {
    "equinox": {path: SPLIT for path in EXPECTED["equinox"]}
    | {"head/weight": "P(None, 'd')", "head/bias": "P()"},
    "linen": {path: SPLIT for path in EXPECTED["linen"]} | {"Dense_0/bias": "P()"},
}

FRAMEWORKS = pytest.mark.parametrize("framework", worker.FRAMEWORKS)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """The two workers' JSON reports, process 0 first."""
    out = tmp_path_factory.mktemp("multiprocess")
    # The coordinator is on loopback: a proxy must not be asked for it.
    env = {key: value for key, value in os.environ.items() if "proxy" not in key.lower()}
    # Two CPU devices each, beside the suite's own XLA flags (tests/conftest.py).
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=flags.strip())
    port = str(_free_port())
    procs = []
    for i in range(2):
        with open(out / f"{i}.err", "w") as err:
            procs.append(
                subprocess.Popen(
                    [sys.executable, str(WORKER), str(i), port, str(out / f"{i}.json")],
                    env=env, stdout=err, stderr=subprocess.STDOUT,
                )
            )
    deadline = time.monotonic() + TIMEOUT
    timed_out, killed = False, set()
    while None in (codes := [proc.poll() for proc in procs]):
        # A worker that failed leaves the other waiting for it in a collective.
        failed = any(code not in (None, 0) for code in codes)
        timed_out = time.monotonic() > deadline
        if failed or timed_out:
            killed = {i for i, code in enumerate(codes) if code is None}
            for i in killed:
                procs[i].kill()
            break
        time.sleep(0.1)
    for proc in procs:
        proc.wait()
    if timed_out or any(proc.returncode != 0 for proc in procs):
        why = f"timed out after {TIMEOUT} s" if timed_out else "the other worker failed"
        logs = "\n".join(
            f"--- worker {i}: exit code {proc.returncode}"
            + (f" (killed: {why})" if i in killed else "")
            + " ---\n"
            + (out / f"{i}.err").read_text()[-4000:]
            for i, proc in enumerate(procs)
        )
        pytest.fail(logs)
    return [json.loads((out / f"{i}.json").read_text()) for i in range(2)]


@pytest.fixture(scope="module")
def one_process() -> dict[str, Any]:
    """Per framework: the params, the policy's outputs and the jitted step, in this
    process on unsharded arrays."""
    results = {}
    for framework in worker.FRAMEWORKS:
        params = jax.tree.map(jnp.asarray, worker.params(framework))
        grads = jax.tree.map(jnp.asarray, worker.gradients(framework))
        assert all(leaf.is_fully_addressable for leaf in jax.tree.leaves(params))
        tx = worker.optimizer()
        new, _, _ = jax.jit(lambda p, s, g, tx=tx: worker.step(tx, p, s, g))(
            params, jax.jit(tx.init)(params), grads
        )
        results[framework] = {
            "params": dict(worker.flat(worker.params(framework))),
            "grads": dict(worker.flat(worker.gradients(framework))),
            "mask": dict(worker.flat(worker.POLICY.mask(params))),
            "lr_scales": dict(worker.flat(worker.POLICY.lr_scales(params))),
            "trainable": dict(worker.flat(worker.POLICY.trainable(params))),
            "rows": worker.POLICY.explain(params).to_dicts(),
            "new": {path: np.asarray(leaf) for path, leaf in worker.flat(new)},
        }
    return results


def _assemble(reports: list[dict[str, Any]], framework: str, path: str, shape: Any) -> Any:
    """The whole array from both processes' shards, and per process where it held one."""
    whole = np.full(shape, np.nan, np.float32)
    held = []
    for report in reports:
        mine = np.zeros(shape, bool)
        for index, values in report["frameworks"][framework]["new"][path]:
            region = tuple(slice(start, stop) for start, stop in index)
            values = np.asarray(values, np.float32)
            seen = ~np.isnan(whole[region])
            # Copies of one element (a replicated array, on two devices) are equal.
            np.testing.assert_array_equal(values[seen], whole[region][seen], err_msg=path)
            whole[region] = values
            mine[region] = True
        held.append(mine)
    assert not np.isnan(whole).any(), path
    return whole, held


def test_each_process_holds_its_part_of_one_mesh(reports):
    for i, report in enumerate(reports):
        assert (report["process_index"], report["process_count"]) == (i, 2)
        assert (report["devices"], report["local_devices"]) == (4, 2)
        for framework in worker.FRAMEWORKS:
            assert report["frameworks"][framework]["specs"] == SPECS[framework]


@FRAMEWORKS
def test_both_processes_build_the_outputs_of_one_process(reports, one_process, framework):
    first, second = (report["frameworks"][framework] for report in reports)
    here = one_process[framework]
    for key in ("mask", "lr_scales", "trainable", "rows"):
        assert first[key] == second[key], key
        assert first[key] == here[key], key
    table = {
        row["path"]: (row["decay"], row["lr"], not row["frozen"], row["layer_id"])
        for row in first["rows"]
    }
    assert table == EXPECTED[framework]
    assert {path: (decay, lr, trained) for path, (decay, lr, trained, _) in table.items()} == {
        path: (first["mask"][path], first["lr_scales"][path], first["trainable"][path])
        for path in table
    }


@FRAMEWORKS
def test_the_sharded_step_is_the_step_of_one_process(reports, one_process, framework):
    here = one_process[framework]
    for path, (decayed, lr, trained, _) in EXPECTED[framework].items():
        p = here["params"][path].astype(np.float64)
        g = here["grads"][path].astype(np.float64)
        whole, held = _assemble(reports, framework, path, p.shape)
        if SPECS[framework][path] != "P()":
            # Split: each process held half of the array, and together all of it.
            assert [mine.mean() for mine in held] == [0.5, 0.5], path
            assert not (held[0] & held[1]).any(), path
        np.testing.assert_allclose(whole, here["new"][path], rtol=1e-6, atol=1e-7, err_msg=path)
        # adamw's first step is g / (|g| + eps), plus the decay; times the multiplier.
        by_hand = p - worker.LR * lr * (g / (np.abs(g) + 1e-8) + worker.WEIGHT_DECAY * decayed * p)
        np.testing.assert_allclose(whole, by_hand if trained else p, rtol=1e-5, atol=1e-6)


@FRAMEWORKS
def test_frozen_leaves_do_not_move_and_keep_no_state(reports, one_process, framework):
    here = one_process[framework]
    frozen = [path for path, (_, _, trained, _) in EXPECTED[framework].items() if not trained]
    assert len(frozen) == 1
    for path in frozen:
        whole, _ = _assemble(reports, framework, path, here["params"][path].shape)
        np.testing.assert_array_equal(whole, here["params"][path])
    trained = [path for path in EXPECTED[framework] if path not in frozen]
    for report in reports:
        assert sorted(report["frameworks"][framework]["moments"]) == sorted(trained)


@FRAMEWORKS
def test_a_reduction_over_both_processes_agrees(reports, one_process, framework):
    first, second = (report["frameworks"][framework]["checksums"] for report in reports)
    assert first == second
    here = {
        path: float(np.sum(new * np.arange(1, new.size + 1).reshape(new.shape)))
        for path, new in one_process[framework]["new"].items()
    }
    assert first.keys() == here.keys()
    for path in here:
        assert first[path] == pytest.approx(here[path], rel=1e-5, abs=1e-5), path


@FRAMEWORKS
def test_updated_params_keep_their_sharding(reports, framework):
    for report in reports:
        kept = report["frameworks"][framework]["params_keep_sharding"]
        assert kept == dict.fromkeys(EXPECTED[framework], True)


@FRAMEWORKS
def test_updates_keep_the_gradients_sharding(reports, framework):
    for report in reports:
        kept = report["frameworks"][framework]["updates_keep_sharding"]
        assert kept == dict.fromkeys(EXPECTED[framework], True)
