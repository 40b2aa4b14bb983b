"""torch.autograd.Function under grad, vmap, jvp and their compositions, against torch.func."""
import expecttest
import numpy as np
import pytest
import torch
import torch.func as tf

import functransforms as ft
from functransforms.autograd_function import VmapInfo
from custom_functions import MyExp


def to_numpy(t):
    return t.detach().cpu().numpy()


class NumpyTake(torch.autograd.Function):
    @staticmethod
    def forward(x, ind, ind_inv, dim):
        return torch.tensor(np.take_along_axis(to_numpy(x), to_numpy(ind), dim))

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, ind, ind_inv, dim = inputs
        ctx.save_for_backward(ind, ind_inv)
        ctx.dim = dim

    @staticmethod
    def backward(ctx, grad):
        ind, ind_inv = ctx.saved_tensors
        return NumpyTake.apply(grad, ind_inv, ind, ctx.dim), None, None, None

    @staticmethod
    def vmap(info, in_dims, x, ind, ind_inv, dim):
        def front(t, d):
            if d is None:
                return t.unsqueeze(0).expand(info.batch_size, *t.shape)
            return t.movedim(d, 0)
        logical_rank = x.dim() - (in_dims[0] is not None)
        dim = dim % logical_rank
        x, ind, ind_inv = (front(t, d) for t, d in zip((x, ind, ind_inv), in_dims))
        return NumpyTake.apply(x, ind, ind_inv, dim + 1), 0


class NumpySort(torch.autograd.Function):
    """Sorts in NumPy: forward must only ever see plain tensors."""

    @staticmethod
    def forward(x, dim):
        xn = to_numpy(x)
        ind = np.argsort(xn, axis=dim)
        ind_inv = np.argsort(ind, axis=dim)
        result = np.take_along_axis(xn, ind, axis=dim)
        return torch.tensor(result), torch.tensor(ind), torch.tensor(ind_inv)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, dim = inputs
        _, ind, ind_inv = output
        ctx.mark_non_differentiable(ind, ind_inv)
        ctx.save_for_backward(ind, ind_inv)
        ctx.dim = dim

    @staticmethod
    def backward(ctx, grad, _ind_grad, _ind_inv_grad):
        ind, ind_inv = ctx.saved_tensors
        return NumpyTake.apply(grad, ind_inv, ind, ctx.dim), None

    @staticmethod
    def vmap(info, in_dims, x, dim):
        x = x.movedim(in_dims[0], 0)
        dim = dim % (x.dim() - 1)
        return NumpySort.apply(x, dim + 1), (0, 0, 0)


class ScaledMul(torch.autograd.Function):
    """Two inputs, a non-tensor argument, saved inputs; generated vmap rule."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, y, scale):
        return x * y * scale

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, y, scale = inputs
        ctx.save_for_backward(x, y)
        ctx.save_for_forward(x, y)
        ctx.scale = scale

    @staticmethod
    def backward(ctx, grad):
        x, y = ctx.saved_tensors
        return grad * y * ctx.scale, grad * x * ctx.scale, None

    @staticmethod
    def jvp(ctx, tx, ty, _):
        x, y = ctx.saved_tensors
        return (tx * y + x * ty) * ctx.scale


class CubeWithVmap(torch.autograd.Function):
    """A hand-written vmap staticmethod that records what it was told."""

    seen = []

    @staticmethod
    def forward(x):
        return x ** 3

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 3 * grad * x ** 2

    @staticmethod
    def vmap(info, in_dims, x):
        CubeWithVmap.seen.append((info, in_dims))
        return CubeWithVmap.apply(x.movedim(in_dims[0], -1)), -1


class WrongBackward(torch.autograd.Function):
    """backward is deliberately not the derivative: proves the custom rule is the one used."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x.sin()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * x * 10


def assert_close(a, b):
    torch.testing.assert_close(a, b)


X = torch.randn(3, 4, dtype=torch.double, generator=torch.Generator().manual_seed(0))
T = torch.randn(3, 4, dtype=torch.double, generator=torch.Generator().manual_seed(1))


def sort_loss(x):
    return NumpySort.apply(x, -1)[0].pow(3).mul(torch.arange(x.shape[-1])).sum()


def sort_rows(x):
    return NumpySort.apply(x, 0)[0].pow(3)


def exp_loss(x):
    return MyExp.apply(x).sin().sum()


def mul_loss(x, y):
    return ScaledMul.apply(x, y, 2.5).cos().sum()


@pytest.mark.parametrize(
    "f, args",
    [
        (sort_loss, (X,)),
        (exp_loss, (X,)),
        (mul_loss, (X, T)),
        (lambda x: CubeWithVmap.apply(x).sum(), (X,)),
        (lambda x: WrongBackward.apply(x).sum(), (X,)),
    ],
)
class TestTransforms:
    def test_grad(self, f, args):
        argnums = tuple(range(len(args)))
        assert_close(ft.grad(f, argnums)(*args), tf.grad(f, argnums)(*args))

    def test_vmap_grad(self, f, args):
        assert_close(ft.vmap(ft.grad(f))(*args), tf.vmap(tf.grad(f))(*args))

    def test_grad_of_vmap(self, f, args):
        def g(*a):
            return ft.vmap(f)(*a).pow(2).sum()

        def g_ref(*a):
            return tf.vmap(f)(*a).pow(2).sum()

        assert_close(ft.grad(g)(*args), tf.grad(g_ref)(*args))

    def test_vjp_under_vmap(self, f, args):
        out, vjp_fn = ft.vjp(f, *args)
        out_ref, vjp_ref = tf.vjp(f, *args)
        cts = torch.arange(1.0, 4.0, dtype=torch.double)
        assert_close(ft.vmap(vjp_fn)(cts), tf.vmap(vjp_ref)(cts))


def test_vmap_numpy_sort_uses_vmap_staticmethod():
    assert_close(ft.vmap(sort_rows)(X), tf.vmap(sort_rows)(X))
    assert_close(ft.vmap(sort_rows, in_dims=1)(X), tf.vmap(sort_rows, in_dims=1)(X))


def test_vmap_staticmethod_is_told_batch_size_and_in_dims():
    CubeWithVmap.seen.clear()
    out = ft.vmap(CubeWithVmap.apply, randomness="same")(X)
    assert_close(out, X ** 3)
    assert CubeWithVmap.seen == [(VmapInfo(batch_size=3, randomness="same"), (0,))]


def test_nested_vmap_generated_rule():
    assert_close(ft.vmap(ft.vmap(MyExp.apply))(X), X.exp())
    assert_close(ft.vmap(ScaledMul.apply, in_dims=(0, None, None))(X, T[0], 3.0), X * T[0] * 3.0)


def test_vmap_generated_rule_backward_of_unbatched_input():
    # T[0] is shared by every example, so its gradient is summed over the batch.
    def f(x, y):
        return ft.vmap(ScaledMul.apply, in_dims=(0, None, None))(x, y, 2.0).sum()

    def f_ref(x, y):
        return tf.vmap(ScaledMul.apply, in_dims=(0, None, None))(x, y, 2.0).sum()

    assert_close(ft.grad(f, (0, 1))(X, T[0]), tf.grad(f_ref, (0, 1))(X, T[0]))


@pytest.mark.parametrize("order", ["grad", "jvp"])
def test_nested_vmaps_each_keep_their_saved_dims(order):
    # Under vmap(vmap(...)) the per-level ctx proxies write through to one real ctx; each
    # level must read back the batch dims of its own saves (x is batched by the outer vmap
    # only, y by the inner one). One shared record made the inner level batch x as well.
    g = torch.Generator().manual_seed(5)
    xs, ys = torch.randn(2, 3, generator=g), torch.randn(4, 3, generator=g)

    def run(T):
        def f(a, b):
            return T.vmap(lambda x: T.vmap(lambda y: ScaledMul.apply(x, y, 1.5))(b))(a)

        if order == "grad":
            return T.grad(lambda a, b: f(a, b).sum(), argnums=(0, 1))(xs, ys)
        return T.jvp(f, (xs, ys), (xs.cos(), ys.sin()))

    assert_close(run(ft), run(tf))


def test_custom_backward_used_at_every_grad_level():
    x = torch.tensor(0.7, dtype=torch.double)

    def once(x):
        return WrongBackward.apply(x)

    assert_close(ft.grad(once)(x), tf.grad(once)(x))
    assert_close(ft.grad(ft.grad(once))(x), tf.grad(tf.grad(once))(x))
    assert_close(ft.grad(ft.grad(MyExp.apply))(x), x.exp())


def test_forward_only_sees_plain_tensors():
    seen = []

    class Spy(torch.autograd.Function):
        generate_vmap_rule = True

        @staticmethod
        def forward(x):
            seen.append(type(x))
            return x * 2

        @staticmethod
        def setup_context(ctx, inputs, output):
            pass

        @staticmethod
        def backward(ctx, grad):
            return grad * 2

    ft.grad(lambda x: ft.grad(lambda y: Spy.apply(y).sum())(x).sum())(X)
    ft.grad(lambda x: Spy.apply(x).sum())(X)
    assert seen == [torch.Tensor, torch.Tensor]


def test_plain_autograd_around_transforms():
    x = X.clone().requires_grad_()
    ft.vmap(MyExp.apply)(x).sum().backward()
    assert_close(x.grad, X.exp())


@pytest.mark.parametrize(
    "f, args, tangents",
    [
        (MyExp.apply, (X,), (T,)),
        (lambda x: MyExp.apply(x).sin(), (X,), (T,)),
        (lambda x, y: ScaledMul.apply(x, y, 1.5), (X, T), (T, X)),
    ],
)
def test_jvp(f, args, tangents):
    assert_close(ft.jvp(f, args, tangents), tf.jvp(f, args, tangents))


def test_jvp_compositions():
    def jvp_out(x, t):
        return ft.jvp(MyExp.apply, (x,), (t,))[1]

    assert_close(ft.vmap(jvp_out)(X, T), T * X.exp())
    assert_close(ft.grad(lambda x: jvp_out(x, T).sum())(X), T * X.exp())
    assert_close(ft.jvp(ft.vmap(MyExp.apply), (X,), (T,))[1], T * X.exp())
    assert_close(ft.jacfwd(MyExp.apply)(X[0]), torch.diag(X[0].exp()))


class TestErrors(expecttest.TestCase):
    def test_old_style_function(self):
        class Old(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x):
                return x * 2

            @staticmethod
            def backward(ctx, grad):
                return grad * 2

        with self.assertRaises(RuntimeError) as err:
            ft.grad(lambda x: Old.apply(x).sum())(X)
        self.assertExpectedInline(str(err.exception), """Old: to use an autograd.Function inside functransforms transforms (vmap, grad, jvp, jacrev, ...), it must override the setup_context staticmethod: define forward(*args) without ctx and a setup_context(ctx, inputs, output) staticmethod, as torch.func requires.""")
        # Outside transforms it still works as torch defines it.
        assert_close(Old.apply(X), X * 2)

    def test_no_vmap_support(self):
        class NoVmap(torch.autograd.Function):
            @staticmethod
            def forward(x):
                return x * 2

            @staticmethod
            def setup_context(ctx, inputs, output):
                pass

            @staticmethod
            def backward(ctx, grad):
                return grad * 2

        with self.assertRaises(RuntimeError) as err:
            ft.vmap(NoVmap.apply)(X)
        self.assertExpectedInline(str(err.exception), """vmap: NoVmap is an autograd.Function that does not have vmap support. Define a vmap(info, in_dims, *args) staticmethod that returns (output, out_dims), or set generate_vmap_rule = True so that forward and backward are vmapped for you.""")
        assert_close(ft.grad(lambda x: NoVmap.apply(x).sum())(X), torch.full_like(X, 2.0))

    def test_both_vmap_rules(self):
        class Both(torch.autograd.Function):
            generate_vmap_rule = True

            @staticmethod
            def forward(x):
                return x

            @staticmethod
            def setup_context(ctx, inputs, output):
                pass

            @staticmethod
            def backward(ctx, grad):
                return grad

            @staticmethod
            def vmap(info, in_dims, x):
                return x, 0

        with self.assertRaises(RuntimeError) as err:
            ft.vmap(Both.apply)(X)
        self.assertExpectedInline(str(err.exception), """vmap: Both sets both generate_vmap_rule=True and a vmap staticmethod. Use one or the other.""")

    def test_no_jvp(self):
        with self.assertRaises(RuntimeError) as err:
            ft.jvp(lambda x: NumpySort.apply(x, 0)[0], (X,), (T,))
        self.assertExpectedInline(str(err.exception), """jvp: NumpySort is an autograd.Function without a jvp staticmethod. Define jvp(ctx, *tangents) to use it with forward-mode transforms (jvp, jacfwd, ...).""")
        assert_close(ft.jvp(MyExp.apply, (X,), (T,))[1], T * X.exp())

    def test_vmap_staticmethod_bad_out_dims(self):
        class BadDims(torch.autograd.Function):
            @staticmethod
            def forward(x):
                return x, x

            @staticmethod
            def setup_context(ctx, inputs, output):
                pass

            @staticmethod
            def backward(ctx, g1, g2):
                return g1 + g2

            @staticmethod
            def vmap(info, in_dims, x):
                return BadDims.apply(x), (0,)

        with self.assertRaises(RuntimeError) as err:
            ft.vmap(BadDims.apply)(X)
        self.assertExpectedInline(str(err.exception), """vmap: BadDims.vmap returned an incompatible (output, out_dims) tuple: out_dims=(0,) does not match the structure of the output (TreeSpec(tuple, None, [*, *])). Give out_dims that structure, with an int or None per output Tensor.""")


def test_once_differentiable_backward_refuses_double_backward_like_torch_func():
    class Cube(torch.autograd.Function):
        @staticmethod
        def forward(x):
            return x ** 3

        @staticmethod
        def setup_context(ctx, inputs, output):
            ctx.save_for_backward(inputs[0])

        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return 3 * x ** 2 * g

    x = torch.tensor(1.5, requires_grad=True)
    gy = torch.tensor(0.5, requires_grad=True)
    for m in (ft, torch.func):
        _, vjp_fn = m.vjp(Cube.apply, x)
        (gx,) = vjp_fn(gy)
        torch.testing.assert_close(gx.detach(), torch.tensor(3 * 1.5 ** 2 * 0.5))
        with pytest.raises(RuntimeError, match="marked with @once_differentiable"):
            gx.backward()
    torch.testing.assert_close(ft.grad(Cube.apply)(torch.tensor(2.0)), torch.tensor(12.0))


class Identity(torch.autograd.Function):
    @staticmethod
    def forward(x):
        return x.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, g):
        return g


class TestContract(expecttest.TestCase):
    def test_vmap_staticmethod_must_have_two_returns(self):
        class OneReturn(Identity):
            @staticmethod
            def vmap(info, in_dims, x):
                return x

        with self.assertRaises(RuntimeError) as err:
            ft.vmap(OneReturn.apply)(X)
        self.assertExpectedInline(str(err.exception), """vmap: expected the vmap staticmethod of OneReturn to have two returns, an output and out_dims with a pytree structure compatible with the output; got Tensor.""")

    def test_kwarg_only_tensors(self):
        class KwOnly(Identity):
            @staticmethod
            def forward(x, *, y):
                return x + y

        with self.assertRaises(NotImplementedError) as err:
            ft.grad(lambda x: KwOnly.apply(x, y=x).sum())(X)
        self.assertExpectedInline(str(err.exception), """KwOnly: kwarg-only Tensor args of forward are not supported inside transforms (nor by torch.func). Make them positional arguments of forward.""")

    def test_pytree_in_dims_and_out_dims(self):
        seen = []

        class Pair(Identity):
            @staticmethod
            def forward(x, ys):
                return x, ys

            @staticmethod
            def vmap(info, in_dims, x, ys):
                seen.append(in_dims)
                return (x, ys), in_dims

        for m in (ft, tf):
            out = m.vmap(Pair.apply)(X, [X, X * 2])
            assert_close(out, (X, [X, X * 2]))
        self.assertEqual(seen, [(0, [0, 0])] * 2)

    def test_generated_backward_name_and_mark_dirty(self):
        class AddOne(Identity):
            @staticmethod
            def forward(x):
                return x.add_(1)

            @staticmethod
            def setup_context(ctx, inputs, output):
                ctx.mark_dirty(inputs[0])

            @staticmethod
            def jvp(ctx, t):
                return t.add_(0)  # an in-place Function updates its tangent in place too

        names = []

        def f(x):
            y = AddOne.apply(x.clone())
            names.append(type(y.grad_fn).__name__)
            return (y * y).sum()

        for m in (ft, tf):
            assert_close(m.grad(f)(X), 2 * (X + 1))
            assert_close(m.jvp(lambda x: AddOne.apply(x.clone()), (X,), (T,)), (X + 1, T))
        self.assertEqual(names, ["AddOneGeneratedBackward"] * 2)


class CloningSquare(torch.autograd.Function):
    # Its rules make fresh tensors one level down (clone, zeros_like): no level may claim them.
    @staticmethod
    def forward(x):
        return x.clone() * x

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_forward(inputs[0])
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 2 * x.clone() * g

    @staticmethod
    def jvp(ctx, t):
        (x,) = ctx.saved_tensors
        buf = torch.zeros_like(t)
        buf.copy_(t.clone())
        return 2 * x * buf

    @staticmethod
    def vmap(info, in_dims, x):
        return CloningSquare.apply(x.clone()), in_dims[0]


@pytest.mark.parametrize("transform", ["jacfwd", "jacrev", "hessian", "vmap_jacfwd"])
def test_fresh_tensors_inside_custom_rules_stay_below(transform):
    def run(m):
        f = lambda x: CloningSquare.apply(x).sin()
        if transform == "vmap_jacfwd":
            return m.vmap(m.jacfwd(f))(X.reshape(-1)[:6].reshape(3, 2))
        if transform == "hessian":
            return m.hessian(lambda x: f(x).sum())(X)
        return getattr(m, transform)(f)(X)

    assert_close(run(ft), run(tf))
