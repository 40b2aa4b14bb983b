"""grad and grad_and_value against torch.func on the same inputs."""
import collections

import expecttest
import pytest
import torch
import torch.func as tf

import functransforms as ft
from functransforms.core.levels import level_stack
from functransforms.core.wrapper import LevelTensor


def assert_plain(tree):
    """No wrapper may escape a transform: every tensor in the result is a plain torch.Tensor."""
    leaves, _ = torch.utils._pytree.tree_flatten(tree)
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            assert type(leaf) is torch.Tensor, type(leaf)
            assert not isinstance(leaf, LevelTensor)


def assert_same(actual, expected):
    assert_plain(actual)
    a_leaves, a_spec = torch.utils._pytree.tree_flatten(actual)
    e_leaves, e_spec = torch.utils._pytree.tree_flatten(expected)
    assert a_spec == e_spec, (a_spec, e_spec)
    for a, e in zip(a_leaves, e_leaves):
        if isinstance(e, torch.Tensor):
            torch.testing.assert_close(a, e)
        else:
            assert a == e


def both(make, *args, **kwargs):
    """Run ``make(transforms_module)(*args)`` for ft and torch.func; compare the results."""
    expected = make(tf)(*args, **kwargs)
    actual = make(ft)(*args, **kwargs)
    assert_same(actual, expected)
    return actual


def nest(m, f, order):
    """grad applied ``order`` times; inner gradients are summed to stay scalar."""
    g = f
    for _ in range(order - 1):
        g = (lambda h: lambda x: m.grad(h)(x).sum())(g)
    return m.grad(g)


W = torch.randn(5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
POS = torch.arange(1.0, 6.0, dtype=torch.float64)

# Ops that save their inputs for backward (sin, matmul) and ops that save their outputs
# (exp, tanh, sigmoid, softmax, sqrt, log_softmax): the latter broke higher orders once.
SCALAR_FNS = {
    "sin": lambda x: x.sin().sum(),
    "exp": lambda x: x.exp().sum(),
    "tanh": lambda x: x.tanh().sum(),
    "sigmoid": lambda x: x.sigmoid().sum(),
    "softmax": lambda x: (x.softmax(0) * POS).sum(),
    "sqrt": lambda x: (x * x + 1).sqrt().sum(),
    "matmul": lambda x: (W @ x).sin().sum(),
    "log_softmax": lambda x: (x.log_softmax(0) * POS).sum(),
}


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("name", list(SCALAR_FNS))
def test_higher_order(name, order):
    x = torch.randn(5, dtype=torch.float64, generator=torch.Generator().manual_seed(order))
    both(lambda m: nest(m, SCALAR_FNS[name], order), x)


def test_tour_scalar_identities():
    x = torch.randn([])
    torch.testing.assert_close(ft.grad(torch.sin)(x), x.cos())
    torch.testing.assert_close(ft.grad(ft.grad(torch.sin))(x), -x.sin())
    torch.testing.assert_close(ft.grad(ft.grad(ft.grad(torch.sin)))(x), -x.cos())


@pytest.mark.parametrize("argnums", [0, 1, -1, -3, (0, 2), (2, 0), (-1,), (0, 1, 2)])
def test_argnums(argnums):
    x, y, z = torch.randn(3), torch.randn(3), torch.randn(3)
    f = lambda a, b, c: (a * b.exp() + c.sin() * a).sum()  # noqa: E731
    both(lambda m: m.grad(f, argnums=argnums), x, y, z)
    both(lambda m: m.grad_and_value(f, argnums=argnums), x, y, z)


def test_kwargs_pass_through_undifferentiated():
    f = lambda x, *, scale: (x * scale).sin().sum()  # noqa: E731
    both(lambda m: m.grad(f), torch.randn(3), scale=torch.randn(3))


Point = collections.namedtuple("Point", ["x", "y"])


@pytest.mark.parametrize(
    "make_input",
    [
        lambda: {"a": torch.randn(3), "b": torch.randn(2, 2)},
        lambda: [torch.randn(3), torch.randn(3)],
        lambda: (torch.randn(3), (torch.randn(2), {"c": torch.randn(1)})),
        lambda: Point(torch.randn(3), torch.randn(3)),
    ],
    ids=["dict", "list", "nested_tuple", "namedtuple"],
)
def test_pytree_inputs(make_input):
    def f(tree):
        leaves, _ = torch.utils._pytree.tree_flatten(tree)
        return sum((leaf.sin() * (i + 1)).sum() for i, leaf in enumerate(leaves))

    out = both(lambda m: m.grad(f), make_input())
    both(lambda m: m.grad_and_value(f), make_input())
    assert type(out) is type(make_input())


def test_pytree_input_with_other_argnums():
    p = {"w": torch.randn(3, 2), "b": torch.randn(2)}
    x = torch.randn(4, 3)
    f = lambda x, p: ((x @ p["w"] + p["b"]).tanh() ** 2).mean()  # noqa: E731
    both(lambda m: m.grad(f, argnums=(0, 1)), x, p)


def test_has_aux_pytree_without_leaks():
    def f(x):
        y = x.sin()
        return y.sum(), {"y": y, "parts": [x.cos(), (x * 2, x.detach())]}

    x = torch.randn(4)
    both(lambda m: m.grad(f, has_aux=True), x)
    both(lambda m: m.grad_and_value(f, has_aux=True), x)
    g, (value, aux) = ft.grad_and_value(f, has_aux=True)(x)
    assert not aux["y"].requires_grad and aux["y"].grad_fn is None


def test_has_aux_nested_levels_unwrap_to_plain():
    def inner(x):
        return x.exp().sum(), x.exp()

    def outer(x):
        g, aux = ft.grad(inner, has_aux=True)(x)
        return g.sum(), (g, aux)

    x = torch.randn(3)
    g, (g_inner, aux) = ft.grad(outer, has_aux=True)(x)
    assert_plain((g, g_inner, aux))
    torch.testing.assert_close(g, x.exp())
    torch.testing.assert_close(aux, x.exp())


def test_grad_and_value():
    f = lambda x, y: (x.exp() * y).sum()  # noqa: E731
    both(lambda m: m.grad_and_value(f), torch.randn(3), torch.randn(3))
    both(lambda m: m.grad_and_value(f, argnums=(0, 1)), torch.randn(3), torch.randn(3))


def test_unused_input_gets_zero_gradient():
    both(lambda m: m.grad(lambda x, y: y.sum(), argnums=(0, 1)), torch.randn(3), torch.randn(2))
    both(lambda m: m.grad(lambda x: torch.ones(())), torch.randn(3))


def test_closure_across_two_levels():
    # The inner grad must treat the outer level's x as a constant.
    ones = torch.ones(3)
    f = lambda m: m.grad(lambda x: m.grad(lambda y: (x * y).sum())(ones).sum())  # noqa: E731
    both(f, torch.randn(3))
    g = lambda m: m.grad(lambda x: m.grad(lambda y: (x * y.sin() * x).sum())(x).sum())  # noqa: E731
    both(g, torch.randn(3))


def test_inner_grad_of_outer_variable():
    # Perturbation confusion: d/dx [x * d/dy (x + y)] = 1, not 2.
    f = lambda m: m.grad(lambda x: x * m.grad(lambda y: x + y)(x))  # noqa: E731
    out = both(f, torch.tensor(3.0))
    assert out.item() == 1.0


def test_torch_autograd_through_grad():
    def f(x):
        return (x.sin() * x.exp()).sum()

    x0 = torch.randn(4, dtype=torch.float64)
    results = {}
    for name, m in (("tf", tf), ("ft", ft)):
        x = x0.clone().requires_grad_()
        g = m.grad(f)(x)
        assert g.requires_grad
        (gg,) = torch.autograd.grad(g.pow(2).sum(), x, create_graph=True)
        gg.sum().backward()
        results[name] = (g.detach(), gg.detach(), x.grad)
    assert_same(results["ft"], results["tf"])


def test_torch_autograd_through_grad_of_grad():
    x0 = torch.randn(3, dtype=torch.float64)
    f = lambda m: nest(m, lambda x: x.tanh().sum(), 2)  # noqa: E731
    grads = []
    for m in (tf, ft):
        x = x0.clone().requires_grad_()
        f(m)(x).sum().backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[1], grads[0])


def test_no_grad_inside_is_respected():
    def f(x):
        with torch.no_grad():
            c = x.sin()
        return (c * x).sum()

    out = both(lambda m: m.grad(f), torch.randn(3))
    assert_plain(out)


def test_no_grad_around_call_is_ignored():
    x = torch.randn(3)
    with torch.no_grad():
        both(lambda m: m.grad(lambda x: x.exp().sum()), x)
        both(lambda m: nest(m, lambda x: x.exp().sum(), 2), x)


def test_no_grad_inside_nested():
    # The inner level's no_grad hides x * y from the inner level only; the outer level
    # still sees the inner computation.
    def make(m):
        def inner(y, x):
            with torch.no_grad():
                c = (x * y).sin()
            return (c * y + x * y * y).sum()

        return m.grad(lambda x: m.grad(inner)(x, x).sum())

    both(make, torch.randn(3))


def test_no_grad_inside_outer_function():
    def make(m):
        def outer(x):
            with torch.no_grad():
                g = m.grad(lambda y: (y * x).sin().sum())(x)
            return (g * x).sum()

        return m.grad(outer)

    both(make, torch.randn(3))


def test_detach_stops_gradient():
    f = lambda x: (x.detach() * x + x.detach().exp()).sum()  # noqa: E731
    both(lambda m: m.grad(f), torch.randn(3))
    both(lambda m: nest(m, f, 2), torch.randn(3))


def test_inplace_on_clone_of_input():
    def f(x):
        x = x.clone()
        x.mul_(2)
        x.sin_()
        return (x * x).sum()

    both(lambda m: m.grad(f), torch.randn(3))
    both(lambda m: nest(m, f, 2), torch.randn(3))


def test_inplace_view_ops():
    # matmul of a vector ends with squeeze_, which changes the shape in place.
    def f(x):
        y = x.clone()
        y.unsqueeze_(0)
        y.t_()
        return (y.squeeze(1) @ W.float()).sin().sum()

    both(lambda m: m.grad(f), torch.randn(5))


def test_exception_leaves_stack_clean():
    def bad(x):
        raise ValueError("boom")

    for fn in (ft.grad(bad), ft.grad(lambda x: ft.grad(bad)(x)), ft.grad(lambda x: x * 1)):
        with pytest.raises((ValueError, RuntimeError)):
            fn(torch.randn(2))
        assert level_stack() == []
    both(lambda m: m.grad(lambda x: x.exp().sum()), torch.randn(3))


def test_dead_level_wrapper_behaves_as_value():
    leaked = []

    def f(x):
        leaked.append(x * 2)
        return x.sum()

    ft.grad(f)(torch.ones(2))
    torch.testing.assert_close(leaked[0] + 1, torch.full((2,), 3.0))
    assert type(leaked[0] + 1) is torch.Tensor


class TestErrors(expecttest.TestCase):
    def error(self, fn, *args, exc=RuntimeError):
        with self.assertRaises(exc) as ctx:
            fn(*args)
        assert level_stack() == []
        return str(ctx.exception)

    def test_non_scalar_output(self):
        self.assertExpectedInline(
            self.error(ft.grad(lambda x: x * 2), torch.randn(3)),
            """grad_and_value(f)(*args): expected f(*args) to return a scalar Tensor, got a tensor with 1 dims. Use vjp or jacrev for non-scalar outputs, or reduce the output (e.g. .sum()) first.""",
        )

    def test_non_tensor_output(self):
        self.assertExpectedInline(
            self.error(ft.grad(lambda x: 3.0), torch.randn(3)),
            """grad_and_value(f)(*args): expected f(*args) to return a Tensor, got float.""",
        )

    def test_has_aux_wrong_structure(self):
        self.assertExpectedInline(
            self.error(ft.grad(lambda x: x.sum(), has_aux=True), torch.randn(3)),
            """grad_and_value(f)(*args): output of function f should be a tuple: (output, aux) if has_aux is True, got Tensor.""",
        )
        self.assertExpectedInline(
            self.error(ft.grad(lambda x: (x.sum(), 1, 2), has_aux=True), torch.randn(3)),
            """grad_and_value(f)(*args): output of function f should be a tuple: (output, aux) if has_aux is True, got tuple.""",
        )

    def test_integer_input(self):
        self.assertExpectedInline(
            self.error(ft.grad(lambda x: (x * 2).sum()), torch.arange(3)),
            """grad_and_value: can only differentiate with respect to floating point or complex Tensors, got an input of dtype torch.int64. Convert it (e.g. x.float()) or do not differentiate with respect to it.""",
        )

    def test_non_tensor_input(self):
        self.assertExpectedInline(
            self.error(ft.grad(lambda x, y: (x * y).sum()), 2.0, torch.randn(3)),
            """grad_and_value: expected every input being differentiated to be a Tensor, got float. Move non-Tensor arguments out of argnums.""",
        )

    def test_bad_argnums(self):
        f = lambda x, y: (x * y).sum()  # noqa: E731
        x = torch.randn(3)
        self.assertExpectedInline(
            self.error(ft.grad(f, argnums=2), x, x),
            """grad_and_value: got argnum=2, but only 2 positional inputs were given. Each argnum must satisfy -2 <= argnum < 2.""",
        )
        self.assertExpectedInline(
            self.error(ft.grad(f, argnums=(0, -2)), x, x),
            """grad_and_value: argnums elements must be unique, got argnums=(0, -2), which names the same argument twice.""",
        )
        self.assertExpectedInline(
            self.error(ft.grad(f, argnums=[0]), x, x),
            """grad_and_value: argnums must be int or Tuple[int, ...] (an int or a non-empty tuple of ints), got [0].""",
        )

    def test_inplace_on_captured_tensor(self):
        captured = torch.randn(3)
        self.assertExpectedInline(
            self.error(ft.grad(lambda x: captured.mul_(x).sum()), torch.randn(3)),
            """During a grad transform (grad, vjp, jacrev, ...), the function called the in-place operation aten::mul_.Tensor that would mutate a captured Tensor (one from outside the transform). Its gradient would be lost. Pass that tensor as an input of the transformed function, or use the out-of-place version of the operation.""",
        )

    def test_inplace_on_outer_level_tensor(self):
        def outer(x):
            captured = x * 1
            return ft.grad(lambda y: captured.mul_(y).sum())(x.clone()).sum()

        msg = self.error(ft.grad(outer), torch.randn(3))
        assert "mutate a captured Tensor" in msg

    def test_inplace_on_differentiated_input(self):
        # torch autograd's own check, as in torch.func.
        msg = self.error(ft.grad(lambda x: x.mul_(2).sum()), torch.randn(3))
        self.assertExpectedInline(msg, """a leaf Variable that requires grad is being used in an in-place operation.""")


@pytest.mark.parametrize("name", ["exp", "tanh", "sigmoid", "softmax"])
def test_vmap_of_second_order(name):
    # vmap's randomness mode sits in front of every op: autograd's own detach of saved
    # outputs must still reach the grad levels as such.
    f = SCALAR_FNS[name]
    x = torch.randn(4, 5, dtype=torch.float64)
    both(lambda m: m.vmap(nest(m, f, 2)), x)
    both(lambda m: m.grad(lambda x: m.vmap(m.grad(f))(x).sum()), x)


def test_vmap_of_grad_with_detach():
    f = lambda x: (x.detach() * x.exp() + x.tanh()).sum()  # noqa: E731
    both(lambda m: m.vmap(nest(m, f, 2)), torch.randn(4, 3))


def test_tolist_and_repr_inside_grad_like_torch_func():
    # Python values of a grad level's tensors are allowed, as under torch.func, conjugate
    # views and nested levels included.
    seen = []

    def f(x):
        seen.append((x.tolist(), x.conj().tolist()))
        return (x * x.conj()).real.sum()

    z = torch.tensor([1.0 + 2.0j, 3.0 + 4.0j])
    torch.testing.assert_close(ft.grad(f)(z), torch.func.grad(f)(z))
    assert seen[0] == seen[1]

    def g(x):
        inner = ft.grad(lambda y: (y ** 3).sum())(x)
        seen.append((x.tolist(), inner.tolist()))
        assert repr(x).startswith("GradTrackingTensor(lvl=1, value=")
        return inner.sum()

    x = torch.tensor([1.0, 2.0])
    torch.testing.assert_close(ft.grad(g)(x), 6 * x)
    assert seen[-1] == ([1.0, 2.0], [3.0, 12.0])
