import jax
import pytest


@pytest.fixture(autouse=True)
def _third_party_rank_promotion():
    # The zoo's models broadcast ranks freely (a bias added to a 3-D activation); the
    # strict setting of the rest of the suite is for our own test models.
    with jax.numpy_rank_promotion("allow"):
        yield
