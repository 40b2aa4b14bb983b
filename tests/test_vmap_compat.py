"""vmap where torch.func computes and we used to refuse: elementwise ops whose
decomposition fills an output shaped after one argument, batch norm with some running
stats batched, and nested-tensor inputs. Compared with torch.func."""
import warnings

import pytest
import torch
import torch.func
import torch.nn.functional as F

import functransforms as ft

B = 3


def _same(ours, theirs):
    if ours.is_nested:
        assert theirs.is_nested
        for a, b in zip(ours.unbind(), theirs.unbind()):
            torch.testing.assert_close(a, b)
    else:
        torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("op", [torch.complex, torch.polar])
@pytest.mark.parametrize("in_dims", [(0, None), (None, 0), (0, 0), (1, None)])
def test_complex_outputs_from_one_batched_argument(op, in_dims):
    a = torch.randn(B, 4, dtype=torch.float64)
    b = torch.rand(4, dtype=torch.float64) + 0.5
    args = [a if d is not None else b for d in in_dims]
    if in_dims[0] == 1:
        args[0] = a.t()
    _same(ft.vmap(op, in_dims=in_dims)(*args), torch.func.vmap(op, in_dims=in_dims)(*args))


@pytest.mark.parametrize("in_dims", [(None, 0, None), (None, None, 0), (None, 0, 0)])
def test_batch_norm_training_with_some_stats_batched(in_dims):
    x = torch.randn(4, 3, 5, dtype=torch.float64)
    stats = (torch.randn(B, 3, dtype=torch.float64), torch.rand(B, 3, dtype=torch.float64) + .5)
    args = [x] + [s if d is not None else s[0] for s, d in zip(stats, in_dims[1:])]

    def f(x, rm, rv):
        return F.batch_norm(x, rm, rv, training=True)

    ours = ft.vmap(f, in_dims=in_dims)(*[a.clone() for a in args])
    theirs = torch.func.vmap(f, in_dims=in_dims)(*[a.clone() for a in args])
    _same(ours, theirs)


def test_batch_norm_training_batched_input_unbatched_stats_raises():
    x = torch.randn(B, 4, 3, 5)
    for vmap in (ft.vmap, torch.func.vmap):
        with pytest.raises(RuntimeError, match="Batch norm got a batched tensor as input"):
            vmap(lambda x: F.batch_norm(x, torch.zeros(3), torch.ones(3), training=True))(x)


def _nt(*shapes):
    g = torch.Generator().manual_seed(sum(map(sum, shapes)))
    return torch.nested.nested_tensor([torch.randn(*s, generator=g) for s in shapes])


@pytest.mark.parametrize("f, args, in_dims", [
    (lambda x: x.sin() * 2.0, (_nt((2, 3), (4, 3)),), 0),
    (lambda x, y: x @ y, (_nt((2, 3), (4, 3)), _nt((3, 5), (3, 1))), 0),
    (lambda x, y: x @ y, (_nt((2, 3), (4, 3)), torch.randn(3, 2)), (0, None)),
    (lambda x, y: x @ y, (_nt((2, 3), (4, 3)), torch.randn(2, 3, 2)), 0),
    (lambda x, y: torch.cat([x, y], 0), (_nt((2, 3), (4, 3)), _nt((1, 3), (2, 3))), 0),
])
def test_nested_tensor_inputs(f, args, in_dims):
    before = ft.fallback_counts().get("<nested tensor inputs>", 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        ours = ft.vmap(f, in_dims=in_dims)(*args)
        theirs = torch.func.vmap(f, in_dims=in_dims)(*args)
    # The per-component loop is a slow path: counted like the per-example fallback.
    assert ft.fallback_counts()["<nested tensor inputs>"] == before + 1
    _same(ours, theirs)


def test_nested_tensor_errors():
    x = _nt((2, 3), (4, 3))
    for vmap in (ft.vmap, torch.func.vmap):
        with pytest.raises(RuntimeError, match="Nested tensors can only be vmapped over dim=0"):
            vmap(lambda t: t, out_dims=1)(x)
        with pytest.raises(RuntimeError, match="Only one level of vmap is supported"):
            vmap(vmap(lambda t: t.sin()))(_nt((2, 2, 3), (2, 2, 1)))
    with pytest.raises(RuntimeError, match="Nested tensors can only be vmapped over dim=0"):
        ft.vmap(lambda t: t, in_dims=1)(x)


@pytest.mark.parametrize("op", [torch.linalg.det, torch.linalg.inv, torch.linalg.qr,
                                torch.linalg.svd, torch.linalg.eigh, torch.linalg.slogdet])
def test_linalg_of_vector_examples_raises(op):
    # Each example is 1-D: the batch dim must not become a matrix dim (a silent answer).
    x = torch.randn(3, 3, dtype=torch.float64)
    x = x @ x.T + 3 * torch.eye(3, dtype=torch.float64)
    for vmap in (ft.vmap, torch.func.vmap):
        with pytest.raises(RuntimeError, match="dimension"):
            vmap(op)(x)
