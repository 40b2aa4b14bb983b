"""Core semantics that cut across transforms: tensors created inside f, in-place writes
through views at lower levels, complex values (lazy conjugation) passed down a level."""
import pytest
import torch
import torch.func as tf

import functransforms as ft


def buffer_writes(kind):
    def f(y):
        x = y.expand(3)
        buf = torch.zeros(3)
        if kind == "copy":
            buf.copy_(x.sin())
        elif kind == "index":
            buf[0] = x[0] * 2
        else:
            buf[1:] = x[1:].sin()
        return (buf * buf).sum()
    return f


@pytest.mark.parametrize("kind", ["copy", "index", "slice"])
def test_factory_inside_grad_is_writable(kind):
    f, y = buffer_writes(kind), torch.tensor(0.5)
    torch.testing.assert_close(ft.grad(f)(y), tf.grad(f)(y))
    torch.testing.assert_close(ft.grad(ft.grad(f))(y), tf.grad(tf.grad(f))(y))
    one = torch.tensor(1.0)
    torch.testing.assert_close(ft.jvp(f, (y,), (one,))[1], tf.jvp(f, (y,), (one,))[1])
    torch.testing.assert_close(ft.jvp(ft.grad(f), (y,), (one,))[1],
                               tf.jvp(tf.grad(f), (y,), (one,))[1])


def test_plain_autograd_through_grad_with_view_writes():
    x = torch.randn(3, requires_grad=True)

    def run(m):
        def f(z):
            buf = torch.zeros(3)
            buf[0] = z[0] * z[1]
            return (buf * z).sum()
        return torch.autograd.grad(m.grad(f)(x).sum(), x)

    torch.testing.assert_close(run(ft), run(tf))


def test_integer_factories_stay_plain():
    def f(x):
        idx = torch.arange(3)
        return x[idx].sum()

    x = torch.randn(5)
    torch.testing.assert_close(ft.grad(f)(x), tf.grad(f)(x))


@pytest.mark.parametrize("fn", [
    lambda a: a.conj() * 2,
    lambda a: a.conj().sum(),
    lambda a: (a.conj() + 1).abs(),
    lambda a: a.conj().dot(a),
    lambda a: a.conj().exp(),
])
def test_lazy_conjugation_under_vmap(fn):
    x = torch.randn(3, 4, dtype=torch.complex64)
    torch.testing.assert_close(ft.vmap(fn)(x), tf.vmap(fn)(x))


def test_complex_grad_through_conj():
    x = torch.randn(4, dtype=torch.complex128)
    f = lambda a: (a.conj() * a).real.sum()  # noqa: E731
    torch.testing.assert_close(ft.grad(f)(x), tf.grad(f)(x))
    torch.testing.assert_close(ft.vmap(ft.grad(f))(x.expand(2, 4)), tf.vmap(tf.grad(f))(x.expand(2, 4)))


def test_requires_grad_inside_transforms_is_refused_like_torch_func():
    # torch autograd on a level's own wrappers would read or corrupt the transform's
    # bookkeeping; torch.func refuses requires_grad_ (and torch.autograd.functional, which
    # calls it) inside vmap and grad alike, and so do we.
    def f(x):
        x = x.clone()
        x.requires_grad_()
        return x.sum()

    def g(x):
        return torch.autograd.functional.jacobian(torch.sin, x)

    xs = torch.randn(4, 3)
    for fn, transform in [(f, ft.vmap), (f, lambda h: ft.grad(lambda x: h(x).sum())),
                          (g, ft.vmap), (g, lambda h: ft.grad(lambda x: h(x).sum()))]:
        with pytest.raises(RuntimeError, match="requires_grad_"):
            transform(fn)(xs if transform is ft.vmap else xs[0])
    with pytest.raises(RuntimeError, match="requires_grad_"):
        tf.vmap(f)(xs)
