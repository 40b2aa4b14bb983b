"""grad of a tiny function and of an MLP loss: fixed per-call cost against real work.

The functions (workloads/models.py): ``(x.sin() * x.exp()).sum()`` on 4 floats, where the
transform's entry and exit dominate, and the loss of a 1024-512-512-256-10 ReLU MLP
(0.92M parameters, batch 64), where the kernels do. The baseline is plain
``torch.autograd.grad`` on leaves that require grad, the work any grad transform wraps.
"""
import torch
import torch.func as tf
from torch.utils._pytree import tree_flatten, tree_unflatten

from . import models
from .harness import ORACLE, OURS, Table, add_row, ft_api

AUTOGRAD = "torch.autograd.grad"
IMPLS = [OURS, ORACLE, AUTOGRAD]


class _FtNamespace:
    """The cases call ``m.grad``; a missing transform becomes Unavailable, not an error."""

    def __getattr__(self, name):
        return ft_api(name)


class _AutogradNamespace:
    """``m.grad`` as plain autograd: fresh leaves for the first argument, then autograd.grad."""

    @staticmethod
    def grad(f):
        def g(arg, *rest):
            leaves, spec = tree_flatten(arg)
            leaves = [leaf.detach().requires_grad_() for leaf in leaves]
            out = f(tree_unflatten(leaves, spec), *rest)
            return tree_unflatten(list(torch.autograd.grad(out, leaves)), spec)
        return g


# config -> case; each takes the namespace providing ``grad``.
CASES = {
    "tiny: (x.sin()*x.exp()).sum(), 4 floats": models.tiny_grad,
    "MLP loss, 0.92M params, batch 64": models.big_mlp_grad,
}


def builders(case):
    def bind(namespace):
        def make():
            torch.manual_seed(0)  # tiny_grad draws its input from the global generator
            return case(namespace)
        return make

    return {OURS: bind(_FtNamespace()), ORACLE: bind(tf), AUTOGRAD: bind(_AutogradNamespace)}


def run(settings):
    table = Table(
        key="grad_micro",
        title="grad of a tiny function and of a 0.92M-parameter MLP loss",
        config_label="function", impls=IMPLS, loop=AUTOGRAD,
    )
    table.notes.append(
        f"{AUTOGRAD}: detach the input, `requires_grad_()`, run the function and call "
        "`torch.autograd.grad`, i.e. the untransformed work; the speedup column is below 1x "
        "by the transform's own cost."
    )
    for config, case in CASES.items():  # both are cheap enough for quick mode too
        add_row(table, config, builders(case), settings)
    return [table]
