"""vmap batching rules of neural-network ops, checked against torch.func.vmap.

Every case runs with each combination of batched/unbatched tensor arguments and must not
use the per-example loop fallback. Backward ops are reached through ``vjp`` under vmap,
with the cotangent batched or not.
"""
import itertools
import warnings

import expecttest
import pytest
import torch
import torch.func as tf
import torch.nn.functional as F

import functransforms as ft

B = 3
aten = torch.ops.aten


def randn(shape):
    return torch.randn(shape, dtype=torch.double)


def prob(shape):
    return torch.rand(shape, dtype=torch.double) * 0.8 + 0.1


def positive(shape):
    return torch.rand(shape, dtype=torch.double) + 0.5


def classes(shape):
    return torch.randint(0, 4, shape)


def classes_or_ignored(shape):
    return torch.where(torch.rand(shape) < 0.3, torch.full(shape, -100), classes(shape))


def make_inputs(shapes, gens, in_dims):
    return [gen(((B,) + shape) if d == 0 else shape) for shape, gen, d in zip(shapes, gens, in_dims)]


_SWEEP = {"full": False}


@pytest.fixture(params=["fast", pytest.param("full", marks=pytest.mark.slow)])
def sweep(request):
    """Fast tier: every argument batched alone, and all together. Slow tier: every mix."""
    _SWEEP["full"] = request.param == "full"
    yield
    _SWEEP["full"] = False


def all_in_dims(n):
    if _SWEEP["full"]:
        return [d for d in itertools.product([0, None], repeat=n) if any(x == 0 for x in d)]
    alone = [tuple(0 if j == i else None for j in range(n)) for i in range(n)]
    return alone + ([(0,) * n] if n > 1 else [])


def assert_close_tree(actual, expected, atol=1e-6):
    actual, _ = torch.utils._pytree.tree_flatten(actual)
    expected, _ = torch.utils._pytree.tree_flatten(expected)
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, atol=atol, rtol=1e-5, equal_nan=True)


def check_vmap(fn, shapes, gens=None, fn_expected=None):
    """vmap(fn) against torch.func.vmap(fn) for every batched/unbatched combination."""
    gens = gens or [randn] * len(shapes)
    for in_dims in all_in_dims(len(shapes)):
        torch.manual_seed(0)
        inputs = make_inputs(shapes, gens, in_dims)
        ft.reset_fallback_counts()
        actual = ft.vmap(fn, in_dims=in_dims)(*inputs)
        assert ft.fallback_counts() == {}, (in_dims, ft.fallback_counts())
        expected = tf.vmap(fn_expected or fn, in_dims=in_dims)(*inputs)
        assert_close_tree(actual, expected)


def check_vmap_vjp(fn, shapes, out_shape, gens=None, argnums=(0,)):
    """vmap over (inputs, cotangent) of the vjp of ``fn`` w.r.t. the args in ``argnums``."""

    def make(vjp):
        def pullback(*args):
            primals, cotangent = list(args[:-1]), args[-1]

            def partial(*diff):
                for i, v in zip(argnums, diff):
                    primals[i] = v
                return fn(*primals)

            return vjp(partial, *[primals[i] for i in argnums])[1](cotangent)

        return pullback

    check_vmap(make(ft.vjp), list(shapes) + [out_shape], list(gens or [randn] * len(shapes)) + [randn],
               fn_expected=make(tf.vjp))


@pytest.fixture(autouse=True)
def quiet_fallback_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# -- matrix products ----------------------------------------------------------------------

MATMUL_CASES = {
    "mm": (torch.mm, [(2, 3), (3, 4)]),
    "bmm": (torch.bmm, [(5, 2, 3), (5, 3, 4)]),
    "mv": (torch.mv, [(2, 3), (3,)]),
    "dot": (torch.dot, [(3,), (3,)]),
    "vdot": (torch.vdot, [(3,), (3,)]),
    "addmm": (torch.addmm, [(2, 4), (2, 3), (3, 4)]),
    "addmm_bias_row": (torch.addmm, [(4,), (2, 3), (3, 4)]),
    "addmm_scaled": (lambda c, a, b: torch.addmm(c, a, b, beta=0.5, alpha=2), [(4,), (2, 3), (3, 4)]),
    "addmm_beta0": (lambda c, a, b: torch.addmm(c, a, b, beta=0, alpha=2), [(2, 4), (2, 3), (3, 4)]),
    "baddbmm": (lambda c, a, b: torch.baddbmm(c, a, b, alpha=0.5), [(5, 2, 4), (5, 2, 3), (5, 3, 4)]),
    "addbmm": (torch.addbmm, [(2, 4), (5, 2, 3), (5, 3, 4)]),
    "addmv": (lambda c, a, b: torch.addmv(c, a, b, beta=2), [(2,), (2, 3), (3,)]),
    "addr": (torch.addr, [(2, 3), (2,), (3,)]),
    "outer": (torch.outer, [(2,), (3,)]),
    "linear": (F.linear, [(5, 3), (4, 3), (4,)]),
    "linear_3d": (F.linear, [(2, 5, 3), (4, 3), (4,)]),
    "linear_1d": (F.linear, [(3,), (4, 3), (4,)]),
    "einsum_bmm": (lambda a, b: torch.einsum("bij,bjk->bik", a, b), [(4, 2, 3), (4, 3, 5)]),
    "einsum_nt": (lambda a, b: torch.einsum("ij,kj->ik", a, b), [(2, 3), (4, 3)]),
}
MATMUL_SHAPES = [
    ((3,), (3,)), ((2, 3), (3,)), ((3,), (3, 4)), ((2, 3), (3, 4)), ((5, 2, 3), (3, 4)),
    ((2, 3), (5, 3, 4)), ((5, 2, 3), (5, 3, 4)), ((3,), (5, 3, 4)), ((5, 2, 3), (3,)),
    ((6, 5, 2, 3), (5, 3, 4)), ((6, 1, 2, 3), (5, 3, 4)),
]
for _a, _b in MATMUL_SHAPES:
    MATMUL_CASES[f"matmul_{len(_a)}d_{len(_b)}d_{_a[0]}"] = (torch.matmul, [_a, _b])


@pytest.mark.usefixtures("sweep")
@pytest.mark.parametrize("name", list(MATMUL_CASES))
def test_matmul_family(name):
    fn, shapes = MATMUL_CASES[name]
    check_vmap(fn, shapes)


@pytest.mark.usefixtures("sweep")
@pytest.mark.parametrize("name", ["mm", "bmm", "mv", "dot", "addmm", "baddbmm", "addmv", "linear_3d",
                                  "matmul_3d_2d_5"])
def test_matmul_family_backward(name):
    fn, shapes = MATMUL_CASES[name]
    out_shape = fn(*[randn(s) for s in shapes]).shape
    check_vmap_vjp(fn, shapes, tuple(out_shape), argnums=tuple(range(len(shapes))))


# -- convolution --------------------------------------------------------------------------

CONV_CASES = {
    "conv2d": (lambda x, w, b: F.conv2d(x, w, b, padding=1), [(2, 3, 6, 6), (4, 3, 3, 3), (4,)]),
    "conv2d_no_n": (lambda x, w, b: F.conv2d(x, w, b, padding=1), [(3, 6, 6), (4, 3, 3, 3), (4,)]),
    "conv2d_groups": (lambda x, w, b: F.conv2d(x, w, b, stride=2, dilation=2, padding=2, groups=2),
                      [(2, 4, 7, 7), (6, 2, 3, 3), (6,)]),
    "conv1d": (lambda x, w: F.conv1d(x, w, stride=2), [(2, 4, 9), (6, 4, 3)]),
    "conv1d_groups": (lambda x, w: F.conv1d(x, w, stride=2, groups=2), [(2, 4, 9), (6, 2, 3)]),
    "conv3d": (lambda x, w, b: F.conv3d(x, w, b, padding=1), [(2, 3, 4, 4, 4), (4, 3, 3, 3, 3), (4,)]),
    "conv_transpose2d": (lambda x, w, b: F.conv_transpose2d(x, w, b, stride=2, output_padding=1),
                         [(2, 3, 5, 5), (3, 4, 3, 3), (4,)]),
    "conv_transpose2d_groups": (
        lambda x, w, b: F.conv_transpose2d(x, w, b, stride=2, groups=3, dilation=2),
        [(2, 6, 5, 5), (6, 2, 3, 3), (6,)]),
    "conv_transpose1d": (lambda x, w: F.conv_transpose1d(x, w), [(2, 3, 5), (3, 4, 3)]),
}


@pytest.mark.usefixtures("sweep")
@pytest.mark.parametrize("name", list(CONV_CASES))
def test_convolution(name):
    fn, shapes = CONV_CASES[name]
    check_vmap(fn, shapes)


def _conv_backward(mask, transposed=False, groups=1, stride=1):
    def fn(grad_out, x, w):
        bias_size = w.shape[1] * groups if transposed else w.shape[0]
        outs = aten.convolution_backward(grad_out, x, w, [bias_size], [stride, stride], [1, 1],
                                         [1, 1], transposed, [0, 0], groups, mask)
        return tuple(o for o in outs if o is not None)

    return fn


@pytest.mark.usefixtures("sweep")
@pytest.mark.parametrize("mask", [m for m in itertools.product([True, False], repeat=3) if any(m)])
@pytest.mark.parametrize("kind", ["plain", "groups_stride", "transposed_groups"])
def test_convolution_backward(mask, kind):
    fn, shapes = {
        "plain": (_conv_backward(list(mask)), [(2, 4, 6, 6), (2, 3, 6, 6), (4, 3, 3, 3)]),
        "groups_stride": (_conv_backward(list(mask), groups=2, stride=2),
                          [(2, 4, 3, 3), (2, 4, 6, 6), (4, 2, 3, 3)]),
        "transposed_groups": (_conv_backward(list(mask), transposed=True, groups=2),
                              [(2, 6, 6, 6), (2, 4, 6, 6), (4, 3, 3, 3)]),
    }[kind]
    check_vmap(fn, shapes)


# -- pooling and padding ------------------------------------------------------------------

POOL_CASES = {
    "max_pool2d": (lambda x: F.max_pool2d(x, 2, return_indices=True), (2, 3, 6, 6), None),
    "max_pool2d_ceil": (lambda x: F.max_pool2d(x, 3, stride=2, padding=1, ceil_mode=True), (3, 6, 6),
                        (3, 4, 4)),
    "max_pool1d": (lambda x: F.max_pool1d(x, 2), (2, 3, 8), (2, 3, 4)),
    "max_pool3d": (lambda x: F.max_pool3d(x, 2), (2, 3, 4, 4, 4), (2, 3, 2, 2, 2)),
    "avg_pool2d": (lambda x: F.avg_pool2d(x, 3, stride=2, padding=1, count_include_pad=False),
                   (2, 3, 6, 6), (2, 3, 3, 3)),
    "avg_pool1d": (lambda x: F.avg_pool1d(x, 2), (3, 8), (3, 4)),
    "avg_pool3d": (lambda x: F.avg_pool3d(x, 2), (2, 3, 4, 4, 4), (2, 3, 2, 2, 2)),
    "adaptive_avg_pool2d": (lambda x: F.adaptive_avg_pool2d(x, (4, 3)), (2, 3, 6, 6), (2, 3, 4, 3)),
    "adaptive_avg_pool1d": (lambda x: F.adaptive_avg_pool1d(x, 3), (2, 3, 8), (2, 3, 3)),
    "adaptive_avg_pool3d": (lambda x: F.adaptive_avg_pool3d(x, 2), (3, 4, 4, 4), (3, 2, 2, 2)),
    "adaptive_max_pool2d": (lambda x: F.adaptive_max_pool2d(x, (2, 3)), (2, 3, 6, 6), (2, 3, 2, 3)),
    "reflection_pad1d": (lambda x: F.pad(x, (1, 2), mode="reflect"), (2, 3, 6), (2, 3, 9)),
    "reflection_pad2d": (lambda x: F.pad(x, (1, 2, 2, 1), mode="reflect"), (3, 6, 6), (3, 9, 9)),
    "replication_pad2d": (lambda x: F.pad(x, (1, 1, 1, 1), mode="replicate"), (2, 3, 6, 6),
                          (2, 3, 8, 8)),
}


@pytest.mark.usefixtures("sweep")
@pytest.mark.parametrize("name", list(POOL_CASES))
def test_pooling(name):
    fn, shape, out_shape = POOL_CASES[name]
    check_vmap(fn, [shape])
    if out_shape is not None:
        check_vmap_vjp(fn, [shape], out_shape)


# -- normalisation ------------------------------------------------------------------------

NORM_CASES = {
    "layer_norm": (lambda x, w, b: F.layer_norm(x, (5,), w, b), [(4, 3, 5), (5,), (5,)]),
    "layer_norm_2d": (lambda x, w, b: F.layer_norm(x, (3, 5), w, b), [(4, 3, 5), (3, 5), (3, 5)]),
    "layer_norm_all": (lambda x, w, b: F.layer_norm(x, (3, 5), w, b), [(3, 5), (3, 5), (3, 5)]),
    "group_norm": (lambda x, w, b: F.group_norm(x, 3, w, b), [(4, 6, 5), (6,), (6,)]),
    "group_norm_2d": (lambda x, w, b: F.group_norm(x, 2, w, b), [(2, 4, 3, 3), (4,), (4,)]),
    "batch_norm_train": (lambda x, w, b: F.batch_norm(x, None, None, w, b, training=True),
                         [(4, 3, 5), (3,), (3,)]),
    "batch_norm_train_2d": (lambda x, w, b: F.batch_norm(x, None, None, w, b, training=True),
                            [(4, 3), (3,), (3,)]),
    "batch_norm_eval": (
        lambda x, w, b: F.batch_norm(x, torch.full((3,), 0.5, dtype=torch.double),
                                     torch.full((3,), 2.0, dtype=torch.double), w, b, training=False),
        [(4, 3, 5), (3,), (3,)]),
}


@pytest.mark.usefixtures("sweep")
@pytest.mark.parametrize("name", list(NORM_CASES))
def test_norms(name):
    fn, shapes = NORM_CASES[name]
    check_vmap(fn, shapes)
    check_vmap_vjp(fn, shapes, shapes[0], argnums=(0, 1, 2))


@pytest.mark.usefixtures("sweep")
def test_batch_norm_eval_with_batched_running_stats():
    fn = lambda x, rm, rv: F.batch_norm(x, rm, rv, training=False)  # noqa: E731
    check_vmap(fn, [(4, 3, 5), (3,), (3,)], gens=[randn, randn, positive])


@pytest.mark.usefixtures("sweep")
@pytest.mark.parametrize("variant", ["no_stats", "no_training"])
def test_native_batch_norm_legit(variant):
    rm, rv = randn((3,)), positive((3,))
    fn = {
        "no_stats": lambda x, w, b: aten._native_batch_norm_legit.no_stats(x, w, b, True, 0.1, 1e-5),
        "no_training": lambda x, w, b: aten._native_batch_norm_legit_no_training(
            x, w, b, rm, rv, 0.1, 1e-5),
    }[variant]
    check_vmap(fn, [(4, 3, 5), (3,), (3,)])


@pytest.mark.usefixtures("sweep")
def test_instance_norm():
    check_vmap(lambda x: F.instance_norm(x), [(4, 6, 5)])


@pytest.mark.parametrize("in_dims", [(0, 0, 0), (0, 1, 1)])
def test_batch_norm_updates_batched_running_stats(in_dims):
    def fn(x, rm, rv):
        return F.batch_norm(x, rm, rv, training=True, momentum=0.3)

    x = torch.randn(B, 4, 3, 5)
    stat_shape = (B, 3) if in_dims[1] == 0 else (3, B)
    rm, rv = torch.zeros(stat_shape), torch.ones(stat_shape)
    out = ft.vmap(fn, in_dims=in_dims)(x, rm, rv)
    # The meaning of vmap: one call per example, each updating its own stats.
    rm_loop, rv_loop = torch.zeros(stat_shape), torch.ones(stat_shape)
    for i in range(B):
        sel = (lambda t: t[i]) if in_dims[1] == 0 else (lambda t: t[:, i])
        torch.testing.assert_close(out[i], fn(x[i], sel(rm_loop), sel(rv_loop)))
    torch.testing.assert_close(rm, rm_loop)
    torch.testing.assert_close(rv, rv_loop)


class TestBatchNormRunningStatsError(expecttest.TestCase):
    def test_unbatched_running_stats_in_training(self):
        bn = torch.nn.BatchNorm1d(3)
        with self.assertRaises(RuntimeError) as ctx:
            ft.vmap(bn)(torch.randn(B, 4, 3))
        self.assertExpectedInline(str(ctx.exception), """vmap: batch norm in training mode got a batched input but unbatched running_mean/running_var, which it would have to update in place with per-example statistics (Batch norm got a batched tensor as input while the running_mean or running_var, which will be updated in place, were not batched). Either stop tracking running stats (build the module with track_running_stats=False, or call replace_all_batch_norm_modules_(model) to patch every batch norm of a model), pass batched running stats through functional_call, or put the module in eval mode.""")  # noqa: B950

    def test_eval_mode_and_untracked_stats_work(self):
        x = torch.randn(B, 4, 3)
        bn = torch.nn.BatchNorm1d(3).eval()
        torch.testing.assert_close(ft.vmap(bn)(x), tf.vmap(bn)(x))
        bn = torch.nn.BatchNorm1d(3, track_running_stats=False)
        torch.testing.assert_close(ft.vmap(bn)(x), tf.vmap(bn)(x))


# -- softmax, activations, embedding ------------------------------------------------------

SOFTMAX_CASES = {
    f"{name}_{dim}": (lambda x, f=f, dim=dim: f(x, dim), shape)
    for name, f in (("softmax", F.softmax), ("log_softmax", F.log_softmax))
    for dim, shape in ((0, (4, 3)), (1, (4, 3)), (-1, (4, 3)), (0, ()))
}
ACTIVATIONS = {
    f.__name__: f for f in (F.elu, F.leaky_relu, F.softplus, F.hardtanh, F.hardswish, F.hardsigmoid,
                            F.softshrink, F.hardshrink, F.gelu, F.silu, F.relu, F.relu6, F.mish)
}


@pytest.mark.usefixtures("sweep")
@pytest.mark.parametrize("name", list(SOFTMAX_CASES))
def test_softmax(name):
    fn, shape = SOFTMAX_CASES[name]
    check_vmap(fn, [shape])
    check_vmap_vjp(fn, [shape], shape)


@pytest.mark.usefixtures("sweep")
@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_activation_backward(name):
    check_vmap_vjp(ACTIVATIONS[name], [(4, 3)], (4, 3))


@pytest.mark.usefixtures("sweep")
@pytest.mark.parametrize("index_shape", [(2, 4), ()])
def test_embedding(index_shape):
    check_vmap(lambda w, i: F.embedding(i, w), [(5, 3), index_shape], gens=[randn, classes])


@pytest.mark.parametrize("kwargs", [{}, {"padding_idx": 1}, {"scale_grad_by_freq": True},
                                    {"padding_idx": 2, "scale_grad_by_freq": True}])
@pytest.mark.usefixtures("sweep")
def test_embedding_backward(kwargs):
    check_vmap_vjp(lambda w, i: F.embedding(i, w, **kwargs), [(5, 3), (2, 4)], (2, 4, 3),
                   gens=[randn, classes])


# -- losses -------------------------------------------------------------------------------

REDUCTIONS = ["none", "mean", "sum"]


@pytest.mark.usefixtures("sweep")
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shapes", [[(5, 4), (5,)], [(4,), ()]], ids=["2d", "1d"])
def test_nll_loss(reduction, shapes):
    out_shape = shapes[1] if reduction == "none" else ()
    fn = lambda x, t: F.nll_loss(x, t, reduction=reduction)  # noqa: E731
    check_vmap(fn, shapes, gens=[randn, classes_or_ignored])
    check_vmap_vjp(fn, shapes, out_shape, gens=[randn, classes_or_ignored])
    weighted = lambda x, t, w: F.nll_loss(x, t, w, reduction=reduction, ignore_index=1)  # noqa: E731
    check_vmap(weighted, shapes + [(4,)], gens=[randn, classes, prob])
    check_vmap_vjp(weighted, shapes + [(4,)], out_shape, gens=[randn, classes, prob])


@pytest.mark.usefixtures("sweep")
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_nll_loss2d(reduction):
    fn = lambda x, t, w: F.nll_loss(x, t, w, reduction=reduction)  # noqa: E731
    shapes = [(2, 4, 3, 3), (2, 3, 3), (4,)]
    check_vmap(fn, shapes, gens=[randn, classes, prob])
    check_vmap_vjp(fn, shapes, (2, 3, 3) if reduction == "none" else (), gens=[randn, classes, prob])


def multilabel_targets(shape):
    # Class indices, with -1 ending each row's target list early (later entries are ignored).
    return torch.randint(-1, 4, shape)


@pytest.mark.usefixtures("sweep")
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shapes", [[(3, 4), (3,)], [(4,), ()], [(4,), (1,)], [(), ()]],
                         ids=["2d", "1d", "1d-target1", "0d"])
def test_multi_margin_loss(reduction, shapes):
    out_shape = shapes[1] if reduction == "none" else ()
    fn = lambda x, t: F.multi_margin_loss(x, t, reduction=reduction)  # noqa: E731
    gens = [randn, classes if shapes[0] else (lambda s: torch.zeros(s, dtype=torch.long))]
    check_vmap(fn, shapes, gens=gens)
    check_vmap_vjp(fn, shapes, out_shape, gens=gens)


@pytest.mark.usefixtures("sweep")
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", [(3, 4), (4,)], ids=["2d", "1d"])
def test_multilabel_margin_loss(reduction, shape):
    out_shape = shape[:1] if reduction == "none" and len(shape) == 2 else ()
    fn = lambda x, t: F.multilabel_margin_loss(x, t, reduction=reduction)  # noqa: E731
    check_vmap(fn, [shape, shape], gens=[randn, multilabel_targets])
    check_vmap_vjp(fn, [shape, shape], out_shape, gens=[randn, multilabel_targets])


def test_margin_losses_under_jvp_raise_like_torch_func():
    # torch has no forward formula for them, and its decompositions disagree with the
    # kernels: torch.func raises, and so do we rather than answer from a decomposition.
    x, t = torch.randn(3, 4, dtype=torch.double), torch.tensor([[3, 0, -1, 1]] * 3)
    for f in (lambda x: F.multilabel_margin_loss(x, t), lambda x: F.multi_margin_loss(x, t[:, 0])):
        for m in (tf, ft):
            with pytest.raises(RuntimeError, match="Trying to use forward AD"):
                m.jvp(f, (x,), (x,))


@pytest.mark.usefixtures("sweep")
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cross_entropy(reduction):
    check_vmap(lambda x, t: F.cross_entropy(x, t, reduction=reduction), [(5, 4), (5,)],
               gens=[randn, classes])


ELEMENTWISE_LOSSES = {
    "mse": (F.mse_loss, 2),
    "huber": (F.huber_loss, 2),
    "smooth_l1": (lambda x, t, reduction: F.smooth_l1_loss(x, t, reduction=reduction, beta=0.5), 2),
    "soft_margin": (F.soft_margin_loss, 2),
    "bce": (F.binary_cross_entropy, 2),
    "bce_weight": (lambda x, t, w, reduction: F.binary_cross_entropy(x, t, w, reduction=reduction), 3),
    "bce_logits": (F.binary_cross_entropy_with_logits, 2),
    "bce_logits_weights": (
        lambda x, t, w, p, reduction: F.binary_cross_entropy_with_logits(
            x, t, w, reduction=reduction, pos_weight=p), 4),
}


@pytest.mark.usefixtures("sweep")
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name", list(ELEMENTWISE_LOSSES))
def test_elementwise_loss(name, reduction):
    loss, n_args = ELEMENTWISE_LOSSES[name]
    shapes = [(5, 3)] * min(n_args, 3) + [(3,)] * (n_args - 3)
    fn = lambda *args: loss(*args, reduction=reduction)  # noqa: E731
    check_vmap(fn, shapes, gens=[prob] * n_args)
    check_vmap_vjp(fn, shapes, (5, 3) if reduction == "none" else (), gens=[prob] * n_args)


# -- composition --------------------------------------------------------------------------


def test_vmap_of_vmap_mm_and_conv():
    a, b = randn((2, 3, 4, 5)), randn((3, 5, 6))
    ft.reset_fallback_counts()
    torch.testing.assert_close(ft.vmap(ft.vmap(torch.mm), in_dims=(0, None))(a, b),
                               tf.vmap(tf.vmap(torch.mm), in_dims=(0, None))(a, b))
    x, w = randn((2, 3, 4, 3, 6, 6)), randn((3, 5, 3, 3, 3))
    conv = lambda x, w: F.conv2d(x, w, padding=1)  # noqa: E731
    torch.testing.assert_close(ft.vmap(ft.vmap(conv), in_dims=(0, None))(x, w),
                               tf.vmap(tf.vmap(conv), in_dims=(0, None))(x, w))
    torch.testing.assert_close(ft.vmap(ft.vmap(conv, in_dims=(0, None)), in_dims=(None, 0))(x[0], w),
                               tf.vmap(tf.vmap(conv, in_dims=(0, None)), in_dims=(None, 0))(x[0], w))
    assert ft.fallback_counts() == {}


def test_grad_of_vmap_mm_and_conv():
    def loss(vmap, w, x, bias):
        mm = lambda x: torch.mm(x, w).tanh()  # noqa: E731
        conv = lambda x: F.conv2d(x, w.view(4, 1, 2, 2)[:3], bias, padding=1)  # noqa: E731
        return vmap(mm)(x).sum() + vmap(conv)(x.view(B, 1, 8, 4)).pow(2).sum()

    w, x, bias = randn((4, 4)), randn((B, 8, 4)), randn((3,))
    ft.reset_fallback_counts()
    actual = ft.grad(lambda *a: loss(ft.vmap, *a), argnums=(0, 2))(w, x, bias)
    assert ft.fallback_counts() == {}
    expected = tf.grad(lambda *a: loss(tf.vmap, *a), argnums=(0, 2))(w, x, bias)
    assert_close_tree(actual, expected)


def test_pooling_backward_with_unbatched_input_and_indices():
    # vmap over cotangents only: the input and indices reach the backward kernel expanded
    # over the batch; adaptive_max_pool3d_backward used to read past them and crash.
    x = torch.randn(1, 4, 4, 3, 5)
    cts = torch.randn(3, 1, 4, 4, 3, 5)

    def f(x):
        return torch.nn.functional.adaptive_max_pool3d(x, (4, 3, 5))

    _, ft_vjp = ft.vjp(f, x)
    _, tf_vjp = tf.vjp(f, x)
    torch.testing.assert_close(ft.vmap(ft_vjp)(cts), tf.vmap(tf_vjp)(cts))


@pytest.mark.parametrize("f", [
    lambda x, g: F.grid_sample(x, g, align_corners=False),
    lambda x, g: F.grid_sample(x, g, mode="nearest", padding_mode="reflection", align_corners=True),
    lambda x, g: F.interpolate(x, size=(7, 5), mode="bilinear"),
    lambda x, g: F.interpolate(x, scale_factor=1.7, mode="bicubic", antialias=True),
    lambda x, g: F.interpolate(x, size=(7, 5), mode="nearest-exact"),
], ids=["grid_sample", "grid_sample_nearest", "bilinear", "bicubic_aa", "nearest_exact"])
def test_resampling_in_float32_matches_the_kernel_per_example(f):
    # Served by the kernels themselves, so each example's float32 result is the one torch
    # computes for it alone (torch's decompositions round differently).
    torch.manual_seed(0)
    x, grid = torch.randn(3, 2, 4, 9, 8), torch.rand(3, 2, 6, 5, 2) * 2.2 - 1.1
    expected = torch.stack([f(x[i], grid[i]) for i in range(3)])
    torch.testing.assert_close(ft.vmap(f)(x, grid), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ft.vmap(f, in_dims=(0, None))(x, grid[0]),
                               torch.stack([f(x[i], grid[0]) for i in range(3)]), rtol=1e-6, atol=1e-6)
