"""Collectives over named axes, JAX's vocabulary: psum, pmean, pmax, pmin, all_gather,
axis_index, axis_size; and ``process_axis``, which names the processes of a
torch.distributed group.

Inside ``vmap(f, axis_name="batch")`` a collective over ``"batch"`` gives every example what
it would see if the examples were devices: ``psum(x, "batch")`` is the sum of ``x`` over the
examples, the same for each. Inside ``with process_axis("ranks"):`` the same call over
``"ranks"`` is an all-reduce over the group. Both compose with grad, vjp and jvp (NOTE
[Named axes] in core/collectives.py has the mechanism) and may be combined in one call:
``psum(g, ("batch", "ranks"))``.
"""
import numbers
import time

import torch
import torch.distributed as dist

from ..core.collectives import OPS, Axis, bind_axis, resolve_axis
from .pytree import map_tensors, tree_flatten, tree_unflatten

__all__ = ["psum", "pmean", "pmax", "pmin", "all_gather", "axis_index", "axis_size",
           "process_axis", "ProcessAxis"]


def _resolve(axis_name, what):
    names = axis_name if isinstance(axis_name, (tuple, list)) else (axis_name,)
    if not names:
        raise ValueError(f"{what}: axis_name must name at least one axis, got {axis_name!r}.")
    return [resolve_axis(name, what) for name in names]


def _leaves(tree, what):
    leaves, spec = tree_flatten(tree)
    out = []
    for leaf in leaves:
        if isinstance(leaf, numbers.Number):
            leaf = torch.as_tensor(leaf)
        elif not isinstance(leaf, torch.Tensor):
            raise TypeError(
                f"{what}: expected tensors or Python numbers (in any pytree), got a leaf of "
                f"type {type(leaf).__name__}."
            )
        out.append(leaf)
    return out, spec


def _map_leaves(fn, tree, what):
    leaves, spec = _leaves(tree, what)
    return tree_unflatten([fn(leaf) for leaf in leaves], spec)


def _bucketed(op, axis, leaves):
    """One collective per dtype instead of one per leaf: over a process axis each call is a
    round trip between processes (a model's gradients are one pytree of many tensors)."""
    out = list(leaves)
    by_dtype = {}
    for i, leaf in enumerate(leaves):
        by_dtype.setdefault(leaf.dtype, []).append(i)
    for group in by_dtype.values():
        if len(group) == 1:
            out[group[0]] = op(leaves[group[0]], axis.id)
            continue
        flat = op(torch.cat([leaves[i].reshape(-1) for i in group]), axis.id)
        for i, piece in zip(group, flat.split([leaves[i].numel() for i in group])):
            out[i] = piece.reshape(leaves[i].shape)
    return out


def _reduction(op_name, what):
    op = OPS[op_name]

    def reduce(x, axis_name):
        axes = _resolve(axis_name, what)
        leaves, spec = _leaves(x, what)
        for axis in axes:
            if axis.kind == "process" and len(leaves) > 1:
                leaves = _bucketed(op, axis, leaves)
            else:
                leaves = [op(leaf, axis.id) for leaf in leaves]
        return tree_unflatten(leaves, spec)

    return reduce


_psum = _reduction("psum", "psum")
_pmax = _reduction("pmax", "pmax")
_pmin = _reduction("pmin", "pmin")


def psum(x, axis_name):
    """The sum of ``x`` over the named axis (or tuple of axes), the same at every position.

    ``x`` is a tensor or any pytree of tensors. Under vmap this sums over the examples; over
    a process axis it is an all-reduce. Its derivative is a psum of the tangent, and its
    backward a psum of the cotangents.
    """
    return _psum(x, axis_name)


def pmean(x, axis_name):
    """The mean of ``x`` over the named axis (or tuple of axes)."""
    size = axis_size(axis_name)
    return map_tensors(lambda s: s / size, _psum(x, axis_name))


def pmax(x, axis_name):
    """The maximum of ``x`` over the named axis (or axes), elementwise. Gradients go to the
    positions attaining it, shared evenly among ties (as torch.amax)."""
    return _pmax(x, axis_name)


def pmin(x, axis_name):
    """The minimum of ``x`` over the named axis (or axes), elementwise."""
    return _pmin(x, axis_name)


def all_gather(x, axis_name, axis=0, tiled=False):
    """Every position's ``x``, stacked along a new dimension ``axis`` (concatenated along
    the existing dimension ``axis`` when ``tiled``), the same at every position. Over
    several names the positions are ordered with the first name slowest, as in JAX."""
    what = "all_gather"
    axes = _resolve(axis_name, what)
    op = OPS["all_gather"]

    def one(leaf):
        rank = leaf.dim()
        if tiled and rank == 0:
            raise ValueError(f"{what}: tiled=True needs an input with at least one dimension.")
        out_rank = rank if tiled else rank + 1
        if not -out_rank <= axis < out_rank:
            raise IndexError(
                f"{what}: axis={axis} is out of range for a result with {out_rank} dims "
                f"(an input with {rank} dims, tiled={tiled}); use "
                f"{-out_rank} <= axis < {out_rank}."
            )
        dim = axis % out_rank
        # The last name varies fastest: gather over it first, then concatenate those blocks
        # along the same dim for each name before it.
        for i, ax in enumerate(reversed(axes)):
            leaf = op(leaf, ax.id, dim, tiled or i > 0)
        return leaf

    return _map_leaves(one, x, what)


def axis_index(axis_name):
    """This position's index along the named axis: an int64 tensor (under vmap, each
    example gets its own). Over several names, the row-major index of the combination."""
    axes = _resolve(axis_name, "axis_index")
    index = None
    for axis in axes:
        index = axis.index() if index is None else index * axis.size + axis.index()
    return index


def axis_size(axis_name):
    """The number of positions along the named axis (the product over several names)."""
    size = 1
    for axis in _resolve(axis_name, "axis_size"):
        size *= axis.size
    return size


class ProcessAxis(Axis):
    """The processes of a torch.distributed group as a named axis. Every collective is one
    torch.distributed call on the plain values, whatever levels they travelled through
    (their batch dims ride along as data). Without an initialised process group the axis
    has one position and the collectives do no communication."""

    kind = "process"

    def __init__(self, name, group=None):
        distributed = dist.is_available() and dist.is_initialized()
        if group is not None and not distributed:
            raise RuntimeError(
                f"process_axis({name!r}, group=...): torch.distributed is not initialised. "
                f"Call torch.distributed.init_process_group first (torchrun sets up its "
                f"environment), or leave group=None for a single process."
            )
        super().__init__(name, dist.get_world_size(group) if distributed else 1)
        self.group = group
        self.rank = dist.get_rank(group) if distributed else 0
        self.calls = 0
        self.seconds = 0.0

    def _communicate(self, collective, *args):
        start = time.perf_counter()
        collective(*args, group=self.group)
        self.seconds += time.perf_counter() - start
        self.calls += 1

    def _all_reduce(self, x, op):
        out = x.clone(memory_format=torch.contiguous_format)
        if self.size > 1:
            self._communicate(dist.all_reduce, out, op)
        return out

    def psum(self, x):
        if x.dtype == torch.bool:
            x = x.long()
        return self._all_reduce(x, dist.ReduceOp.SUM)

    def pmax(self, x):
        return self._all_reduce(x, dist.ReduceOp.MAX)

    def pmin(self, x):
        return self._all_reduce(x, dist.ReduceOp.MIN)

    def all_gather(self, x, dim, tiled):
        x = x.contiguous()
        if self.size == 1:
            parts = [x]
        else:
            parts = [torch.empty_like(x) for _ in range(self.size)]
            self._communicate(dist.all_gather, parts, x)
        return torch.cat(parts, dim) if tiled else torch.stack(parts, dim)

    def index(self):
        return torch.tensor(self.rank)


class process_axis:
    """``with process_axis("ranks"):`` names the processes of ``group`` (default: the world)
    so that ``psum(x, "ranks")`` is a differentiable all-reduce over them.

    The backward of a sum all-reduce is a sum all-reduce of the cotangents. Every process
    must run the same collectives in the same order, as with torch.distributed itself.
    """

    def __init__(self, name, group=None):
        self.axis = ProcessAxis(name, group)
        self._binding = bind_axis(self.axis)

    def __enter__(self):
        return self._binding.__enter__()

    def __exit__(self, *exc):
        return self._binding.__exit__(*exc)
