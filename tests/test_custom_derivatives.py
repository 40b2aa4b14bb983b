"""custom_vjp and custom_jvp: the rules are called (counted), results match the rules, and
every transform and two-level composition behaves as in JAX, against explicit formulas,
torch.func on the equivalent explicit code or finite differences; float64."""
import functools

import pytest
import torch
import torch.func as tf

import functransforms as ft
from functransforms.core.levels import level_stack

D = torch.float64


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


def close(a, b):
    torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-7)


# ---------------------------------------------------------------------------------------
# A custom_vjp whose rule is deliberately *not* the true derivative, so results show which
# rule ran: f(x, y) = sin(x) * y, with d/dx replaced by 2 * x * y * g (bwd's own derivative
# in x is 2 * y * g).


def make_fake_vjp():
    calls = {"fun": 0, "fwd": 0, "bwd": 0}

    @ft.custom_vjp
    def f(x, y):
        calls["fun"] += 1
        return x.sin() * y

    def f_fwd(x, y):
        calls["fwd"] += 1
        return x.sin() * y, (x, y)

    def f_bwd(res, g):
        calls["bwd"] += 1
        x, y = res
        return 2 * x * y * g, x.sin() * g

    f.defvjp(f_fwd, f_bwd)
    return f, calls


def rule_grads(x, y, g):
    return 2 * x * y * g, x.sin() * g


def xy():
    g = torch.Generator().manual_seed(1)
    return (torch.randn(4, generator=g, dtype=D), torch.randn(4, generator=g, dtype=D),
            torch.randn(4, generator=g, dtype=D))


def test_custom_vjp_eager_and_vmap_call_only_fun():
    f, calls = make_fake_vjp()
    x, y, _ = xy()
    close(f(x, y), x.sin() * y)
    close(ft.vmap(f)(x, y), x.sin() * y)
    close(ft.vmap(f, in_dims=(0, None))(x, y[0]), x.sin() * y[0])
    assert calls == {"fun": 3, "fwd": 0, "bwd": 0}


def test_custom_vjp_grad_vjp_jacrev_use_the_rule():
    f, calls = make_fake_vjp()
    x, y, g = xy()
    gx, gy = ft.grad(lambda x, y: f(x, y).sum(), argnums=(0, 1))(x, y)
    close(gx, 2 * x * y)
    close(gy, x.sin())
    assert calls == {"fun": 0, "fwd": 1, "bwd": 1}
    out, vjp_fn = ft.vjp(f, x, y)
    close(out, x.sin() * y)
    for a, b in zip(vjp_fn(g), rule_grads(x, y, g)):
        close(a, b)
    close(ft.jacrev(f)(x, y), torch.diag(2 * x * y))
    # jacrev vmaps the backward pass over the basis: bwd still runs once, batched.
    assert calls == {"fun": 0, "fwd": 3, "bwd": 3}


def test_custom_vjp_vmap_of_grad_batches_the_rules_by_vmapping_them():
    f, calls = make_fake_vjp()
    x, y, _ = xy()
    ft.reset_fallback_counts()
    out = ft.vmap(ft.grad(f, argnums=(0, 1)))(x, y)
    close(out[0], 2 * x * y)
    close(out[1], x.sin())
    assert calls == {"fun": 0, "fwd": 1, "bwd": 1}  # once each, batched
    # An unbatched argument's cotangent is summed over the batch.
    gy = ft.grad(lambda y: ft.vmap(f, in_dims=(0, None))(x, y).sum())(y[0])
    close(gy, x.sin().sum())
    gx, gy = ft.vmap(ft.grad(f, argnums=(0, 1)), in_dims=(0, None))(x, y[0])
    close(gx, 2 * x * y[0])
    close(gy, x.sin())
    assert ft.fallback_counts() == {}


def test_custom_vjp_second_order_uses_bwds_own_derivative():
    f, calls = make_fake_vjp()
    x, y, g = xy()
    # d/dx of bwd's 2*x*y*g is 2*y*g: grad(grad), hessian (jacfwd over jacrev) and
    # forward-over-reverse all see bwd as ordinary code.
    close(ft.grad(ft.grad(f))(x[0], y[0]), 2 * y[0])
    close(ft.hessian(lambda x: f(x, y).sum())(x), torch.diag(2 * y))
    close(ft.jacrev(ft.jacrev(lambda x: f(x, y).sum()))(x), torch.diag(2 * y))
    close(ft.jvp(ft.grad(lambda x: f(x, y).sum()), (x,), (g,))[1], 2 * y * g)
    close(ft.vmap(ft.grad(ft.grad(f)))(x, y), 2 * y)
    close(ft.grad(lambda x: ft.vmap(ft.grad(f))(x, y).sum())(x), 2 * y)


def test_custom_vjp_forward_mode_raises_jax_error_and_stack_stays_clean():
    f, calls = make_fake_vjp()
    x, y, g = xy()
    for run in (lambda: ft.jvp(f, (x, y), (g, g)), lambda: ft.jacfwd(f)(x, y),
                lambda: ft.vmap(lambda x: ft.jvp(lambda x: f(x, y[0]), (x,), (x,)))(x)):
        with pytest.raises(TypeError, match=r"can't apply forward-mode autodiff \(jvp\) to a "
                                            r"custom_vjp function"):
            run()
        assert level_stack() == []
    close(ft.grad(lambda x: f(x, y).sum())(x), 2 * x * y)


def test_custom_vjp_hessian_raises_when_fwd_calls_the_function_itself():
    # As in JAX: fwd calling f puts a custom_vjp call under the outer jvp of jacfwd.
    @ft.custom_vjp
    def f(x):
        return x.sin()
    f.defvjp(lambda x: (f(x), x), lambda x, g: (g * x.cos(),))
    x = torch.randn(3, dtype=D)
    close(ft.grad(lambda x: f(x).sum())(x), x.cos())
    close(ft.grad(ft.grad(f))(x[0]), -x[0].sin())  # reverse over reverse is fine
    with pytest.raises(TypeError, match="forward-mode autodiff"):
        ft.hessian(lambda x: f(x).sum())(x)


def test_custom_vjp_gradient_clipping_with_nondiff_argnums():
    calls = []

    @functools.partial(ft.custom_vjp, nondiff_argnums=(0, 1))
    def clip_gradient(lo, hi, x):
        return x

    def fwd(lo, hi, x):
        return x, None

    def bwd(lo, hi, _, g):
        calls.append((lo, hi))
        return (g.clamp(lo, hi),)
    clip_gradient.defvjp(fwd, bwd)
    x = torch.linspace(-3, 3, 7, dtype=D)
    loss = lambda x: (clip_gradient(-0.5, 1.0, x) ** 3).sum()  # noqa: E731
    close(ft.grad(loss)(x), (3 * x ** 2).clamp(-0.5, 1.0))
    close(ft.vmap(ft.grad(lambda x: clip_gradient(-0.5, 1.0, x) ** 3))(x),
          (3 * x ** 2).clamp(-0.5, 1.0))
    assert calls == [(-0.5, 1.0)] * 2
    # Keyword arguments are bound to their positions.
    close(ft.grad(lambda x: clip_gradient(-1.0, 1.0, x=x).sum() * 5)(x), torch.ones(7, dtype=D))


def test_custom_vjp_pytrees_and_none_cotangents():
    @ft.custom_vjp
    def f(p, z):
        return {"a": p["w"] * z, "b": p["b"].exp()}

    def fwd(p, z):
        return f(p, z), (p, z)

    def bwd(res, g):
        p, z = res
        return {"w": g["a"] * z, "b": None}, None
    f.defvjp(fwd, bwd)
    p = {"w": torch.randn(3, dtype=D), "b": torch.randn(3, dtype=D)}
    z = torch.randn(3, dtype=D)
    grads = ft.grad(lambda p, z: f(p, z)["a"].sum() + f(p, z)["b"].sum(), argnums=(0, 1))(p, z)
    close(grads[0]["w"], z)
    close(grads[0]["b"], torch.zeros(3, dtype=D))
    close(grads[1], torch.zeros(3, dtype=D))


def test_custom_vjp_rule_errors():
    x = torch.randn(3, dtype=D)

    @ft.custom_vjp
    def f(x, y):
        return x * y
    with pytest.raises(AttributeError, match="No VJP defined for custom_vjp function f using "
                                             "defvjp"):
        f(x, x)
    f.defvjp(lambda x, y: x * y, lambda res, g: (g, g))
    with pytest.raises(TypeError, match=r"must produce a pair \(list or tuple of length two\)"):
        ft.grad(lambda x: f(x, x).sum())(x)
    f.defvjp(lambda x, y: (x * y, None), lambda res, g: (g,))
    with pytest.raises(TypeError, match="must produce a tuple of length equal to the number of "
                                        "arguments to the primal function"):
        ft.grad(lambda x: f(x, x).sum())(x)
    f.defvjp(lambda x, y: (x * y, None), lambda res, g: (g[:2], g))
    with pytest.raises(ValueError, match="same shape/dtypes as the args tuple"):
        ft.grad(lambda x: f(x, x).sum())(x)
    assert level_stack() == []
    f.defvjp(lambda x, y: (x * y, y), lambda y, g: (g * y, None))
    close(ft.grad(lambda x: f(x, x + 1).sum())(x), x + 1)


def test_custom_vjp_closure_over_differentiated_value_raises():
    x = torch.randn(3, dtype=D)

    def outer(w):
        @ft.custom_vjp
        def f(z):
            return z * w
        f.defvjp(lambda z: (z * w, None), lambda _, g: (g * w,))
        return f(x).sum()
    with pytest.raises(TypeError, match="Detected differentiation of a custom_vjp function with "
                                        "respect to a closed-over value"):
        ft.grad(outer)(torch.tensor(2.0, dtype=D))
    assert level_stack() == []

    @functools.partial(ft.custom_vjp, nondiff_argnums=(1,))
    def g(z, w):
        return z * w
    g.defvjp(lambda z, w: (z * w, None), lambda w, _, ct: (ct * w,))
    with pytest.raises(TypeError, match="nondiff_argnums"):
        ft.grad(lambda w: g(x, w).sum())(torch.tensor(2.0, dtype=D))
    assert level_stack() == []


def test_custom_vjp_inside_capture_replays():
    f, calls = make_fake_vjp()
    x, y, _ = xy()
    captured = ft.capture(ft.vmap(ft.grad(f)))
    for scale in (1.0, 2.0, -1.0):
        close(captured(x * scale, y), 2 * x * scale * y)
    assert calls["bwd"] == 1  # recorded once, then replayed


# ---------------------------------------------------------------------------------------
# custom_jvp: f(x) = sin(x) with the rule's tangent 3 * x**2 * t (derivative of x**3).


def make_fake_jvp():
    calls = {"fun": 0, "rule": 0}

    @ft.custom_jvp
    def f(x):
        calls["fun"] += 1
        return x.sin()

    @f.defjvp
    def f_jvp(primals, tangents):
        calls["rule"] += 1
        (x,), (t,) = primals, tangents
        return x.sin(), 3 * x ** 2 * t
    return f, calls


def test_custom_jvp_eager_and_vmap_call_only_fun():
    f, calls = make_fake_jvp()
    x, _, _ = xy()
    close(f(x), x.sin())
    close(ft.vmap(f)(x), x.sin())
    assert calls == {"fun": 2, "rule": 0}


def test_custom_jvp_forward_mode_uses_the_rule():
    f, calls = make_fake_jvp()
    x, _, t = xy()
    out, tan = ft.jvp(f, (x,), (t,))
    close(out, x.sin())
    close(tan, 3 * x ** 2 * t)
    assert calls == {"fun": 0, "rule": 1}
    close(ft.jacfwd(f)(x), torch.diag(3 * x ** 2))
    close(ft.vmap(lambda x, t: ft.jvp(f, (x,), (t,))[1])(x, t), 3 * x ** 2 * t)
    assert calls == {"fun": 0, "rule": 3}


def test_custom_jvp_reverse_mode_transposes_the_rule():
    f, calls = make_fake_jvp()
    x, _, g = xy()
    close(ft.grad(lambda x: f(x).sum())(x), 3 * x ** 2)
    assert calls["rule"] == 1
    out, vjp_fn = ft.vjp(f, x)
    close(vjp_fn(g)[0], 3 * x ** 2 * g)
    close(ft.jacrev(f)(x), torch.diag(3 * x ** 2))
    close(ft.vmap(ft.grad(f))(x), 3 * x ** 2)
    close(ft.grad(lambda x: ft.vmap(f)(x).sum())(x), 3 * x ** 2)


def test_custom_jvp_second_order_differentiates_the_rule():
    f, _ = make_fake_jvp()
    x, _, t = xy()
    for H in (ft.hessian(lambda x: f(x).sum())(x), ft.jacrev(ft.jacrev(lambda x: f(x).sum()))(x),
              ft.jacfwd(ft.jacfwd(lambda x: f(x).sum()))(x),
              ft.jacrev(ft.jacfwd(lambda x: f(x).sum()))(x)):
        close(H, torch.diag(6 * x))
    close(ft.grad(ft.grad(f))(x[0]), 6 * x[0])
    close(ft.vmap(ft.grad(ft.grad(f)))(x), 6 * x)
    close(ft.jvp(ft.grad(lambda x: f(x).sum()), (x,), (t,))[1], 6 * x * t)


def test_custom_jvp_numerically_safe_softplus_against_reference():
    @ft.custom_jvp
    def softplus(x):
        return torch.log1p(torch.exp(x))

    @softplus.defjvp
    def softplus_jvp(primals, tangents):
        (x,), (t,) = primals, tangents
        return softplus(x), torch.sigmoid(x) * t
    x = torch.tensor([-50.0, -1.0, 0.0, 2.0, 800.0], dtype=D)
    naive = ft.grad(lambda x: torch.log1p(torch.exp(x)).sum())(x)
    assert torch.isnan(naive[-1])  # exp overflows: inf / inf
    close(ft.grad(lambda x: softplus(x).sum())(x), torch.sigmoid(x))
    close(ft.vmap(ft.grad(softplus))(x), torch.sigmoid(x))
    close(ft.jacfwd(softplus)(x), torch.diag(torch.sigmoid(x)))
    s = torch.sigmoid(x)
    close(ft.hessian(lambda x: softplus(x).sum())(x), torch.diag(s * (1 - s)))
    # Where the naive formula is fine, both agree with finite differences.
    x0 = torch.tensor([-1.0, 0.5, 2.0], dtype=D)
    eps = 1e-6
    fd = (torch.log1p(torch.exp(x0 + eps)) - torch.log1p(torch.exp(x0 - eps))) / (2 * eps)
    torch.testing.assert_close(ft.grad(lambda x: softplus(x).sum())(x0), fd, atol=1e-8, rtol=1e-6)


def test_custom_jvp_nondiff_argnums_and_pytrees():
    calls = []

    @functools.partial(ft.custom_jvp, nondiff_argnums=(0,))
    def apply(fn, p):
        return {"y": fn(p["a"]) * p["b"]}

    @apply.defjvp
    def apply_jvp(fn, primals, tangents):
        calls.append(fn)
        (p,), (t,) = primals, tangents
        y = fn(p["a"]) * p["b"]
        return {"y": y}, {"y": p["a"].cos() * p["b"] * t["a"] + fn(p["a"]) * t["b"]}
    p = {"a": torch.randn(3, dtype=D), "b": torch.randn(3, dtype=D)}
    g = ft.grad(lambda p: apply(torch.sin, p)["y"].sum())(p)
    ref = tf.grad(lambda p: (p["a"].sin() * p["b"]).sum())(p)
    close(g["a"], ref["a"])
    close(g["b"], ref["b"])
    assert calls == [torch.sin]


def test_custom_jvp_rule_errors_and_closures():
    x = torch.randn(3, dtype=D)

    @ft.custom_jvp
    def f(x):
        return x.sin()
    with pytest.raises(AttributeError, match="No JVP defined for custom_jvp function f using "
                                             "defjvp"):
        f(x)
    f.defjvp(lambda p, t: p[0].sin())
    with pytest.raises(TypeError, match="must produce a pair"):
        ft.jvp(f, (x,), (x,))
    f.defjvp(lambda p, t: (p[0].sin(), (t[0],)))
    with pytest.raises(TypeError, match="equal container \\(pytree\\) structures"):
        ft.jvp(f, (x,), (x,))
    f.defjvp(lambda p, t: (p[0].sin(), t[0][:2]))
    with pytest.raises(ValueError, match="corresponding shapes"):
        ft.grad(lambda x: f(x).sum())(x)
    assert level_stack() == []

    def outer(w):
        @ft.custom_jvp
        def g(z):
            return z * w
        g.defjvp(lambda p, t: (p[0] * w, t[0] * w))
        return g(x).sum()
    with pytest.raises(TypeError, match="custom_jvp function with respect to a closed-over"):
        ft.grad(outer)(torch.tensor(2.0, dtype=D))
    with pytest.raises(TypeError, match="closed-over"):
        ft.jvp(outer, (torch.tensor(2.0, dtype=D),), (torch.tensor(1.0, dtype=D),))
    assert level_stack() == []


def test_custom_jvp_finite_differences_of_a_true_rule_under_compositions():
    @ft.custom_jvp
    def f(x, y):
        return x.tanh() * y.exp()

    @f.defjvp
    def f_jvp(primals, tangents):
        (x, y), (tx, ty) = primals, tangents
        out = x.tanh() * y.exp()
        return out, (1 - x.tanh() ** 2) * y.exp() * tx + out * ty
    ref = lambda x, y: x.tanh() * y.exp()  # noqa: E731
    X, Y = torch.randn(5, 3, dtype=D), torch.randn(5, 3, dtype=D)
    close(ft.vmap(ft.jacrev(f, argnums=(0, 1)))(X, Y)[1],
          tf.vmap(tf.jacrev(ref, argnums=(0, 1)))(X, Y)[1])
    close(ft.vmap(ft.hessian(lambda x, y: f(x, y).sum(), argnums=1))(X, Y),
          tf.vmap(tf.hessian(lambda x, y: ref(x, y).sum(), argnums=1))(X, Y))
    close(ft.jacfwd(ft.vmap(f))(X, Y), tf.jacfwd(tf.vmap(ref))(X, Y))


def test_torch_autograd_outside_every_transform_uses_the_rules():
    f, calls = make_fake_vjp()
    x, y, _ = xy()
    xr, yr = x.clone().requires_grad_(), y.clone().requires_grad_()
    f(xr, yr).sum().backward()
    close(xr.grad, 2 * x * y)
    close(yr.grad, x.sin())
    assert calls == {"fun": 0, "fwd": 1, "bwd": 1}
    # Second order: bwd's own derivative, through create_graph.
    xr = x.clone().requires_grad_()
    (gx,) = torch.autograd.grad(f(xr, y).sum(), xr, create_graph=True)
    (hx,) = torch.autograd.grad(gx.sum(), xr)
    close(hx, 2 * y)
    # vmap under torch autograd: the batched rules are recorded.
    xr = x.clone().requires_grad_()
    ft.vmap(f)(xr, y).sum().backward()
    close(xr.grad, 2 * x * y)

    g, rule_calls = make_fake_jvp()
    xr = x.clone().requires_grad_()
    g(xr).sum().backward()
    close(xr.grad, 3 * x ** 2)
    assert rule_calls == {"fun": 1, "rule": 1}
    with torch.no_grad():
        close(g(xr), x.sin())
    assert rule_calls == {"fun": 2, "rule": 1}


def test_custom_rules_under_functionalize():
    f, calls = make_fake_vjp()
    x, y, _ = xy()
    close(ft.functionalize(f)(x, y), x.sin() * y)
    close(ft.functionalize(ft.grad(lambda x: f(x, y).sum()))(x), 2 * x * y)
    with pytest.raises(RuntimeError, match=r"functionalize\(grad\(f\)\) rather than"):
        ft.grad(ft.functionalize(lambda x: f(x, y).sum()))(x)
    assert level_stack() == []


def test_custom_vjp_with_a_true_rule_under_nested_vmaps_against_torch_func():
    calls = {"fwd": 0, "bwd": 0}

    @ft.custom_vjp
    def g(x, w):
        return (x * w).sin()

    def fwd(x, w):
        calls["fwd"] += 1
        return (x * w).sin(), (x, w)

    def bwd(res, ct):
        calls["bwd"] += 1
        x, w = res
        c = (x * w).cos() * ct
        return c * w, c * x
    g.defvjp(fwd, bwd)
    ref = lambda x, w: (x * w).sin()  # noqa: E731
    X, W = torch.randn(2, 3, 4, dtype=D), torch.randn(4, dtype=D)

    def nested(api, fn):
        inner = api.vmap(api.grad(lambda x, w: fn(x, w).sum(), argnums=(0, 1)), in_dims=(0, None))
        return api.vmap(inner, in_dims=(0, None))
    for a, b in zip(nested(ft, g)(X, W), nested(tf, ref)(X, W)):
        close(a, b)
    close(ft.grad(lambda w: ft.vmap(ft.vmap(g, in_dims=(0, None)), in_dims=(0, None))(X, w).sum())(W),
          tf.grad(lambda w: ref(X, w).sum())(W))
    close(ft.jacrev(ft.vmap(g, in_dims=(0, None)), argnums=1)(X[0], W),
          tf.jacrev(tf.vmap(ref, in_dims=(0, None)), argnums=1)(X[0], W))
    close(ft.hessian(lambda w: ft.vmap(g, in_dims=(0, None))(X[0], w).sum())(W),
          tf.hessian(lambda w: ref(X[0], w).sum())(W))
    assert calls == {"fwd": 4, "bwd": 4}  # each rule once per transform call, batched


def test_custom_jvp_defjvps_sums_per_argument_rules():
    @ft.custom_jvp
    def f(x, y):
        return x.sin() * y

    f.defjvps(lambda tx, out, x, y: x.cos() * y * tx, lambda ty, out, x, y: x.sin() * ty)
    x, y, t = xy()
    ref = lambda x, y: x.sin() * y  # noqa: E731
    close(ft.jvp(f, (x, y), (t, t))[1], tf.jvp(ref, (x, y), (t, t))[1])
    for a, b in zip(ft.grad(lambda x, y: f(x, y).sum(), argnums=(0, 1))(x, y),
                    tf.grad(lambda x, y: ref(x, y).sum(), argnums=(0, 1))(x, y)):
        close(a, b)

    @ft.custom_jvp
    def g(x, y):
        return x * y
    g.defjvps(None, lambda ty, out, x, y: x * ty)  # no tangent through x
    close(ft.grad(lambda x: g(x, y).sum())(x), torch.zeros_like(x))
    close(ft.grad(lambda y: g(x, y).sum())(y), x)


def test_custom_jvp_inside_capture_replays_forward_and_second_order():
    @ft.custom_jvp
    def softplus(x):
        return torch.where(x > 30, x, torch.log1p(torch.exp(x.clamp(max=30))))
    softplus.defjvp(lambda p, t: (softplus(p[0]), torch.sigmoid(p[0]) * t[0]))
    X = torch.randn(5, 3, dtype=D)
    jac = ft.capture(ft.vmap(ft.jacfwd(softplus)))
    hess = ft.capture(ft.vmap(ft.hessian(lambda x: softplus(x).sum())))
    for scale in (1.0, 2.0, 100.0):
        s = torch.sigmoid(X * scale)
        close(jac(X * scale), torch.diag_embed(s))
        close(hess(X * scale), torch.diag_embed(s * (1 - s)))


def test_batched_rules_see_the_vmap_axis_name():
    @ft.custom_vjp
    def f(x):
        return x.sin()
    # A bwd that centres the cotangent over the named batch.
    f.defvjp(lambda x: (x.sin(), x), lambda x, g: (g * x.cos() - ft.pmean(g * x.cos(), "b"),))
    X = torch.randn(4, 3, dtype=D)
    expected = X.cos() - X.cos().mean(0)
    close(ft.vmap(ft.grad(lambda x: f(x).sum()), axis_name="b")(X), expected)
    close(ft.grad(lambda X: ft.vmap(lambda x: f(x).sum(), axis_name="b")(X).sum())(X), expected)
