"""jvp and linearize: API contract, rule families and compositions, against torch.func."""
import warnings

import expecttest
import pytest
import torch
import torch.func

import functransforms as ft
from functransforms.forward.fallback import jvp_fallback_counts

D = torch.float64


def rand(*shape, seed=0):
    return torch.randn(*shape, dtype=D, generator=torch.Generator().manual_seed(seed))


def assert_same(actual, expected):
    a, _ = torch.utils._pytree.tree_flatten(actual)
    e, _ = torch.utils._pytree.tree_flatten(expected)
    assert len(a) == len(e)
    for x, y in zip(a, e):
        assert type(x) is torch.Tensor, type(x)
        torch.testing.assert_close(x, y)


def both(transform_ft, transform_tf, *args):
    return transform_ft(*args), transform_tf(*args)


def test_whirlwind_tour_example():
    from functransforms import jvp

    x = torch.randn(5)
    y = torch.randn(5)
    f = lambda x, y: (x * y)
    _, out_tangent = jvp(f, (x, y), (torch.ones(5), torch.ones(5)))
    assert torch.allclose(out_tangent, x + y)


FUNCTIONS = {
    "unary_chain": lambda x: x.sin().exp().tanh().sigmoid().sqrt(),
    "saves_outputs": lambda x: x.exp() * x.tanh() + x.sigmoid().rsqrt(),
    "softmax": lambda x: x.softmax(-1) + x.log_softmax(0),
    "reductions": lambda x: x.sum(0) + x.mean(0, keepdim=True).squeeze(0) * x.var(0) + x.amax(0) + x.std(),
    "views": lambda x: x.t().reshape(-1)[2:7].unsqueeze(0).expand(3, 5).flip(0),
    "matmul": lambda x: (x @ x.t()).addmm(x, x.t(), beta=0.5) @ x,
    "index": lambda x: x[[0, 2]].gather(1, torch.tensor([[0, 1], [2, 0]])).sum() + x.index_select(0, torch.tensor([1, 1])),
    "cat_stack": lambda x: torch.cat([x, x.sin()], 0).sum(0) + torch.stack([x, x * 2]).mean(0).sum(0),
    "max_dim": lambda x: x.max(1).values + x.sort(1).values[:, 0] + x.topk(2, 0).values.sum(0)[:3],
    "layer_norm": lambda x: torch.nn.functional.layer_norm(x, (4,)),
    "pow_div": lambda x: x.abs().pow(1.5) / (1 + x * x) + torch.atan2(x, x.cos() + 2),
    "where_clamp": lambda x: torch.where(x > 0, x.clamp(max=0.5), x * 3).cumsum(0),
}


@pytest.mark.parametrize("name", FUNCTIONS)
def test_jvp_matches_torch_func(name):
    f = FUNCTIONS[name]
    x, t = rand(3, 4), rand(3, 4, seed=1)
    assert_same(ft.jvp(f, (x,), (t,)), torch.func.jvp(f, (x,), (t,)))


def test_conv2d_all_inputs():
    f = lambda x, w, b: torch.nn.functional.conv2d(x, w, b, padding=1).tanh()
    primals = (rand(2, 3, 5, 5), rand(4, 3, 3, 3, seed=1), rand(4, seed=2))
    tangents = tuple(rand(*p.shape, seed=i + 3) for i, p in enumerate(primals))
    assert_same(ft.jvp(f, primals, tangents), torch.func.jvp(f, primals, tangents))


def test_multiple_inputs_pytree_and_constant_output():
    def f(d, y):
        return {"a": d["x"] * y, "b": torch.ones(2, dtype=D)}

    primals = ({"x": rand(3)}, rand(3, seed=1))
    tangents = ({"x": rand(3, seed=2)}, rand(3, seed=3))
    assert_same(ft.jvp(f, primals, tangents), torch.func.jvp(f, primals, tangents))


def test_has_aux():
    f = lambda x: (x.sin(), {"c": x.cos()})
    x, t = rand(3), rand(3, seed=1)
    out, t_out, aux = ft.jvp(f, (x,), (t,), has_aux=True)
    assert_same((out, t_out, aux), torch.func.jvp(f, (x,), (t,), has_aux=True))


def test_zero_tangents_stay_unmaterialised():
    # Only x has a tangent flowing into mul's second operand: no zeros are built for w.
    w = rand(3)
    seen = []

    class Spy(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    with Spy():
        ft.jvp(lambda x: x * w, (rand(3, seed=1),), (rand(3, seed=2),))
    assert torch.ops.aten.zeros_like.default not in seen
    assert torch.ops.aten.zeros.default not in seen


def test_inplace_on_dual():
    def f(x):
        y = x.clone()
        y.mul_(2).add_(x.sin())
        return y

    x, t = rand(4), rand(4, seed=1)
    assert_same(ft.jvp(f, (x,), (t,)), torch.func.jvp(f, (x,), (t,)))


def test_detach_drops_tangent():
    f = lambda x: x.detach() * x
    x, t = rand(3), rand(3, seed=1)
    assert_same(ft.jvp(f, (x,), (t,)), torch.func.jvp(f, (x,), (t,)))


def test_general_fallback_is_counted_and_correct():
    # linalg_inv_ex has neither a rule nor a decomposition.
    f = lambda x: torch.linalg.inv(x)
    x = rand(3, 3) + 3 * torch.eye(3, dtype=D)
    t = rand(3, 3, seed=1)
    before = jvp_fallback_counts().get("linalg_inv_ex.default", 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert_same(ft.jvp(f, (x,), (t,)), torch.func.jvp(f, (x,), (t,)))
        # Under vmap the primals are wrapped, so the double-vjp path is taken.
        xs, ts = torch.stack([x, x.t()]), torch.stack([t, t * 2])
        g = lambda x, t: ft.jvp(f, (x,), (t,))
        h = lambda x, t: torch.func.jvp(f, (x,), (t,))
        assert_same(ft.vmap(g)(xs, ts), torch.func.vmap(h)(xs, ts))
    assert jvp_fallback_counts()["linalg_inv_ex.default"] > before


# -- compositions ------------------------------------------------------------------------


def scalar_fn(x):
    return (x.sin() * x.exp()).sum() + x.tanh().pow(2).sum() + x.softmax(0).max()


def test_hessian_vector_product_jvp_of_grad():
    x, v = rand(5), rand(5, seed=1)
    assert_same(
        ft.jvp(ft.grad(scalar_fn), (x,), (v,)),
        torch.func.jvp(torch.func.grad(scalar_fn), (x,), (v,)),
    )


def test_grad_of_jvp():
    x, v = rand(5), rand(5, seed=1)
    f_ft = lambda x: ft.jvp(scalar_fn, (x,), (v,))[1]
    f_tf = lambda x: torch.func.jvp(scalar_fn, (x,), (v,))[1]
    assert_same(ft.grad(f_ft)(x), torch.func.grad(f_tf)(x))


def test_vmap_of_jvp_over_tangents_is_jacfwd():
    # jacfwd = vmap over the tangents of jvp: the tangents are BatchedTensors, the primal is not.
    x = rand(4)
    f = lambda x: x.sin().cumsum(0) * x.softmax(0)
    basis = torch.eye(4, dtype=D)
    jac_ft = ft.vmap(lambda t: ft.jvp(f, (x,), (t,))[1])(basis)
    jac_tf = torch.func.vmap(lambda t: torch.func.jvp(f, (x,), (t,))[1])(basis)
    assert_same(jac_ft, jac_tf)


def test_vmap_of_jvp_over_primals_and_jvp_of_vmap():
    xs, ts = rand(3, 4), rand(3, 4, seed=1)
    f = lambda x: (x.exp() * x.sum()).tanh()
    g_ft = lambda x, t: ft.jvp(f, (x,), (t,))
    g_tf = lambda x, t: torch.func.jvp(f, (x,), (t,))
    assert_same(ft.vmap(g_ft)(xs, ts), torch.func.vmap(g_tf)(xs, ts))
    assert_same(ft.jvp(ft.vmap(f), (xs,), (ts,)), torch.func.jvp(torch.func.vmap(f), (xs,), (ts,)))


@pytest.mark.parametrize("op", [torch.exp, torch.tanh, torch.sigmoid, lambda x: x.softmax(0)])
def test_jvp_of_jvp_saves_outputs(op):
    x, u, v = rand(4), rand(4, seed=1), rand(4, seed=2)
    inner_ft = lambda x: ft.jvp(op, (x,), (u,))[1]
    inner_tf = lambda x: torch.func.jvp(op, (x,), (u,))[1]
    assert_same(ft.jvp(inner_ft, (x,), (v,)), torch.func.jvp(inner_tf, (x,), (v,)))
    # Third order too.
    outer_ft = lambda x: ft.jvp(inner_ft, (x,), (v,))[1]
    outer_tf = lambda x: torch.func.jvp(inner_tf, (x,), (v,))[1]
    assert_same(ft.jvp(outer_ft, (x,), (u,)), torch.func.jvp(outer_tf, (x,), (u,)))


def test_jvp_of_vjp():
    x, ct, v = rand(4), rand(4, seed=1), rand(4, seed=2)
    f = lambda x: x.exp() * x.sin()

    def pullback(vjp):
        return lambda x: vjp(f, x)[1](ct)[0]

    assert_same(ft.jvp(pullback(ft.vjp), (x,), (v,)), torch.func.jvp(pullback(torch.func.vjp), (x,), (v,)))


def test_perturbation_confusion_between_jvp_levels():
    # d/dx [x * d/dy (x * y)] = d/dx [x * x] = 2x: the inner jvp must not pick up x's tangent.
    x, y = rand(3), rand(3, seed=1)
    one = torch.ones(3, dtype=D)

    def outer(jvp):
        return lambda x: x * jvp(lambda y: x * y, (y,), (one,))[1]

    assert_same(ft.jvp(outer(ft.jvp), (x,), (one,)), torch.func.jvp(outer(torch.func.jvp), (x,), (one,)))
    torch.testing.assert_close(ft.jvp(outer(ft.jvp), (x,), (one,))[1], 2 * x)


def test_perturbation_confusion_jvp_and_grad():
    x, y = rand(3), rand(3, seed=1)
    one = torch.ones(3, dtype=D)

    def make(jvp, grad):
        return lambda x: jvp(lambda y: grad(lambda x2: (x2 * y * x).sum())(x), (y,), (one,))[1].sum()

    assert_same(ft.grad(make(ft.jvp, ft.grad))(x), torch.func.grad(make(torch.func.jvp, torch.func.grad))(x))
    g_ft = lambda y: ft.grad(lambda x: ft.jvp(lambda y2: (x * y2 * y).sum(), (y,), (one,))[1])(x)
    g_tf = lambda y: torch.func.grad(lambda x: torch.func.jvp(lambda y2: (x * y2 * y).sum(), (y,), (one,))[1])(x)
    assert_same(ft.jvp(g_ft, (y,), (one,)), torch.func.jvp(g_tf, (y,), (one,)))


def test_torch_autograd_around_jvp():
    x = rand(3).requires_grad_()
    t = rand(3, seed=1)
    (ft_x,) = torch.autograd.grad(ft.jvp(torch.sin, (x,), (t,))[1].sum(), x)
    (tf_x,) = torch.autograd.grad(torch.func.jvp(torch.sin, (x,), (t,))[1].sum(), x)
    torch.testing.assert_close(ft_x, tf_x)


# -- linearize ---------------------------------------------------------------------------


def test_linearize_matches_jvp_and_runs_f_once():
    calls = []

    def f(x, y):
        calls.append(1)
        return {"a": x.sin() * y, "b": (x @ y.unsqueeze(-1)).exp()}

    x, y = rand(3, 3), rand(3, seed=1)
    out, jvp_fn = ft.linearize(f, x, y)
    assert len(calls) == 1
    tx, ty = rand(3, 3, seed=2), rand(3, seed=3)
    t_out = jvp_fn(tx, ty)
    t_out2 = jvp_fn(ty.expand(3, 3), tx[0])
    assert len(calls) == 1
    assert_same((out, t_out), torch.func.jvp(f, (x, y), (tx, ty)))
    assert_same(t_out2, torch.func.jvp(f, (x, y), (ty.expand(3, 3), tx[0]))[1])


def test_linearize_linear_function_and_vmap():
    out, jvp_fn = ft.linearize(lambda x: x.sum(0), rand(3, 2))
    torch.testing.assert_close(jvp_fn(torch.ones(3, 2, dtype=D)), torch.full((2,), 3.0, dtype=D))
    x = rand(4)
    _, jvp_fn = ft.linearize(torch.tanh, x)
    basis = torch.eye(4, dtype=D)
    torch.testing.assert_close(ft.vmap(jvp_fn)(basis), torch.diag(1 - x.tanh() ** 2))


# -- errors ------------------------------------------------------------------------------


class TestErrors(expecttest.TestCase):
    def assert_error(self, fn, expected):
        with self.assertRaises(RuntimeError) as ctx:
            fn()
        self.assertExpectedInline(str(ctx.exception), expected, skip=1)

    def test_primals_not_tuple(self):
        x = rand(3)
        self.assert_error(lambda: ft.jvp(torch.sin, x, (x,)), """jvp(f, primals, tangents): Expected primals to be a tuple. E.g. it should be valid to call f(*primals). Got Tensor.""")

    def test_structure_mismatch(self):
        x = rand(3)
        self.assert_error(lambda: ft.jvp(torch.sin, (x,), (x, x)), """jvp(f, primals, tangents): Expected primals and tangents to have the same python structure (one tangent per primal, in a tuple like primals), got primals (*,) and tangents (*, *).""")

    def test_shape_mismatch(self):
        self.assert_error(lambda: ft.jvp(torch.sin, (rand(3),), (rand(4),)), """\
jvp(f, primals, tangents): each tangent must have the shape of its primal, got a primal of shape (3,) with a tangent of shape (4,).""")

    def test_non_tensor_primal(self):
        self.assert_error(lambda: ft.jvp(torch.sin, (3.0,), (3.0,)), """jvp(f, primals, tangents): Expected primals to only contain Tensors, got float.""")

    def test_integer_primal(self):
        x = torch.arange(3)
        self.assert_error(lambda: ft.jvp(torch.sin, (x,), (x,)), """\
jvp(f, primals, tangents): primals must be floating point or complex Tensors to be differentiated, got one of dtype torch.int64.""")

    def test_non_tensor_output(self):
        x = rand(3)
        self.assert_error(lambda: ft.jvp(lambda x: (x, 3), (x,), (x,)), """jvp(f, primals, tangents): expected f(*primals) to return only tensors, got unsupported type int.""")

    def test_bad_aux(self):
        x = rand(3)
        self.assert_error(lambda: ft.jvp(lambda x: x, (x,), (x,), has_aux=True), """jvp(f, primals, tangents): output of function f should be a tuple: (output, aux) if has_aux is True, got Tensor.""")

    def test_mutating_captured_tensor(self):
        x, captured = rand(3), rand(3, seed=1)
        self.assert_error(lambda: ft.jvp(lambda x: captured.add_(x), (x,), (x,)), """During a jvp transform, the function called the in-place operation aten::add_.Tensor that would mutate a captured Tensor: one that is not a dual of this jvp level (captured from outside the transform, or created inside it without depending on its inputs). Its tangent would be lost. Pass that tensor as an input of the function, or use the out-of-place version of the operation.""")

    def test_linearize_bad_tangent(self):
        _, jvp_fn = ft.linearize(torch.sin, rand(3))
        self.assert_error(lambda: jvp_fn(rand(4)), """\
linearize: jvp_fn expects each tangent to be a Tensor shaped like its primal (3,), got (4,).""")


def test_hvp_through_backward_formulas_has_direct_rules():
    # jvp(grad(f)) pushes tangents through autograd's backward formulas; the common ones
    # (threshold_backward, nll_loss_backward, softmax/log_softmax backward) have rules.
    import torch.nn.functional as F

    torch.manual_seed(0)
    p = {"w1": torch.randn(20, 16, dtype=torch.float64), "w2": torch.randn(16, 5, dtype=torch.float64)}
    x, y = torch.randn(8, 20, dtype=torch.float64), torch.randint(0, 5, (8,))

    def loss(p):
        h = torch.relu(x @ p["w1"])
        return F.nll_loss(F.log_softmax(h @ p["w2"], -1), y) + F.softmax(h, -1).sum() * 0.1

    v = {k: torch.randn_like(t) for k, t in p.items()}
    ft.reset_jvp_fallback_counts()
    ours = ft.jvp(ft.grad(loss), (p,), (v,))[1]
    theirs = torch.func.jvp(torch.func.grad(loss), (p,), (v,))[1]
    for k in p:
        torch.testing.assert_close(ours[k], theirs[k])
    assert ft.jvp_fallback_counts() == {}


# Ops that are not holomorphic (abs, sgn, var) or whose derivative has a branch cut
# (acosh) need their own complex formulas: the tangent is not ``t * f'(z)`` with the real one.
COMPLEX_OPS = {
    "abs": torch.abs,
    "sgn": torch.sgn,
    "acosh": torch.acosh,
    "var": lambda z: z.var(0),
    "std": lambda z: z.std(),
    "pow": lambda z: z ** (z * 0.5),
    "normalized": lambda z: z / z.abs(),
}


@pytest.mark.parametrize("name", list(COMPLEX_OPS))
def test_complex_non_holomorphic(name):
    g = torch.Generator().manual_seed(0)
    z, t = (torch.randn(4, 3, dtype=torch.complex128, generator=g) for _ in range(2))
    f = COMPLEX_OPS[name]
    assert_same(ft.jvp(f, (z,), (t,)), torch.func.jvp(f, (z,), (t,)))


def _write_into_base(x, y):
    view = x[0, ::2]
    x.copy_(y)
    x[1].mul_(2)
    return x, view


def _write_into_base_of_clone(x, y):
    z = x * 1.0
    view = z.t()[::2]
    z.add_(y)
    return z, view, x


@pytest.mark.parametrize("f", [_write_into_base, _write_into_base_of_clone])
def test_inplace_on_base_reaches_earlier_views(f):
    # A view taken before an in-place write into its base sees the base's new tangent.
    x, xt, y, yt = rand(2, 6, seed=1), rand(2, 6, seed=2), rand(2, 6, seed=3), rand(2, 6, seed=4)
    ours = ft.jvp(f, (x.clone(), y), (xt.clone(), yt))
    theirs = torch.func.jvp(f, (x.clone(), y), (xt.clone(), yt))
    assert_same(ours, theirs)


def test_vmap_of_jvp_inplace_on_base_reaches_earlier_views():
    B = 3
    x, xt = rand(2, B, 6, seed=1), rand(2, 6, B, seed=2)
    y, yt = rand(2, B, 6, seed=3), rand(2, B, 6, seed=4)

    def run(vmap, jvp):
        push = lambda a, at, b, bt: jvp(_write_into_base, (a, b), (at, bt))  # noqa: E731
        return vmap(push, in_dims=(1, 2, 1, 1))(x.clone(), xt.clone(), y, yt)

    assert_same(run(ft.vmap, ft.jvp), run(torch.func.vmap, torch.func.jvp))


def test_inplace_does_not_write_into_another_duals_tangent():
    def f(x):
        z = x + 1.0  # z's tangent may be x's tangent object
        z.mul_(3)
        return x, z

    x, xt = rand(4, seed=1), rand(4, seed=2)
    ours = ft.jvp(f, (x,), (xt.clone(),))
    theirs = torch.func.jvp(f, (x,), (xt.clone(),))
    assert_same(ours, theirs)
