import jax

# Strict JAX: implicit rank promotion hides shape bugs in test models.
jax.config.update("jax_numpy_rank_promotion", "raise")
