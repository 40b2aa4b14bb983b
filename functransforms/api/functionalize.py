"""functionalize: run a function with its mutations (and optionally views) taken out.

NOTE [Functionalization as a level]
A functionalize level wraps each tensor in a FunctionalTensor. The levels below never see
an in-place op from it: ``x.add_(y)`` becomes ``add(x, y)`` one level down and the wrapper
is re-pointed at the result. Aliasing is kept at this level only. Every wrapper belongs to
a ``_Storage`` (the current value of its base tensor and a version counter) and remembers
the chain of view ops that leads from the base to it. Writing into a view scatters the new
values into the base (through an index map obtained by replaying the chain on
``arange``) and bumps the version; any other wrapper of the same storage whose version is
stale replays its chain on the new base before it is next used. With
``remove='mutations_and_views'`` the ops sent down are the ``*_copy`` versions of the
views, so nothing below aliases either. Inputs that were written to are updated with
``copy_`` once the function returns, so callers observe the same mutations as without
functionalize.
"""
import functools

import torch
from torch.utils._mode_utils import no_dispatch

from ..autograd_function import custom_function_call, custom_function_rule
from ..batching.fallback import op_name
from ..core.levels import Interpreter, lowering
from ..core.mode import adopting_new_tensors
from ..core.wrapper import LevelTensor, mutated_arg_positions, out_arg_names
from .pytree import tree_flatten, tree_map, tree_unflatten

aten = torch.ops.aten

_REMOVE = ("mutations", "mutations_and_views")


class _Storage:
    __slots__ = ("base", "version")

    def __init__(self, base):
        self.base = base
        self.version = 0


class FunctionalTensor(LevelTensor):
    @staticmethod
    def __new__(cls, value, level, storage, chain):
        self = LevelTensor._make(cls, value, level, value.shape, value.stride())
        self._storage = storage
        self._chain = chain
        self._seen = storage.version
        return self

    def __repr__(self, *, tensor_contents=None):
        return f"FunctionalTensor(lvl={self._level.depth + 1}, value={self._value!r})"


class FunctionalizeInterpreter(Interpreter):
    kind = "functionalize"
    adopts_every_dtype = True

    def __init__(self, remove="mutations"):
        super().__init__()
        self.views_as_copies = remove == "mutations_and_views"
        self.inputs = []

    def lift(self, value):
        return FunctionalTensor(value, self, _Storage(value), ())

    def adopt(self, tensor):
        # A tensor the function creates (``buf = torch.zeros(3)``) is the function's own:
        # writes into it are functionalized like writes into any intermediate.
        return self.lift(tensor)

    def current(self, x):
        """``x``'s value one level down, brought up to date with writes through aliases."""
        if not (isinstance(x, LevelTensor) and x._level is self):
            return x
        storage = x._storage
        if x._seen != storage.version:
            value = storage.base
            with lowering(None):
                for step in x._chain:
                    value = self._replay(step, value)
            x._value = value
            x._seen = storage.version
        return x._value

    def _replay(self, step, value):
        func, rest, kwargs, index = step
        op = _copy_twin(func) if self.views_as_copies else func
        out = op(value, *rest, **kwargs)
        return out if index is None else out[index]

    def _unwrap(self, a):
        if type(a) in (list, tuple):
            return type(a)(self.current(b) for b in a)
        return self.current(a)

    def process(self, func, args, kwargs):
        if torch.Tag.inplace_view in func.tags and func is not aten.resize_.default:
            return self._inplace_view(func, args, kwargs)
        if kwargs and _out_variant(func) is not None:
            return self._out(func, args, kwargs)
        values = [self._unwrap(a) for a in args]
        if kwargs:
            kwargs = {k: self._unwrap(v) for k, v in kwargs.items()}
        mutated = mutated_arg_positions(func)
        if mutated:
            return self._mutate(func, args, values, kwargs, mutated)
        if _is_view(func):
            op = _copy_twin(func) if self.views_as_copies else func
            with lowering(None):
                out = op(*values, **kwargs)
            source = args[0]
            if not (isinstance(source, LevelTensor) and source._level is self):
                return self._wrap_fresh(out)
            step_args = (func, tuple(values[1:]), kwargs)
            if isinstance(out, torch.Tensor):
                return self._view_of(source, out, step_args + (None,))
            return type(out)(self._view_of(source, o, step_args + (i,)) for i, o in enumerate(out))
        with lowering(None):
            out = func(*values, **kwargs)
        return self._wrap_fresh(out)

    def _inplace_view(self, func, args, kwargs):
        # ``x.unsqueeze_(0)`` re-points x at a new view of the same storage: the chain
        # grows by the out-of-place view, and the wrapper takes the new shape.
        target = args[0]
        twin = _functional_twin(func)
        if (twin is None or not (isinstance(target, LevelTensor) and target._level is self)
                or any(target is w for w in self.inputs)):
            # An input's new shape could not be applied back to the caller's tensor.
            raise RuntimeError(
                f"functionalize: aten::{op_name(func)} changes a tensor's shape or strides in "
                f"place, which is supported only on tensors the function creates, not on its "
                f"inputs. Use the out-of-place version (e.g. `x = x.t()` instead of `x.t_()`)."
            )
        rest = tuple(self._unwrap(a) for a in args[1:])
        kwargs = {k: self._unwrap(v) for k, v in kwargs.items()}
        op = _copy_twin(twin) if self.views_as_copies else twin
        with lowering(None):
            value = op(self.current(target), *rest, **kwargs)
        target._chain = target._chain + ((twin, rest, kwargs, None),)
        target._value = value
        with no_dispatch():
            target.as_strided_(value.shape, value.stride())
        return target

    def _out(self, func, args, kwargs):
        # ``torch.add(a, b, out=buf)``: the functional op, then its result written into
        # ``buf`` like any in-place write (resizing it, as out= does, when shapes differ).
        outs, functional = _out_variant(func)
        if functional is None:
            raise RuntimeError(
                f"functionalize: aten::{op_name(func)} was called with out= and has no "
                f"out-of-place version to replace it with. Use the out-of-place operation."
            )
        targets = [kwargs[name] for name in outs]
        for t in targets:
            if not (isinstance(t, LevelTensor) and t._level is self):
                raise RuntimeError(
                    f"functionalize: aten::{op_name(func)} writes into a tensor captured from "
                    f"outside the function. Pass it as an input so that the write can be "
                    f"applied back to it."
                )
        values = [self._unwrap(a) for a in args]
        rest = {k: self._unwrap(v) for k, v in kwargs.items() if k not in outs}
        with lowering(None):
            out = functional(*values, **rest)
            results = out if type(out) in (tuple, list) else (out,)
            for target, new in zip(targets, results):
                self._write(func, target, new)
        return targets[0] if len(targets) == 1 else tuple(targets)

    def _view_of(self, source, value, step):
        return FunctionalTensor(value, self, source._storage, source._chain + (step,))

    def _wrap_fresh(self, out):
        if isinstance(out, torch.Tensor):
            return self.lift(out)
        if type(out) in (tuple, list):
            return type(out)(self.lift(o) if isinstance(o, torch.Tensor) else o for o in out)
        return out

    def _mutate(self, func, args, values, kwargs, mutated):
        for i in mutated:
            if not (isinstance(args[i], LevelTensor) and args[i]._level is self):
                raise RuntimeError(
                    f"functionalize: aten::{op_name(func)} writes into a tensor captured from "
                    f"outside the function. Pass it as an input so that the write can be "
                    f"applied back to it."
                )
        twin = _functional_twin(func)
        if twin is None:
            raise RuntimeError(
                f"functionalize: aten::{op_name(func)} mutates its input and has no "
                f"out-of-place version to replace it with."
            )
        with lowering(None):
            out = twin(*values, **kwargs)
            results = out if type(out) in (tuple, list) else (out,)
            for i, new in zip(mutated, results):
                self._write(func, args[i], new)
        if len(mutated) == 1:
            return args[mutated[0]]
        return tuple(args[i] for i in mutated)

    def _write(self, func, target, new):
        if new.shape != target.shape:
            if target._chain:
                raise RuntimeError(
                    f"functionalize: aten::{op_name(func)} changes the shape of a view in place "
                    f"({tuple(target.shape)} -> {tuple(new.shape)}), which is not supported. "
                    f"Resize the base tensor instead."
                )
            # resize_ (or an out= op resizing its buffer): the base itself takes the new
            # shape; an input's new shape is applied back to it on the way out.
            with no_dispatch():
                target.resize_(new.shape)
                target.as_strided_(new.shape, new.stride())
        if new.dtype != target.dtype:
            new = new.to(target.dtype)
        storage = target._storage
        if target._chain:
            storage.base = self._scatter(storage.base, target._chain, new)
        else:
            storage.base = new
        storage.version += 1
        target._value = new
        target._seen = storage.version

    def _scatter(self, base, chain, new):
        if base.dim() == 0:
            return new.reshape(())
        # Where each element of the view lives in the base, as one index tensor per base
        # dim: index_put then writes the view's values without viewing anything below.
        index = torch.arange(base.numel(), device=base.device).view(base.shape)
        for func, rest, kwargs, i in chain:
            index = func(index, *rest, **kwargs)
            if i is not None:
                index = index[i]
        return base.index_put(torch.unravel_index(index, base.shape), new)


@custom_function_rule("functionalize")
def _custom_function_rule(level, spec, args):
    # A custom Function's forward is opaque here: it runs below on current values and its
    # outputs are fresh tensors of this level.
    values = tuple(level.current(a) for a in args)
    with lowering(None):
        out = custom_function_call(spec, values)
    return level._wrap_fresh(out)


def _is_view(func):
    return any(r.alias_info is not None for r in func._schema.returns)


_twin_cache = {}


def _copy_twin(func):
    """``view`` -> ``view_copy``: the same op returning fresh memory (or ``func`` + clone)."""
    twin = _twin_cache.get(func)
    if twin is None:
        packet = getattr(aten, func._schema.name.split("::")[-1] + "_copy", None)
        twin = getattr(packet, func._overloadname, None) if packet is not None else None
        if twin is None:
            def twin(*args, **kwargs):
                out = func(*args, **kwargs)
                if isinstance(out, torch.Tensor):
                    return out.clone()
                return type(out)(o.clone() for o in out)
        _twin_cache[func] = twin
    return twin


_INPLACE_TWINS = {aten.copy_.default: aten.copy.default}


def _functional_twin(func):
    if func in _INPLACE_TWINS:
        return _INPLACE_TWINS[func]
    name = func._schema.name.split("::")[-1]
    if not name.endswith("_"):
        return None
    packet = getattr(aten, name[:-1], None)
    twin = getattr(packet, func._overloadname, None) if packet is not None else None
    if twin is None or len(twin._schema.arguments) != len(func._schema.arguments):
        return None
    return twin


_out_cache = {}


def _out_variant(func):
    """``(out argument names, functional overload)`` for an ``out=`` overload, else None."""
    entry = _out_cache.get(func)
    if entry is None:
        outs = out_arg_names(func)
        functional = None
        if outs:
            names = [a.name for a in func._schema.arguments if a.name not in outs]
            packet = getattr(aten, func._schema.name.split("::")[-1], None)
            for overload in packet.overloads() if packet is not None else ():
                op = getattr(packet, overload)
                args = op._schema.arguments
                if [a.name for a in args] == names and not any(
                        a.alias_info is not None and a.alias_info.is_write for a in args):
                    functional = op
                    break
        entry = _out_cache[func] = (outs, functional) if outs else (None,)
    return entry if entry[0] else None


def functionalize(func, *, remove="mutations"):
    """Run ``func`` with every mutation replaced by an out-of-place op.

    Results are those of ``func``; inputs that ``func`` writes to are updated once it
    returns. With ``remove='mutations_and_views'`` views are also replaced by copies, so the
    transforms below (and anything tracing them) see a program without aliasing.

    >>> def f(x):
    ...     y = x.clone()
    ...     y[0].add_(1)
    ...     return y
    >>> functionalize(f)(torch.zeros(2, 2))
    tensor([[1., 1.],
            [0., 0.]])
    """
    if remove not in _REMOVE:
        raise ValueError(
            f"functionalize: remove must be one of {_REMOVE}, got {remove!r}."
        )

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        flat_in, in_spec = tree_flatten((args, kwargs))
        with FunctionalizeInterpreter(remove) as level:
            lifted = [level.lift(x) if isinstance(x, torch.Tensor) else x for x in flat_in]
            level.inputs = [w for w in lifted if isinstance(w, FunctionalTensor)]
            f_args, f_kwargs = tree_unflatten(lifted, in_spec)
            with adopting_new_tensors(level):
                out = func(*f_args, **f_kwargs)
            out = tree_map(level.current, out)
            written = [
                (x, level.current(w))
                for x, w in zip(flat_in, lifted)
                if isinstance(w, FunctionalTensor) and w._storage.version
            ]
        for original, new in written:
            if original.shape != new.shape:
                original.resize_(new.shape)
            original.copy_(new)
        return out

    return wrapper
