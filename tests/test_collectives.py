"""Collectives over named axes (issue 17): under vmap each one equals what every example sees
in the explicit whole-batch formulation; derivatives through them match torch.func on that
formulation (float64); nested and shadowed names; errors."""
import pytest
import torch
import torch.func

import functransforms as ft
from functransforms.core.collectives import bound_axes

torch.manual_seed(0)
N = 4
XS = torch.randn(N, 3, dtype=torch.float64)
TS = torch.randn(N, 3, dtype=torch.float64)


def _per_example(rows):
    return torch.stack(list(rows))


# name: (f of one example, using axis "b"; F of the whole batch, one row per example)
CASES = {
    "psum": (lambda x: ft.psum(x, "b") * x.sin(),
             lambda xs: xs.sum(0) * xs.sin()),
    "pmean": (lambda x: (x - ft.pmean(x, "b")) ** 2,
              lambda xs: (xs - xs.mean(0)) ** 2),
    "pmax": (lambda x: x * ft.pmax(x.exp(), "b"),
             lambda xs: xs * xs.exp().amax(0)),
    "pmin": (lambda x: x.cos() + ft.pmin(x * x, "b"),
             lambda xs: xs.cos() + (xs * xs).amin(0)),
    "all_gather": (lambda x: ft.all_gather(x.tanh(), "b") @ x,
                   lambda xs: xs @ xs.tanh().T),
    "all_gather_axis1": (lambda x: ft.all_gather(x * 2, "b", axis=1).sum(1) * x,
                         lambda xs: (xs * 2).sum(0) * xs),
    "all_gather_tiled": (lambda x: ft.all_gather(x, "b", tiled=True)[: 2 * 3] * x.repeat(2),
                         lambda xs: xs.reshape(-1)[:6] * xs.repeat(1, 2)),
    "axis_index": (lambda x: x * ft.axis_index("b") + ft.axis_size("b"),
                   lambda xs: xs * torch.arange(N).unsqueeze(1) + N),
    "batch_norm": (lambda x: (x - ft.pmean(x, "b")) / (ft.pmean((x - ft.pmean(x, "b")) ** 2, "b") + 1e-5).sqrt(),
                   lambda xs: (xs - xs.mean(0)) / (xs.var(0, unbiased=False) + 1e-5).sqrt()),
    "contrastive": (
        # indexing with a tensor would call .item(): select with index_select instead
        lambda x: -torch.log_softmax(ft.all_gather(x, "b") @ x, 0).index_select(
            0, ft.axis_index("b").reshape(1))[0],
        lambda xs: -torch.log_softmax(xs @ xs.T, 1).diagonal(),
    ),
}


@pytest.mark.parametrize("name", CASES)
def test_vmap_equals_explicit(name):
    f, F = CASES[name]
    out = ft.vmap(f, axis_name="b")(XS)
    torch.testing.assert_close(out, F(XS))
    # the loop formulation: example i reads the whole batch and keeps its own row
    loop = _per_example(F(XS)[i] for i in range(N))
    torch.testing.assert_close(out, loop)


@pytest.mark.parametrize("name", CASES)
def test_grad_and_vjp_inside_vmap(name):
    # SPMD transposes: example i's cotangent flows to every example it read, so vjp at each
    # example with its own cotangent is the whole batch's vjp.
    f, F = CASES[name]
    cts = torch.randn_like(F(XS))
    _, vjp_fn = torch.func.vjp(F, XS)
    (expected,) = vjp_fn(cts)
    got = ft.vmap(lambda x, ct: ft.vjp(f, x)[1](ct)[0], axis_name="b")(XS, cts)
    torch.testing.assert_close(got, expected)
    g = ft.vmap(ft.grad(lambda x: f(x).sum()), axis_name="b")(XS)
    torch.testing.assert_close(g, torch.func.grad(lambda xs: F(xs).sum())(XS))


@pytest.mark.parametrize("name", CASES)
def test_jvp_inside_vmap(name):
    f, F = CASES[name]
    out, tangent = ft.vmap(lambda x, t: ft.jvp(f, (x,), (t,)), axis_name="b")(XS, TS)
    ref_out, ref_tangent = torch.func.jvp(F, (XS,), (TS,))
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(tangent, ref_tangent)


@pytest.mark.parametrize("name", CASES)
def test_transforms_outside_vmap(name):
    f, F = CASES[name]
    batched = ft.vmap(f, axis_name="b")
    torch.testing.assert_close(ft.grad(lambda xs: batched(xs).sum())(XS),
                               torch.func.grad(lambda xs: F(xs).sum())(XS))
    torch.testing.assert_close(ft.jvp(batched, (XS,), (TS,))[1],
                               torch.func.jvp(F, (XS,), (TS,))[1])
    torch.testing.assert_close(ft.jacrev(batched)(XS), torch.func.jacrev(F)(XS))


def test_second_order_inside_vmap():
    f = lambda x: (ft.psum(x**3, "b") * x).sum()  # noqa: E731
    F = lambda xs: (xs.pow(3).sum(0) * xs).sum(1)  # noqa: E731
    got = ft.vmap(ft.grad(lambda x: ft.grad(f)(x).sum()), axis_name="b")(XS)
    expected = torch.func.grad(lambda xs: torch.func.grad(lambda ys: F(ys).sum())(xs).sum())(XS)
    torch.testing.assert_close(got, expected)
    hvp = ft.vmap(lambda x, t: ft.jvp(ft.grad(f), (x,), (t,))[1], axis_name="b")(XS, TS)
    expected = torch.func.jvp(torch.func.grad(lambda xs: F(xs).sum()), (XS,), (TS,))[1]
    torch.testing.assert_close(hvp, expected)


def test_pmax_ties_share_the_gradient():
    xs = torch.tensor([[1.0, 3.0], [3.0, 2.0], [3.0, 0.0]], dtype=torch.float64)
    g = ft.vmap(ft.grad(lambda x: ft.pmax(x, "b").sum()), axis_name="b")(xs)
    torch.testing.assert_close(g, torch.func.grad(lambda xs: xs.amax(0).sum() * len(xs))(xs))


def test_values_every_example_shares():
    c = torch.randn(3, dtype=torch.float64)
    out = ft.vmap(lambda x: (ft.psum(c, "b"), ft.pmax(c, "b"), ft.all_gather(c, "b")),
                  axis_name="b", out_dims=None)(XS)
    torch.testing.assert_close(out[0], c * N)
    torch.testing.assert_close(out[1], c)
    torch.testing.assert_close(out[2], c.expand(N, 3))
    assert ft.vmap(lambda x: ft.psum(1.0, "b") + 0 * x, axis_name="b")(XS)[0, 0].item() == N


def test_torch_autograd_outside_through_a_shared_value():
    c = torch.randn(3, dtype=torch.float64, requires_grad=True)
    out = ft.vmap(lambda x: x * ft.psum(c, "b") + ft.all_gather(c, "b").sum(0), axis_name="b")(XS)
    out.sum().backward()
    ref = torch.autograd.grad((XS * (c * N) + c * N).sum(), c)[0]
    torch.testing.assert_close(c.grad, ref)


def test_results_are_unbatched():
    out = ft.vmap(lambda x: ft.psum(x, "b"), axis_name="b", out_dims=None)(XS)
    torch.testing.assert_close(out, XS.sum(0))


def test_pytrees():
    out = ft.vmap(lambda a, b: ft.psum({"a": a, "b": (b, 3)}, "b"), axis_name="b",
                  out_dims=None)(XS, XS * 2)
    torch.testing.assert_close(out["a"], XS.sum(0))
    torch.testing.assert_close(out["b"][0], 2 * XS.sum(0))
    assert out["b"][1].item() == 3 * N


# -- nested names ----------------------------------------------------------------------

I, J = 3, 4
YS = torch.randn(I, J, 2, dtype=torch.float64)


def _nested(f, **kw):
    return ft.vmap(ft.vmap(f, axis_name="j", **kw), axis_name="i")


def test_nested_names():
    out = _nested(lambda y: torch.stack([ft.psum(y, "i"), ft.psum(y, "j"), ft.psum(y, ("i", "j")),
                                         ft.pmax(y, "i"), ft.pmean(y, ("j", "i"))]))(YS)
    expected = torch.stack([YS.sum(0, keepdim=True).expand_as(YS), YS.sum(1, keepdim=True).expand_as(YS),
                            YS.sum((0, 1), keepdim=True).expand_as(YS), YS.amax(0, keepdim=True).expand_as(YS),
                            YS.mean((0, 1), keepdim=True).expand_as(YS)], dim=2)
    torch.testing.assert_close(out, expected)


def test_nested_index_size_and_gather():
    idx = _nested(lambda y: ft.axis_index(("i", "j")) + 0 * y[0].long())(YS)
    assert idx.tolist() == torch.arange(I * J).reshape(I, J).tolist()
    sizes = _nested(lambda y: y[0] * 0 + ft.axis_size("i") * 10 + ft.axis_size(("i", "j")))(YS)
    assert (sizes == I * 10 + I * J).all()
    gathered = _nested(lambda y: ft.all_gather(y, ("i", "j")))(YS)
    torch.testing.assert_close(gathered[1, 2], YS.reshape(I * J, 2))
    gathered = _nested(lambda y: ft.all_gather(y, "i", axis=1))(YS)
    torch.testing.assert_close(gathered[2, 1], YS[:, 1].T)


def test_nested_grad_between_levels():
    # grad sits between the two vmaps; the outer name is reduced below it, the inner above.
    def f(y):
        return (ft.psum(y, "i") * ft.pmean(y, "j") * y).sum()

    got = ft.vmap(ft.vmap(ft.grad(f), axis_name="j"), axis_name="i")(YS)
    expected = torch.func.grad(
        lambda ys: (ys.sum(0, keepdim=True) * ys.mean(1, keepdim=True) * ys).sum())(YS)
    torch.testing.assert_close(got, expected)


def test_shadowed_name_means_the_inner_axis():
    out = ft.vmap(ft.vmap(lambda y: ft.psum(y, "b"), axis_name="b"), axis_name="b")(YS)
    torch.testing.assert_close(out, YS.sum(1, keepdim=True).expand_as(YS))
    # a value mapped only by the outer axis is shared by the inner one
    out = ft.vmap(lambda y: ft.vmap(lambda z: ft.psum(y, "b") + 0 * z, axis_name="b")(y),
                  axis_name="b")(YS)
    torch.testing.assert_close(out, (J * YS).unsqueeze(1).expand(I, J, J, 2))


# -- process axis in one process -------------------------------------------------------

def test_process_axis_of_one_process():
    with ft.process_axis("ranks"):
        assert ft.axis_size("ranks") == 1 and ft.axis_index("ranks").item() == 0
        out = ft.vmap(lambda x: ft.psum(x, ("b", "ranks")), axis_name="b", out_dims=None)(XS)
        torch.testing.assert_close(out, XS.sum(0))
        x = XS.clone().requires_grad_()
        y = ft.psum(x, "ranks")
        (g,) = torch.autograd.grad((y * y).sum(), x)
        torch.testing.assert_close(g, 2 * XS)
        torch.testing.assert_close(ft.grad(lambda x: ft.psum(x.sin(), "ranks").sum())(XS), XS.cos())
    assert bound_axes() == []


def test_process_axis_sums_a_pytree_in_one_call_per_dtype():
    tree = {"w": XS, "b": XS[:, 0], "f": XS.float() * 3, "n": (XS > 0).long()}
    with ft.process_axis("ranks"):
        out = ft.vmap(lambda t: ft.psum(t, ("b", "ranks")), axis_name="b", out_dims=None)(tree)
        g = ft.vmap(ft.grad(lambda x: ft.psum({"a": x.sin(), "c": x[:2] ** 2}, ("ranks", "b"))["c"].sum()
                            + ft.psum(x.sin(), "ranks").sum()), axis_name="b")(XS)
    for k, v in tree.items():
        torch.testing.assert_close(out[k], v.sum(0))
    expected = torch.func.grad(lambda xs: N * (xs[:, :2] ** 2).sum() + xs.sin().sum())(XS)
    torch.testing.assert_close(g, expected)


# -- errors ----------------------------------------------------------------------------

def test_unknown_name():
    with pytest.raises(NameError, match="unbound axis name: 'c'.*available.*\\['b'\\]"):
        ft.vmap(lambda x: ft.psum(x, "c"), axis_name="b")(XS)
    with pytest.raises(NameError, match="unbound axis name"):
        ft.psum(XS, "b")
    with pytest.raises(NameError, match="unbound axis name"):
        ft.vmap(lambda x: ft.axis_index("b"))(XS)
    assert bound_axes() == []


def test_inconsistent_shadowing():
    with ft.process_axis("b"):
        with pytest.raises(ValueError, match="already bound to a process axis"):
            ft.vmap(lambda x: ft.psum(x, "b"), axis_name="b")(XS)
    with pytest.raises(ValueError, match="already bound to a vmap axis"):
        ft.vmap(lambda x: ft.process_axis("b").__enter__(), axis_name="b")(XS)
    assert bound_axes() == []


def test_bad_arguments():
    with pytest.raises(ValueError, match="chunk_size cannot be combined with axis_name"):
        ft.vmap(lambda x: x, axis_name="b", chunk_size=2)
    with pytest.raises(ValueError, match="single name"):
        ft.vmap(lambda x: x, axis_name=("a", "b"))
    with pytest.raises(TypeError, match="axis_name must be hashable"):
        ft.vmap(lambda x: x, axis_name={"a": 1})
    with pytest.raises(IndexError, match="axis=3 is out of range"):
        ft.vmap(lambda x: ft.all_gather(x, "b", axis=3), axis_name="b")(XS)
    with pytest.raises(ValueError, match="tiled=True needs"):
        ft.vmap(lambda x: ft.all_gather(x.sum(), "b", tiled=True), axis_name="b")(XS)
    assert bound_axes() == []
