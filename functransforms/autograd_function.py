"""torch.autograd.Function under every transform, with torch.func's contract.

A Function usable inside transforms defines ``forward(*args)`` (no ctx),
``setup_context(ctx, inputs, output)`` and ``backward(ctx, *grads)``; optionally
``jvp(ctx, *tangents)`` for forward mode, and for vmap either a ``vmap(info, in_dims, *args)``
staticmethod or ``generate_vmap_rule = True``.

NOTE [Custom functions travel down the levels]
``Function.apply`` is a Python call, not an aten op, so it never reaches
``__torch_dispatch__``. We intercept it (see NOTE [Patching Function.apply]) and hand the
call to the innermost live level among its arguments, through a rule keyed by the level's
kind (``CUSTOM_FUNCTION_RULES``). Each rule strips its own level from the arguments, sends
the call one level down (recursively, through the same machinery) and wraps the result:
  * grad: a torch Function is applied to the level's GradTensors, so torch autograd records
    the user's ``backward`` as the node of this level;
  * vmap: the user's ``vmap`` staticmethod runs on the values one level down, or, with
    ``generate_vmap_rule``, a batched version of the whole Function is sent down;
  * jvp: the output tangents come from the user's ``jvp`` staticmethod.
Only when no live level is left does ``forward`` run, on plain tensors (or tensors of dead
levels' values). So ``forward`` never sees a wrapper, its inner ops are never differentiated
by any level, and the user's ``backward``/``jvp`` is used at every level, as in torch.func.
"""
import inspect
import itertools
import threading
from typing import NamedTuple

import torch
import torch.utils._pytree as pytree

from .batching.interpreter import BatchedTensor, VmapInterpreter
from .core.mode import not_adopting
from .core.wrapper import LevelTensor, tracked_below
from .reverse.interpreter import GradTensor

__all__ = ["custom_function_call", "VmapInfo", "CUSTOM_FUNCTION_RULES"]

_Function = torch.autograd.Function
_DelayedError = torch._C._functions.DelayedError

CUSTOM_FUNCTION_RULES = {}


def custom_function_rule(kind):
    """Register the decorated ``rule(level, spec, args)`` for levels of ``kind``."""

    def register(rule):
        CUSTOM_FUNCTION_RULES[kind] = rule
        return rule

    return register


class VmapInfo(NamedTuple):
    """What a Function's ``vmap`` staticmethod is told about the vmap it runs under."""

    batch_size: int
    randomness: str


# ---------------------------------------------------------------------------------------
# Entry point


def _live_level(args):
    best = None
    for a in args:
        if isinstance(a, LevelTensor) and a._level.alive:
            if best is None or a._level.depth > best.depth:
                best = a._level
    return best


def _strip_dead(x):
    while isinstance(x, LevelTensor) and not x._level.alive:
        x = x._value
    return x


def _is_torch_function(spec):
    return isinstance(spec, type) and issubclass(spec, _Function)


def custom_function_call(spec, args):
    """Apply the custom function ``spec`` to positional ``args`` at the innermost live level."""
    level = _live_level(args)
    if level is None:
        args = tuple(_strip_dead(a) for a in args)
        if _is_torch_function(spec):
            return _torch_apply(spec, *args)
        return _apply_with(_BottomFunction, spec, None, args)
    rule = CUSTOM_FUNCTION_RULES.get(level.kind)
    if rule is None:
        raise RuntimeError(
            f"{_name(spec)}: autograd.Function is not supported under the '{level.kind}' "
            f"transform."
        )
    return rule(level, spec, args)


def _name(spec):
    return getattr(spec, "__name__", type(spec).__name__)


def _torch_apply(cls, *args):
    # torch's own apply, below our patch: runs forward with grad mode off and records
    # ``cls.backward`` as the autograd node of any output that needs it.
    return super(_Function, cls).apply(*args)


def _overrides(spec, name):
    if isinstance(spec, _BatchedSpec):
        return name != "vmap" and _overrides(spec.spec, name)
    fn = getattr(spec, name, None)
    return fn is not None and fn is not getattr(_Function, name)


# NOTE [Patching Function.apply]
# torch routes Function.apply to torch.func only when torch.func's own transforms are
# active, and neither __torch_function__ nor a mode sees the call. The only hook is the
# classmethod itself: we replace ``torch.autograd.Function.apply`` once, at import, by a
# version that behaves exactly like torch's when no argument is a live functransforms
# wrapper, and calls ``custom_function_call`` otherwise. ``uninstall_apply_patch()``
# restores torch's original.
_ORIGINAL_APPLY = _Function.__dict__["apply"]


def _patched_apply(cls, *args, **kwargs):
    if _live_level(args) is None and _live_level(tuple(kwargs.values())) is None:
        if any(isinstance(a, LevelTensor) for a in args):
            args = tuple(_strip_dead(a) for a in args)
        return _ORIGINAL_APPLY.__func__(cls, *args, **kwargs)
    if not _overrides(cls, "setup_context"):
        if _defined_by_torch(cls):
            # Autograd kernels of prims and custom ops apply old-style Functions to whatever
            # reaches them, our wrappers included; torch autograd handles those as usual.
            return _ORIGINAL_APPLY.__func__(cls, *args, **kwargs)
        raise RuntimeError(
            f"{cls.__name__}: to use an autograd.Function inside functransforms transforms "
            f"(vmap, grad, jvp, jacrev, ...), it must override the setup_context staticmethod: "
            f"define forward(*args) without ctx and a setup_context(ctx, inputs, output) "
            f"staticmethod, as torch.func requires."
        )
    bound = inspect.signature(cls.forward).bind(*args, **kwargs)
    bound.apply_defaults()
    if any(isinstance(v, torch.Tensor) for v in bound.kwargs.values()):
        raise NotImplementedError(
            f"{cls.__name__}: kwarg-only Tensor args of forward are not supported inside "
            f"transforms (nor by torch.func). Make them positional arguments of forward."
        )
    return custom_function_call(cls, tuple(bound.args))


def _defined_by_torch(cls):
    return cls.__module__ == "torch" or cls.__module__.startswith("torch.")


def install_apply_patch():
    _Function.apply = classmethod(_patched_apply)


def uninstall_apply_patch():
    _Function.apply = _ORIGINAL_APPLY


install_apply_patch()


# ---------------------------------------------------------------------------------------
# The torch Functions we apply ourselves. A spec is the user's Function class or one of our
# batched versions of it. It is handed to ``forward`` through ``_pending`` (read before
# anything else runs) and kept on the ctx for backward, rather than passed as an argument,
# so that ``ctx.needs_input_grad`` lines up with the user's own inputs.

_pending = threading.local()


def _apply_with(cls, spec, level, args):
    _pending.spec = spec
    _pending.level = level
    return _torch_apply(cls, *args)


class _SpecFunction(_Function):
    @staticmethod
    def backward(ctx, *grads):
        return ctx._ft_spec.backward(ctx, *grads)


class _BottomFunction(_SpecFunction):
    """Runs a batched spec's forward on plain tensors, for torch autograd outside every level."""

    @staticmethod
    def forward(ctx, *args):
        spec = ctx._ft_spec = _pending.spec
        out = spec.forward(*args)
        spec.setup_context(ctx, args, out)
        return out

    @staticmethod
    def jvp(ctx, *tangents):
        return ctx._ft_spec.jvp(ctx, *tangents)


class _GradLevelFunction(_SpecFunction):
    """The node a grad level records: forward goes one level down, backward is the user's."""

    @staticmethod
    def backward(ctx, *grads):
        out = ctx._ft_spec.backward(ctx, *grads)
        if _once_differentiable(ctx._ft_spec):
            # The user's backward ran under no_grad: the levels below must not differentiate
            # its result either. As torch's once_differentiable does for plain autograd,
            # results whose cotangents are tracked below get a node that refuses backward.
            out = _delay_error(ctx._ft_level, grads, out)
        return out

    @staticmethod
    def forward(ctx, *args):
        spec = ctx._ft_spec = _pending.spec
        level = ctx._ft_level = _pending.level
        values = tuple(a._value if isinstance(a, LevelTensor) and a._level is level else a
                       for a in args)
        with level.lower(), not_adopting(level):
            out = custom_function_call(spec, values)
        # An input handed back as-is (an in-place Function marks it dirty) must stay the
        # same object, or torch autograd would not see it among the outputs.
        wrapped = _map_tensors(out, lambda t: _same_input(t, values, args, level))
        spec.setup_context(ctx, args, wrapped)
        return wrapped


def _same_input(t, values, args, level):
    for v, a in zip(values, args):
        if t is v and isinstance(a, torch.Tensor):
            return a
    return GradTensor(t, level)


_generated = {}


def _grad_function_for(spec):
    """A torch Function per user Function, so that its backward node reads
    ``<Name>GeneratedBackward`` in ``grad_fn``, as under torch.func."""
    if not isinstance(spec, type):
        return _GradLevelFunction
    cls = _generated.get(spec)
    if cls is None:
        cls = _generated[spec] = type(f"{spec.__name__}Generated", (_GradLevelFunction,), {})
    return cls


# The code object of torch's once_differentiable wrapper, to recognise wrapped backwards.
_ONCE_DIFFERENTIABLE_CODE = torch.autograd.function.once_differentiable(lambda ctx: None).__code__


def _once_differentiable(spec):
    return getattr(getattr(spec, "backward", None), "__code__", None) is _ONCE_DIFFERENTIABLE_CODE


def _delay_error(level, grads, out):
    values = [g._value if isinstance(g, LevelTensor) and g._level is level else g for g in grads]
    if not any(isinstance(v, torch.Tensor) and tracked_below(v) for v in values):
        return out
    outs = _as_tuple(out)
    inner = [o._value if isinstance(o, LevelTensor) and o._level is level else o for o in outs]
    # A result computed without the tracked values (a fresh tensor from numpy) must still
    # refuse a second backward, as torch.func's does: it becomes a leaf that requires grad.
    tensors = [i if i.requires_grad or isinstance(i, LevelTensor) else i.detach().requires_grad_()
               for i in inner if isinstance(i, torch.Tensor)]
    with level.lower():
        delayed = _DelayedError(
            b"trying to differentiate twice a function that was marked with "
            b"@once_differentiable", len(tensors))(*tensors)
    delayed = iter(_as_tuple(delayed))
    wrapped = tuple(GradTensor(next(delayed), level) if isinstance(i, torch.Tensor) else o
                    for i, o in zip(inner, outs))
    return wrapped if isinstance(out, tuple) else wrapped[0]


def _as_tuple(x):
    return x if isinstance(x, tuple) else (x,)


def _map_tensors(out, fn):
    if isinstance(out, torch.Tensor):
        return fn(out)
    if isinstance(out, (tuple, list)):
        return type(out)(fn(o) if isinstance(o, torch.Tensor) else o for o in out)
    return out


# ---------------------------------------------------------------------------------------
# grad


@custom_function_rule("grad")
def _grad_rule(level, spec, args):
    return _apply_with(_grad_function_for(spec), spec, level, args)


# ---------------------------------------------------------------------------------------
# vmap


def _vmap_unsupported_message(spec):
    return (
        f"vmap: {_name(spec)} is an autograd.Function that does not have vmap support. "
        f"Define a vmap(info, in_dims, *args) staticmethod that returns (output, out_dims), "
        f"or set generate_vmap_rule = True so that forward and backward are vmapped for you."
    )


@custom_function_rule("vmap")
def _vmap_rule(level, spec, args):
    has_rule = _overrides(spec, "vmap")
    if getattr(spec, "generate_vmap_rule", False):
        if has_rule:
            raise RuntimeError(
                f"vmap: {_name(spec)} sets both generate_vmap_rule=True and a vmap "
                f"staticmethod. Use one or the other."
            )
        return _vmap_generated(level, spec, args)
    if not has_rule:
        raise RuntimeError(_vmap_unsupported_message(spec))
    values = []
    in_dims = []
    for a in args:
        # Pytrees of tensors (a list argument) get a pytree of in_dims, as in torch.func.
        leaves, spec_a = pytree.tree_flatten(a)
        pairs = [_unbatch_one(level, x) for x in leaves]
        values.append(pytree.tree_unflatten([p[0] for p in pairs], spec_a))
        in_dims.append(pytree.tree_unflatten([p[1] for p in pairs], spec_a))
    info = VmapInfo(level.batch_size, level.randomness)
    with level.lower(), not_adopting(level):
        result = spec.vmap(info, tuple(in_dims), *values)
    if not (isinstance(result, tuple) and len(result) == 2):
        raise RuntimeError(
            f"vmap: expected the vmap staticmethod of {_name(spec)} to have two returns, an "
            f"output and out_dims with a pytree structure compatible with the output; got "
            f"{type(result).__name__}"
            + (f" of length {len(result)}." if isinstance(result, tuple) else ".")
        )
    out, out_dims = result
    return _wrap_batched(level, spec, out, out_dims)


def _wrap_batched(level, spec, out, out_dims):
    # As in torch.func, out_dims must be a prefix of the output's pytree (a tuple for a
    # tuple, not for a single Tensor or a list).
    outs, out_spec = pytree.tree_flatten(out)
    dims = pytree._broadcast_to_and_flatten(out_dims, out_spec)
    if dims is None or not all(d is None or type(d) is int for d in dims):
        raise RuntimeError(
            f"vmap: {_name(spec)}.vmap returned an incompatible (output, out_dims) tuple: "
            f"out_dims={out_dims!r} does not match the structure of the output "
            f"({' '.join(str(out_spec).split())}). "
            f"Give out_dims that structure, with an int or None per output Tensor."
        )
    wrapped = []
    for o, d in zip(outs, dims):
        if d is None or not isinstance(o, torch.Tensor):
            wrapped.append(o)
            continue
        with level.lower():
            value = o.movedim(d, 0) if d != 0 else o
        wrapped.append(BatchedTensor(value, level))
    return pytree.tree_unflatten(wrapped, out_spec)


def _vmap_generated(level, spec, args):
    values = []
    in_dims = []
    for a in args:
        if isinstance(a, LevelTensor) and a._level is level:
            values.append(a._value)
            in_dims.append(0)
        else:
            values.append(a)
            in_dims.append(None)
    batched = _BatchedSpec(spec, tuple(in_dims), level.batch_size, level.randomness)
    with level.lower(), not_adopting(level):
        out = custom_function_call(batched, tuple(values))
    return _wrap_batched(level, spec, out, batched.out_dims)


_SPEC_KEYS = itertools.count()


class _BatchedSpec:
    """``spec`` vmapped over ``in_dims``: a spec in its own right, one level down.

    Each of forward, setup_context, backward and jvp runs the user's per-example method
    under a fresh vmap level. Saved tensors are kept unbatched-or-batch-in-front on the
    real ctx and re-wrapped for backward; ``out_dims`` records which outputs depend on the
    batched inputs.
    """

    generate_vmap_rule = True

    def __init__(self, spec, in_dims, batch_size, randomness):
        self.spec = spec
        self.__name__ = f"Vmapped{_name(spec)}"
        self.in_dims = in_dims
        self.batch_size = batch_size
        self.randomness = randomness
        self.out_dims = None
        self._key = next(_SPEC_KEYS)

    def _enter(self):
        return VmapInterpreter(self.batch_size, self.randomness)

    def forward(self, *args):
        with self._enter() as vl:
            out = self.spec.forward(*_batch_all(vl, args, self.in_dims))
            out, self.out_dims = _unbatch_all(vl, out)
        return out

    def setup_context(self, ctx, inputs, output):
        with self._enter() as vl:
            proxy = _BatchedCtx(ctx, vl, self._key)
            self.spec.setup_context(
                proxy, tuple(_batch_all(vl, inputs, self.in_dims)),
                _batch_like(vl, output, self.out_dims),
            )

    def backward(self, ctx, *grads):
        with self._enter() as vl:
            proxy = _BatchedCtx(ctx, vl, self._key)
            grad_dims = [None if g is None else d
                         for g, d in zip(grads, _flat_dims(self.out_dims, len(grads)))]
            grads_in = self.spec.backward(proxy, *_batch_all(vl, grads, grad_dims))
            single = not isinstance(grads_in, tuple)
            grads_in = (grads_in,) if single else grads_in
            result = []
            for g, d in zip(grads_in, self.in_dims):
                result.append(_match_batching(vl, g, d, self.batch_size))
        return result[0] if single else tuple(result)

    def jvp(self, ctx, *tangents):
        with self._enter() as vl:
            proxy = _BatchedCtx(ctx, vl, self._key, forward=True)
            t_out = self.spec.jvp(proxy, *_batch_all(vl, tangents, self.in_dims))
            single = not isinstance(t_out, tuple)
            dims = (self.out_dims,) if single else _flat_dims(self.out_dims, len(t_out))
            t_out = (t_out,) if single else t_out
            result = [_match_batching(vl, t, d, self.batch_size) for t, d in zip(t_out, dims)]
        return result[0] if single else tuple(result)


def _flat_dims(dims, n):
    return dims if isinstance(dims, tuple) else (dims,) * n


def _batch_all(vl, values, dims):
    return [
        BatchedTensor(v, vl) if d == 0 and isinstance(v, torch.Tensor) else v
        for v, d in zip(values, dims)
    ]


def _batch_like(vl, out, out_dims):
    if isinstance(out, (tuple, list)):
        return type(out)(_batch_all(vl, out, _flat_dims(out_dims, len(out))))
    return _batch_all(vl, (out,), (out_dims,))[0]


def _unbatch_one(vl, t):
    if isinstance(t, LevelTensor) and t._level is vl:
        return t._value, 0
    return t, None


def _unbatch_all(vl, out):
    if isinstance(out, (tuple, list)):
        pairs = [_unbatch_one(vl, o) for o in out]
        return type(out)(p[0] for p in pairs), tuple(p[1] for p in pairs)
    return _unbatch_one(vl, out)


def _match_batching(vl, t, want_dim, batch_size):
    """Bring a gradient or tangent computed under ``vl`` to the layout of its target.

    A batched gradient of an unbatched input is summed over the batch (the input was
    broadcast to every example); an unbatched one of a batched input is expanded.
    """
    value, dim = _unbatch_one(vl, t)
    if value is None or not isinstance(value, torch.Tensor):
        return value
    if dim == want_dim:
        return value
    if want_dim is None:
        return value.sum(0)
    return value.unsqueeze(0).expand(batch_size, *value.shape)


class _BatchedCtx:
    """The ctx a per-example setup_context/backward/jvp sees under a batched spec.

    Under nested vmaps the proxies stack (a proxy's ctx is the outer spec's proxy) and all
    write through to the one real ctx, so each spec keeps the batch dims of its saved
    tensors under its own key: one shared attribute let the outer level's dims overwrite
    the inner one's, batching a saved tensor at a level that never batched it."""

    def __init__(self, ctx, vl, key, forward=False):
        object.__setattr__(self, "_ctx", ctx)
        object.__setattr__(self, "_vl", vl)
        object.__setattr__(self, "_saved_dims_attr",
                           f"_ft_{'forward' if forward else 'saved'}_dims_{key}")
        object.__setattr__(self, "_key", key)

    def __getattr__(self, name):
        return getattr(self._ctx, name)

    def __setattr__(self, name, value):
        setattr(self._ctx, name, value)

    def save_for_backward(self, *tensors):
        values, dims = _unbatch_all(self._vl, tensors)
        setattr(self._ctx, f"_ft_saved_dims_{self._key}", dims)
        self._ctx.save_for_backward(*values)

    def save_for_forward(self, *tensors):
        values, dims = _unbatch_all(self._vl, tensors)
        setattr(self._ctx, f"_ft_forward_dims_{self._key}", dims)
        self._ctx.save_for_forward(*values)

    @property
    def saved_tensors(self):
        dims = getattr(self._ctx, self._saved_dims_attr)
        return tuple(_batch_all(self._vl, self._ctx.saved_tensors, dims))

    def mark_non_differentiable(self, *tensors):
        self._ctx.mark_non_differentiable(*_unbatch_all(self._vl, tensors)[0])

    def mark_dirty(self, *tensors):
        raise RuntimeError("vmap: in-place autograd.Functions (ctx.mark_dirty) are not supported.")


# ---------------------------------------------------------------------------------------
# jvp


class _JvpCtx:
    """ctx for a forward-mode call: holds what setup_context saves for ``jvp``."""

    materialize_grads = True

    def __init__(self, num_inputs):
        self.needs_input_grad = (True,) * num_inputs
        self.saved_tensors = ()
        self.non_differentiable = ()

    def save_for_backward(self, *tensors):
        # What backward needs is saved by the levels that run backward; jvp sees only
        # save_for_forward's tensors, as in torch.
        pass

    def save_for_forward(self, *tensors):
        self.saved_tensors = tensors

    def mark_non_differentiable(self, *tensors):
        self.non_differentiable = tensors

    def set_materialize_grads(self, value):
        self.materialize_grads = value

    def mark_dirty(self, *tensors):
        # The outputs that are these inputs get the input's dual back (see _jvp_rule).
        self.dirty = tensors


@custom_function_rule("jvp")
def _jvp_rule(level, spec, args):
    if not _overrides(spec, "jvp"):
        raise RuntimeError(
            f"jvp: {_name(spec)} is an autograd.Function without a jvp staticmethod. Define "
            f"jvp(ctx, *tangents) to use it with forward-mode transforms (jvp, jacfwd, ...)."
        )
    primals, tangents, _ = level.split_args(args)
    with level.lower(), not_adopting(level):
        out = custom_function_call(spec, tuple(primals))
        ctx = _JvpCtx(len(primals))
        spec.setup_context(ctx, tuple(primals), out)
        tangents = [
            torch.zeros_like(p) if t is None and isinstance(p, torch.Tensor) else t
            for p, t in zip(primals, tangents)
        ]
        out_tangents = spec.jvp(ctx, *tangents)
    if isinstance(out, torch.Tensor):
        return _dual(level, out, out_tangents, ctx, primals, args)
    out_tangents = _as_tuple(out_tangents)
    return type(out)(_dual(level, o, t, ctx, primals, args) for o, t in zip(out, out_tangents))


def _dual(level, primal, tangent, ctx, primals, args):
    if not isinstance(primal, torch.Tensor) or tangent is None:
        return primal
    if any(primal is n for n in ctx.non_differentiable):
        return primal
    if any(primal is d for d in getattr(ctx, "dirty", ())):
        # An input modified in place and returned: the same dual, with its new tangent.
        for p, a in zip(primals, args):
            if p is primal and isinstance(a, LevelTensor) and a._level is level:
                a._tangent = tangent
                return a
    return level.lift(primal, tangent)
