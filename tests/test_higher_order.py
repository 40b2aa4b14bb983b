"""Second and third order: transforms of transforms, float64, compared with torch.func on the
same inputs (issue 13)."""
import pytest
import torch
import torch.func as tf
import torch.nn.functional as F

import functransforms as ft
from functransforms.core.levels import level_stack

RTOL = 1e-6
ATOL = 1e-9


def close(a, b):
    fa, sa = torch.utils._pytree.tree_flatten(a)
    fb, sb = torch.utils._pytree.tree_flatten(b)
    assert sa == sb
    for x, y in zip(fa, fb):
        assert type(x) is torch.Tensor, f"wrapper leaked: {type(x)}"
        assert not x.requires_grad, "a transform's result is recorded by torch autograd"
        torch.testing.assert_close(x, y, rtol=RTOL, atol=ATOL)


@pytest.fixture
def xva():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, dtype=torch.float64, generator=g)
    v = torch.randn(6, dtype=torch.float64, generator=g)
    A = torch.randn(6, 6, dtype=torch.float64, generator=g) + 4 * torch.eye(6, dtype=torch.float64)
    return x, v, A


def both(make):
    """``make(T)`` with T = ft, then T = torch.func; compared."""
    close(make(ft), make(tf))


# Activations whose backward is its own once-differentiable kernel unless grad mode is on
# while the backward runs (NOTE [Backward that a level below differentiates]).
ACTIVATIONS = {
    "silu": lambda x: F.silu(x).sum(),
    "mish": lambda x: F.mish(x).sum(),
    "logit": lambda x: torch.logit(x.sigmoid() * 0.8 + 0.1).sum(),
    "group_norm": lambda x: F.group_norm(x.reshape(1, 6), 2).exp().sum(),
}


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_jacrev_jacrev_backward_kernels(xva, name):
    x, _, _ = xva
    f = ACTIVATIONS[name]
    both(lambda T: T.jacrev(T.jacrev(f))(x))


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_third_order_backward_kernels(xva, name):
    x, v, _ = xva
    f = ACTIVATIONS[name]
    both(lambda T: T.jvp(T.jacrev(T.grad(f)), (x,), (v,)))


def test_jvp_grad_layer_norm(xva):
    x, v, _ = xva
    both(lambda T: T.jvp(T.grad(lambda x: F.layer_norm(x, (6,)).exp().sum()), (x,), (v,)))


def test_hessian_det(xva):
    x, _, A = xva
    f = lambda x: torch.linalg.det(A + torch.diag(x.sin()))  # noqa: E731
    both(lambda T: T.hessian(f)(x))
    both(lambda T: T.jacrev(T.jacrev(f))(x))


def test_hessian_solve(xva):
    x, _, A = xva
    both(lambda T: T.hessian(lambda x: torch.linalg.solve(A + torch.diag(x.tanh()), x).sum())(x))


@pytest.mark.parametrize("shape", [(2, 3), (3, 2), (6, 1), (1, 3, 2)])
def test_hessian_batch_norm_training(xva, shape):
    x, _, _ = xva
    f = lambda x: F.batch_norm(x.reshape(shape), None, None, training=True).exp().sum()  # noqa: E731
    both(lambda T: T.hessian(f)(x))


def test_hessian_batch_norm_affine(xva):
    x, v, _ = xva
    w, b = v[:2], v[2:4]
    f = lambda x: F.batch_norm(x.reshape(3, 2), None, None, w, b, training=True).tanh().sum()  # noqa: E731
    both(lambda T: T.hessian(f)(x))
    both(lambda T: T.jvp(T.grad(f), (x,), (v,)))


def test_inplace_pow_scalar_exponent(xva):
    # pow_.Scalar's out-of-place twin is pow.Tensor_Scalar, not pow.Scalar (a Scalar base).
    x, v, _ = xva
    both(lambda T: T.jvp(lambda x: x.clone().pow_(3), (x,), (v,)))
    both(lambda T: T.vmap(lambda x: x.clone().pow_(3))(x.reshape(2, 3)))


@pytest.mark.parametrize("ord", [2, 3, 6, float("inf")])
def test_jvp_vjp_vector_norm(xva, ord):
    x, v, _ = xva
    ct, ct_t = torch.tensor(1.3, dtype=x.dtype), torch.tensor(-0.4, dtype=x.dtype)

    def pullback(T):
        return lambda x, c: T.vjp(lambda x: torch.linalg.vector_norm(x, ord), x)[1](c)[0]

    both(lambda T: T.jvp(pullback(T), (x, ct), (v, ct_t)))
    both(lambda T: T.jvp(pullback(T), (x[0], ct), (v[0], ct_t)))


def test_jvp_vjp_dist(xva):
    x, v, A = xva
    y = A[0]
    ct, ct_t = torch.tensor(0.8, dtype=x.dtype), torch.tensor(0.3, dtype=x.dtype)
    for p in (1.5, 2, 4):
        def pullback(T):
            return lambda x, c: T.vjp(lambda x: torch.dist(x, y, p), x)[1](c)[0]

        both(lambda T: T.jvp(pullback(T), (x, ct), (v, ct_t)))


def test_inplace_bernoulli_default_p(xva):
    # bernoulli_.float has p=0.5 by default, its twin bernoulli.p has none; dispatch drops the
    # default, so the twin must get it back.
    x, v, _ = xva
    out, tangent = ft.jvp(lambda x: x * x.clone().bernoulli_(), (x,), (v,))
    mask = (out != 0).to(x.dtype)
    close((out, tangent), (x * mask, v * mask))
    draws = ft.vmap(lambda x: x.clone().bernoulli_(), randomness="different")(x.reshape(2, 3))
    assert set(draws.flatten().tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize("dropout", [F.dropout, F.alpha_dropout, F.dropout1d])
def test_jvp_vjp_dropout(xva, dropout):
    x, v, A = xva
    x2, v2, ct, ct_t = x.reshape(2, 3), v.reshape(2, 3), A[:2, :3], A[2:4, :3]

    def run(T):
        torch.manual_seed(0)
        pullback = lambda x, c: T.vjp(lambda x: dropout(x, 0.5, training=True), x)[1](c)[0]  # noqa: E731
        return T.jvp(pullback, (x2, ct), (v2, ct_t))

    both(run)


AS_STRIDED = {
    "as_strided": lambda x: x.as_strided((3, 2), (1, 2), 1).sin(),
    "overlapping": lambda x: x.as_strided((4, 3), (1, 1)) * 2,
    "as_strided_scatter": lambda x: torch.as_strided_scatter(x, x[:3].exp(), (3,), (2,), 0),
    "as_strided_copy": lambda x: torch.as_strided_copy(x.cos(), (2, 2), (2, 1), 1),
}


@pytest.mark.parametrize("name", list(AS_STRIDED))
def test_as_strided_family_second_order(xva, name):
    x, v, _ = xva
    f = AS_STRIDED[name]
    ct = torch.randn(f(x).shape, dtype=x.dtype, generator=torch.Generator().manual_seed(1))

    def pullback(T):
        return lambda x, c: T.vjp(f, x)[1](c)[0]

    both(lambda T: T.jvp(pullback(T), (x, ct), (v, ct.flip(0))))
    both(lambda T: T.vjp(pullback(T), x, ct)[1](v))


def test_jvp_write_through_as_strided_view(xva):
    x, v, _ = xva

    def f(x):
        buf = x.new_zeros(8)
        buf.as_strided((3,), (2,), 1).copy_(x[:3])
        return buf

    both(lambda T: T.jvp(f, (x,), (v,)))


RUNNING_MEAN = torch.linspace(0, 1, 5, dtype=torch.float64)
RUNNING_VAR = torch.linspace(1, 2, 5, dtype=torch.float64)

NORMS = {
    # Running statistics captured from outside: batch norm writes them, so forward mode
    # cannot take torch's decomposition of the forward op.
    "batch_norm_running": lambda x, w, b: F.batch_norm(
        x, RUNNING_MEAN.clone(), RUNNING_VAR.clone(), w, b, True, 0.5, 0.6),
    "batch_norm": lambda x, w, b: F.batch_norm(x, None, None, w, b, True),
    "instance_norm": lambda x, w, b: F.instance_norm(x, weight=w, bias=b),
    "layer_norm": lambda x, w, b: F.layer_norm(x, (2,), w[:2], b[:2]),
    "group_norm": lambda x, w, b: F.group_norm(x, 5, w, b),
}


@pytest.mark.parametrize("name", list(NORMS))
def test_norms_forward_over_reverse(name):
    # The backward kernels read the saved mean and inverse std, whose tangents torch's forward
    # formulas leave out: forward mode must recompute them from the input.
    g = torch.Generator().manual_seed(2)
    primals = tuple(torch.randn(s, dtype=torch.float64, generator=g) for s in ((3, 5, 2), (5,), (5,)))
    ct = torch.randn(3, 5, 2, dtype=torch.float64, generator=g)
    tangents = tuple(torch.randn_like(p) for p in (*primals, ct))
    f = NORMS[name]

    def pullback(T):
        return lambda x, w, b, c: T.vjp(f, x, w, b)[1](c)

    both(lambda T: T.jvp(pullback(T), (*primals, ct), tangents))
    both(lambda T: T.vjp(pullback(T), *primals, ct)[1](tuple(t[..., :] for t in tangents[:3])))


# jvp serves these with torch._refs decompositions that end in prims; the prims' primals are
# computed on values a grad level records, so they must be recorded as aten ops.
REFS_DECOMPOSED = {
    "cumprod": lambda x: x.cumprod(0),
    "renorm": lambda x: torch.renorm(x.reshape(2, 3), 2, 0, 1.0),
    "logit": lambda x: torch.logit(x.sigmoid(), eps=0.2),
    "vander": lambda x: torch.linalg.vander(x[:3]),
    "copysign": lambda x: torch.copysign(x, x.flip(0)) * x,
    # not refs, but the same composition: as_strided's tangent buffer must belong to the
    # grad level below, or the copy into it is refused as a write into a captured tensor.
    "as_strided": lambda x: x.as_strided((2, 2), (1, 2), 1),
    "group_norm": lambda x: F.group_norm(x.reshape(1, 6, 1), 3),
}


@pytest.mark.parametrize("name", list(REFS_DECOMPOSED))
def test_reverse_over_forward_refs_decompositions(xva, name):
    x, v, _ = xva
    f = REFS_DECOMPOSED[name]
    both(lambda T: T.grad(lambda x: T.jvp(f, (x,), (v,))[1].sin().sum())(x))
    both(lambda T: T.jacrev(lambda x: T.jvp(f, (x,), (v,))[1])(x))


def test_constants_written_into_captured_tensors(xva):
    # cosine_similarity's kernel clamps the norm of a captured input in place with an eps
    # tensor it creates: that tensor belongs to the transforms (adopted) but carries no
    # tangent and no gradient, so the write is no captured mutation.
    x, v, A = xva
    x2, v2, y = x.reshape(2, 3), v.reshape(2, 3), A[:2, :3]
    f = lambda a: F.cosine_similarity(a, y)  # noqa: E731
    both(lambda T: T.jvp(f, (x2,), (v2,)))
    both(lambda T: T.jacrev(T.grad(lambda a: f(a).sum()))(x2))
    both(lambda T: T.grad(lambda a: T.jvp(f, (a,), (v2,))[1].sin().sum())(x2))
    captured = torch.zeros(3, dtype=x.dtype)

    def writes_tracked(x):
        buf = torch.zeros(3, dtype=x.dtype)
        buf[0] = x[0]
        captured.add_(buf)
        return buf

    with pytest.raises(RuntimeError, match="in-place"):
        ft.jvp(writes_tracked, (x,), (v,))
    with pytest.raises(RuntimeError, match="in-place"):
        ft.grad(lambda x: captured.add_(x[:3]).sum())(x)
    assert level_stack() == []


def test_exception_inside_second_order_leaves_stack_clean(xva):
    x, v, _ = xva

    def inner_fails(x):
        y = F.silu(x)
        _, vjp_fn = ft.vjp(F.silu, y)
        return vjp_fn(torch.ones(3, dtype=x.dtype))[0].sum()  # wrong cotangent shape

    with pytest.raises(RuntimeError, match="shape"):
        ft.grad(ft.grad(inner_fails))(x)
    assert level_stack() == []

    def raises_midway(x):
        g = ft.grad(lambda x: F.mish(x).sum())(x)
        if g.sum() < 1e9:
            raise ValueError("user error")
        return g.sum()

    with pytest.raises(ValueError, match="user error"):
        ft.jvp(ft.grad(raises_midway), (x,), (v,))
    assert level_stack() == []
    # The process is still usable: the same composition runs and agrees afterwards.
    both(lambda T: T.jacrev(T.jacrev(lambda x: F.silu(x).sum()))(x))


def test_reverse_over_forward_inplace_under_no_grad(xva):
    # An in-place op under no_grad changes a dual's tangent values but not its history, as
    # in torch: the grad level below still differentiates the tangent as before.
    x, v, _ = xva

    def f(a):
        n = (a * a).sum().clone()
        with torch.no_grad():
            n.mul_(2)
        return n * a

    both(lambda T: T.grad(lambda a: T.jvp(f, (a,), (v,))[1].sin().sum())(x))


# -- third order through solve/det and reverse-over-forward of linear algebra (issue 13) --------
# torch.func is wrong on several of these (its forward formulas read outputs that are not
# differentiable, or the output itself): the references are central differences of ft's own
# lower-order result (checked against torch.func there), or torch.func in reverse mode only.

FD_EPS = 1e-6


def directional_fd(g, x, e):
    return (g(x + FD_EPS * e) - g(x - FD_EPS * e)) / (2 * FD_EPS)


def fd_close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7 * max(1.0, b.abs().max().item()))


def _well_conditioned(x, A):
    return A + torch.diag(x.sin()) + 0.3 * torch.tanh(torch.outer(x, x))


LINALG = {
    "solve": lambda A: lambda x: torch.linalg.solve(_well_conditioned(x, A), x.cos()),
    "solve_left_false": lambda A: lambda x: torch.linalg.solve(
        _well_conditioned(x, A), torch.outer(x.cos(), x[:2]).T, left=False),
    "det": lambda A: lambda x: torch.linalg.det(_well_conditioned(x, A)).reshape(1),
    "slogdet": lambda A: lambda x: torch.linalg.slogdet(_well_conditioned(x, A))[1].reshape(1),
    "householder_product": lambda A: lambda x: torch.linalg.householder_product(
        A[:, :3] + x[:, None], x[:3].sin()),
    # Served by the general fallback: torch's formula on one jvp level, double vjp on the
    # other, whose copy_ of tangents a grad level below must be able to differentiate.
    "lu_solve": lambda A: lambda x: torch.linalg.lu_solve(
        *torch.linalg.lu_factor(_well_conditioned(x, A)), x.cos().unsqueeze(-1)).squeeze(-1),
}


@pytest.mark.parametrize("name", list(LINALG))
def test_first_order_linalg_rules(xva, name):
    x, v, A = xva
    f = LINALG[name](A)
    both(lambda T: T.jvp(f, (x,), (v,)))
    both(lambda T: T.vmap(lambda t: T.jvp(f, (x,), (t,))[1])(torch.stack([v, v.cos()])))


@pytest.mark.parametrize("name", list(LINALG))
def test_reverse_over_forward_linalg_matches_finite_differences(xva, name):
    # grad(jvp(solve)) and grad(jvp(householder_product)): torch.func is wrong here.
    x, v, A = xva
    f = LINALG[name](A)
    e = torch.linspace(-1, 1, 6, dtype=torch.float64)
    h = lambda T, y: T.jvp(f, (y,), (v,))[1].sin().sum()  # noqa: E731
    close(h(ft, x), h(tf, x))
    g = ft.grad(lambda y: h(ft, y))(x)
    fd_close((g * e).sum(), directional_fd(lambda y: h(ft, y), x, e))


@pytest.mark.parametrize("name", ["solve", "det", "slogdet", "householder_product", "lu_solve"])
@pytest.mark.parametrize("outer", ["jvp", "grad"])
def test_third_order_two_forward_levels_linalg(xva, name, outer):
    # Two jvp levels and one more: the second jvp level used to reach the general fallback,
    # whose nested double-vjp crashed ("derivative for aten::copy is not implemented") or
    # was wrong. torch.func is wrong already at second order (its formulas read the LU
    # factors or the output): each order is checked by central differences of the one below,
    # the first against torch.func.
    x, v, A = xva
    f = LINALG[name](A)
    u = torch.linspace(-1, 1, 6, dtype=torch.float64).cos()
    first = lambda T, y: T.jvp(f, (y,), (v,))[1]  # noqa: E731
    second = lambda T, y: T.jvp(lambda z: first(T, z), (y,), (u,))[1]  # noqa: E731
    close(first(ft, x), first(tf, x))
    fd_close(second(ft, x), directional_fd(lambda y: first(ft, y), x, u))
    e = torch.linspace(-0.5, 1, 6, dtype=torch.float64)
    if outer == "jvp":
        third = ft.jvp(lambda y: second(ft, y), (x,), (e,))[1]
        fd_close(third, directional_fd(lambda y: second(ft, y), x, e))
    else:
        w = torch.linspace(1, 2, second(ft, x).numel(), dtype=torch.float64)
        s = lambda y: (second(ft, y).reshape(-1) * w).sum()  # noqa: E731
        fd_close((ft.grad(s)(x) * e).sum(), directional_fd(s, x, e))


def test_det_jvp_at_singular_matrix_is_zero_like_torch():
    A = torch.tensor([[1.0, 2.0], [2.0, 4.0]], dtype=torch.float64)
    E = torch.eye(2, dtype=torch.float64)
    both(lambda T: T.jvp(torch.linalg.det, (A,), (E,)))
    out = ft.grad(lambda a: ft.jvp(torch.linalg.det, (a,), (E,))[1])(A)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("stack", ["jvp_vjp_vjp", "jvp_jacrev_vjp", "grad_grad_grad"])
def test_det_third_order_two_reverse_levels(xva, stack):
    # NOTE [Ops whose torch backward breaks at higher order]: torch's det backward on
    # subclasses always takes the SVD path, whose next derivative divides by the gaps between
    # U's singular values (all 1): NaN or a percent off (torch.func too). Reference: central
    # differences of ft's second order, which is checked against torch.func.
    x, v, A = xva
    f = lambda y: torch.linalg.det(_well_conditioned(y, A)).exp().reshape(1)  # noqa: E731
    w = torch.linspace(1, 2, 6, dtype=torch.float64)

    def second(T, y):
        if stack == "grad_grad_grad":
            return T.grad(lambda z: (T.grad(lambda u: f(u).sum())(z) * w).sum())(y)
        f1 = lambda z: T.vjp(f, z)[1](torch.ones(1, dtype=torch.float64))[0]  # noqa: E731
        if stack == "jvp_jacrev_vjp":
            return T.jacrev(f1)(y) @ w
        return T.vjp(f1, y)[1](w)[0]

    close(second(ft, x), second(tf, x))
    if stack == "grad_grad_grad":
        third = ft.grad(lambda y: (second(ft, y) * v).sum())(x)
        fd_close((third * w).sum(), directional_fd(lambda y: (second(ft, y) * v).sum(), x, w))
    else:
        third = ft.jvp(lambda y: second(ft, y), (x,), (v,))[1]
        fd_close(third, directional_fd(lambda y: second(ft, y), x, v))


THIRD_ORDER_REVERSE = {
    "layer_norm": lambda y: F.layer_norm(y, (6,)),
    "layer_norm_2": lambda y: F.layer_norm(y.reshape(3, 2), (2,)).reshape(6),
    "batch_norm": lambda y: F.batch_norm(y.reshape(3, 2), None, None, training=True).reshape(6),
    "instance_norm": lambda y: F.instance_norm(y.reshape(1, 2, 3)).reshape(6),
    "group_norm": lambda y: F.group_norm(y.reshape(1, 6, 1), 2).reshape(6),
    # NOTE [Ops whose torch backward breaks at higher order]: log|grad| under a where().
    "logcumsumexp": lambda y: torch.logcumsumexp(3 * y, 0),
    "logcumsumexp_2d": lambda y: y.reshape(2, 3).logcumsumexp(1).reshape(6),
}


@pytest.mark.parametrize("name", list(THIRD_ORDER_REVERSE))
def test_third_order_three_reverse_levels(xva, name):
    # NOTE [Norm backwards differentiated twice]: torch's formula for the norm backwards reads
    # the saved mean and inverse std, which no level differentiates, so grad(grad(grad))
    # missed their dependence on the input (torch.func and plain autograd still do). The
    # reference is ft in forward mode only (jacfwd), checked against central differences.
    x, v, _ = xva
    w = torch.linspace(-1, 1, 6, dtype=torch.float64)
    norm = THIRD_ORDER_REVERSE[name]
    f = lambda y: (norm(y) * w.exp()).sum()  # noqa: E731

    def second(d):
        return lambda y: d(lambda z: d(f)(z) @ v.cos())(y) @ v.sin()

    close(ft.hessian(f)(x), tf.hessian(f)(x))
    forward_only = ft.jacfwd(second(ft.jacfwd))(x)
    close(ft.grad(second(ft.grad))(x), forward_only)
    fd_close(forward_only @ w, directional_fd(second(ft.grad), x, w))


def test_logcumsumexp_differentiated_in_a_cotangent_with_zeros():
    # torch's backward takes the log of the cotangent's parts; differentiating it with respect
    # to a cotangent that has zeros gave NaN (torch.func too).
    x = torch.tensor([0.3, -1.2, 2.0, 0.5], dtype=torch.float64)
    ct = torch.tensor([0.0, 1.5, 0.0, -2.0], dtype=torch.float64)
    e = torch.linspace(-1, 1, 4, dtype=torch.float64)
    pullback = lambda c: ft.vjp(lambda y: torch.logcumsumexp(y, 0), x)[1](c)[0]  # noqa: E731
    second = ft.grad(lambda c: (ft.grad(lambda y: (pullback(c) * y).sum())(x) * e).sum())(ct)
    fd = directional_fd(lambda c: (pullback(c) * e).sum(), ct, torch.eye(4, dtype=torch.float64)[0])
    assert torch.isfinite(second).all()
    fd_close(second[0], fd)
    close(ft.jacrev(ft.jacrev(lambda y: torch.logcumsumexp(y, 0)))(x),
          tf.jacrev(tf.jacrev(lambda y: torch.logcumsumexp(y, 0)))(x))


def test_third_order_conv_through_two_forward_levels():
    # The second jvp level serves convolution_backward by the general fallback's double vjp;
    # its output mask leaves some outputs None, which the fallback must skip.
    w = torch.linspace(-1, 1, 2, dtype=torch.float64).reshape(1, 1, 2)
    x = torch.linspace(-0.7, 0.9, 5, dtype=torch.float64)
    f = lambda y: torch.log_softmax(F.conv1d(y.reshape(1, 1, -1), w).reshape(-1), -1)  # noqa: E731
    both(lambda T: T.jvp(T.jacfwd(T.jacrev(f)), (x,), (x.cos(),))[1])


AS_STRIDED_TIMES = {
    "identity_view": lambda y: y * y.as_strided([6], [1]),
    "after_sin": lambda y: y * y.sin().as_strided([6], [1]),
    "group_norm_affine": lambda y: F.group_norm(  # torch's decomposition ends in as_strided
        y.reshape(1, 6, 1), 2, torch.linspace(0.5, 1.5, 6, dtype=torch.float64)).reshape(6),
}


@pytest.mark.parametrize("name", list(AS_STRIDED_TIMES))
def test_as_strided_tangent_views_under_vmap_and_nested_jvp(xva, name):
    # as_strided's backward writes the cotangent through a view of a fresh buffer; under a
    # jvp level that view's tangent must be a view of the buffer's tangent. A batched
    # (vmap) or dual (a second jvp) tangent was copied instead, so the write was lost:
    # hessian was off by 2 here.
    x, v, _ = xva
    w = torch.linspace(-1, 1, 6, dtype=torch.float64)
    f = lambda y: (AS_STRIDED_TIMES[name](y) * w).sum()  # noqa: E731
    both(lambda T: T.hessian(f)(x))
    hvp = lambda y: ft.jvp(ft.grad(f), (y,), (v,))[1]  # noqa: E731
    close(ft.jvp(hvp, (x,), (w,))[1], tf.jvp(lambda y: tf.jvp(tf.grad(f), (y,), (v,))[1], (x,), (w,))[1])
    fd_close(ft.jvp(hvp, (x,), (w,))[1], directional_fd(hvp, x, w))


SINGULAR = {
    "rank_n-1": torch.tensor([[1.0, 2.0, 3.0], [2.0, 4.0, 6.5], [1.0, 0.0, 1.0]]),
    "rank_n-2": torch.tensor([[1.0, 2.0, 3.0], [2.0, 4.0, 6.0], [3.0, 6.0, 9.0]]),
    "zero_row": torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [1.0, 0.0, 1.0]]),
}


@pytest.mark.parametrize("name", list(SINGULAR))
def test_det_second_order_at_singular_matrices(name):
    # The backward of a grad level that a level below differentiates is ours there; at a
    # (numerically) singular matrix it takes the SVD path as torch does, also in a batch
    # that mixes singular and invertible matrices.
    S = SINGULAR[name].to(torch.float64)
    S[1, 2] += 0.0 if name != "rank_n-1" else -0.5  # exactly rank deficient
    det_sum = lambda a: torch.linalg.det(a).sum()  # noqa: E731
    batch = torch.stack([S, S + torch.diag(torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64))])
    for A in (S, batch):
        # First order too: torch's formula without grad mode gives 0 at an exactly singular
        # matrix, torch.func (whose backward always runs with grad mode on) the cofactors.
        both(lambda T: T.jacrev(torch.linalg.det)(A))
        both(lambda T: T.vmap(T.grad(torch.linalg.det))(A.reshape(-1, 3, 3)))
        with torch.no_grad():
            both(lambda T: T.grad(det_sum)(A))
        both(lambda T: T.hessian(det_sum)(A))
        both(lambda T: T.jacrev(T.jacrev(det_sum))(A))
    # An invertible matrix with a repeated singular value: torch.func's SVD path gives NaN
    # there; plain autograd (which solves for invertible matrices) is the reference.
    repeated = torch.stack([S, S + 3 * torch.eye(3, dtype=torch.float64)])
    close(ft.hessian(det_sum)(repeated), torch.autograd.functional.hessian(det_sum, repeated))


def test_det_own_formula_only_under_differentiating_levels():
    # First-order reverse mode and plain calls keep torch's det and its autograd node.
    from functransforms.reverse.own_derivatives import _OwnDerivativesMode

    seen = []

    def f(a):
        seen.append(any(isinstance(m, _OwnDerivativesMode)
                        for m in torch.overrides._get_current_function_mode_stack()))
        return torch.linalg.det(a)

    A = torch.randn(3, 3, dtype=torch.float64) + 3 * torch.eye(3, dtype=torch.float64)
    ft.grad(f)(A)
    ft.vmap(ft.grad(f))(A.expand(2, 3, 3))
    ft.jacrev(ft.jacrev(f))(A)
    ft.jacfwd(ft.jacrev(f))(A)
    assert seen == [False, False, True, True]
    assert not torch.overrides._get_current_function_mode_stack()


@pytest.mark.parametrize("affine", [False, True])
def test_third_order_layer_norm_two_reverse_levels(affine):
    # layer norm's double backward builds temporaries from the cotangents alone and then
    # writes tangent- or batch-carrying values into them in place (NOTE [Writes a wrapper's
    # value cannot hold]); torch.func is wrong at third order here, so the reference is
    # central differences of ft's second order (which matches torch.func).
    g = torch.Generator().manual_seed(3)
    x, t, w1, w2, wt, b = torch.randn(6, 3, dtype=torch.float64, generator=g).unbind(0)
    f = lambda y: (F.layer_norm(y, (3,), *((wt, b) if affine else ())) * w1).sum().reshape(1)  # noqa: E731

    def second(T):
        def f1(y):
            out, pb = T.vjp(f, y)
            return pb(torch.ones_like(out))[0]

        def f2(y):
            out, pb = T.vjp(f1, y)
            return pb(w2)[0]

        return f2

    close(second(ft)(x), second(tf)(x))
    fd = directional_fd(second(ft), x, t)
    fd_close(ft.jvp(second(ft), (x,), (t,))[1], fd)
    # vmap outermost over reverse-over-reverse: the write lands in a temporary that is not
    # batched at the outer vmap.
    xs = torch.stack([x, x.cos()])
    both(lambda T: T.vmap(T.jacrev(T.jacrev(lambda y: F.layer_norm(y, (3,), *((wt, b) if affine else ())))))(xs))
    assert not level_stack()



@pytest.mark.parametrize("norm", ["batch_norm", "layer_norm"])
@pytest.mark.parametrize("linalg", ["solve", "det"])
def test_norm_then_linalg_forward_over_forward(norm, linalg):
    # torch.func is wrong here (its forward formulas for the norms and for solve/det read
    # outputs it does not differentiate); torch.func in reverse mode only is the reference.
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, dtype=torch.float64, generator=g)
    u, t = torch.randn(2, 2, 3, dtype=torch.float64, generator=g).unbind(0)
    eye = 4 * torch.eye(3, dtype=torch.float64)

    def f(y):
        if norm == "batch_norm":
            y = F.batch_norm(y, None, None, training=True)
        else:
            y = F.layer_norm(y, (3,))
        A = eye + torch.diag_embed(y.sin()) + 0.3 * torch.tanh(y.unsqueeze(-1) * y.unsqueeze(-2))
        if linalg == "solve":
            return torch.linalg.solve(A, y.unsqueeze(-1)).squeeze(-1)
        return torch.linalg.det(A)

    def jvp_by_jacrev(h, y, v):
        out = h(y)
        return (tf.jacrev(h)(y).reshape(out.numel(), -1) @ v.reshape(-1)).reshape(out.shape)

    actual = ft.jvp(lambda y: ft.jvp(f, (y,), (u,))[1], (x,), (t,))[1]
    expected = jvp_by_jacrev(lambda y: jvp_by_jacrev(f, y, u), x, t)
    torch.testing.assert_close(actual, expected, rtol=1e-7, atol=1e-9)
