"""In-place writes into a dual that views were taken of: the views' tangents follow, as
with torch.func (torch forward AD shares a base's tangent with its views)."""
import torch
import torch.func as tf

import functransforms as ft


def base_written_after_view(x, y):
    view = x[0, ::2]
    x.copy_(y)
    return x, view


def base_scaled_after_views(x, y):
    a, b = x[1:], x.t()
    x.mul_(2).add_(y)
    return a, b


def intermediate_written(x, y):
    z = x * 1
    w = z[:, 1]
    z.copy_(y)
    z.mul_(3)
    return z, w, y


def _jvp_both(f, primals, tangents):
    # Tangents may be written through (x's tangent belongs to the dual): fresh copies each.
    def run(m):
        return m.jvp(f, tuple(p.clone() for p in primals), tuple(t.clone() for t in tangents))
    return run(ft), run(tf)


def test_jvp_base_written_after_views():
    torch.manual_seed(0)
    for f in (base_written_after_view, base_scaled_after_views, intermediate_written):
        primals = (torch.randn(3, 6, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64))
        tangents = (torch.randn(3, 6, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64))
        if f is base_scaled_after_views:
            primals = tuple(p[:, :3] for p in primals)
            tangents = tuple(t[:, :3] for t in tangents)
        actual, expected = _jvp_both(f, primals, tangents)
        torch.testing.assert_close(actual, expected)


def test_vmap_of_jvp_base_written_after_view():
    torch.manual_seed(0)
    x, xt = torch.randn(2, 4, 6, dtype=torch.float64), torch.randn(2, 6, 4, dtype=torch.float64)
    y, yt = torch.randn(2, 4, 6, dtype=torch.float64), torch.randn(2, 4, 6, dtype=torch.float64)

    def run(m):
        def push(x, xt, y, yt):
            return m.jvp(base_written_after_view, (x, y), (xt, yt))
        return m.vmap(push, in_dims=(1, 2, 1, 1))(x.clone(), xt.clone(), y, yt)

    torch.testing.assert_close(run(ft), run(tf))



def buffer_filled_through_views(x):
    # A tensor made inside f has unbatched zeros as its tangent; under jacfwd the writes
    # through its views carry tangents batched by the vmap below.
    buf = torch.zeros(4, 3, dtype=x.dtype)
    rows, column = buf[1:3], buf.t()[0]
    rows.copy_(x.reshape(2, 3).exp())
    buf[0, :] = x[:3].sin()
    scaled = buf * 2  # not created by f from nothing: its tangent is computed, yet unbatched
    scaled[3].copy_(x[3:])
    return scaled, column, rows


def test_writes_into_views_of_a_fresh_tensor_under_forward_jacobians():
    x = torch.randn(6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for jac in ("jacfwd", "jacrev"):
        ours, theirs = getattr(ft, jac)(buffer_filled_through_views)(x), getattr(tf, jac)(
            buffer_filled_through_views)(x)
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b)
    loss = lambda x: buffer_filled_through_views(x)[0].sin().sum()  # noqa: E731
    torch.testing.assert_close(ft.hessian(loss)(x), tf.hessian(loss)(x))


def test_writes_into_split_pieces_under_jacfwd():
    # Pieces of a multi-output view op alias their base's tangent like any other view.
    def f(x):
        buf = torch.zeros(4, dtype=x.dtype) * 2
        first, second = buf.split(2)
        second.copy_(x[:2].exp())
        return buf, first

    x = torch.randn(3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for ours, theirs in zip(ft.jacfwd(f)(x), tf.jacfwd(f)(x)):
        torch.testing.assert_close(ours, theirs)
