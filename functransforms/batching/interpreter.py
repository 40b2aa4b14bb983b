"""vmap as a level: BatchedTensor and the batching interpreter.

A BatchedTensor's value always carries the batch dimension in front. Moving a batch dim is
a view in PyTorch, so normalising it at the edges costs nothing, and every rule can rely
on it. User code sees the logical (per-example) shape.

How an op is served, fastest first (the choice is cached per op):
  1. a batching rule from ``BATCH_RULES`` (batching/rules/*.py, one module per op family);
  2. for an in-place op, the rule of its out-of-place twin followed by ``copy_``;
  3. a decomposition (``torch._decomp`` or the op's CompositeImplicit kernel), whose pieces
     come back through dispatch and meet their own rules;
  4. the per-example loop (batching/fallback.py), counted and warned about.
"""
import torch
from torch.utils._mode_utils import no_dispatch

from ..core.collectives import Axis, bind_axis
from ..core.levels import Interpreter, lowering
from ..core.ops import decomposition, functional_twin, twin_call
from ..core.wrapper import (
    LevelTensor,
    is_plain_layout,
    new_wrapper,
    memory_layout,
    aliasing_op,
    mutated_arg_positions,
    out_arg_names,
    returned_arg_positions,
    needs_lowering,
    rebind_instead_of_writing,
)
from .fallback import note_fallback, op_name
from ..core.mode import transform_mode_active
from .registry import BATCH_RULES

aten = torch.ops.aten


class BatchedTensor(LevelTensor):
    _escaped_message = (
        "vmap: a tensor of a finished vmap was used: your tensor may have escaped from "
        "inside a function being vmapped (stored in a global or a closure), which is not "
        "supported. Its value holds every example, so it cannot stand for one. Return the "
        "tensor from the vmapped function instead."
    )

    @staticmethod
    def __new__(cls, value, level):
        if is_plain_layout(value):
            return new_wrapper(cls, value, level, value.shape[1:])
        return LevelTensor._make(cls, value, level, value.shape[1:], value.stride()[1:])

    def __repr__(self, *, tensor_contents=None):
        # torch.func's format (levels counted from 1); the batch dim is always in front here.
        return f"BatchedTensor(lvl={self._level.depth + 1}, bdim=0, value={self._value!r})"

    def example_layout(self):
        # The memory example 0 reads: as_strided under vmap addresses each example's own
        # stretch of the value (batching/rules/views.py), one batch stride apart.
        layout = memory_layout(self._value)
        if layout is None or not layout[0]:
            return None
        strides, offset, _ = layout
        return strides[1:], offset, strides[0]

    # ``.data`` would hand out (or replace) the batched value behind autograd's back; refused
    # while the level runs, as torch.func does.
    @property
    def data(self):
        if self._level.alive:
            raise RuntimeError(
                "vmap: accessing `data` under vmap transform is not allowed: it would detach "
                "a batched tensor from autograd. Use x.detach() instead."
            )
        return self._value.data

    @data.setter
    def data(self, value):
        if not self._level.alive:
            torch.Tensor.data.__set__(self, value)
            return
        raise RuntimeError(
            "vmap: mutating directly with `.data` under vmap transform is not allowed. Use "
            "x.copy_(value) (with torch.no_grad() if needed) instead."
        )

    def is_contiguous(self, memory_format=torch.contiguous_format):
        # Python-level callers only (C++ reads the wrapper's strides). Channels-last
        # contiguity of one example is refused, as torch.func does.
        if memory_format is not torch.contiguous_format and self._level.alive:
            raise RuntimeError(
                f"vmap: NYI: querying is_contiguous inside of vmap for memory_format other "
                f"than torch.contiguous_format (got {memory_format}). Query it outside vmap, "
                f"or make the layout explicit with .contiguous(memory_format=...)."
            )
        return super().is_contiguous(memory_format=memory_format)

    def tolist(self):
        # torch refuses .tolist() on any subclass before dispatch, with a message that does
        # not say why or what to do; under vmap the reason is the same as for .item().
        if self._level.alive:
            raise RuntimeError(
                "vmap: .tolist() would turn a batched tensor into Python numbers, but every "
                "example has its own values. Keep the computation in tensors, or return the "
                "tensor from the vmapped function and call .tolist() on the result."
            )
        return self._value.tolist()


_NO_KWARGS = {}
_STRIDED = torch.strided


class VmapAxis(Axis):
    """The examples of one vmap level as a named axis (NOTE [Named axes] in
    core/collectives.py). Values batched at the level are reduced by its batching rules;
    what reaches this object is the same for every example."""

    kind = "vmap"

    def __init__(self, name, level):
        super().__init__(name, level.batch_size)
        self.level = level
        self.device = None  # the mapped inputs' device, for axis_index

    def index(self):
        if not self.level.alive:
            raise RuntimeError(
                f"axis_index({self.name!r}): the vmap that bound this name has returned."
            )
        return BatchedTensor(torch.arange(self.size, device=self.device), self.level)


class VmapInterpreter(Interpreter):
    kind = "vmap"
    # Filled by random_mode.py: the context that, under randomness='different', gives
    # dropout of an unbatched input one mask per example (NOTE [Randomness]).
    different_randomness_context = None

    def __init__(self, batch_size, randomness="error", axis_name=None):
        super().__init__()
        self.batch_size = batch_size
        self.randomness = randomness
        self.axis = None if axis_name is None else VmapAxis(axis_name, self)

    def lift(self, value):
        return BatchedTensor(value, self)

    def rebind(self, wrapper, result):
        # NOTE [Writes a wrapper's value cannot hold] in core/wrapper.py.
        if isinstance(result, LevelTensor) and result._level is self:
            value = result._value
        else:
            with lowering(None):
                value = result.unsqueeze(0).expand(self.batch_size, *result.shape).clone()
        wrapper._value = value
        if wrapper.stride() != value.stride()[1:]:
            with no_dispatch():
                wrapper.as_strided_(value.shape[1:], value.stride()[1:])

    def __enter__(self):
        self._binding = None
        if self.axis is not None:
            # Bound before the level is pushed: a refused name leaves nothing behind.
            self._binding = bind_axis(self.axis)
            self._binding.__enter__()
        super().__enter__()
        # See NOTE [Randomness] in random_mode.py.
        self._mode = self._function_mode = None
        if self.randomness != "same":
            self._mode = transform_mode_active()
            self._mode.__enter__()
        if self.randomness == "different" and self.different_randomness_context is not None:
            self._function_mode = self.different_randomness_context()
            self._function_mode.__enter__()
        return self

    def __exit__(self, *exc):
        try:
            if self._function_mode is not None:
                self._function_mode.__exit__(*exc)
        finally:
            try:
                if self._mode is not None:
                    self._mode.__exit__(*exc)
            finally:
                super().__exit__(*exc)
                if self._binding is not None:
                    self._binding.__exit__(*exc)
        return False

    def process(self, func, args, kwargs):
        handler = _HANDLERS.get(id(func))
        if handler is None:
            handler = _choose_handler(func)
        return handler(self, func, args, kwargs)

    # -- the three ways of serving an op -------------------------------------------------

    def unwrap_args(self, args):
        """Split args into values one level down and their bdims (0 or None).

        Also reports whether any value is tracked by autograd below: only then must the
        rule run under ``lowering`` (see NOTE [Lowering]), which is the costliest part of
        a cheap op.
        """
        values = []
        bdims = []
        tracked = False
        for a in args:
            if isinstance(a, torch.Tensor):
                if isinstance(a, LevelTensor) and a._level is self:
                    a = a._value
                    bdims.append(0)
                else:
                    bdims.append(None)
                tracked = tracked or needs_lowering(a)
                values.append(a)
            elif type(a) in (list, tuple) and a and any(isinstance(b, LevelTensor) for b in a):
                vs, ds = [], []
                for b in a:
                    if isinstance(b, LevelTensor) and b._level is self:
                        b = b._value
                        ds.append(0)
                    else:
                        ds.append(None)
                    tracked = tracked or (isinstance(b, torch.Tensor) and needs_lowering(b))
                    vs.append(b)
                values.append(type(a)(vs))
                bdims.append(ds)
            else:
                values.append(a)
                bdims.append(None)
        return values, bdims, tracked

    def _unwrap_kwarg(self, name, v):
        if isinstance(v, LevelTensor) and v._level is self:
            raise _NeedsFallback()
        return v

    def wrap_out(self, out, out_bdims):
        if isinstance(out, torch.Tensor):
            if isinstance(out_bdims, (list, tuple)):
                (out_bdims,) = out_bdims
            return BatchedTensor(out, self) if out_bdims is not None else out
        if type(out) in (tuple, list):
            if not isinstance(out_bdims, (list, tuple)):
                out_bdims = (out_bdims,) * len(out)
            return type(out)(
                BatchedTensor(o, self) if (d is not None and isinstance(o, torch.Tensor)) else o
                for o, d in zip(out, out_bdims)
            )
        return out

    def select_example(self, x, i):
        if isinstance(x, LevelTensor) and x._level is self:
            return x._value[i]
        if type(x) in (list, tuple):
            return type(x)(self.select_example(b, i) for b in x)
        return x

    def run_per_example(self, func, args, kwargs):
        if func.is_view or torch.Tag.inplace_view in func.tags:
            # Stacking per-example results makes a copy, so writes through the "view" would
            # be lost: refuse rather than return a silently detached tensor.
            raise RuntimeError(
                f"vmap: there is no batching rule for the view operation aten::{op_name(func)}, "
                f"and running it once per example cannot return (or reshape) a view. Use the "
                f"op's *_copy variant or an out-of-place formulation."
            )
        if self.batch_size == 0:
            raise RuntimeError(
                f"vmap: aten::{op_name(func)} has no batching rule, and running it once per "
                f"example cannot give a result's shape with no examples (The fallback path "
                f"does not support vmap over dims of size 0). Map over a non-empty dimension."
            )
        note_fallback(func)
        check_random(self, func, args, kwargs)
        mutated = mutated_arg_positions(func)
        for i in mutated:
            if not (isinstance(args[i], LevelTensor) and args[i]._level is self):
                raise RuntimeError(inplace_into_unbatched_message(func))
        outs = out_arg_names(func)
        if outs:
            # out= ops: every example writes into its own slice of a batched out tensor; an
            # unbatched one would be overwritten by each example in turn.
            written = [t for n in outs for t in _tensors(kwargs.get(n))]
            if not all(isinstance(t, LevelTensor) and t._level is self for t in written):
                raise RuntimeError(inplace_into_unbatched_message(func))
        # Ops that address storage directly (as_strided_scatter's storage_offset) would read
        # an example's slice at its offset inside the batch: give them fresh copies.
        fresh = not mutated and any(a.name == "storage_offset" for a in func._schema.arguments)
        results = []
        with lowering(None):
            for i in range(self.batch_size):
                a = [self.select_example(x, i) for x in args]
                if fresh:
                    a = [x.clone() if isinstance(x, torch.Tensor) else x for x in a]
                k = {n: self.select_example(v, i) for n, v in kwargs.items()} if kwargs else _NO_KWARGS
                results.append(func(*a, **k))
        if outs:
            return written[0] if len(written) == 1 else tuple(written)
        returned = returned_arg_positions(func)
        if returned:
            stacked = self._stack_results(func, results) if None in returned else None
            if len(returned) == 1:
                return args[returned[0]] if returned[0] is not None else stacked
            return tuple(
                args[i] if i is not None else stacked[j] for j, i in enumerate(returned)
            )
        return self._stack_results(func, results)

    def _stack_results(self, func, results):
        first = results[0]
        if isinstance(first, torch.Tensor):
            with lowering(None):
                return BatchedTensor(torch.stack(results), self)
        if type(first) in (tuple, list):
            columns = list(zip(*results))
            return type(first)(self._stack_results(func, list(col)) for col in columns)
        if all(r == first for r in results):
            return first
        raise RuntimeError(
            f"vmap: aten::{op_name(func)} returned a Python value that differs between examples "
            f"({results[:3]}...). vmap can only batch tensor results."
        )


class _NeedsFallback(Exception):
    pass


def _rule_handler(rule, func):
    returned = returned_arg_positions(func)
    aliasing = aliasing_op(func)
    # Random in-place rules check the written tensor themselves: the randomness mode's
    # refusals come first, as in torch.func.
    written = () if torch.Tag.nondeterministic_seeded in func.tags else [
        i for i in returned if i is not None]
    # In-place and out= ops hand back the very wrapper they were given; returned_arg_positions
    # has an entry (None) for every return of other ops too.
    hands_back = any(i is not None for i in returned)

    def handle(interp, func, args, kwargs):
        if hands_back:
            rebound = rebind_instead_of_writing(interp, func, args, kwargs)
            if rebound is not None:
                return rebound
        values, bdims, tracked = interp.unwrap_args(args)
        for i in written:
            if bdims[i] is None:
                raise RuntimeError(inplace_into_unbatched_message(func))
        try:
            if kwargs:
                kwargs = {k: interp._unwrap_kwarg(k, v) for k, v in kwargs.items()}
        except _NeedsFallback:
            return interp.run_per_example(func, args, kwargs)
        try:
            if tracked or aliasing:
                # See aliasing_op in core/wrapper.py for why views and mutations always do.
                with lowering(None):
                    out, out_bdims = rule(interp, func, values, bdims, kwargs)
            else:
                out, out_bdims = rule(interp, func, values, bdims, kwargs)
        except _NeedsFallback:
            # A rule may decline a case it cannot batch (e.g. a data-dependent shape).
            return interp.run_per_example(func, args, kwargs)
        if hands_back:
            if len(returned) == 1:
                if returned[0] is not None:
                    return args[returned[0]]
            else:
                wrapped = interp.wrap_out(out, out_bdims)
                return tuple(args[i] if i is not None else w for i, w in zip(returned, wrapped))
        if type(out) is torch.Tensor or isinstance(out, torch.Tensor):
            if out_bdims is None or (type(out_bdims) in (list, tuple) and out_bdims[0] is None):
                return out
            # is_plain_layout inlined (every op): a plain result takes the cheap constructor.
            if (type(out) is torch.Tensor and out.layout is _STRIDED and not out.is_complex()
                    and out.is_contiguous()):
                return new_wrapper(BatchedTensor, out, interp, out.shape[1:])
            return BatchedTensor(out, interp)
        return interp.wrap_out(out, out_bdims)

    return handle


def _inplace_via_functional(functional):
    def handle(interp, func, args, kwargs):
        self_arg = args[0]
        if not (isinstance(self_arg, LevelTensor) and self_arg._level is interp):
            raise RuntimeError(inplace_into_unbatched_message(func))
        rebound = rebind_instead_of_writing(interp, func, args, kwargs)
        if rebound is not None:
            return rebound
        result = functional(*args, **kwargs)
        if torch.Tag.inplace_view in func.tags:
            # squeeze_, t_, ... change the tensor's shape, not its data: point the wrapper at
            # the view and make its own metadata follow (matmul(1-D, 2-D) ends in squeeze_).
            value = self_arg._value = result._value
            with no_dispatch():
                self_arg.as_strided_(value.shape[1:], value.stride()[1:])
            return self_arg
        # copy_ is batched like any op; it writes through to the value of ``self_arg``.
        aten.copy_.default(self_arg, result)
        return self_arg

    return handle


def _decomposition_handler(decomp):
    def handle(interp, func, args, kwargs):
        return decomp(*args, **kwargs)

    return handle


def _tensors(value):
    if isinstance(value, torch.Tensor):
        return (value,)
    if type(value) in (list, tuple):
        return tuple(v for v in value if isinstance(v, torch.Tensor))
    return ()


def _loop_handler(interp, func, args, kwargs):
    return interp.run_per_example(func, args, kwargs)


_HANDLERS = {}


def _elementwise_handler(general, func):
    """The fast lane for elementwise rules (see ``elementwise`` in batching/registry.py).

    When every tensor argument is one of this level's BatchedTensors holding a plain, real,
    untracked value of the same rank as the others, broadcasting needs no padding and
    nothing below needs ``lowering``: the op runs on the values directly. Anything else
    takes the general rule path.
    """
    op = func._op

    def handle(interp, func, args, kwargs):
        if kwargs:
            return general(interp, func, args, kwargs)
        values = []
        rank = -1
        for a in args:
            if isinstance(a, torch.Tensor):
                if type(a) is not BatchedTensor or a._level is not interp:
                    return general(interp, func, args, kwargs)
                v = a._value
                if (type(v) is not torch.Tensor or v.requires_grad or v.is_complex()
                        or v._is_zerotensor() or (rank >= 0 and v.dim() != rank)):
                    return general(interp, func, args, kwargs)
                rank = v.dim()
                values.append(v)
            else:
                values.append(a)
        out = op(*values)
        if not isinstance(out, torch.Tensor):
            return interp.wrap_out(out, 0)  # frexp and the few other multi-output ones
        if (type(out) is torch.Tensor and out.layout is _STRIDED and not out.is_complex()
                and out.is_contiguous()):  # is_plain_layout, inlined
            return new_wrapper(BatchedTensor, out, interp, out.shape[1:])
        return BatchedTensor(out, interp)

    return handle


def _choose_handler(func):
    rule = BATCH_RULES.get(func)
    if rule is not None:
        handler = _rule_handler(rule, func)
        if getattr(rule, "elementwise", False) and not aliasing_op(func):
            handler = _elementwise_handler(handler, func)
    elif mutated_arg_positions(func) and func._schema.name.endswith("_"):
        twin = functional_twin(func)
        if twin is not None and (twin in BATCH_RULES or decomposition(twin) is not None):
            handler = _inplace_via_functional(twin_call(func, twin))
        else:
            handler = _loop_handler
    else:
        decomp = decomposition(func)
        handler = _decomposition_handler(decomp) if decomp is not None else _loop_handler
    _HANDLERS[id(func)] = handler
    return handler


def check_random(interp, func, args=(), kwargs=None):
    if (torch.Tag.nondeterministic_seeded in func.tags and interp.randomness == "error"
            and _draws(func, args, kwargs or {})):
        raise RuntimeError(random_in_error_mode_message(func))


def random_in_error_mode_message(func):
    return (
        f"vmap: called random operation while in randomness error mode (aten::{op_name(func)} "
        f"under vmap with randomness='error'). Pass randomness='different' for independent "
        f"draws per example or randomness='same' for one draw shared by every example."
    )


def _draws(func, args, kwargs):
    """Seeded ops whose only randomness is a dropout probability draw nothing at p=0
    (the fused attention kernels in eval mode)."""
    for i, arg in enumerate(func._schema.arguments):
        if arg.name == "dropout_p":
            p = args[i] if i < len(args) else kwargs.get("dropout_p", arg.default_value)
            return bool(p)
    return True


def inplace_into_unbatched_message(func):
    # The parenthesis is torch.func's wording of the same refusal.
    return (
        f"vmap: aten::{op_name(func)} is an in-place operation that would write batched values "
        f"into a tensor that is not batched (inplace aten::{op_name(func)}(self, *extra_args) is "
        f"not possible because there exists a Tensor `other` in extra_args that has more "
        f"elements than `self`). Use the out-of-place version (for example `y = x + z` instead "
        f"of `x += z`), or make the written tensor batched too."
    )
