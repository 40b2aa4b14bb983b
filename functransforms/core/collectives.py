"""Named axes and the collective ops over them.

NOTE [Named axes]
``vmap(f, axis_name="batch")`` and ``with ft.process_axis("ranks"):`` *bind* a name to an
``Axis``: the mapped examples of one vmap level, or the processes of a torch.distributed
group. A collective (``ft.psum(x, "batch")``) resolves its name once, when it is called, to
the innermost live binding of that name, and then runs the aten-level op
``functransforms::psum(x, axis_id)``. From there it travels like any other op:
  * a vmap level whose axis has that id reduces over its own batch dim (the result is the
    same for every example, so it is unbatched); any other vmap level passes the op down
    with its batch dim in front, which a collective over another axis treats as data;
  * a jvp level applies the op to the primal and to the tangent (every collective here is
    linear, or piecewise linear for pmax/pmin);
  * a grad level lets torch autograd record it, with the formulas in
    reverse/collectives.py: the backward of psum is a psum of the cotangents (JAX's
    transpose for SPMD code, and the all-reduce rule of data parallelism);
  * on plain tensors (no level of the axis holds the value) the ``Axis`` itself answers: a
    vmap axis as for a value every example shares (psum multiplies by the size), a process
    axis with a torch.distributed collective.
Passing an id rather than the name keeps a recorded backward bound to the axis its forward
saw, even when the same name is bound again later or the axis is gone (an ``Axis`` outlives
its binding with its size, so a dead vmap axis still answers for shared values).

Nothing here imports the interpreters: each axis kind implements ``Axis`` where it is
defined (batching/interpreter.py, api/collectives.py) and each interpreter registers its
rules for the ops from its own package.
"""
import itertools
import threading
import weakref

import torch

__all__ = ["Axis", "bind_axis", "resolve_axis", "bound_axes", "axis_by_id", "OPS"]

_ids = itertools.count(1)
_by_id = weakref.WeakValueDictionary()
_local = threading.local()


class Axis:
    """One binding of a name. Subclasses say how a value that is the same everywhere along
    the axis (a plain tensor reaching the op) is reduced, and give the index."""

    kind = "?"

    def __init__(self, name, size):
        self.name = name
        self.size = size
        self.id = next(_ids)
        self.alive = False
        _by_id[self.id] = self

    # Values shared by every position along the axis.
    def psum(self, x):
        return x * self.size

    def pmax(self, x):
        return x.clone()

    def pmin(self, x):
        return x.clone()

    def all_gather(self, x, dim, tiled):
        copies = [x] * self.size
        return torch.cat(copies, dim) if tiled else torch.stack(copies, dim)

    def index(self):
        raise NotImplementedError

    def __repr__(self):
        return f"{self.kind} axis {self.name!r} of size {self.size}"


def bound_axes():
    """The live bindings, innermost last."""
    stack = getattr(_local, "axes", None)
    if stack is None:
        stack = _local.axes = []
    return stack


class bind_axis:
    """Bind ``axis.name`` to ``axis`` for the extent of a ``with`` block.

    Rebinding a name of the same kind shadows it (the inner vmap wins, as in JAX); a vmap
    name that would hide a process axis, or the reverse, is refused: code written for one
    would silently reduce over the other.
    """

    __slots__ = ("axis",)

    def __init__(self, axis):
        self.axis = axis

    def __enter__(self):
        axis = self.axis
        stack = bound_axes()
        for other in stack:
            if other.name == axis.name and other.kind != axis.kind:
                raise ValueError(
                    f"axis name {axis.name!r} is already bound to a {other.kind} axis here; "
                    f"binding it to a {axis.kind} axis as well would make every collective "
                    f"over {axis.name!r} ambiguous. Give the {axis.kind} axis another name."
                )
        axis.alive = True
        stack.append(axis)
        return axis

    def __exit__(self, *exc):
        stack = bound_axes()
        if self.axis in stack:
            while stack:
                top = stack.pop()
                top.alive = False
                if top is self.axis:
                    break
        self.axis.alive = False
        return False


def resolve_axis(name, what):
    """The innermost live binding of ``name``, or JAX's NameError saying what is bound."""
    for axis in reversed(bound_axes()):
        if axis.name == name:
            return axis
    names = [a.name for a in bound_axes()]
    raise NameError(
        f"unbound axis name: {name!r}. The following axis names are available to collective "
        f"operations: {names}. {what} can only be called inside a function vmapped with "
        f"vmap(..., axis_name={name!r}) or inside `with ft.process_axis({name!r}):`."
    )


def axis_by_id(axis_id):
    axis = _by_id.get(axis_id)
    if axis is None:
        raise RuntimeError(
            f"functransforms collective: axis #{axis_id} no longer exists. Collectives are "
            f"bound to the vmap call or process_axis block that was active when they ran."
        )
    return axis


# ---------------------------------------------------------------------------------------
# The ops. Their kernels here serve plain tensors; levels serve their own wrappers first.

_lib = torch.library.Library("functransforms", "DEF")
_lib.define("psum(Tensor x, int axis) -> Tensor")
_lib.define("pmax(Tensor x, int axis) -> Tensor")
_lib.define("pmin(Tensor x, int axis) -> Tensor")
_lib.define("all_gather(Tensor x, int axis, int dim, bool tiled) -> Tensor")


def _psum(x, axis):
    return axis_by_id(axis).psum(x)


def _pmax(x, axis):
    return axis_by_id(axis).pmax(x)


def _pmin(x, axis):
    return axis_by_id(axis).pmin(x)


def _all_gather(x, axis, dim, tiled):
    return axis_by_id(axis).all_gather(x, dim, tiled)


for _name, _kernel in (("psum", _psum), ("pmax", _pmax), ("pmin", _pmin),
                       ("all_gather", _all_gather)):
    _lib.impl(_name, _kernel, "CompositeExplicitAutograd")

_ns = torch.ops.functransforms
OPS = {
    "psum": _ns.psum.default,
    "pmax": _ns.pmax.default,
    "pmin": _ns.pmin.default,
    "all_gather": _ns.all_gather.default,
}
