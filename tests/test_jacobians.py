"""jacrev, jacfwd and hessian against torch.func on the same inputs."""
import copy
import warnings

import expecttest
import pytest
import torch
import torch.func as tf
from torch import nn
from torch.utils._pytree import tree_flatten, tree_structure

import functransforms as ft

warnings.filterwarnings("ignore", message=".*per-example loop.*")


def assert_same(actual, expected, atol=1e-5, rtol=1e-4):
    assert tree_structure(actual) == tree_structure(expected), (actual, expected)
    for a, e in zip(tree_flatten(actual)[0], tree_flatten(expected)[0]):
        assert type(a) is torch.Tensor, type(a)
        assert a.shape == e.shape, (a.shape, e.shape)
        torch.testing.assert_close(a, e, atol=atol, rtol=rtol)


def dict_fn(d):
    return {"a": d["x"].sin() * d["y"].sum(), "b": (d["x"] ** 2).sum()}


def dict_input():
    return {"x": torch.randn(3), "y": torch.randn(2, 2)}


def two_arg_fn(x, y):
    return (x * y.sum(), x.exp().sum() * y)


def needs_jvp():
    try:
        import functransforms.api.forward  # noqa: F401
    except ImportError:
        pytest.skip("forward mode (functransforms/api/forward.py) not available yet")


JACOBIANS = {
    "jacrev": (lambda *a, **k: ft.jacrev(*a, **k), lambda *a, **k: tf.jacrev(*a, **k)),
    "jacfwd": (lambda *a, **k: ft.jacfwd(*a, **k), lambda *a, **k: tf.jacfwd(*a, **k)),
}


@pytest.fixture(params=sorted(JACOBIANS))
def jac(request):
    if request.param == "jacfwd":
        needs_jvp()
    return JACOBIANS[request.param]


def test_whirlwind_tour_jacobians():
    torch.manual_seed(0)
    x = torch.randn(5)
    assert torch.allclose(ft.jacrev(torch.sin)(x), torch.diag(torch.cos(x)))
    x = torch.randn(64, 5)
    assert ft.vmap(ft.jacrev(torch.sin))(x).shape == (64, 5, 5)


def test_whirlwind_tour_jacfwd_hessian():
    needs_jvp()
    torch.manual_seed(0)
    x = torch.randn(5)
    assert torch.allclose(ft.jacfwd(torch.sin)(x), torch.diag(torch.cos(x)))

    def f(x):
        return x.sin().sum()

    hessian0 = ft.jacrev(ft.jacrev(f))(x)
    hessian1 = ft.jacfwd(ft.jacrev(f))(x)
    hess = ft.hessian(f)(x)
    expected = torch.diag(-x.sin())
    for h in (hessian0, hessian1, hess):
        assert_same(h, expected)


def test_dict_input_and_output(jac):
    ours, theirs = jac
    d = dict_input()
    assert_same(ours(dict_fn)(d), theirs(dict_fn)(d))


@pytest.mark.parametrize("argnums", [0, 1, (0,), (0, 1), (1, 0), -1])
def test_tuple_outputs_and_argnums(jac, argnums):
    ours, theirs = jac
    x, y = torch.randn(3), torch.randn(2, 2)
    # torch.func.jacfwd returns zeros for a negative argnums; compare with its positive twin.
    expected_argnums = 1 if argnums == -1 else argnums
    assert_same(ours(two_arg_fn, argnums)(x, y), theirs(two_arg_fn, expected_argnums)(x, y))


def test_has_aux(jac):
    ours, theirs = jac

    def f(x, y):
        out = x.sin() * y
        return out, {"norm": out.norm(), "y": y}

    x, y = torch.randn(4), torch.randn(4)
    assert_same(ours(f, has_aux=True)(x, y), theirs(f, has_aux=True)(x, y))


def test_scalar_and_0d():
    x = torch.randn(())
    assert_same(ft.jacrev(torch.sin)(x), tf.jacrev(torch.sin)(x))
    x = torch.randn(3)
    assert_same(ft.jacrev(lambda x: x.sum())(x), tf.jacrev(lambda x: x.sum())(x))


def test_output_independent_of_input():
    x, y = torch.randn(3), torch.randn(2)
    f = lambda x, y: x.cos() * 2  # noqa: E731
    assert_same(ft.jacrev(f, argnums=(0, 1))(x, y), tf.jacrev(f, argnums=(0, 1))(x, y))


@pytest.mark.parametrize("chunk_size", [None, 1, 3, 100])
def test_jacrev_chunk_size(chunk_size):
    d = dict_input()
    expected = tf.jacrev(dict_fn)(d)
    assert_same(ft.jacrev(dict_fn, chunk_size=chunk_size)(d), expected)
    x, y = torch.randn(3), torch.randn(2, 2)
    assert_same(
        ft.jacrev(two_arg_fn, (0, 1), chunk_size=chunk_size)(x, y),
        tf.jacrev(two_arg_fn, (0, 1))(x, y),
    )


@pytest.mark.parametrize("chunk_size", [None, 1, 2])
def test_vmap_of_jacrev(chunk_size):
    x = torch.randn(4, 3)
    f = lambda x: x.sin() * x.sum()  # noqa: E731
    assert_same(
        ft.vmap(ft.jacrev(f, chunk_size=chunk_size))(x), tf.vmap(tf.jacrev(f))(x)
    )


def test_vmap_of_jacfwd():
    needs_jvp()
    x = torch.randn(4, 3)
    f = lambda x: x.sin() * x.sum()  # noqa: E731
    assert_same(ft.vmap(ft.jacfwd(f))(x), tf.vmap(tf.jacfwd(f))(x))


def test_jacrev_of_jacrev_and_grad_of_jacrev():
    x = torch.randn(3)
    f = lambda x: (x.exp() * x.sum()).tanh()  # noqa: E731
    assert_same(ft.jacrev(ft.jacrev(f))(x), tf.jacrev(tf.jacrev(f))(x))
    g = lambda x: ft.jacrev(f, chunk_size=2)(x).sum()  # noqa: E731
    assert_same(ft.grad(g)(x), tf.grad(lambda x: tf.jacrev(f)(x).sum())(x))


def test_hessian_dict_and_argnums():
    needs_jvp()
    d = dict_input()
    f = lambda d: (d["x"].sin().sum() * d["y"].exp().sum())  # noqa: E731
    assert_same(ft.hessian(f)(d), tf.hessian(f)(d))
    g = lambda x, y: (x.exp() * y.sin()).sum()  # noqa: E731
    x, y = torch.randn(3), torch.randn(3)
    assert_same(ft.hessian(g, argnums=(0, 1))(x, y), tf.hessian(g, argnums=(0, 1))(x, y))


def _mlp_loss_setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2))
    x, t = torch.randn(6, 4), torch.randn(6, 2)
    params = {k: v.detach() for k, v in model.named_parameters()}
    return model, params, x, t


def test_hessian_of_mlp_loss_wrt_params_jacrev():
    model, params, x, t = _mlp_loss_setup()

    def loss(fc):
        return lambda p: ((fc(model, p, (x,)) - t) ** 2).mean()

    assert_same(
        ft.jacrev(ft.jacrev(loss(ft.functional_call)))(params),
        tf.jacrev(tf.jacrev(loss(tf.functional_call)))(params),
    )


def test_hessian_of_mlp_loss_wrt_params():
    needs_jvp()
    model, params, x, t = _mlp_loss_setup()

    def loss(fc):
        return lambda p: ((fc(model, p, (x,)) - t) ** 2).mean()

    assert_same(ft.hessian(loss(ft.functional_call))(params),
                tf.hessian(loss(tf.functional_call))(params))


def test_jacrev_leaves_module_alone():
    model, params, x, _ = _mlp_loss_setup()
    before = copy.deepcopy(model.state_dict())
    ft.jacrev(lambda p: ft.functional_call(model, p, (x,)))(params)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


class TestErrors(expecttest.TestCase):
    def test_bad_chunk_size(self):
        with self.assertRaises(ValueError) as ctx:
            ft.jacrev(torch.sin, chunk_size=0)
        self.assertExpectedInline(
            str(ctx.exception), """jacrev: `chunk_size` should be greater than 0. Pass a positive int, or None for all rows in one pass; got 0."""
        )

    def test_non_tensor_output(self):
        with self.assertRaises(RuntimeError) as ctx:
            ft.jacrev(lambda x: 3.0)(torch.randn(2))
        self.assertExpectedInline(
            str(ctx.exception),
            """vjp(f, *primals): expected f(*primals) to return only tensors, got unsupported type float.""",
        )

    def test_complex_input(self):
        with self.assertRaises(RuntimeError) as ctx:
            ft.jacrev(torch.sin)(torch.randn(2, dtype=torch.cfloat))
        self.assertExpectedInline(
            str(ctx.exception),
            """jacrev: Expected all inputs to be real but received complex tensor (dtype torch.complex64); take the real and imaginary parts as separate real tensors.""",  # noqa: B950
        )

    def test_bad_argnums(self):
        with self.assertRaises(RuntimeError) as ctx:
            ft.jacrev(torch.mul, argnums=2)(torch.randn(2), torch.randn(2))
        self.assertExpectedInline(
            str(ctx.exception),
            """jacrev: got argnum=2, but only 2 positional inputs were given. Each argnum must satisfy -2 <= argnum < 2.""",  # noqa: B950
        )


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(),
                         nn.Linear(8, 1)).double()


@pytest.mark.parametrize("transform", ["jacrev", "jacfwd", "grad", "vjp"])
def test_torch_autograd_through_derivatives_of_a_model(transform):
    # Force-field training: the loss holds d(model)/dx, and torch autograd differentiates it
    # w.r.t. the captured parameters. The backward of mm on a captured weight (weight.t())
    # must be recorded too.
    model = _mlp()
    x = torch.rand(6, 1, dtype=torch.float64) + 0.5

    def derivative(lib):
        if transform == "vjp":
            def d(t):
                _, pull = lib.vjp(model, t)
                return pull(torch.ones(1, dtype=torch.float64))[0]
        elif transform == "grad":
            d = lib.grad(lambda t: model(t).sum())
        else:
            d = getattr(lib, transform)(model)
        return lib.vmap(d)(x)

    grads = []
    for lib in (ft, tf):
        loss = model(x).pow(2).mean() + derivative(lib).pow(2).mean()
        grads.append(torch.autograd.grad(loss, list(model.parameters())))
    for ours, theirs in zip(*grads):
        torch.testing.assert_close(ours, theirs)


def test_torch_autograd_through_grad_with_captured_weights():
    w = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    v = torch.randn(4, dtype=torch.float64, requires_grad=True)
    x = torch.randn(3, dtype=torch.float64)

    def f(x):
        return torch.tanh(x @ w) @ v

    results = []
    for lib in (ft, tf):
        g = lib.grad(f)(x)
        results.append(torch.autograd.grad(g.pow(2).sum(), (w, v)))
    for ours, theirs in zip(*results):
        torch.testing.assert_close(ours, theirs)
