"""Transforms composed with each other, compared with torch.func on the same inputs."""
import pytest
import torch
import torch.func as tf
import torch.nn.functional as F

import functransforms as ft


def close(a, b):
    fa, sa = torch.utils._pytree.tree_flatten(a)
    fb, sb = torch.utils._pytree.tree_flatten(b)
    assert sa == sb
    for x, y in zip(fa, fb):
        assert type(x) is torch.Tensor, f"wrapper leaked: {type(x)}"
        torch.testing.assert_close(x, y)


def mlp_loss(params, x, y):
    h = torch.tanh(x @ params["w1"] + params["b1"])
    out = h @ params["w2"]
    return F.mse_loss(out, y)


@pytest.fixture
def mlp():
    torch.manual_seed(0)
    params = {"w1": torch.randn(4, 8), "b1": torch.randn(8), "w2": torch.randn(8, 2)}
    return params, torch.randn(6, 4), torch.randn(6, 2)


def test_vmap_grad_per_sample(mlp):
    params, x, y = mlp
    close(ft.vmap(ft.grad(mlp_loss), in_dims=(None, 0, 0))(params, x, y),
          tf.vmap(tf.grad(mlp_loss), in_dims=(None, 0, 0))(params, x, y))


def test_grad_of_vmap(mlp):
    params, x, y = mlp

    def batch_loss(fn, vm):
        return lambda p: vm(fn, in_dims=(None, 0, 0))(p, x, y).sum()

    close(ft.grad(batch_loss(mlp_loss, ft.vmap))(params),
          tf.grad(batch_loss(mlp_loss, tf.vmap))(params))


def test_vmap_vmap():
    x, y = torch.randn(3, 4, 5), torch.randn(4, 5)
    f = lambda a, b: (a * b).sin().sum()  # noqa: E731
    close(ft.vmap(ft.vmap(f, in_dims=(0, 0)), in_dims=(0, None))(x, y),
          tf.vmap(tf.vmap(f, in_dims=(0, 0)), in_dims=(0, None))(x, y))


def test_vmap_of_vjp_fn():
    x = torch.randn(5)
    cts = torch.randn(3, 5)
    _, fn = ft.vjp(torch.sin, x)
    _, tfn = tf.vjp(torch.sin, x)
    close(ft.vmap(fn)(cts), tf.vmap(tfn)(cts))


def test_vmap_vjp_inside():
    x, ct = torch.randn(3, 5), torch.randn(3, 5)

    def f(ops):
        vjp = ops.vjp

        def per_example(a, c):
            _, fn = vjp(lambda t: t.exp() * t, a)
            return fn(c)[0]

        return ops.vmap(per_example)(x, ct)

    close(f(ft), f(tf))


def test_vmap_grad_grad():
    x = torch.randn(4)
    close(ft.vmap(ft.grad(ft.grad(torch.tanh)))(x), tf.vmap(tf.grad(tf.grad(torch.tanh)))(x))


def test_grad_vmap_grad():
    x = torch.randn(4)

    def f(g, v):
        return lambda t: v(g(lambda s: s.exp().sin()))(t).sum()

    close(ft.grad(f(ft.grad, ft.vmap))(x), tf.grad(f(tf.grad, tf.vmap))(x))


def test_perturbation_confusion_with_vmap_between():
    x = torch.randn(3)

    def f(g, v):
        def outer(a):
            return v(lambda b: g(lambda y: (a * y).sum())(b))(torch.ones(2, 3)).sum()
        return g(outer)(x)

    close(f(ft.grad, ft.vmap), f(tf.grad, tf.vmap))


def test_maml_style_inner_sgd_step(mlp):
    params, x, y = mlp

    def meta_loss(grad, p):
        inner = grad(mlp_loss)(p, x, y)
        adapted = {k: p[k] - 0.1 * inner[k] for k in p}
        return mlp_loss(adapted, x, y)

    close(ft.grad(lambda p: meta_loss(ft.grad, p))(params),
          tf.grad(lambda p: meta_loss(tf.grad, p))(params))
