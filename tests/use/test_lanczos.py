"""Lanczos's top eigenpairs against NumPy's dense eigendecomposition (float32)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from numpyro_ensemble.use.lanczos import top_eigenpairs


def _psd(dim, decay, seed=0):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    values = np.exp(-decay * np.arange(dim)) * 100.0
    return (q * values) @ q.T, values, q


def _check_pairs(matrix, values, vectors, want, atol):
    np.testing.assert_allclose(values, want, rtol=1e-4, atol=atol)
    vectors = np.asarray(vectors)
    np.testing.assert_allclose(vectors.T @ vectors, np.eye(vectors.shape[1]), atol=1e-5)
    # each column an eigenvector: G v = lambda v
    np.testing.assert_allclose(matrix @ vectors, vectors * np.asarray(values), atol=atol * 10)


def test_top_eigenpairs_of_a_known_matrix():
    matrix, spectrum, _ = _psd(200, decay=0.3)
    g = jnp.asarray(matrix)
    values, vectors = top_eigenpairs(lambda v: g @ v, 200, 5)
    _check_pairs(matrix, np.asarray(values), vectors, spectrum[:5], atol=1e-3)


def test_low_rank_operator_breaks_down_safely():
    # rank 3 < the 30 Lanczos steps: the Krylov space is exhausted after 3 steps
    rng = np.random.default_rng(1)
    factor = rng.normal(size=(100, 3))
    matrix = factor @ factor.T
    want = np.sort(np.linalg.eigvalsh(matrix))[::-1][:5]
    g = jnp.asarray(matrix)
    values, vectors = top_eigenpairs(lambda v: g @ v, 100, 5)
    assert np.isfinite(np.asarray(vectors)).all()
    _check_pairs(matrix, np.asarray(values), vectors, want, atol=1e-3)


def test_vmapped_over_operators_equals_one_at_a_time():
    matrices = jnp.stack([jnp.asarray(_psd(50, 0.2, seed)[0]) for seed in range(3)])

    def pairs(g):
        return top_eigenpairs(lambda v: g @ v, 50, 4)

    values, vectors = jax.jit(jax.vmap(pairs))(matrices)
    for e in range(3):
        one_values, one_vectors = pairs(matrices[e])
        np.testing.assert_allclose(values[e], one_values, rtol=1e-5)
        # eigenvectors up to sign
        signs = np.sign(np.sum(np.asarray(vectors[e] * one_vectors), axis=0))
        np.testing.assert_allclose(vectors[e] * signs, one_vectors, atol=1e-4)


def test_no_dense_array_at_large_dimension():
    dim = 200_000
    diagonal = jnp.linspace(1.0, 2.0, dim)
    jaxpr = jax.make_jaxpr(lambda d: top_eigenpairs(lambda v: d * v, dim, 5))(diagonal)
    sizes = [
        int(np.prod(var.aval.shape))
        for eqn in jaxpr.jaxpr.eqns
        for var in eqn.outvars
        if hasattr(var.aval, "shape")
    ]
    assert max(sizes) <= 31 * dim  # the (m + 1, D) basis, m = 2k + 20 = 30


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"k": 0}, "k must be"),
        ({"k": 11}, "k must be"),
        ({"k": 3, "num_iterations": 2}, "num_iterations"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        top_eigenpairs(lambda v: v, 10, **kwargs)
