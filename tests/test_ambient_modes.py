"""Ambient autograd switches around and inside transforms, compared with torch.func.

Inference mode and torch's forward-AD switch are thread-local state that user code sets; a
transform must not be silently disabled by them (zero gradients/tangents), and an
inference_mode block inside ``f`` is a constant to the grad levels.
"""
import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.func as tf

import functransforms as ft
from custom_functions import MyExp

torch.manual_seed(0)
X = torch.randn(4, dtype=torch.float64)
XS = torch.randn(3, 4, dtype=torch.float64)


def cube_sum(x):
    return (x ** 3).sum()


def with_inference_block(x):
    # The block's result is a constant to every level, as under no_grad.
    with torch.inference_mode():
        c = x.sin() * x
    return (x * x - c).sum()


# (name, call(api) -> result) pairs, each run with the transforms of torch.func and ours.
CASES = [
    ("grad", lambda m: m.grad(cube_sum)(X)),
    ("vjp", lambda m: m.vjp(lambda x: x.exp(), X)[1](torch.ones(4, dtype=torch.float64))),
    ("jacrev", lambda m: m.jacrev(torch.tanh)(X)),
    ("jvp", lambda m: m.jvp(torch.sin, (X,), (torch.ones(4, dtype=torch.float64),))),
    ("vmap_grad", lambda m: m.vmap(m.grad(cube_sum))(XS)),
    ("grad_vmap", lambda m: m.grad(lambda x: m.vmap(torch.sin)(x).sum())(X)),
    ("grad_grad", lambda m: m.grad(m.grad(lambda x: x.sin() * x))(X[0])),
    ("hessian", lambda m: m.jacrev(m.grad(cube_sum))(X)),
    ("inference_block_inside", lambda m: m.grad(with_inference_block)(X)),
]


@pytest.mark.parametrize("name,call", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("no_grad", [False, True])
def test_inference_mode_around_transform(name, call, no_grad):
    with torch.inference_mode():
        with torch.set_grad_enabled(not no_grad):
            expected = call(tf)
            actual = call(ft)
        assert torch.is_inference_mode_enabled()
    assert not torch.is_inference_mode_enabled()
    torch.testing.assert_close(actual, expected)


def test_inference_block_inside_grad_without_outer_mode():
    torch.testing.assert_close(ft.grad(with_inference_block)(X), tf.grad(with_inference_block)(X))


def test_forward_ad_disabled_around_jvp():
    t = torch.randn(4, dtype=torch.float64)
    with fwAD._set_fwd_grad_enabled(False):
        actual = ft.jvp(torch.sin, (X,), (t,))
        assert not fwAD._is_fwd_grad_enabled()
    torch.testing.assert_close(actual, tf.jvp(torch.sin, (X,), (t,)))


def _shifted_square(x):
    # The shift is a constant to forward mode: the tangent is that of x ** 2 alone.
    with fwAD._set_fwd_grad_enabled(False):
        shift = x ** 2
    return x ** 2 - shift


@pytest.mark.parametrize("case", ["jvp", "jvp_jvp", "jacfwd", "hessian", "vmap_jvp",
                                  "under_enabled_switch", "custom_function"])
def test_forward_ad_disabled_inside_f_makes_constants(case):
    x, t = torch.randn(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)

    def run(m):
        if case == "jvp":
            return m.jvp(_shifted_square, (x,), (t,))
        if case == "jvp_jvp":
            return m.jvp(lambda x: m.jvp(_shifted_square, (x,), (t,))[1], (x,), (t,))
        if case == "jacfwd":
            return m.jacfwd(_shifted_square)(x)
        if case == "hessian":
            return m.hessian(lambda x: _shifted_square(x).sum())(x)
        if case == "vmap_jvp":
            return m.vmap(lambda x: m.jvp(_shifted_square, (x,), (t,)))(x.reshape(3, 1) * t)
        if case == "under_enabled_switch":
            with fwAD._set_fwd_grad_enabled(True):
                return m.jvp(_shifted_square, (x,), (t,))
        # A grad level runs the Function's forward (torch turns forward AD off there) on
        # the jvp level's duals: their tangents must survive.
        return m.jvp(m.grad(lambda x: MyExp.apply(x).sum()), (x,), (t,))

    torch.testing.assert_close(run(ft), run(tf))
