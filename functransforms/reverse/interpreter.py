"""Reverse mode as a level: GradTensor and the grad interpreter.

NOTE [Reverse mode rides on torch autograd]
A grad level does not keep a tape of its own. Its wrappers are ordinary autograd citizens:
each differentiable input is wrapped into a fresh GradTensor leaf with ``requires_grad``,
and torch autograd records every op on GradTensors *before* the op reaches
``__torch_dispatch__``. Backward therefore runs torch's own derivative formulas, on
GradTensors, and every op those formulas issue is lowered like any other op, so the
levels below record the backward pass too (that is what makes grad-of-grad work).
Because a GradTensor is a new object around the same value, the lower levels' graphs stay
connected through it.

NOTE [detach at a grad level]
Autograd detaches the outputs it saves for backward (``exp`` saves its result). If that
``detach`` were lowered it would cut the graph of the level below, and second derivatives
of ops that save outputs would come out wrong. A grad level answers ``detach``/``alias``
itself by re-wrapping the very same value.
A user's ``x.detach()`` is different: as in torch.func it stops the gradient at every level,
so it is lowered like any other op. The two are told apart by where they come from: a user
call passes torch's autograd kernel, which excludes the autograd keys before handing the op
to ``__torch_dispatch__``; autograd's own detach (SavedVariable, ``.data``) is issued from
C++ straight to the Python key, with those keys still active.
"""
import torch
from torch._C import DispatchKey
from torch.utils._mode_utils import no_dispatch

from ..core.levels import Interpreter, lowering
from ..core.ops import decomposition_for_jvp
from ..core.wrapper import (
    LevelTensor,
    is_plain_layout,
    new_wrapper,
    aliasing_op,
    mutated_arg_positions,
    returned_arg_positions,
    needs_lowering,
    wrap_output,
    call_below,
    rebind_instead_of_writing,
)

aten = torch.ops.aten

# Keyed by id(): OpOverload.__hash__ is a Python method, and this runs on every op.
_REWRAP_OPS = frozenset({id(aten.detach.default), id(aten.alias.default)})


class GradTensor(LevelTensor):
    @staticmethod
    def __new__(cls, value, level, requires_grad=False):
        if not requires_grad and is_plain_layout(value):
            return new_wrapper(cls, value, level, value.shape)
        return LevelTensor._make(cls, value, level, value.shape, value.stride(), requires_grad)

    def __repr__(self, *, tensor_contents=None):
        # torch.func's format (levels counted from 1), so printed output reads the same.
        return f"GradTrackingTensor(lvl={self._level.depth + 1}, value={self._value!r})"


class GradInterpreter(Interpreter):
    kind = "grad"

    def __init__(self):
        super().__init__()
        self.prev_grad_mode = torch.is_grad_enabled()
        self.prev_fwd_grad = torch._C._is_fwd_grad_enabled()
        self.in_backward = False
        # Set when an op of the forward pass took a tensor tracked below that is not this
        # level's (a captured parameter requiring grad, an outer level's wrapper). Its
        # backward formulas then run ops on that tensor alone (``weight.t()``), which only
        # a backward with grad mode on records below (NOTE [Backward of captured tensors]
        # in reverse/backward.py).
        self.captures_tracked = False
        # Set when the forward pass ran an op of _GRAD_MODE_FORMULAS.
        self.formulas_need_grad_mode = False

    # NOTE [Inference mode around a grad level]: inference mode turns autograd off more
    # thoroughly than no_grad (enable_grad cannot undo it), and a grad level *is* autograd:
    # under it the level would silently compute zero gradients. As in torch.func the level
    # runs with inference mode off and restores it on the way out; an inference_mode block
    # inside ``f`` still hides its ops from every level, like no_grad.
    # Saved tensor hooks (save_on_cpu, ...) would see this level's GradTensors, which must
    # not leave the level: they are refused while a grad level is active, as in torch.func
    # (jvp and vmap levels do not mind them).
    def __enter__(self):
        self._prev_hooks_message = _hooks_disabled_message()
        try:
            _disable_hooks(_SAVED_TENSOR_HOOKS_MESSAGE)
        except RuntimeError:
            _restore_hooks(self._prev_hooks_message)
            raise
        self._inference_guard = None
        if torch.is_inference_mode_enabled():
            self._inference_guard = torch._C._InferenceMode(False)
            self._inference_guard.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            if self._inference_guard is not None:
                self._inference_guard.__exit__(*exc)
                self._inference_guard = None
            _restore_hooks(self._prev_hooks_message)

    def lowered_grad_mode(self):
        # As in torch.func, grad mode is one switch shared by all levels: a no_grad inside f
        # also hides the op from the levels below, and a level entered under no_grad never
        # lets the levels below record. The exception is this level's own backward, which
        # runs with grad mode off but must be recorded below (grad of grad).
        if self.in_backward:
            return self.prev_grad_mode
        return self.prev_grad_mode and torch.is_grad_enabled()

    def lower(self):
        # For callers that run code on this level's behalf (custom autograd.Function forward,
        # which torch runs under no_grad and with forward AD off): the levels below record,
        # and the jvp levels below carry tangents, as if this level were off.
        return lowering(self.prev_grad_mode, self.prev_fwd_grad)

    def lift(self, value, requires_grad):
        return GradTensor(value, self, requires_grad)

    def adopt(self, tensor):
        return GradTensor(tensor, self)

    def rebind(self, wrapper, result):
        # NOTE [Writes a wrapper's value cannot hold] in core/wrapper.py.
        wrapper._value = result._value if isinstance(result, LevelTensor) and result._level is self else result
        _sync_metadata(wrapper)

    def process(self, func, args, kwargs):
        plan = _PLANS.get(id(func))
        if plan is None:
            plan = _plan(func)
        rewrap, mutated, returned, aliasing, formula_needs_grad_mode = plan
        if formula_needs_grad_mode:
            self.formulas_need_grad_mode = True
        if rewrap and not torch._C._dispatch_tls_is_dispatch_key_excluded(
            DispatchKey.AutogradFunctionality
        ):
            return GradTensor(args[0]._value, self)
        if mutated:
            rebound = rebind_instead_of_writing(self, func, args, kwargs)
            if rebound is not None:
                return rebound
            for i in returned:
                if i is not None and not (isinstance(args[i], LevelTensor) and args[i]._level is self):
                    # Writing this level's constants (an ``eps`` tensor a composite kernel
                    # made) into a captured tensor loses no gradient; anything this level
                    # tracks would.
                    if _any_tracked_here(self, args, kwargs):
                        raise RuntimeError(_captured_mutation_message(func))
        # Only values tracked by a lower level need the op recorded below; skipping the
        # lowering context otherwise is what keeps a single grad level cheap. With no
        # wrapper of a lower level among the values either, the op runs right here.
        tracked = aliasing
        below = False
        values = []
        for a in args:
            if isinstance(a, torch.Tensor):
                if isinstance(a, LevelTensor) and a._level is self:
                    a = a._value
                    if type(a) is torch.Tensor:
                        if not tracked and (a.requires_grad or a.is_complex()
                                            or a._is_zerotensor()):
                            tracked = True
                    else:
                        below = True
                        tracked = tracked or needs_lowering(a)
                else:
                    below = below or isinstance(a, LevelTensor)
                    if needs_lowering(a):
                        tracked = self.captures_tracked = True
            elif type(a) in (list, tuple):
                if any(isinstance(b, torch.Tensor) and not (
                        isinstance(b, LevelTensor) and b._level is self) and needs_lowering(b)
                        for b in a):
                    self.captures_tracked = True
                a = type(a)(_unwrap(b, self) for b in a)
                below = True
                tracked = tracked or any(
                    isinstance(b, torch.Tensor) and needs_lowering(b) for b in a
                )
            values.append(a)
        if kwargs:
            if any(isinstance(v, torch.Tensor) and not (
                    isinstance(v, LevelTensor) and v._level is self) and needs_lowering(v)
                    for v in kwargs.values()):
                self.captures_tracked = True
            kwargs = {k: _unwrap(v, self) for k, v in kwargs.items()}
            below = True
            tracked = tracked or any(
                isinstance(v, torch.Tensor) and needs_lowering(v) for v in kwargs.values()
            )
        if tracked:
            with lowering(self.lowered_grad_mode()):
                out = _lowered_form(func)(*values, **kwargs)
        elif below:
            out = call_below(func, values, kwargs)
        else:
            out = func._op(*values)
        if mutated:
            for i in mutated:
                if isinstance(args[i], LevelTensor) and args[i]._level is self:
                    _sync_metadata(args[i])
            # In-place ops return their (already mutated) input: hand back the same wrapper
            # so autograd's version counter and history bookkeeping stay on one object.
            if not returned:
                return out
            if len(returned) == 1:
                return args[returned[0]] if returned[0] is not None else GradTensor(out, self)
            return tuple(
                args[i] if i is not None else GradTensor(o, self) for i, o in zip(returned, out)
            )
        if type(out) is torch.Tensor:
            if out.layout is _STRIDED and not out.is_complex() and out.is_contiguous():
                return new_wrapper(GradTensor, out, self, out.shape)
            return GradTensor(out, self)
        if isinstance(out, torch.Tensor):
            return GradTensor(out, self)
        return wrap_output(out, lambda t: GradTensor(t, self))


_SAVED_TENSOR_HOOKS_MESSAGE = (
    "Grad transforms (grad, vjp, jacrev, hessian, ...) don't support saved tensor hooks "
    "(torch.func transforms don't yet support saved tensor hooks either): the hooks would "
    "see the transform's internal tensors. Use the hooks (e.g. save_on_cpu) outside the "
    "transformed function and around no transform call, or drop them."
)
_hooks_disabled_message = torch._C._autograd._saved_tensors_hooks_get_disabled_error_message
_disable_hooks = torch._C._autograd._saved_tensors_hooks_disable


def _restore_hooks(message):
    if message is None:
        torch._C._autograd._saved_tensors_hooks_enable()
    else:
        torch._C._autograd._saved_tensors_hooks_disable(message)


_STRIDED = torch.strided
# Ops whose torch backward formula gives a different (and only then torch.func's) answer
# with grad mode on: det's formula without grad mode solves with an eps-perturbed LU, which
# is 0 at an exactly singular matrix instead of its cofactors. A level that ran one runs its
# backward with grad mode on (NOTE [Backward that a level below differentiates]).
_GRAD_MODE_FORMULAS = frozenset({id(aten._linalg_det.default)})
# id(func) -> (is detach/alias, mutated positions, returned positions, aliasing, in
# _GRAD_MODE_FORMULAS): the facts process reads on every op, looked up once.
_PLANS = {}


def _plan(func):
    mutated = mutated_arg_positions(func)
    plan = _PLANS[id(func)] = (
        id(func) in _REWRAP_OPS, mutated, returned_arg_positions(func) if mutated else (),
        aliasing_op(func), id(func) in _GRAD_MODE_FORMULAS,
    )
    return plan


# NOTE [Norm backwards differentiated twice]
# native_layer_norm and native_batch_norm return mean and inverse std as outputs that torch
# autograd does not differentiate, and the derivative formulas of their backward ops read
# those saved statistics. So a grad level below that records a norm's backward with torch's
# formula (grad of grad) gets the second derivative right, but a third level differentiating
# that formula misses how the statistics depend on the input (grad(grad(grad(layer_norm)))
# was off, as in torch.func and plain torch autograd). A grad level lowering such a backward
# onto values tracked below therefore lowers torch's decomposition of it written for forward
# mode, which recomputes the statistics from the input: the levels below record ops whose
# derivatives are complete at every order. The jvp level uses the same decompositions.
_LOWERED_FORMS = {}


def _lowered_form(func):
    """What this level calls to lower ``func`` onto values tracked below."""
    form = _LOWERED_FORMS.get(id(func))
    if form is None:
        form = _LOWERED_FORMS[id(func)] = decomposition_for_jvp(func) or func._op
    return form


def _sync_metadata(wrapper):
    # In-place view ops (squeeze_, t_, as_strided_, ...) changed the value's shape; the
    # wrapper must follow or its size would lie to autograd (matmul ends with squeeze_).
    value = wrapper._value
    if wrapper.shape != value.shape or wrapper.stride() != value.stride():
        with no_dispatch():
            wrapper.as_strided_(value.shape, value.stride())


def _any_tracked_here(level, args, kwargs):
    for a in (*args, *kwargs.values()):
        for b in (a if type(a) in (list, tuple) else (a,)):
            if isinstance(b, LevelTensor) and b._level is level and b.requires_grad:
                return True
    return False


def _unwrap(a, level):
    if isinstance(a, LevelTensor) and a._level is level:
        return a._value
    return a


def _captured_mutation_message(func):
    return (
        f"During a grad transform (grad, vjp, jacrev, ...), the function called the in-place "
        f"operation {func._schema.name}.{func._overloadname} that would mutate a captured "
        f"Tensor (one from outside the transform). Its gradient would be lost. Pass that "
        f"tensor as an input of the transformed function, or use the out-of-place version of "
        f"the operation."
    )
