"""Installs with one framework, or none: each fresh interpreter blocks the missing ones
(``sys.modules[name] = None`` makes their import fail as if they were not installed)."""

from __future__ import annotations

import functools
import os
import subprocess
import sys

import pytest

RUN = """
import sys
for name in {blocked!r}:
    sys.modules[name] = None
import decaymask as dm
for body in {bodies!r}:
    try:
        exec(body, {{"dm": dm}})
    except Exception as err:
        print(type(err).__name__ + ": " + str(err))
    print("-- end --")
"""


def _run(blocked: tuple[str, ...], body: str) -> str:
    # One interpreter per set of blocked imports runs every case of that set.
    bodies = tuple(b for blocked_set, b, _ in CASES if blocked_set == blocked)
    return _outputs(blocked, bodies)[bodies.index(body)]


@functools.cache
def _outputs(blocked: tuple[str, ...], bodies: tuple[str, ...]) -> list[str]:
    result = subprocess.run(
        [sys.executable, "-c", RUN.format(blocked=blocked, bodies=bodies)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert result.returncode == 0, result.stderr
    outputs = [part.strip() for part in result.stdout.split("-- end --")][:-1]
    assert len(outputs) == len(bodies), result.stdout
    return outputs


EQX_LINEAR = "import equinox as eqx, jax\nmodel = eqx.nn.Linear(2, 3, key=jax.random.key(0))\n"
NNX_LINEAR = "from flax import nnx\nmodel = nnx.Linear(2, 3, rngs=nnx.Rngs(0))\n"
HAIKU_LINEAR = (
    "import haiku as hk, jax\n"
    "params = hk.transform(lambda x: hk.Linear(3)(x)).init(jax.random.key(0), jax.numpy.ones((1, 2)))\n"
)
NO_JAX = ("jax", "jaxlib", "equinox", "flax", "optax", "haiku")
# Every extra that brings jax and optax, as the messages name them.
ANY_FRAMEWORK = (
    "pip install 'decaymask[equinox]', 'decaymask[flax]' or 'decaymask[haiku]' (whichever "
    "framework you use)."
)


ERRORS = [
        (NO_JAX, "dm.check_mask({'a': True}, {'a': 1.0})",
         "ImportError: check_mask needs jax, which is not installed: " + ANY_FRAMEWORK),
        (NO_JAX, "dm.add_decayed_weights(0.1, {'a': 1.0})",
         "ImportError: dm.add_decayed_weights needs jax and optax, which are not installed: "
         + ANY_FRAMEWORK),
        (("optax",), EQX_LINEAR + "dm.add_decayed_weights(0.1, {'a': 1.0})",
         "ImportError: dm.add_decayed_weights needs optax, which is not installed: " + ANY_FRAMEWORK),
        (("optax",), EQX_LINEAR + "dm.presets.muon().muon_dims_for_equinox(model)",
         "ImportError: muon_dims_for_equinox needs optax, which is not installed: " + ANY_FRAMEWORK),
        (("flax",), EQX_LINEAR + "dm.presets.standard().trainable_filter(model)",
         "ImportError: policy.trainable_filter needs flax, which is not installed: pip install "
         "'decaymask[flax]'."),
        (("flax", "equinox"), HAIKU_LINEAR + "dm.presets.standard().for_flax(params)",
         "ImportError: for_flax: got Haiku params (module paths such as 'linear'), and flax is "
         "not installed; use policy.for_haiku(params) for Haiku params. For Flax Linen: pip "
         "install 'decaymask[flax]'."),
        (("flax", "equinox"), HAIKU_LINEAR + "dm.presets.muon().muon_dims_for_flax(params)",
         "ImportError: muon_dims_for_flax: got Haiku params (module paths such as 'linear'), and "
         "flax is not installed; use policy.muon_dims_for_haiku(params) for Haiku params. For "
         "Flax Linen: pip install 'decaymask[flax]'."),
        (("flax", "equinox", "haiku"), "dm.presets.standard().for_flax({'linear': {'w': 1.0}})",
         "ImportError: decaymask needs flax for this: pip install 'decaymask[flax]'"),
        (("equinox", "flax"), "dm.presets.standard().for_equinox({'a': 1.0})",
         "ImportError: decaymask needs equinox for this: pip install 'decaymask[equinox]'"),
        (("flax",), EQX_LINEAR + "dm.presets.standard().for_flax(model)",
         "TypeError: for_flax: got an Equinox Linear; use policy.for_equinox(model) for "
         "Equinox models and their params."),
        (("flax",), EQX_LINEAR + "dm.presets.muon().muon_dims_for_flax(model)",
         "TypeError: muon_dims_for_flax: got an Equinox Linear; use "
         "policy.muon_dims_for_equinox(model) for Equinox models and their params."),
        (("equinox",), NNX_LINEAR + "dm.presets.standard().for_equinox(model)",
         "TypeError: for_equinox: got a Linear from Flax; use policy.for_flax(...) for Flax "
         "params, variables, nnx.Module or nnx.State."),
        (("equinox",), "dm.presets.standard().labels_for_equinox({'Dense_0': {'kernel': 1.0}})",
         "TypeError: labels_for_equinox: got a dict that holds no Equinox module, which looks "
         "like Flax Linen params; use policy.labels_for_flax(params). For a pytree of Equinox "
         "modules, pass the modules themselves."),
]
ERROR_IDS = ["check_mask_no_jax", "add_decayed_weights_no_jax", "add_decayed_weights_no_optax",
         "muon_dims_no_optax", "trainable_filter_no_flax", "for_flax_of_haiku_without_flax",
         "muon_dims_for_flax_of_haiku_without_flax", "for_flax_no_framework", "no_framework", "for_flax_of_equinox", "muon_dims_for_flax_of_equinox",
         "for_equinox_of_nnx", "labels_for_equinox_of_linen"]


@pytest.mark.parametrize("blocked, body, expected", ERRORS, ids=ERROR_IDS)
def test_a_missing_framework_is_named_or_the_right_method_is(blocked, body, expected):
    assert _run(blocked, body) == expected


WORKING = [
        (("flax",), EQX_LINEAR + "print(dm.presets.standard().explain(model).summary())",
         "decayed 1 of 2 leaves, 6 of 9 elements (66.7%)"),
        (("equinox",), NNX_LINEAR + "print(dm.presets.standard().explain(model).summary())",
         "decayed 1 of 2 leaves, 6 of 9 elements (66.7%)"),
        (("equinox",), NNX_LINEAR + "import optax\n"
         "dm.check_mask(dm.presets.standard().for_flax(model), nnx.state(model, nnx.Param))\n"
         "print('fits')", "fits"),
]
CASES = ERRORS + WORKING


@pytest.mark.parametrize(
    "blocked, body, expected", WORKING, ids=["equinox_alone", "flax_alone", "check_mask_flax_alone"]
)
def test_one_framework_alone_works(blocked, body, expected):
    assert _run(blocked, body) == expected


def test_yaml_without_pyyaml_names_the_extra(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text("rules: []\n")
    body = f"dm.Policy.from_file({str(path)!r})"
    [out] = _outputs(("yaml",), (body,))
    assert out == (
        f"ImportError: Policy.from_file({str(path)!r}): reading YAML needs PyYAML: "
        f"pip install 'decaymask[yaml]'"
    )
