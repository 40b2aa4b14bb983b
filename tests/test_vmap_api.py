"""vmap's public contract: in_dims/out_dims pytrees, non-tensor args, kwargs, nesting, chunking."""
from collections import namedtuple

import expecttest
import pytest
import torch
import torch.func as tf

import functransforms as ft
from functransforms.core.levels import level_stack


def assert_same(a, b):
    fa, sa = torch.utils._pytree.tree_flatten(a)
    fb, sb = torch.utils._pytree.tree_flatten(b)
    assert sa == sb
    for x, y in zip(fa, fb):
        if isinstance(x, torch.Tensor):
            assert type(x) is torch.Tensor, f"wrapper leaked: {type(x)}"
            assert x.shape == y.shape and x.dtype == y.dtype
            torch.testing.assert_close(x, y)
        else:
            assert x == y


def both(fn, *args, **vmap_kwargs):
    assert_same(ft.vmap(fn, **vmap_kwargs)(*args), tf.vmap(fn, **vmap_kwargs)(*args))


def test_default_in_dims_and_logical_shape():
    seen = []

    def f(x):
        seen.append((tuple(x.shape), x.dim(), x.size(-1)))
        return x * 2

    both(f, torch.randn(3, 4, 5))
    assert seen[0] == ((4, 5), 2, 5)


@pytest.mark.parametrize("in_dims", [1, -1, (2,)])
def test_in_dims_int_and_negative(in_dims):
    both(lambda x: x.sin() + 1, torch.randn(2, 3, 4), in_dims=in_dims)


def test_in_dims_none_and_non_tensor_args():
    x, y = torch.randn(3, 4), torch.randn(4)
    both(lambda x, y, s: x * y + s, x, y, 2.5, in_dims=(0, None, None))


def test_nested_in_dims_pytree():
    x = {"a": torch.randn(3, 2), "b": (torch.randn(2, 3), torch.randn(2))}
    both(lambda d: d["a"] * d["b"][0].t() + d["b"][1], x, in_dims=({"a": 0, "b": (1, None)},))


def test_namedtuple_inputs_and_outputs():
    Pair = namedtuple("Pair", "x y")
    p = Pair(torch.randn(3, 2), torch.randn(3, 2))
    both(lambda p: Pair(p.x + p.y, p.x * p.y), p)


def test_kwargs_are_not_batched():
    x, w = torch.randn(3, 4), torch.randn(4)
    out = ft.vmap(lambda x, *, w: x * w)(x, w=w)
    torch.testing.assert_close(out, x * w)


@pytest.mark.parametrize("out_dims", [0, 1, -1, (1, 0)])
def test_out_dims(out_dims):
    both(lambda x: (x.sin(), x.cos()), torch.randn(3, 4, 2), out_dims=out_dims)


def test_unbatched_output_is_expanded():
    both(lambda x: torch.ones(2), torch.randn(3, 4))
    both(lambda x, y: y.sin(), torch.randn(3, 4), torch.randn(2), in_dims=(0, None))


def test_out_dims_none_for_constant_output():
    y = torch.randn(2)
    both(lambda x: (x * 2, y), torch.randn(3, 4), out_dims=(0, None))


def test_nested_vmap():
    x, y = torch.randn(3, 4), torch.randn(5, 4)
    both(tf.vmap(lambda a, b: a * b, in_dims=(None, 0)), x, y, in_dims=(0, None))
    out = ft.vmap(ft.vmap(lambda a, b: a * b, in_dims=(None, 0)), in_dims=(0, None))(x, y)
    torch.testing.assert_close(out, x[:, None] * y[None])


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 10])
def test_chunk_size(chunk_size):
    x, y = torch.randn(7, 3), torch.randn(3)
    both(lambda a, b: (a * b, a + 1), x, y, in_dims=(0, None), chunk_size=chunk_size,
         out_dims=(0, 1))


def test_inplace_on_batched_input_mutates_it():
    x = torch.randn(3, 4)
    expected = x * 2

    def f(a):
        a.mul_(2)
        return a

    out = ft.vmap(f)(x)
    torch.testing.assert_close(x, expected)
    torch.testing.assert_close(out, expected)


def test_plain_autograd_through_vmap():
    weights = torch.randn(5, requires_grad=True)
    examples = torch.randn(3, 5)
    out = ft.vmap(lambda v: v.dot(weights).relu())(examples)
    (g,) = torch.autograd.grad(out.sum(), weights)
    expected_out = tf.vmap(lambda v: v.dot(weights).relu())(examples)
    (expected,) = torch.autograd.grad(expected_out.sum(), weights)
    torch.testing.assert_close(g, expected)


class TestErrors(expecttest.TestCase):
    def check(self, fn, *args, expected, **vmap_kwargs):
        with self.assertRaises((ValueError, RuntimeError)) as ctx:
            ft.vmap(fn, **vmap_kwargs)(*args)
        self.assertExpectedInline(str(ctx.exception), expected, skip=1)
        assert level_stack() == []
        torch.testing.assert_close(ft.vmap(torch.sin)(torch.ones(2, 2)), torch.ones(2, 2).sin())

    def test_mismatched_batch_sizes(self):
        def add(a, b):
            return a + b

        with self.assertRaises(ValueError) as ctx:
            ft.vmap(add)(torch.randn(3), torch.randn(4))
        self.assertExpectedInline(str(ctx.exception), """vmap(add, in_dims=0, out_dims=0)(<inputs>): Expected all tensors to have the same size in the mapped dimension, got sizes [3, 4] for the mapped inputs. Map over dimensions of one size, or pass the odd input with in_dim None.""")

    def test_in_dim_out_of_range(self):
        with self.assertRaises(ValueError) as ctx:
            ft.vmap(torch.sin, in_dims=2)(torch.randn(3, 4))
        self.assertExpectedInline(str(ctx.exception), """vmap(sin, in_dims=2, out_dims=0)(<inputs>): Got in_dim=2 for some input, but that input is a Tensor of dimensionality 2; in_dim must satisfy -2 <= in_dim < 2.""")

    def test_in_dims_wrong_structure(self):
        with self.assertRaises(ValueError) as ctx:
            ft.vmap(torch.add, in_dims=(0,))(torch.randn(3), torch.randn(3))
        self.assertExpectedInline(str(ctx.exception), """vmap(add, in_dims=(0,), out_dims=0)(<inputs>): in_dims is not compatible with the structure of `inputs`: in_dims has 1 entries but 2 positional argument(s) were passed. Give one in_dim per positional argument.""")

    def test_in_dim_on_non_tensor(self):
        with self.assertRaises(ValueError) as ctx:
            ft.vmap(lambda x, s: x * s, in_dims=(0, 0))(torch.randn(3), 2.0)
        self.assertExpectedInline(str(ctx.exception), """vmap(<lambda>, in_dims=(0, 0), out_dims=0)(<inputs>): Got in_dim=0 for an input but the input is of type float. vmap can only map over Tensors; use None as the in_dim of non-Tensor inputs.""")

    def test_all_in_dims_none(self):
        with self.assertRaises(ValueError) as ctx:
            ft.vmap(torch.sin, in_dims=None)(torch.randn(3))
        self.assertExpectedInline(str(ctx.exception), """vmap(sin, in_dims=None, out_dims=0)(<inputs>): at least one Tensor must be mapped over, but all in_dims were None or no Tensor was passed. Give a Tensor input an integer in_dim.""")

    def test_non_tensor_output(self):
        with self.assertRaises(ValueError) as ctx:
            ft.vmap(lambda x: 1.0)(torch.randn(3))
        self.assertExpectedInline(str(ctx.exception), """vmap(<lambda>, in_dims=0, out_dims=0)(<inputs>): `f` must only return Tensors, got type <class 'float'>. Set its out_dim to None to return it unbatched.""")

    def test_out_dims_none_on_batched_output(self):
        with self.assertRaises(ValueError) as ctx:
            ft.vmap(lambda x: x * 2, out_dims=None)(torch.randn(3))
        self.assertExpectedInline(str(ctx.exception), """vmap(<lambda>, in_dims=0, out_dims=None)(<inputs>): out_dims is None for an output that depends on the mapped inputs (vmap can not return a BatchedTensor when out_dim is None). Only outputs that are the same for every example can use out_dims=None.""")

    def test_bad_randomness(self):
        with self.assertRaises(RuntimeError) as ctx:
            ft.vmap(torch.sin, randomness="sometimes")
        self.assertExpectedInline(str(ctx.exception), """vmap: randomness must be one of ('error', 'different', 'same'), got 'sometimes'.""")

    def test_exception_inside_f_leaves_stack_clean(self):
        def boom(x):
            raise KeyError("user bug")

        with self.assertRaises(KeyError):
            ft.vmap(boom)(torch.randn(3))
        assert level_stack() == []
        with self.assertRaises(KeyError):
            ft.vmap(ft.grad(lambda x: boom(x)))(torch.randn(3))
        assert level_stack() == []


def test_gru_with_batched_initial_state():
    # The documented workaround for nn.GRU/nn.RNN under vmap (README, Known limitations).
    torch.manual_seed(0)
    gru = torch.nn.GRU(4, 6, batch_first=True)
    x, h0 = torch.randn(5, 7, 4), torch.zeros(5, 1, 1, 6)

    def f(xi, h):
        return gru(xi.unsqueeze(0), h)[0]

    expected = torch.stack([f(x[i], h0[i]) for i in range(5)])
    torch.testing.assert_close(ft.vmap(f)(x, h0), expected)


def test_data_attribute_is_refused_like_torch_func():
    def read(x):
        return x.data

    def write(x):
        x.data = torch.ones(3)
        return x

    for vmap in (ft.vmap, torch.func.vmap):
        with pytest.raises(RuntimeError, match="accessing `data` under vmap transform"):
            vmap(read)(torch.randn(2, 3))
        with pytest.raises(RuntimeError, match="mutating directly with `.data` under vmap"):
            vmap(write)(torch.randn(2, 3))
