"""Forward mode where it pays: Hessian-vector products and Jacobians of wide outputs.

HVP: the Hessian of an MLP's nll loss w.r.t. its parameters, times a vector, by
forward-over-reverse, ``jvp(grad(loss), (params,), (v,))``: one forward-mode pass through
the backward pass. The peer ``torch.autograd.functional.hvp`` is reverse-over-reverse
(double backward), the way to get an HVP without forward mode.

jacfwd: a tanh MLP from R^64 to R^1024; forward mode needs 64 JVPs where reverse mode needs
1024 VJPs, so jacfwd should beat jacrev here, in either library.
"""
import torch
import torch.autograd.functional as taf
import torch.func as tf
import torch.nn.functional as F
from torch import nn

from . import models
from .harness import (
    CAPTURED, COMPILED, ORACLE, OURS, TF_COMPILED, Table, add_row, compiled_builders, ft_api,
    peer,
)

DOUBLE_BACKWARD = "autograd.functional.hvp (reverse-over-reverse)"
FT_JACREV = f"{OURS} jacrev"
TF_JACREV = f"{ORACLE} jacrev"


class _FtNamespace:
    def __getattr__(self, name):
        return ft_api(name)


def hvp_builders(sizes, batch):
    """Every implementation returns the HVP as ``{parameter name: tensor}``."""
    model = models.mlp(sizes)
    params = models.params_of(model)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(batch, sizes[0], generator=g)
    y = torch.randint(0, sizes[-1], (batch,), generator=g)
    v = {k: torch.randn(p.shape, generator=g) for k, p in params.items()}

    def forward_over_reverse(lib):
        def make():
            def loss(p):
                return F.nll_loss(lib.functional_call(model, p, (x,)), y)

            grad_loss, jvp = lib.grad(loss), lib.jvp
            return lambda: jvp(grad_loss, (params,), (v,))[1]
        return make

    def double_backward():
        names = list(params)

        def loss(*leaves):
            return F.nll_loss(tf.functional_call(model, dict(zip(names, leaves)), (x,)), y)

        leaves, tangents = tuple(params.values()), tuple(v[k] for k in names)
        return lambda: dict(zip(names, taf.hvp(loss, leaves, tangents)[1]))

    def program(lib):
        def make():
            def loss(p):
                return F.nll_loss(lib.functional_call(model, p, (x,)), y)
            grad_loss, jvp = lib.grad(loss), lib.jvp
            return lambda p, t: jvp(grad_loss, (p,), (t,))[1]
        return make

    def jax_jit():
        jx = peer("jax")
        jparams = models.jax_params(model)
        jv = {k: jx.numpy.asarray(t.numpy()) for k, t in v.items()}
        xj, yj = jx.numpy.asarray(x.numpy()), jx.numpy.asarray(y.numpy())

        def loss(p):
            logp = models.jax_forward(model, p, xj)
            return -logp[jx.numpy.arange(batch), yj].mean()

        fn = jx.jit(lambda p, t: jx.jvp(jx.grad(loss), (p,), (t,))[1])
        return lambda: models.block(fn(jparams, jv))

    return {OURS: forward_over_reverse(_FtNamespace()), ORACLE: forward_over_reverse(tf),
            **compiled_builders(program(_FtNamespace()), program(tf), (params, v)),
            DOUBLE_BACKWARD: double_backward, "JAX jit": jax_jit}


def jacfwd_builders(sizes):
    model = models.mlp(sizes, act=nn.Tanh, log_softmax=False).requires_grad_(False)
    x = torch.randn(sizes[0], generator=torch.Generator().manual_seed(5))

    def bind(lib, transform):
        def make():
            fn = getattr(lib, transform)(model)
            return lambda: fn(x)
        return make

    ours = _FtNamespace()
    return {OURS: bind(ours, "jacfwd"), ORACLE: bind(tf, "jacfwd"),
            FT_JACREV: bind(ours, "jacrev"), TF_JACREV: bind(tf, "jacrev")}


def _describe(sizes):
    n = sum(i * o + o for i, o in zip(sizes, sizes[1:]))
    return "-".join(map(str, sizes)) + f" ({n:,} params)"


def run(settings):
    hvp = Table(
        key="forward_mode_hvp",
        title="Hessian-vector product of an MLP's nll loss w.r.t. its parameters, "
              "forward-over-reverse jvp(grad(loss))",
        config_label="MLP sizes, batch",
        impls=[OURS, CAPTURED, COMPILED, ORACLE, TF_COMPILED, DOUBLE_BACKWARD, "JAX jit"],
    )
    hvp.notes.append(
        f"{OURS} and {ORACLE}: `jvp(grad(loss), (params,), (v,))[1]` with `params` a dict; "
        f"{DOUBLE_BACKWARD}: the same HVP by double backward on the parameter tuple.")
    hvp_configs = [((16, 32, 10), 8)] if settings.quick else [
        ((784, 128, 128, 10), 64), ((784, 512, 512, 10), 64)]
    for sizes, batch in hvp_configs:
        add_row(hvp, f"{_describe(sizes)}, {batch}", hvp_builders(sizes, batch), settings)

    sizes = (8, 16, 32) if settings.quick else (64, 256, 1024)
    jac = Table(
        key="forward_mode_jacfwd",
        title=f"jacfwd of a tanh MLP R^{sizes[0]} -> R^{sizes[-1]} w.r.t. its input, "
              "against jacrev",
        config_label="MLP sizes", impls=[OURS, ORACLE, FT_JACREV, TF_JACREV],
    )

    def fwd_over_rev(lib, rev):
        def cell(row):
            a, b = row.values.get(lib), row.values.get(rev)
            return "n/a" if not a or not b else f"{a / b:.2f}"
        return cell

    jac.extra_columns = [(f"{OURS} jacfwd / jacrev", fwd_over_rev(OURS, FT_JACREV)),
                         (f"{ORACLE} jacfwd / jacrev", fwd_over_rev(ORACLE, TF_JACREV))]
    jac.notes.append(f"{OURS} / {ORACLE} compares the two jacfwd columns.")
    add_row(jac, "-".join(map(str, sizes)), jacfwd_builders(sizes), settings)
    return [hvp, jac]
