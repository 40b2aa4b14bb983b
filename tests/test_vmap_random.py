"""Random ops under vmap's randomness modes.

Draws cannot match torch.func's bit for bit, so the checks are on shapes, on which rows
are equal ('same') or differ ('different'), on simple statistics, and on the errors.
"""
import warnings

import expecttest
import pytest
import torch
import torch.func
from torch.utils._python_dispatch import _disable_current_modes

import functransforms as ft
from functransforms.batching.interpreter import VmapInterpreter
from functransforms.batching.rules.random import random_factory

aten = torch.ops.aten
B = 4
X = torch.rand(B, 3, 5) * 0.8 + 0.1  # probabilities/positive means, examples (3, 5)

# name -> (f, whether 'same' is allowed: the draw does not depend on batched values)
CASES = {
    "rand_like": (lambda t: torch.rand_like(t), True),
    "randn_like": (lambda t: torch.randn_like(t), True),
    "randint_like": (lambda t: torch.randint_like(t, 10).float(), True),
    "randint_like_low": (lambda t: torch.randint_like(t, 3, 10).float(), True),
    "uniform_": (lambda t: t.clone().uniform_(-1, 1), True),
    "normal_": (lambda t: t.clone().normal_(2.0, 3.0), True),
    "exponential_": (lambda t: t.clone().exponential_(), True),
    "random_": (lambda t: t.clone().random_(0, 100), True),
    "bernoulli_float": (lambda t: t.clone().bernoulli_(0.5), True),
    "dropout": (lambda t: torch.nn.functional.dropout(torch.ones_like(t), 0.5), True),
    "bernoulli": (lambda t: torch.bernoulli(t), False),
    "bernoulli_p": (lambda t: t.bernoulli(0.3), True),
    "bernoulli_tensor_": (lambda t: torch.zeros_like(t).bernoulli_(t), False),
    "normal_tensor_float": (lambda t: torch.normal(t, 1.0), False),
    "normal_float_tensor": (lambda t: torch.normal(0.0, t), False),
    "normal_tensor_tensor": (lambda t: torch.normal(t, torch.ones(5)), False),
    "poisson": (lambda t: torch.poisson(t * 10), False),
    "multinomial": (lambda t: torch.multinomial(t, 2).float(), False),
}


def _rows_equal(out):
    return all(torch.equal(out[0], out[i]) for i in range(1, out.shape[0]))


def _rows_all_differ(out):
    return all(not torch.equal(out[i], out[j]) for i in range(out.shape[0]) for j in range(i))


@pytest.mark.parametrize("name", list(CASES))
def test_different(name):
    f, _ = CASES[name]
    ft.reset_fallback_counts()
    got = ft.vmap(f, randomness="different")(X)
    expected = torch.func.vmap(f, randomness="different")(X)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    assert _rows_all_differ(got)
    assert ft.fallback_counts() == {}


# torch.func refuses 'same' for bernoulli(float p) although the draw uses only the shape.
_TORCH_FUNC_REFUSES_SAME = {"bernoulli_p"}


@pytest.mark.parametrize("name", [n for n, (_, same_ok) in CASES.items() if same_ok])
def test_same(name):
    f, _ = CASES[name]
    ft.reset_fallback_counts()
    got = ft.vmap(f, randomness="same")(X)
    oracle_mode = "different" if name in _TORCH_FUNC_REFUSES_SAME else "same"
    expected = torch.func.vmap(f, randomness=oracle_mode)(X)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    assert _rows_equal(got)
    assert ft.fallback_counts() == {}


@pytest.mark.parametrize("name", [n for n, (_, same_ok) in CASES.items() if not same_ok])
def test_same_with_batched_input_raises(name):
    f, _ = CASES[name]
    with pytest.raises(RuntimeError, match="same randomness"):
        torch.func.vmap(f, randomness="same")(X)
    with pytest.raises(RuntimeError, match="randomness='same' cannot share one draw"):
        ft.vmap(f, randomness="same")(X)


@pytest.mark.parametrize("name", list(CASES))
def test_error(name):
    f, _ = CASES[name]
    with pytest.raises(RuntimeError):
        torch.func.vmap(f)(X)
    with pytest.raises(RuntimeError, match="randomness='error'"):
        ft.vmap(f)(X)


def test_statistics():
    x = torch.zeros(64, 500)
    draws = {
        "uniform_": ft.vmap(lambda t: t.clone().uniform_(), randomness="different")(x),
        "randn_like": ft.vmap(torch.randn_like, randomness="different")(x),
        "bernoulli": ft.vmap(lambda t: torch.bernoulli(t + 0.25), randomness="different")(x),
    }
    torch.testing.assert_close(draws["uniform_"].mean(), torch.tensor(0.5), atol=0.01, rtol=0)
    torch.testing.assert_close(draws["randn_like"].std(), torch.tensor(1.0), atol=0.02, rtol=0)
    torch.testing.assert_close(draws["bernoulli"].mean(), torch.tensor(0.25), atol=0.01, rtol=0)
    # Independent rows: the per-row means scatter as for independent samples.
    row_means = draws["randn_like"].mean(1)
    assert 0.02 < row_means.std() < 0.1


def test_dropout_same_shares_the_mask():
    x = torch.randn(B, 50) + 3.0
    out = ft.vmap(lambda t: torch.nn.functional.dropout(t, 0.5), randomness="same")(x)
    zeros = out == 0
    assert _rows_equal(zeros) and 0 < zeros.sum() < zeros.numel()
    torch.testing.assert_close(out[~zeros], (x * 2)[~zeros])


def test_native_dropout():
    x = torch.randn(B, 50) + 3.0
    for randomness in ("same", "different"):
        out, mask = ft.vmap(lambda t: aten.native_dropout(t, 0.5, True),
                            randomness=randomness)(x)
        expected_out, expected_mask = torch.func.vmap(
            lambda t: aten.native_dropout(t, 0.5, True), randomness=randomness)(x)
        assert out.shape == expected_out.shape and mask.shape == expected_mask.shape
        assert _rows_equal(mask) == (randomness == "same")
        torch.testing.assert_close(out, x * mask * 2)


def test_nested():
    x = torch.zeros(2, 3, 5)
    for outer in ("same", "different"):
        for inner in ("same", "different"):
            f = ft.vmap(ft.vmap(torch.rand_like, randomness=inner), randomness=outer)
            out = f(x)
            assert out.shape == x.shape
            assert _rows_equal(out) == (outer == "same")
            assert all(_rows_equal(out[i]) == (inner == "same") for i in range(2))


def test_in_dims():
    x = X.movedim(0, 2)
    out = ft.vmap(lambda t: t.clone().uniform_(), in_dims=2, randomness="same")(x)
    assert out.shape == (B, 3, 5) and _rows_equal(out)
    out = ft.vmap(lambda t: torch.bernoulli(t), in_dims=2, randomness="different")(x)
    assert out.shape == (B, 3, 5) and _rows_all_differ(out)


def test_vmap_of_grad_through_dropout():
    x = torch.randn(B, 20) + 3.0

    def loss(t):
        return (torch.nn.functional.dropout(t, 0.5) * t).sum()

    g = ft.vmap(ft.grad(loss), randomness="same")(x)
    zeros = g == 0
    assert _rows_equal(zeros)


class TestRandomFactory(expecttest.TestCase):
    """``random_factory`` serves random ops that have no tensor argument (torch.rand(3)...).

    It is meant to be called from a dispatch mode's handler, where modes are off; the
    tests call it the same way.
    """

    def _call(self, randomness, func, args, kwargs=None, batch_size=B):
        with VmapInterpreter(batch_size, randomness) as interp, _disable_current_modes():
            out = random_factory(interp, func, args, kwargs or {})
            batched = isinstance(out, ft.batching.interpreter.BatchedTensor)
            return (out._value if batched else out), batched

    def test_different(self):
        for func, args, kwargs in [
            (aten.rand.default, ([3, 2],), {}),
            (aten.randn.default, ([3],), {"dtype": torch.float64}),
            (aten.randint.low, (0, 100, [6]), {}),
            (aten.normal.float_float, (0.0, 1.0, [5]), {}),
            (aten.rand.default, (), {"size": [3]}),
        ]:
            value, batched = self._call("different", func, args, kwargs)
            size = args[-1] if args and isinstance(args[-1], list) else kwargs["size"]
            self.assertTrue(batched)
            self.assertEqual(value.shape, (B, *size))
            self.assertTrue(_rows_all_differ(value))

    def test_same(self):
        value, batched = self._call("same", aten.randn.default, ([3, 2],))
        self.assertFalse(batched)
        self.assertEqual(value.shape, (3, 2))

    def test_randperm(self):
        value, batched = self._call("different", aten.randperm.default, (10,), batch_size=8)
        self.assertTrue(batched)
        self.assertEqual(value.dtype, torch.int64)
        self.assertTrue(torch.equal(value.sort(1).values, torch.arange(10).expand(8, 10)))
        self.assertTrue(_rows_all_differ(value))

    def test_nested_levels(self):
        with VmapInterpreter(2, "different") as outer:
            with VmapInterpreter(3, "same") as inner, _disable_current_modes():
                out = random_factory(inner, aten.rand.default, ([4],), {})
        # Inner 'same' gives an unbatched draw of the inner level, batched at the outer.
        self.assertIsInstance(out, ft.batching.interpreter.BatchedTensor)
        self.assertIs(out._level, outer)
        self.assertEqual(out._value.shape, (2, 4))
        self.assertFalse(torch.equal(out._value[0], out._value[1]))

    def test_error(self):
        with self.assertRaises(RuntimeError) as ctx:
            self._call("error", aten.rand.default, ([3],))
        self.assertExpectedInline(str(ctx.exception), """vmap: called random operation while in randomness error mode (aten::rand.default under vmap with randomness='error'). Pass randomness='different' for independent draws per example or randomness='same' for one draw shared by every example.""")


class TestErrors(expecttest.TestCase):
    def test_same_with_batched_input(self):
        with self.assertRaises(RuntimeError) as ctx:
            ft.vmap(torch.bernoulli, randomness="same")(X)
        self.assertExpectedInline(str(ctx.exception), """vmap: aten::bernoulli.default draws random values that depend on a batched input, so randomness='same' cannot share one draw between the examples (Vmap does not currently support same randomness with a batched tensor input). Use randomness='different', or pass that input unbatched (in_dims=None).""")

    def test_inplace_draw_into_unbatched(self):
        with self.assertRaises(RuntimeError) as ctx:
            ft.vmap(lambda p: torch.zeros(3, 5).bernoulli_(p), randomness="different")(X)
        self.assertExpectedInline(str(ctx.exception), """vmap: aten::bernoulli_.Tensor is an in-place operation that would write batched values into a tensor that is not batched (inplace aten::bernoulli_.Tensor(self, *extra_args) is not possible because there exists a Tensor `other` in extra_args that has more elements than `self`). Use the out-of-place version (for example `y = x + z` instead of `x += z`), or make the written tensor batched too.""")

    def test_error_mode(self):
        with self.assertRaises(RuntimeError) as ctx:
            ft.vmap(torch.rand_like)(X)
        self.assertExpectedInline(str(ctx.exception), """vmap: called random operation while in randomness error mode (aten::rand_like.default under vmap with randomness='error'). Pass randomness='different' for independent draws per example or randomness='same' for one draw shared by every example.""")


class TestDrawsMatchTorchFunc(expecttest.TestCase):
    """Where the draw order is fixed by the op (randperm per example, one shared draw per
    chunk, kernels that lay out their output after an input), the values must be
    torch.func's, seed for seed."""

    def _both(self, make, seed=0):
        outs = []
        for vmap in (ft.vmap, torch.func.vmap):
            torch.manual_seed(seed)
            outs.append(make(vmap))
        return outs

    def test_randperm_different(self):
        g = torch.Generator()
        for kwargs in ({}, {"generator": g}):
            def make(vmap):
                g.manual_seed(1)
                return vmap(lambda _: torch.randperm(7, **kwargs), randomness="different")(
                    torch.randn(5))
            ours, theirs = self._both(make)
            self.assertTrue(torch.equal(ours, theirs))

    def test_randperm_nested_different(self):
        def make(vmap):
            inner = vmap(lambda _: torch.randperm(6), randomness="different")
            return vmap(inner, randomness="different")(torch.randn(2, 3))
        ours, theirs = self._both(make)
        self.assertEqual(ours.shape, (2, 3, 6))
        self.assertTrue(torch.equal(ours, theirs))

    def test_same_with_chunk_size_draws_as_unchunked(self):
        x = torch.randn(5, 4, 3)

        def f(t):
            return t.sin() + torch.rand_like(t) + torch.randn(3)

        for in_dim, out_dim in [(0, 0), (1, 2)]:
            def make(vmap, chunk_size=None):
                return vmap(f, in_dims=in_dim, out_dims=out_dim, randomness="same",
                            chunk_size=chunk_size)(x)
            ours, theirs = self._both(make)
            self.assertTrue(torch.equal(ours, theirs))
            for chunk_size in (1, 2, 4, 7):
                chunked, theirs_chunked = self._both(lambda v: make(v, chunk_size))
                self.assertTrue(torch.equal(chunked, ours))
                self.assertTrue(torch.equal(chunked, theirs_chunked))

    def test_same_with_chunk_size_nested(self):
        x = torch.randn(4, 3, 2)

        def make(vmap, chunk_size=None):
            inner = vmap(lambda t: t + torch.rand_like(t), randomness="same",
                         chunk_size=chunk_size)
            return vmap(inner, randomness="same", chunk_size=chunk_size)(x)

        ours, theirs = self._both(make)
        for chunk_size in (1, 2, 3):
            chunked, theirs_chunked = self._both(lambda v: make(v, chunk_size))
            self.assertTrue(torch.equal(chunked, ours))
            self.assertTrue(torch.equal(chunked, theirs_chunked))

    def test_different_with_an_unbatched_first_input(self):
        count = torch.full((3, 5), 10.0)
        prob = torch.rand(3, 5, B).movedim(-1, 0)  # batched, not contiguous per example
        for op in (torch.binomial, torch.normal):
            with warnings.catch_warnings():
                # torch.func's binomial resizes its output, with a deprecation warning.
                warnings.simplefilter("ignore", UserWarning)
                ours, theirs = self._both(lambda vmap: vmap(
                    op, in_dims=(None, 0), randomness="different")(count, prob))
            self.assertTrue(torch.equal(ours, theirs))

    def test_different_on_unbatched_probabilities(self):
        probs = torch.rand(3, 6)
        ours, theirs = self._both(lambda vmap: vmap(
            lambda _: torch.multinomial(probs, 4), randomness="different")(torch.randn(B)))
        self.assertEqual(ours.shape, (B, 3, 4))
        self.assertTrue(torch.equal(ours, theirs))

    def test_dropout_of_unbatched_input_differs_per_example(self):
        x = torch.ones(2, 3, 8, 8)
        for dropout in (torch.nn.functional.dropout, torch.nn.functional.alpha_dropout,
                        torch.nn.functional.dropout2d):
            out = ft.vmap(lambda _: dropout(x, 0.5, training=True),
                          randomness="different")(torch.randn(B))
            self.assertEqual(out.shape, (B, 2, 3, 8, 8))
            self.assertTrue(_rows_all_differ(out))
            shared = ft.vmap(lambda _: dropout(x, 0.5, training=True),
                             randomness="same")(torch.randn(B))
            self.assertTrue((shared == shared[0]).all())


def test_jacfwd_respects_randomness():
    # jacfwd vmaps over tangents only: the random op reaches the jvp level with an
    # unbatched primal, and is still refused in 'error' mode, as in torch.func.
    x = torch.rand(3, 4)
    for jacfwd in (ft.jacfwd, torch.func.jacfwd):
        with pytest.raises(RuntimeError, match="called random operation while in randomness error mode"):
            jacfwd(torch.bernoulli)(x)
        for randomness in ("same", "different"):
            assert jacfwd(torch.bernoulli, randomness=randomness)(x).shape == (3, 4, 3, 4)
