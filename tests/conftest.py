import os

# The suite compiles thousands of small XLA programs (every eager op of every test model,
# each shape once) and runs each for microseconds: compiling without XLA's backend
# optimizations makes them several times cheaper to compile. What decaymask decides
# does not depend on it. Set before JAX starts its backend; subprocesses inherit it. An
# optimization level given in XLA_FLAGS already is kept.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
    ).strip()

import jax  # noqa: E402

# Strict JAX: implicit rank promotion hides shape bugs in test models.
jax.config.update("jax_numpy_rank_promotion", "raise")


# The files that take longest, longest first. Under --dist loadfile a worker runs a whole
# file; pyproject's addopts keep this order (--no-loadscope-reorder) so that the long files
# start early and the last ones to start are short, not a long one that leaves the other
# workers idle while it runs. Every other file follows in the usual order.
LONGEST_FIRST = (
    "tests/test_nnx.py",
    "tests/test_readme.py",
    "tests/test_haiku.py",
    "tests/test_properties.py",
    "tests/test_linen.py",
    "tests/test_verify.py",
    "tests/test_docs.py",
    "tests/parity/test_groups.py",
    "tests/parity/test_decisions.py",
    "tests/test_mask_is_explain.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::", 1)[0], len(rank)))
