"""vmap of reductions and scans, against torch.func.vmap (or the per-example loop)."""
import pytest
import torch
import torch.func

import functransforms as ft

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop")

torch.manual_seed(0)
X = torch.randn(3, 2, 4)  # batch 3, examples (2, 4)
S = torch.randn(3)  # 0-dim examples
B = torch.randn(3, 2, 4) > 0

CASES = {
    "sum": lambda t: t.sum(),
    "sum_dim": lambda t: t.sum(-1),
    "sum_dims_keepdim": lambda t: t.sum((0, 1), keepdim=True),
    "sum_empty_dims": lambda t: t.sum(()),
    "sum_dtype": lambda t: t.sum(dtype=torch.float64),
    "sum_dim_dtype": lambda t: t.sum(1, dtype=torch.float64),
    "mean": lambda t: t.mean(),
    "mean_dim": lambda t: t.mean(0),
    "mean_neg_keepdim": lambda t: t.mean(-1, keepdim=True),
    "mean_dtype": lambda t: t.mean(dtype=torch.float64),
    "prod": lambda t: t.prod(),
    "prod_dim": lambda t: t.prod(1, keepdim=True),
    "amax": lambda t: t.amax(),
    "amax_dims": lambda t: t.amax((0, -1)),
    "amin_dim": lambda t: t.amin(1, keepdim=True),
    "max": lambda t: t.max(),
    "min": lambda t: t.min(),
    "max_dim": lambda t: tuple(t.max(1)),
    "min_dim_keepdim": lambda t: tuple(t.min(0, keepdim=True)),
    "argmax": lambda t: t.argmax(),
    "argmax_dim": lambda t: t.argmax(-1),
    "argmin_dim_keepdim": lambda t: t.argmin(0, keepdim=True),
    "std": lambda t: t.std(),
    "std_dim": lambda t: t.std(1),
    "var_correction": lambda t: t.var(0, correction=0, keepdim=True),
    "std_mean": lambda t: torch.std_mean(t, -1),
    "var_mean": lambda t: torch.var_mean(t),
    "norm": lambda t: t.norm(),
    "norm_dim": lambda t: t.norm(dim=1),
    "norm_p1": lambda t: t.norm(p=1),
    "vector_norm": lambda t: torch.linalg.vector_norm(t, 3, (0, 1), keepdim=True),
    "vector_norm_inf": lambda t: torch.linalg.vector_norm(t, float("inf")),
    "logsumexp": lambda t: t.logsumexp(1),
    "logsumexp_dims": lambda t: t.logsumexp((0, 1)),
    "any": lambda t: (t > 0).any(),
    "any_dim": lambda t: (t > 0).any(1),
    "any_dims": lambda t: (t > 0).any((0, 1)),
    "all": lambda t: (t > -1).all(),
    "all_dim_keepdim": lambda t: (t > 0).all(0, keepdim=True),
    "cumsum": lambda t: t.cumsum(1),
    "cumsum_dtype": lambda t: t.cumsum(0, dtype=torch.float64),
    "cumprod": lambda t: t.cumprod(-1),
    "logcumsumexp": lambda t: t.logcumsumexp(0),
    "count_nonzero": lambda t: (t > 0).count_nonzero(),
    "count_nonzero_dim": lambda t: (t > 0).count_nonzero(1),
    "count_nonzero_dims": lambda t: (t > 0).count_nonzero((0, 1)),
    "nansum": lambda t: t.nansum(1),
    "aminmax": lambda t: tuple(torch.aminmax(t)),
    "aminmax_dim": lambda t: tuple(torch.aminmax(t, dim=1, keepdim=True)),
}

# torch.func gets these wrong or does not support them; the per-example loop is the oracle.
#   argmax_keepdim: torch.func keeps one dim instead of every dim as size 1.
PER_EXAMPLE = {
    "argmax_keepdim": lambda t: t.argmax(keepdim=True),
    "aminmax_keepdim": lambda t: tuple(torch.aminmax(t, keepdim=True)),
}

# Reductions that are defined on 0-dim examples.
SCALAR_CASES = ["sum", "sum_dim", "mean", "mean_dim", "prod", "prod_dim", "amax", "max",
                "max_dim", "argmax", "argmax_dim", "argmin_dim_keepdim", "norm", "norm_dim",
                "logsumexp", "any", "any_dim", "cumsum", "cumprod", "count_nonzero",
                "var_correction", "aminmax", "sum_dims_keepdim"]


def _per_example(f, x):
    outs = [f(x[i]) for i in range(x.shape[0])]
    if isinstance(outs[0], tuple):
        return tuple(torch.stack(col) for col in zip(*outs))
    return torch.stack(outs)


def _scalar_safe(name):
    # dims written for 2-dim examples become 0 or -1 for a 0-dim example.
    f = CASES[name]
    return {
        "sum_dims_keepdim": lambda t: t.sum(0, keepdim=True),
        "amax_dims": lambda t: t.amax(0),
        "var_correction": lambda t: t.var(0, correction=0, keepdim=True),
        "prod_dim": lambda t: t.prod(0, keepdim=True),
        "norm_dim": lambda t: t.norm(dim=0),
        "logsumexp": lambda t: t.logsumexp(0),
        "any_dim": lambda t: (t > 0).any(0),
        "max_dim": lambda t: tuple(t.max(0)),
        "mean_dim": lambda t: t.mean(0),
        "argmax_dim": lambda t: t.argmax(-1),
        "cumsum": lambda t: t.cumsum(0),
        "cumprod": lambda t: t.cumprod(-1),
        "sum_dim": lambda t: t.sum(-1),
    }.get(name, f)


def _check(got, expected):
    torch.testing.assert_close(got, expected, equal_nan=True)


@pytest.mark.parametrize("name", list(CASES))
def test_matches_torch_func(name):
    f = CASES[name]
    ft.reset_fallback_counts()
    _check(ft.vmap(f)(X), torch.func.vmap(f)(X))
    assert ft.fallback_counts() == {}


@pytest.mark.parametrize("name", list(PER_EXAMPLE))
def test_matches_per_example(name):
    f = PER_EXAMPLE[name]
    ft.reset_fallback_counts()
    _check(ft.vmap(f)(X), _per_example(f, X))
    assert ft.fallback_counts() == {}


@pytest.mark.parametrize("name", SCALAR_CASES)
def test_scalar_examples(name):
    f = _scalar_safe(name)
    ft.reset_fallback_counts()
    _check(ft.vmap(f)(S), _per_example(f, S))
    assert ft.fallback_counts() == {}


@pytest.mark.parametrize("name", ["sum", "sum_dims_keepdim", "mean_dim", "max_dim", "argmax",
                                  "std_mean", "norm_dim", "logsumexp", "any_dims", "cumsum",
                                  "prod", "count_nonzero", "aminmax_dim"])
def test_in_dims(name):
    f = CASES[name]
    x = X.movedim(0, 1)
    ft.reset_fallback_counts()
    _check(ft.vmap(f, in_dims=1)(x), torch.func.vmap(f, in_dims=1)(x))
    assert ft.fallback_counts() == {}


@pytest.mark.parametrize("name", ["sum", "sum_dim", "mean", "max", "max_dim", "argmax_dim",
                                  "std", "var_mean", "norm", "logsumexp", "all", "cumsum",
                                  "prod_dim", "count_nonzero_dims"])
def test_nested(name):
    f = CASES[name]
    xx = torch.randn(2, 3, 2, 4)
    ft.reset_fallback_counts()
    _check(ft.vmap(ft.vmap(f))(xx), torch.func.vmap(torch.func.vmap(f))(xx))
    _check(ft.vmap(ft.vmap(f), in_dims=2)(xx.movedim(0, 2)),
           torch.func.vmap(torch.func.vmap(f), in_dims=2)(xx.movedim(0, 2)))
    assert ft.fallback_counts() == {}


_GRAD_CASES = ["sum", "sum_dim", "sum_dims_keepdim", "mean", "mean_dim", "prod", "amax_dims",
               "max", "std", "var_correction", "norm", "norm_dim", "vector_norm", "logsumexp",
               "cumsum", "nansum"]


@pytest.mark.parametrize("name", _GRAD_CASES)
def test_vmap_of_grad(name):
    f = CASES[name]

    def loss(t):
        return (f(t) ** 2).sum()

    ft.reset_fallback_counts()
    _check(ft.vmap(ft.grad(loss))(X), torch.func.vmap(torch.func.grad(loss))(X))
    assert ft.fallback_counts() == {}


@pytest.mark.parametrize("name", ["sum_dim", "mean", "amax_dims", "std_dim", "logsumexp",
                                  "norm_dim", "cumsum", "prod_dim"])
def test_grad_of_vmap(name):
    f = CASES[name]

    def loss(t):
        return (ft.vmap(f)(t) ** 2).sum()

    def oracle_loss(t):
        return (torch.func.vmap(f)(t) ** 2).sum()

    _check(ft.grad(loss)(X), torch.func.grad(oracle_loss)(X))


def test_nan_propagation():
    x = X.clone()
    x[1, 0, 2] = float("nan")
    for name in ("max", "amax_dims", "sum", "argmax", "logsumexp", "nansum"):
        f = CASES[name]
        _check(ft.vmap(f)(x), torch.func.vmap(f)(x))
