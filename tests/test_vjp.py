"""vjp against torch.func on the same inputs."""
import collections

import expecttest
import pytest
import torch
import torch.func as tf

import functransforms as ft
from functransforms.core.levels import level_stack

from test_grad import assert_plain, assert_same

gen = torch.Generator().manual_seed(0)


def randn(*shape):
    return torch.randn(*shape, dtype=torch.float64, generator=gen)


def both_vjp(f, primals, cotangents, has_aux=False, calls=1):
    """vjp of ``f`` with ft and torch.func; compare outputs, aux and ``calls`` vjp_fn results."""
    results = []
    for m in (tf, ft):
        out = m.vjp(f, *primals, has_aux=has_aux)
        vjp_fn = out[1]
        results.append((out[0], out[2:], [vjp_fn(cotangents) for _ in range(calls)]))
    assert_same(results[1], results[0])
    return results[1]


Pair = collections.namedtuple("Pair", ["a", "b"])


@pytest.mark.parametrize("name", ["sin", "exp", "tanh", "sigmoid", "sqrt", "softmax", "log_softmax"])
def test_unary(name):
    f = {
        "softmax": lambda x: x.softmax(-1),
        "log_softmax": lambda x: x.log_softmax(-1),
        "sqrt": lambda x: (x * x + 1).sqrt(),
    }.get(name, getattr(torch, name))
    both_vjp(f, (randn(3, 4),), randn(3, 4))


def test_matmul_two_primals():
    both_vjp(torch.matmul, (randn(3, 4), randn(4, 2)), randn(3, 2))


def test_tour_example():
    inputs = torch.randn(3)
    cotangents = (torch.randn(3),)
    outputs, vjp_fn = ft.vjp(torch.sin, inputs)
    (vjps,) = vjp_fn(*cotangents)
    torch.testing.assert_close(outputs, inputs.sin())
    torch.testing.assert_close(vjps, cotangents[0] * inputs.cos())


@pytest.mark.parametrize(
    "f, make_ct",
    [
        (lambda x, y: (x * y, x.exp()), lambda: (randn(3), randn(3))),
        (lambda x, y: [x.sin()], lambda: [randn(3)]),
        (lambda x, y: {"s": (x * y).sum(), "t": [x.tanh(), y.sigmoid()]}, lambda: {"s": randn(()), "t": [randn(3), randn(3)]}),
        (lambda x, y: Pair(x + y, x * y), lambda: Pair(randn(3), randn(3))),
    ],
    ids=["tuple", "list", "dict", "namedtuple"],
)
def test_pytree_outputs(f, make_ct):
    both_vjp(f, (randn(3), randn(3)), make_ct())


def test_pytree_primals():
    f = lambda p, x: (p["w"] @ x + p["b"]).tanh()  # noqa: E731
    both_vjp(f, ({"w": randn(2, 3), "b": randn(2)}, randn(3)), randn(2))


def test_vjp_fn_called_twice():
    out, grads, calls = both_vjp(lambda x: x.exp() * x.sin(), (randn(4),), randn(4), calls=2)
    assert_same(calls[0], calls[1])


def test_vjp_fn_with_different_cotangents():
    x = randn(4)
    for m in (tf, ft):
        _, fn = m.vjp(lambda x: x.tanh(), x)
        cts = [randn(4) for _ in range(3)]
        assert_same([fn(c) for c in cts], [(c * (1 - x.tanh() ** 2),) for c in cts])


def test_has_aux():
    def f(x):
        y = x.exp()
        return y * 2, {"y": y, "z": [x.sin()]}

    out, aux, _ = both_vjp(f, (randn(3),), randn(3), has_aux=True)
    assert_plain(aux)


def test_unused_primal_and_constant_output():
    both_vjp(lambda x, y: (x.sin(), torch.ones(2)), (randn(3), randn(2)), (randn(3), randn(2)))


def test_vjp_of_grad():
    f = lambda x: ft.grad(lambda y: (y.sin() * y).sum())(x)  # noqa: E731
    g = lambda x: tf.grad(lambda y: (y.sin() * y).sum())(x)  # noqa: E731
    x, ct = randn(4), randn(4)
    out, fn = ft.vjp(f, x)
    ref_out, ref_fn = tf.vjp(g, x)
    assert_same((out, fn(ct)), (ref_out, ref_fn(ct)))


def test_grad_of_vjp_fn():
    def make(m):
        def loss(x):
            _, fn = m.vjp(lambda y: y.exp() * x, x)
            return fn(torch.ones_like(x))[0].sum()

        return m.grad(loss)

    x = randn(3)
    assert_same(make(ft)(x), make(tf)(x))


def test_vjp_fn_after_exception_elsewhere():
    _, fn = ft.vjp(lambda x: x.sin(), randn(3))
    with pytest.raises(ValueError):
        ft.grad(lambda x: (_ for _ in ()).throw(ValueError("boom")))(randn(3))
    assert level_stack() == []
    x = randn(3)
    _, fn = ft.vjp(lambda x: x.sin(), x)
    torch.testing.assert_close(fn(torch.ones(3, dtype=torch.float64))[0], x.cos())


class TestErrors(expecttest.TestCase):
    def error(self, fn, *args):
        with self.assertRaises(RuntimeError) as ctx:
            fn(*args)
        assert level_stack() == []
        return str(ctx.exception)

    def test_wrong_cotangent_shape(self):
        _, fn = ft.vjp(lambda x: (x * 2, {"a": x.sin()}), torch.randn(3))
        self.assertExpectedInline(
            self.error(fn, (torch.ones(4), {"a": torch.ones(3)})),
            """vjp_fn: a cotangent has shape (4,) but the output it belongs to has shape (3,).""",
        )

    def test_wrong_cotangent_structure(self):
        _, fn = ft.vjp(lambda x: (x * 2, {"a": x.sin()}), torch.randn(3))
        self.assertExpectedInline(
            self.error(fn, (torch.ones(3), torch.ones(3))),
            """vjp_fn: Expected pytree structure of cotangents to be the same as pytree structure of outputs to the function: pass cotangents shaped like the outputs of f, (*, {'a': *}), got (*, *).""",
        )
        self.assertExpectedInline(
            self.error(fn, [torch.ones(3), {"a": torch.ones(3)}]),
            """vjp_fn: Expected pytree structure of cotangents to be the same as pytree structure of outputs to the function: pass cotangents shaped like the outputs of f, (*, {'a': *}), got [*, {'a': *}].""",
        )
        _, fn = ft.vjp(torch.sin, torch.randn(3))
        self.assertExpectedInline(
            self.error(fn, (torch.ones(3),)),
            """vjp_fn: Expected pytree structure of cotangents to be the same as pytree structure of outputs to the function: pass cotangents shaped like the outputs of f, *, got (*,).""",
        )

    def test_non_tensor_cotangent(self):
        _, fn = ft.vjp(lambda x: (x * 2, x), torch.randn(3))
        self.assertExpectedInline(
            self.error(fn, (torch.ones(3), 1.0)),
            """vjp_fn: expected Tensor cotangents, got float.""",
        )

    def test_non_tensor_output(self):
        self.assertExpectedInline(
            self.error(ft.vjp, lambda x: (x, 1), torch.randn(3)),
            """vjp(f, *primals): expected f(*primals) to return only tensors, got unsupported type int.""",
        )

    def test_has_aux_wrong_structure(self):
        self.assertExpectedInline(
            self.error(lambda: ft.vjp(lambda x: x, torch.randn(3), has_aux=True)),
            """vjp(f, *primals): output of function f should be a tuple: (output, aux) if has_aux is True, got Tensor.""",
        )

    def test_integer_primal(self):
        self.assertExpectedInline(
            self.error(ft.vjp, lambda x: x * 2, torch.arange(3)),
            """vjp: can only differentiate with respect to floating point or complex Tensors, got an input of dtype torch.int64. Convert it (e.g. x.float()) or do not differentiate with respect to it.""",
        )
