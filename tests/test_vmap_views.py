"""vmap of shape/view ops, joins, factories and copy/fill, against torch.func.vmap."""
import expecttest
import pytest
import torch
import torch.func

import functransforms as ft

torch.manual_seed(0)
X = torch.randn(3, 2, 4)  # batch 3, examples (2, 4)
V = torch.randn(3, 4)
S = torch.randn(3)  # 0-dim examples
M4 = torch.randn(3, 2, 3, 4, 5)  # 4-dim examples, for channels_last

CASES = {
    "view": (lambda t: t.view(8), (X,)),
    "view_neg": (lambda t: t.view(-1, 2), (X,)),
    "reshape_noncontig": (lambda t: t.t().reshape(-1), (X,)),
    "flatten": (lambda t: t.flatten(), (X,)),
    "unflatten": (lambda t: t.unflatten(1, (2, 2)), (X,)),
    "expand": (lambda t: t[:1].expand(5, 4), (X,)),
    "expand_new_dims": (lambda t: t.expand(2, 3, 2, 4), (X,)),
    "expand_as": (lambda t: t[:, :1].expand_as(t), (X,)),
    "broadcast_to": (lambda t: t.broadcast_to(2, 2, 4), (X,)),
    "permute": (lambda t: t.permute(1, 0), (X,)),
    "permute_neg": (lambda t: t.unsqueeze(0).permute(-1, 0, 1), (X,)),
    "transpose": (lambda t: t.transpose(0, -1), (X,)),
    "t": (lambda t: t.t(), (X,)),
    "t_1d": (lambda t: t.t(), (V,)),
    "mT": (lambda t: t.mT, (X,)),
    "movedim": (lambda t: t.unsqueeze(1).movedim(0, -1), (X,)),
    "squeeze_all": (lambda t: t[:1].squeeze(), (X,)),
    "squeeze_dim": (lambda t: t[:1].squeeze(0), (X,)),
    "squeeze_dims": (lambda t: t[:1, None].squeeze((0, 1)), (X,)),
    "squeeze_scalar": (lambda t: t.squeeze(0), (S,)),
    "unsqueeze": (lambda t: t.unsqueeze(-1), (X,)),
    "unsqueeze_0": (lambda t: t.unsqueeze(0), (X,)),
    "select": (lambda t: t[1], (X,)),
    "select_neg": (lambda t: t.select(-1, -2), (X,)),
    "slice": (lambda t: t[:, 1:3], (X,)),
    "slice_step": (lambda t: t[:, 1::2], (X,)),
    "narrow": (lambda t: t.narrow(-1, 1, 2), (X,)),
    "unbind": (lambda t: t.unbind(1), (X,)),
    "split": (lambda t: t.split(3, -1), (X,)),
    "split_sizes": (lambda t: t.split([1, 3], 1), (X,)),
    "chunk": (lambda t: t.chunk(2, 1), (X,)),
    "tensor_split": (lambda t: t.tensor_split(3, 1), (X,)),
    "diagonal": (lambda t: t.diagonal(), (X,)),
    "diagonal_offset": (lambda t: t.diagonal(1, -1, 0), (X,)),
    "diag": (lambda t: torch.diag(t), (X,)),
    "diag_embed": (lambda t: torch.diag_embed(t), (X,)),
    "unfold": (lambda t: t.unfold(-1, 2, 1), (X,)),
    "as_strided": (lambda t: t.as_strided((2, 2), (1, 2)), (X,)),
    "roll": (lambda t: t.roll(1, -1), (X,)),
    "roll_flat": (lambda t: t.roll(3), (X,)),
    "roll_multi": (lambda t: t.roll((1, 2), (0, 1)), (X,)),
    "flip": (lambda t: t.flip(0, -1), (X,)),
    "rot90": (lambda t: t.rot90(1, (0, 1)), (X,)),
    "repeat": (lambda t: t.repeat(2, 1, 3), (X,)),
    "tile": (lambda t: t.tile(2), (X,)),
    "repeat_interleave": (lambda t: t.repeat_interleave(2, 1), (X,)),
    "triu": (lambda t: t.triu(1), (X,)),
    "pad_constant": (lambda t: torch.nn.functional.pad(t, (1, 2, 0, 1), value=0.5), (X,)),
    "pad_crop": (lambda t: torch.nn.functional.pad(t, (-1, 1)), (X,)),
    "clone": (lambda t: t.clone(), (X,)),
    "contiguous": (lambda t: t.t().contiguous(), (X,)),
    "channels_last": (lambda t: t.contiguous(memory_format=torch.channels_last), (M4,)),
    "to_dtype": (lambda t: t.to(torch.float64), (X,)),
    "view_dtype": (lambda t: t.view(torch.int32), (X,)),
    "detach": (lambda t: t.detach(), (X,)),
    "cat": (lambda a, b: torch.cat([a, b], -1), (X, X)),
    "cat_unbatched": (lambda a: torch.cat([a, torch.ones(2, 1)], 1), (X,)),
    "cat_legacy_empty": (lambda a: torch.cat([torch.empty(0), a, torch.ones(1, 4)]), (X,)),
    "stack": (lambda a, b: torch.stack([a, b], -1), (X, X)),
    "stack_unbatched": (lambda a: torch.stack([torch.zeros(2, 4), a], 1), (X,)),
    "hstack": (lambda a: torch.hstack([a, a]), (X,)),
    "vstack": (lambda a: torch.vstack([a, torch.zeros(4)]), (X,)),
    "new_zeros": (lambda t: t.new_zeros(5), (X,)),
    "new_ones": (lambda t: t.new_ones(2, 2), (X,)),
    "new_full": (lambda t: t.new_full((3,), 2.0), (X,)),
    "new_empty": (lambda t: t.new_empty(3, 1).zero_(), (X,)),
    "zeros_like": (lambda t: torch.zeros_like(t), (X,)),
    "ones_like": (lambda t: torch.ones_like(t, dtype=torch.int64), (X,)),
    "full_like": (lambda t: torch.full_like(t, 7.0), (X,)),
    "empty_like_shape": (lambda t: torch.empty_like(t).fill_(1.0), (X,)),
    "fill_scalar": (lambda t: t.clone().fill_(2.0), (X,)),
    "fill_batched": (lambda t, s: t.clone().fill_(s), (X, S)),
    "fill_unbatched_tensor": (lambda t: t.clone().fill_(torch.tensor(3.0)), (X,)),
    "zero_": (lambda t: t.clone().zero_(), (X,)),
    "copy_batched": (lambda t, v: t.clone().copy_(v), (X, V)),
    "copy_unbatched": (lambda t: t.clone().copy_(torch.arange(4.0)), (X,)),
    "copy_into_new_zeros": (lambda t: t.new_zeros(2, 4).copy_(t), (X,)),
    "copy_dtype": (lambda t: torch.zeros_like(t, dtype=torch.float64).copy_(t), (X,)),
    "setitem": (lambda t, v: _setitem(t, v), (X, V)),
    "masked_fill": (lambda t: t.masked_fill(t > 0, 0.0), (X,)),
    "masked_fill_tensor": (lambda t, s: t.masked_fill(t > 0, s), (X, S)),
    "masked_fill_unbatched_value": (lambda t: t.masked_fill(t > 0, torch.tensor(-1.0)), (X,)),
    "masked_fill_batched_mask": (lambda m: torch.zeros(2, 4).masked_fill(m > 0, 1.0), (X,)),
    "where": (lambda t: torch.where(t > 0, t, 0.0), (X,)),
}


def _setitem(t, v):
    out = t.clone()
    out[0] = v
    out[1, 1:3] = 0.0
    return out


# torch.func raises on these ("NYI: querying is_contiguous inside of vmap..."): compare
# with the per-example loop instead.
_TORCH_FUNC_NYI = {"channels_last"}


def _per_example(f, args):
    outs = [f(*(a[i] for a in args)) for i in range(args[0].shape[0])]
    if isinstance(outs[0], (tuple, list)):
        return type(outs[0])(torch.stack(col) for col in zip(*outs))
    return torch.stack(outs)


def _compare(f, args, in_dims=0, oracle=None):
    ft.reset_fallback_counts()
    got = ft.vmap(f, in_dims)(*args)
    expected = (oracle or torch.func.vmap(f, in_dims))(*args)
    torch.testing.assert_close(got, expected)
    assert ft.fallback_counts() == {}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_torch_func(name):
    f, args = CASES[name]
    oracle = (lambda *a: _per_example(f, a)) if name in _TORCH_FUNC_NYI else None
    _compare(f, args, oracle=oracle)


@pytest.mark.parametrize("name", ["view", "transpose", "permute", "select", "slice", "split",
                                  "cat", "stack", "diagonal", "roll_flat", "repeat", "flip",
                                  "unfold", "squeeze_all", "expand_new_dims", "new_zeros",
                                  "copy_batched", "fill_batched", "masked_fill_tensor",
                                  "reshape_noncontig"])
def test_in_dims_last(name):
    f, args = CASES[name]
    moved = tuple(a.movedim(0, -1) for a in args)
    _compare(f, moved, in_dims=-1)


@pytest.mark.parametrize("name", ["view", "transpose", "select", "split", "cat", "stack",
                                  "expand_new_dims", "roll_flat", "new_zeros", "copy_batched",
                                  "unsqueeze", "squeeze_all", "masked_fill_tensor"])
def test_nested(name):
    f, args = CASES[name]
    nested_args = tuple(torch.stack([a, a * 2 + 1]) for a in args)
    ft.reset_fallback_counts()
    got = ft.vmap(ft.vmap(f))(*nested_args)
    expected = torch.func.vmap(torch.func.vmap(f))(*nested_args)
    torch.testing.assert_close(got, expected)
    assert ft.fallback_counts() == {}


def test_nested_inner_unbatched():
    # The inner vmap maps only y; x is batched by the outer one only.
    x, y = torch.randn(2, 4), torch.randn(3, 4)

    def f(x, y):
        return torch.cat([x, y]).view(2, 4).sum(0)

    expected = torch.func.vmap(torch.func.vmap(f, (None, 0)), (0, None))(x, y)
    got = ft.vmap(ft.vmap(f, (None, 0)), (0, None))(x, y)
    torch.testing.assert_close(got, expected)


def test_view_writes_through():
    def f(t):
        t = t.clone()
        t.view(-1)[0] = 5.0
        t.t()[1, 0] = 7.0
        t.unsqueeze(0).select(0, 0).diagonal().mul_(2)
        return t

    torch.testing.assert_close(ft.vmap(f)(X), torch.func.vmap(f)(X))


def test_view_the_example_layout_refuses_raises():
    # Per example (2, 4) with strides (12, 1) (in_dims=1): eager refuses view(8) on such a
    # tensor, and so do torch.func and vmap, rather than silently copying.
    x = torch.randn(2, 3, 4)
    for vmap in (ft.vmap, torch.func.vmap):
        with pytest.raises(RuntimeError, match="view size is not compatible"):
            vmap(lambda t: t.view(8), in_dims=1)(x)
    torch.testing.assert_close(ft.vmap(lambda t: t.reshape(8), in_dims=1)(x),
                               x.movedim(1, 0).reshape(3, 8))


def test_scalar_examples():
    for f in (lambda t: t.transpose(0, -1), lambda t: t.flip(0), lambda t: t.t(),
              lambda t: t.unsqueeze(0), lambda t: t.expand(3), lambda t: t.roll(1),
              lambda t: t.squeeze(), lambda t: t.unfold(0, 1, 1)):
        per_example = torch.stack([f(s) for s in S])
        torch.testing.assert_close(ft.vmap(f)(S), per_example)


def test_channels_last_layout():
    out = ft.vmap(lambda t: t.contiguous(memory_format=torch.channels_last))(M4)
    assert all(o.is_contiguous(memory_format=torch.channels_last) for o in out)
    # Querying it inside is refused, as in torch.func.
    for vmap in (ft.vmap, torch.func.vmap):
        with pytest.raises(RuntimeError, match="NYI: querying is_contiguous inside of vmap"):
            vmap(lambda t: t.is_contiguous(memory_format=torch.channels_last))(M4)


def test_new_factories_are_batched():
    # A new tensor made from a batched one can take batched in-place writes.
    def f(t):
        out = t.new_zeros(4)
        out.add_(t[0])
        return out

    torch.testing.assert_close(ft.vmap(f)(X), torch.func.vmap(f)(X))


_VIEW_GRAD_CASES = ["pad_constant", "view", "transpose", "permute", "select", "slice", "split", "unbind",
                    "diagonal", "unfold", "roll", "flip", "repeat", "expand_new_dims",
                    "squeeze_all", "cat", "stack", "narrow", "t", "setitem"]


@pytest.mark.parametrize("name", _VIEW_GRAD_CASES)
def test_vmap_of_grad(name):
    f, args = CASES[name]

    def loss(*a):
        out = f(*a)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        return sum((o * o.detach().sin()).sum() for o in outs)

    ft.reset_fallback_counts()
    got = ft.vmap(ft.grad(loss))(*args)
    expected = torch.func.vmap(torch.func.grad(loss))(*args)
    torch.testing.assert_close(got, expected)
    assert ft.fallback_counts() == {}


def test_vmap_of_grad_scalar_unfold():
    f = ft.vmap(ft.grad(lambda t: (t.unfold(0, 1, 1) * 3).sum()))
    torch.testing.assert_close(f(S), torch.full_like(S, 3.0))


class TestErrors(expecttest.TestCase):
    def test_triu_of_vector(self):
        with self.assertRaises(RuntimeError) as ctx:
            ft.vmap(torch.triu)(V)
        self.assertExpectedInline(str(ctx.exception), """\
vmap: triu: input tensor must have at least 2 dimensions per example, got 1.""")

    def test_copy_batched_into_unbatched(self):
        buf = torch.zeros(4)
        with self.assertRaises(RuntimeError) as ctx:
            ft.vmap(lambda v: buf.copy_(v))(V)
        self.assertExpectedInline(str(ctx.exception), """vmap: aten::copy_.default is an in-place operation that would write batched values into a tensor that is not batched (inplace aten::copy_.default(self, *extra_args) is not possible because there exists a Tensor `other` in extra_args that has more elements than `self`). Use the out-of-place version (for example `y = x + z` instead of `x += z`), or make the written tensor batched too.""")

    def test_fill_unbatched_with_batched(self):
        buf = torch.zeros(4)
        with self.assertRaises(RuntimeError) as ctx:
            ft.vmap(lambda s: buf.fill_(s))(S)
        self.assertExpectedInline(str(ctx.exception), """vmap: aten::fill_.Tensor is an in-place operation that would write batched values into a tensor that is not batched (inplace aten::fill_.Tensor(self, *extra_args) is not possible because there exists a Tensor `other` in extra_args that has more elements than `self`). Use the out-of-place version (for example `y = x + z` instead of `x += z`), or make the written tensor batched too.""")
