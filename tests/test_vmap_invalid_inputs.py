"""Inputs torch refuses stay refused under vmap, where our batching rules see the physical
(batched) tensor and would otherwise accept one more dim, a wrong rank or a wrong dtype.

Each case is an OpInfo error input (torch raises on it unbatched); vmapped with each tensor
argument batched in turn, torch.func raises, and so must we. Writes that cannot be batched
(out= tensors outside the vmap, wrappers that escaped a vmap) raise instead of returning a
value that is silently wrong.
"""
import pytest
import torch
import torch.func
from torch.testing._internal.common_methods_invocations import op_db

import functransforms as ft

OPS = ["t", "t_copy", "trace", "narrow_copy", "masked_fill", "masked_scatter", "gather",
       "kthvalue", "masked_select"]


def _cases():
    for op in op_db:
        if op.name not in OPS or op.variant_test_name:
            continue
        for k, error in enumerate(op.error_inputs("cpu")):
            sample = error.sample_input
            args = (sample.input, *sample.args)
            for i, a in enumerate(args):
                if isinstance(a, torch.Tensor):
                    yield pytest.param(op, args, sample.kwargs, i, id=f"{op.name}-{k}-arg{i}")


def _call(vmap, op, args, kwargs, i):
    in_dims = tuple(0 if j == i else None for j in range(len(args)))
    batched = list(args)
    batched[i] = torch.stack([args[i], args[i]])
    return vmap(op, in_dims)(*batched, **kwargs)


@pytest.mark.parametrize("op, args, kwargs, i", list(_cases()))
def test_error_inputs_raise_under_vmap_as_with_torch_func(op, args, kwargs, i):
    try:
        _call(torch.func.vmap, op, args, kwargs, i)
    except Exception:
        pass
    else:
        pytest.skip("torch.func computes this one")
    with pytest.raises(Exception):
        _call(ft.vmap, op, args, kwargs, i)
    assert ft.vmap(torch.sin)(torch.ones(2, 3)).shape == (2, 3)  # the stack is clean


def test_out_tensor_outside_vmap_is_refused_not_overwritten():
    x, index = torch.randn(2, 6), torch.tensor([0, 1, 2])
    out = torch.zeros(3)
    with pytest.raises(RuntimeError, match="not batched"):
        ft.vmap(lambda x: torch.gather(x, 0, index, out=out))(x)
    assert torch.equal(out, torch.zeros(3))


def test_out_tensor_batched_by_the_vmap_gets_every_example():
    x, index = torch.randn(2, 6), torch.tensor([0, 1, 2])
    out = torch.zeros(2, 3)
    result = ft.vmap(lambda x, o: torch.gather(x, 0, index, out=o))(x, out)
    torch.testing.assert_close(out, x[:, :3])
    torch.testing.assert_close(result, x[:, :3])


def test_a_tensor_escaped_from_vmap_raises_like_torch_func():
    escaped = {}

    def f(x):
        escaped["x"] = x
        return x * 2

    ft.vmap(f)(torch.randn(3, 4))
    for use in (lambda t: t.sin(), lambda t: t.mul_(1), lambda t: t + 1):
        with pytest.raises(RuntimeError, match="your tensor may have escaped from inside a "
                                               "function being vmapped"):
            use(escaped["x"])
