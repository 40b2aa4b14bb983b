"""vmap of indexing, sorting and linear-algebra ops against torch.func.vmap, and the errors
vmap raises for data-dependent values and shapes."""
import warnings

import expecttest
import pytest
import torch
import torch.func
from torch.utils._pytree import tree_leaves

import functransforms as ft

B = 3


def _gen():
    return torch.Generator().manual_seed(0)


def randn(*shape):
    return torch.randn(*shape, generator=_GEN)


def randint(high, shape):
    return torch.randint(0, high, shape, generator=_GEN)


_GEN = _gen()


def _loop(f, args, in_dims):
    outs = []
    for k in range(B):
        outs.append(f(*[a if d is None else a.select(d, k) for a, d in zip(args, in_dims)]))
    return [torch.stack(col) for col in zip(*[tree_leaves(o) for o in outs])]


def assert_matches(f, *args, in_dims=0, oracle="torch.func"):
    """ft.vmap(f) equals torch.func.vmap(f) (or the per-example loop), without the fallback."""
    if isinstance(in_dims, int):
        in_dims = (in_dims,) * len(args)
    ft.reset_fallback_counts()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # index_reduce is "beta"; fallbacks are counted below
        actual = tree_leaves(ft.vmap(f, in_dims)(*args))
    assert ft.fallback_counts() == {}
    if oracle == "torch.func":
        expected = tree_leaves(torch.func.vmap(f, in_dims)(*args))
    else:
        expected = _loop(f, args, in_dims)
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert type(a) is torch.Tensor and a.shape == e.shape and a.dtype == e.dtype
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5)


X = randn(B, 5, 6)
X4 = randn(B, 5, 6, 4)
IDX = randint(5, (B, 4))
COLS = randint(6, (4,))
MASK = randn(5, 6) > 0


def _setitem(x, i, v):
    x = x.clone()
    x[:, i] = v
    return x


def _setitem_mask(x, v):
    x = x.clone()
    x[x < 0] = v
    return x


INDEXING_CASES = {
    "index self": (lambda x: x[COLS[:3]], (X,), 0),
    "index self cols": (lambda x: x[:, COLS], (X,), 0),
    "index batched rows": (lambda x, i: x[i], (X, IDX), 0),
    "index batched cols": (lambda x, i: x[:, i], (X, IDX), 0),
    "index unbatched self": (lambda i: X[0][i], (IDX,), 0),
    "index non-adjacent": (lambda x, i: x[i, :, i.clamp(max=3)], (X4, IDX), 0),
    "index adjacent in the middle": (lambda x, i: x[:, i, i.clamp(max=3)], (X4, IDX), 0),
    "index non-adjacent unbatched": (lambda x: x[COLS[:2], :, COLS[:2].clamp(max=3)], (X4,), 0),
    "index mask": (lambda x: x[:, torch.tensor([True, False, True, True, False, True])], (X,), 0),
    "index in_dim 1": (lambda x, i: x[i], (X.transpose(0, 1).contiguous(), IDX), (1, 0)),
    "index_put accumulate": (
        lambda x, i, v: torch.index_put(x, (i,), v, accumulate=True), (X, IDX, randn(B, 4, 6)), 0),
    "index_put unbatched self": (
        lambda i, v: torch.index_put(X[0], (i,), v), (IDX, randn(B, 4, 6)), 0),
    "index_put broadcast indices": (
        lambda x, i, v: torch.index_put(x, (torch.arange(5)[:, None], i), v),
        (X, IDX[:, :2].contiguous(), randn(B, 5, 2)), 0),
    "setitem": (_setitem, (X, IDX, randn(B, 5, 4)), 0),
    "setitem batched mask": (_setitem_mask, (X, randn(B)), 0),
    "gather": (lambda x, i: torch.gather(x, 1, i), (X, randint(6, (B, 5, 3))), 0),
    "gather 0-dim": (lambda x, i: torch.gather(x, 0, i), (randn(B), randint(1, (B,))), 0),
    "scatter": (lambda x, i, s: torch.scatter(x, 1, i, s), (X, randint(6, (B, 5, 3)), randn(B, 5, 3)), 0),
    "scatter value": (lambda x, i: torch.scatter(x, 1, i, 2.0), (X, randint(6, (B, 5, 3))), 0),
    "scatter_add": (
        lambda x, i, s: torch.scatter_add(x, -1, i, s), (X, randint(6, (B, 5, 3)), randn(B, 5, 3)), 0),
    "scatter_reduce": (
        lambda x, i, s: torch.scatter_reduce(x, -1, i, s, "amax", include_self=False),
        (X, randint(6, (B, 5, 3)), randn(B, 5, 3)), 0),
    "index_select": (lambda x, i: torch.index_select(x, 1, i), (X, randint(6, (B, 4))), 0),
    "index_select unbatched index": (lambda x: torch.index_select(x, 1, COLS), (X,), 0),
    "index_select 0-dim": (lambda x, i: torch.index_select(x, 0, i), (randn(B), randint(1, (B,))), 0),
    "index_add": (
        lambda x, i, s: torch.index_add(x, 1, i, s, alpha=2), (X, randint(6, (B, 4)), randn(B, 5, 4)), 0),
    "index_copy": (
        lambda x, i, s: torch.index_copy(x, 1, i, s),
        (X, torch.stack([torch.randperm(6, generator=_GEN)[:4] for _ in range(B)]), randn(B, 5, 4)), 0),
    "index_fill batched value": (
        lambda x, i, v: torch.index_fill(x, 1, i, v), (X, randint(6, (B, 4)), randn(B)), 0),
    "take": (torch.take, (X, randint(30, (B, 2, 3))), 0),
    "put accumulate": (lambda x, i, s: torch.put(x, i, s, accumulate=True),
                       (X, randint(30, (B, 4)), randn(B, 4)), 0),
    "index_reduce": (lambda x, i, s: x.index_reduce(1, i, s, "amax", include_self=False),
                     (X, randint(6, (B, 4)), randn(B, 5, 4)), 0),
    "where": (lambda c, x: torch.where(c, x, 0.0), (X > 0, X), 0),
    "masked_select unbatched mask": (lambda x: torch.masked_select(x, MASK[0]), (X,), 0),
    "masked_scatter": (torch.masked_scatter, (X, randn(B, 5, 6) > 0, randn(B, 40)), 0),
    "masked_scatter unbatched mask": (lambda x, s: torch.masked_scatter(x, MASK, s), (X, randn(B, 40)), 0),
}


@pytest.mark.parametrize("name", INDEXING_CASES)
def test_indexing(name):
    f, args, in_dims = INDEXING_CASES[name]
    # torch.func.vmap cannot batch x[:, i] = v with a batched i, nor x[mask] = v with a batched
    # mask; the loop is the oracle there.
    assert_matches(f, *args, in_dims=in_dims, oracle="loop" if name.startswith("setitem") else "torch.func")


SORTED = randn(B, 7).sort().values
SORTING_CASES = {
    "sort": (lambda x: torch.sort(x, 1, descending=True), (X,)),
    "sort 0-dim": (lambda x: torch.sort(x), (randn(B),)),
    "argsort stable": (lambda x: torch.argsort(x, dim=0, stable=True), (X,)),
    "topk": (lambda x: torch.topk(x, 2), (X,)),
    "kthvalue": (lambda x: torch.kthvalue(x, 2, 0, keepdim=True), (X,)),
    "median": (torch.median, (X,)),
    "median dim": (lambda x: torch.median(x, -1), (X,)),
    "nanmedian": (torch.nanmedian, (X,)),
    "mode": (lambda x: torch.mode(x.round(), 1), (X,)),
    "cummax": (lambda x: torch.cummax(x, 1), (X,)),
    "cummin": (lambda x: torch.cummin(x, 0), (X,)),
    "searchsorted": (torch.searchsorted, (SORTED, randn(B, 4))),
    "searchsorted unbatched boundaries": (lambda v: torch.searchsorted(SORTED[0], v), (randn(B, 4),)),
    "searchsorted n-d": (torch.searchsorted, (randn(B, 2, 7).sort().values, randn(B, 2, 4))),
    "bucketize": (lambda v, b: torch.bucketize(v, b, right=True), (X, SORTED)),
    "searchsorted scalar": (lambda s: torch.searchsorted(s, 0.3, right=True), (SORTED,)),
}


@pytest.mark.parametrize("name", SORTING_CASES)
def test_sorting(name):
    f, args = SORTING_CASES[name]
    assert_matches(f, *args)


A = randn(B, 4, 4)
SPD = A @ A.mT + 4 * torch.eye(4)
LINALG_CASES = {
    "solve vector": (torch.linalg.solve, (A, randn(B, 4)), 0),
    "solve matrix": (torch.linalg.solve, (A, randn(B, 4, 2)), 0),
    "solve unbatched A": (torch.linalg.solve, (A[0], randn(B, 4)), (None, 0)),
    "solve broadcast": (torch.linalg.solve, (randn(B, 2, 4, 4), randn(B, 4, 3)), 0),
    "solve broadcast vector": (torch.linalg.solve, (randn(B, 2, 4, 4), randn(B, 4)), 0),
    "solve left=False": (lambda a, b: torch.linalg.solve(a, b, left=False), (A, randn(B, 2, 4)), 0),
    "inv": (torch.linalg.inv, (A,), 0),
    "det": (torch.linalg.det, (A,), 0),
    "slogdet": (torch.linalg.slogdet, (A,), 0),
    "cholesky": (torch.linalg.cholesky, (SPD,), 0),
    "eigh": (torch.linalg.eigh, (SPD,), 0),
    "eigvalsh": (torch.linalg.eigvalsh, (SPD,), 0),
    "svdvals": (torch.linalg.svdvals, (A,), 0),
    "qr": (torch.linalg.qr, (A,), 0),
    "lu_factor": (torch.linalg.lu_factor, (A,), 0),
    "lu_solve": (lambda lu, piv, b: torch.linalg.lu_solve(lu, piv, b),
                 (*torch.linalg.lu_factor(A), randn(B, 4, 2)), 0),
    "solve_triangular": (lambda a, b: torch.linalg.solve_triangular(a, b, upper=True),
                         (A.triu(), randn(B, 4, 2)), 0),
    "cholesky_solve": (torch.cholesky_solve, (randn(B, 4, 2), torch.linalg.cholesky(SPD)), 0),
    "pinv": (torch.linalg.pinv, (A,), 0),
    "trace": (torch.trace, (A,), 0),
    "matrix_exp in_dim -1": (torch.linalg.matrix_exp, (A.permute(1, 2, 0).contiguous(),), -1),
    "ormqr": (torch.ormqr, (*torch.geqrf(A), randn(B, 4, 2)), 0),
}


# torch.func.vmap gets these wrong (it mixes the vmap dim into the broadcast batch dims).
LOOP_ORACLE = {"solve broadcast", "solve broadcast vector"}


@pytest.mark.parametrize("name", LINALG_CASES)
def test_linalg(name):
    f, args, in_dims = LINALG_CASES[name]
    assert_matches(f, *args, in_dims=in_dims, oracle="loop" if name in LOOP_ORACLE else "torch.func")


def test_per_example_gradients_through_indexing():
    def loss(x, i):
        return (x[i] * x[:, i[:2]].sum()).sum() + torch.gather(x, 1, i[None].expand(5, 4)).sum()

    expected = torch.func.vmap(torch.func.grad(loss))(X, IDX)
    ft.reset_fallback_counts()
    actual = ft.vmap(ft.grad(loss))(X, IDX)
    torch.testing.assert_close(actual, expected)


def test_per_example_gradients_through_masked_scatter():
    def loss(x, m, s):
        return (torch.masked_scatter(x, m, s) ** 2).sum()

    x, m, s = X, randn(B, 5, 6) > 0, randn(B, 40)
    expected = [torch.stack(g) for g in zip(*[
        torch.func.grad(loss, argnums=(0, 2))(x[k], m[k], s[k]) for k in range(B)])]
    ft.reset_fallback_counts()
    actual = ft.vmap(ft.grad(loss, argnums=(0, 2)))(x, m, s)
    assert ft.fallback_counts() == {}
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e)


def test_nested_vmap_gather():
    x, i = randn(2, B, 5, 6), randint(6, (2, B, 5, 3))
    f = lambda x, i: torch.gather(x, 1, i)  # noqa: E731
    torch.testing.assert_close(ft.vmap(ft.vmap(f))(x, i), torch.func.vmap(torch.func.vmap(f))(x, i))


class TestErrors(expecttest.TestCase):
    def _error(self, f, *args):
        with self.assertRaises(RuntimeError) as ctx:
            ft.vmap(f)(*args)
        return str(ctx.exception)

    def test_item(self):
        self.assertExpectedInline(self._error(lambda x: x.sum().item(), X), """vmap: aten::_local_scalar_dense.default turns a batched tensor into a Python number: it looks like you're calling .item() on a Tensor (or float(), int(), bool()) or attempting to use a Tensor in some data-dependent control flow (`if x.sum() > 0:`). Every example has its own value, so there is no single number to return. Keep the computation in tensors: use torch.where(cond, a, b) instead of `if`/`else`, or move the check outside vmap.""")

    def test_control_flow(self):
        msg = self._error(lambda x: x if x.sum() > 0 else -x, X)
        self.assertIn("use torch.where(cond, a, b) instead of `if`/`else`", msg)

    def test_tolist(self):
        # PyTorch refuses .tolist() on any tensor subclass before it reaches vmap.
        self.assertExpectedInline(self._error(lambda x: x.tolist(), X), """vmap: .tolist() would turn a batched tensor into Python numbers, but every example has its own values. Keep the computation in tensors, or return the tensor from the vmapped function and call .tolist() on the result.""")

    def test_dynamic_shape(self):
        self.assertExpectedInline(self._error(lambda x: x.nonzero(), X), """vmap: We do not support batching operators that can output dynamic shape. aten::nonzero.default returns a tensor whose shape depends on the values of its input (Attempted to vmap over aten::where(condition) or aten::nonzero, which torch.where(condition) and torch.nonzero run), so the examples of one batch would need different shapes. Use a fixed-shape formulation instead: torch.where(mask, x, 0) in place of x[mask] or masked_select, or torch.nonzero_static(x, size=...) in place of nonzero.""")
        msg = self._error(torch.masked_select, X, X > 0)
        self.assertIn("aten::masked_select.default returns a tensor whose shape", msg)

    def test_index_put_into_unbatched(self):
        target = torch.zeros(5, 6)

        def f(i, v):
            t = target.clone()
            t[i] = v
            return t

        self.assertExpectedInline(self._error(f, IDX, randn(B, 4, 6)), """vmap: aten::index_put_.default is an in-place operation that would write batched values into a tensor that is not batched (inplace aten::index_put_.default(self, *extra_args) is not possible because there exists a Tensor `other` in extra_args that has more elements than `self`). Use the out-of-place version (for example `y = x + z` instead of `x += z`), or make the written tensor batched too.""")
