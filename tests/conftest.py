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
