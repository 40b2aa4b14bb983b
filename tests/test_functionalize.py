"""functionalize: same results and input mutations as the original, no mutations below."""
import warnings

import expecttest
import pytest
import torch
import torch.func as tf
from torch.utils._pytree import tree_map

import functransforms as ft


def assert_close(a, b):
    torch.testing.assert_close(a, b)


def mutate_views(x):
    y = x.clone()
    y[0].add_(1)
    z = y.t()
    z[1, 2] = 5.0
    x.mul_(2)
    x[:, 2:].copy_(y[:, :2])
    return y, z.sum(0)


def mutate_intermediate(x):
    y = x * 1
    y[1:].mul_(y[:-1].clone())
    y.diagonal().sin_()
    idx = torch.tensor([0, 2])
    y.index_put_((idx,), y[idx] * 3, accumulate=True)
    return y.sum()


def split_views(x):
    y = x.clone()
    a, b = y.split(2, dim=-1)
    a.mul_(b)
    b.unsqueeze(0).add_(1)
    return y


REMOVE = ["mutations", "mutations_and_views"]


@pytest.mark.parametrize("remove", REMOVE)
@pytest.mark.parametrize("f", [mutate_views, split_views])
def test_results_and_input_mutations(f, remove):
    x = torch.randn(3, 4)
    expected_in, actual_in, ref_in = x.clone(), x.clone(), x.clone()
    expected = f(expected_in)
    actual = ft.functionalize(f, remove=remove)(actual_in)
    reference = tf.functionalize(f, remove=remove)(ref_in)
    assert_close(actual, expected)
    assert_close(actual, reference)
    assert_close(actual_in, expected_in)


class Recorder(torch.Tensor):
    """Logs every aten op that reaches it, i.e. what functionalize sends down."""

    @staticmethod
    def __new__(cls, value, log):
        self = torch.Tensor._make_wrapper_subclass(cls, value.shape, strides=value.stride(),
                                                   dtype=value.dtype)
        self.value = value
        self.log = log
        return self

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        log = next(a.log for a in args if isinstance(a, Recorder))
        log.append(func._schema.name.split("::")[1])

        def unwrap(t):
            return t.value if isinstance(t, Recorder) else t

        out = func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs or {}))
        return tree_map(lambda t: Recorder(t, log) if isinstance(t, torch.Tensor) else t, out)


def test_no_mutation_reaches_the_level_below():
    log = []
    ft.functionalize(mutate_views)(Recorder(torch.randn(3, 4), log))
    # The only in-place op is the final write-back into the input.
    assert [op for op in log if op.endswith("_")] == ["copy_"]
    assert "t" in log and "select" in log


def test_no_view_reaches_the_level_below():
    log = []
    ft.functionalize(mutate_views, remove="mutations_and_views")(Recorder(torch.randn(3, 4), log))
    assert [op for op in log if op.endswith("_")] == ["copy_"]
    assert not {"t", "select", "slice", "view"} & set(log)
    assert {"t_copy", "select_copy", "slice_copy"} <= set(log)


@pytest.mark.parametrize("remove", REMOVE)
def test_grad_of_functionalize(remove):
    x = torch.randn(4, 4, dtype=torch.double)
    assert_close(ft.grad(ft.functionalize(mutate_intermediate, remove=remove))(x),
                 tf.grad(mutate_intermediate)(x))
    assert_close(ft.functionalize(ft.grad(mutate_intermediate), remove=remove)(x),
                 tf.grad(mutate_intermediate)(x))


@pytest.mark.parametrize("remove", REMOVE)
def test_vmap_and_functionalize(remove):
    xs = torch.randn(5, 3, 4)
    expected_in, in_a, in_b = xs.clone(), xs.clone(), xs.clone()
    expected = tf.vmap(mutate_views)(expected_in)
    assert_close(ft.vmap(ft.functionalize(mutate_views, remove=remove))(in_a), expected)
    assert_close(ft.functionalize(ft.vmap(mutate_views), remove=remove)(in_b), expected)
    assert_close(in_a, expected_in)
    assert_close(in_b, expected_in)


def test_vmap_grad_functionalize():
    xs = torch.randn(2, 3, 3, dtype=torch.double)
    assert_close(ft.vmap(ft.grad(ft.functionalize(mutate_intermediate)))(xs),
                 tf.vmap(tf.grad(mutate_intermediate))(xs))


def test_kwargs_and_non_tensor_outputs():
    def f(x, *, scale):
        x.mul_(scale)
        return x.sum(), "done"

    x = torch.ones(3)
    out, tag = ft.functionalize(f)(x, scale=2.0)
    assert (out.item(), tag) == (6.0, "done")
    assert_close(x, torch.full((3,), 2.0))


def test_inplace_view_ops_on_own_tensors():
    # unsqueeze_/squeeze_/t_ re-point a tensor at a new view of its storage; later writes
    # through views of it must reach the input, as in eager and torch.func.
    def f(x):
        z = x.view(8).reshape(2, 4).transpose(1, 0)
        z.unsqueeze_(0)
        z.squeeze_()
        z.split(2)[0].add_(1)
        y = x.clone()
        y.t_()
        y[0].mul_(3)
        return x, y

    for remove in ("mutations", "mutations_and_views"):
        a, b, c = torch.randn(4, 2), torch.randn(4, 2), torch.randn(4, 2)
        b.copy_(a)
        c.copy_(a)
        expected = f(a)
        assert_close(ft.functionalize(f, remove=remove)(b), expected)
        assert_close(torch.func.functionalize(f, remove=remove)(c), expected)
        assert_close(b, a)


class TestErrors(expecttest.TestCase):
    def test_bad_remove(self):
        with self.assertRaises(ValueError) as err:
            ft.functionalize(mutate_views, remove="views")
        self.assertExpectedInline(str(err.exception), """functionalize: remove must be one of ('mutations', 'mutations_and_views'), got 'views'.""")

    def test_inplace_metadata_change_of_an_input(self):
        def f(x):
            x.t_()
            return x

        with self.assertRaises(RuntimeError) as err:
            ft.functionalize(f)(torch.randn(2, 3))
        self.assertExpectedInline(str(err.exception), """functionalize: aten::t_.default changes a tensor's shape or strides in place, which is supported only on tensors the function creates, not on its inputs. Use the out-of-place version (e.g. `x = x.t()` instead of `x.t_()`).""")
        eye = torch.eye(3)
        assert_close(ft.functionalize(mutate_intermediate)(eye), mutate_intermediate(eye))

    def test_write_into_captured_tensor(self):
        captured = torch.zeros(3)

        def f(x):
            captured.add_(x)
            return x

        with self.assertRaises(RuntimeError) as err:
            ft.functionalize(f)(torch.ones(3))
        self.assertExpectedInline(str(err.exception), """functionalize: aten::add_.Tensor writes into a tensor captured from outside the function. Pass it as an input so that the write can be applied back to it.""")
        assert_close(captured, torch.zeros(3))


def test_writes_into_tensors_created_inside():
    # Buffers the function creates belong to it (any dtype), as under torch.func.
    def f(src):
        buf = torch.zeros(4, 3)
        buf[1:3].copy_(src)
        idx = torch.zeros(3, dtype=torch.long)
        idx[1] = 2
        return buf * 2, idx

    src = torch.randn(2, 3)
    for remove in ("mutations", "mutations_and_views"):
        assert_close(ft.functionalize(f, remove=remove)(src), torch.func.functionalize(f, remove=remove)(src))
    batched = torch.randn(5, 2, 3)
    assert_close(ft.vmap(ft.functionalize(f))(batched), torch.func.vmap(torch.func.functionalize(f))(batched))


def test_out_arguments():
    # out= writes its result into the buffer (resizing a fresh one), as under torch.func.
    def f(x):
        out = torch.empty(())
        torch.add(x, x, out=out)
        out.view(4).add_(1)
        mins, maxs = torch.empty(2), torch.empty(1, 2)
        torch.aminmax(x.view(2, 2), dim=0, out=(mins, maxs.view(2)))
        return out, mins, maxs

    x = torch.randn(4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager's warning about resizing a non-empty out
        expected = torch.func.functionalize(f)(x)
        for remove in ("mutations", "mutations_and_views"):
            assert_close(ft.functionalize(f, remove=remove)(x), expected)


def test_resize():
    # resize_ of an input is applied back to it; of an intermediate, later writes see the
    # new shape (torch.func's results).
    def grow(x):
        x.resize_(10)
        x.fill_(2)

    def reshape_buffer(x):
        y = x.clone()
        y.resize_(2, 3)
        y.fill_(1)
        y[0].add_(x.sum())
        return y

    for remove in ("mutations", "mutations_and_views"):
        ours, theirs = torch.zeros(0), torch.zeros(0)
        ft.functionalize(grow, remove=remove)(ours)
        torch.func.functionalize(grow, remove=remove)(theirs)
        assert_close(ours, theirs)
        x = torch.randn(6)
        assert_close(ft.functionalize(reshape_buffer, remove=remove)(x),
                     torch.func.functionalize(reshape_buffer, remove=remove)(x))
