"""torch autograd outside a transform, through tensors the transformed function captures.

A Jacobian (or gradient) of ``f`` computed by a transform depends on the parameters ``f``
closes over; torch autograd around the call must see that dependence, as it does with
torch.func (force fields trained on their own derivatives, MAML-style meta-gradients).
"""
import pytest
import torch
import torch.func as tf
from torch import nn

import functransforms as ft

torch.manual_seed(0)
MODEL = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)).double()
X = torch.randn(2, dtype=torch.float64)
XS = torch.randn(4, 2, dtype=torch.float64)


def scalar_model(x):
    return MODEL(x).pow(2).sum()


CASES = [
    ("jacrev", lambda m: m.jacrev(MODEL)(X)),
    ("jacrev_chunked", lambda m: m.jacrev(MODEL, chunk_size=2)(X)),
    ("vmap_jacrev", lambda m: m.vmap(m.jacrev(MODEL))(XS)),
    ("jacfwd", lambda m: m.jacfwd(MODEL)(X)),
    ("vmap_jacfwd", lambda m: m.vmap(m.jacfwd(MODEL))(XS)),
    ("grad", lambda m: m.grad(scalar_model)(X)),
    ("vmap_grad", lambda m: m.vmap(m.grad(scalar_model))(XS)),
    ("vjp", lambda m: m.vjp(MODEL, X)[1](torch.ones(3, dtype=torch.float64))[0]),
    ("hessian", lambda m: m.hessian(scalar_model)(X)),
    ("jacrev_jacrev", lambda m: m.jacrev(m.jacrev(scalar_model))(X)),
]


@pytest.mark.parametrize("name,call", CASES, ids=[c[0] for c in CASES])
def test_gradient_through_transform_reaches_captured_parameters(name, call):
    params = tuple(MODEL.parameters())

    def meta_grads(m):
        out = call(m)
        return torch.autograd.grad(out.pow(2).sum(), params, allow_unused=True)

    expected = meta_grads(tf)
    actual = meta_grads(ft)
    for a, e in zip(actual, expected):
        if e is None:
            assert a is None or not a.any()
        else:
            assert a is not None
            torch.testing.assert_close(a, e)
