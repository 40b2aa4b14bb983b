"""Forward mode as a level: DualTensor and the JVP interpreter.

NOTE [Dual numbers per level]
torch's own forward AD has a single global dual level and crashes when nested on wrapper
subclasses (FINDINGS #4), so each jvp level carries its own dual numbers: a DualTensor's
``_value`` is the primal and ``_tangent`` the tangent, both one level down (plain tensors
or wrappers of lower levels, e.g. a BatchedTensor when jacfwd vmaps over tangents). A
DualTensor always has a tangent; a result whose tangent is structurally zero is returned
as its bare primal, which every level treats as a constant. That keeps zeros free and is
also what stops two levels from confusing their perturbations.

How an op is served, fastest first (the choice is cached per op):
  1. a JVP rule from ``JVP_RULES`` (forward/rules/*.py, one module per op family);
  2. for an in-place op, its out-of-place twin, then the primal is overwritten and the
     tangent rebound;
  3. a decomposition (``torch._decomp``'s for forward mode where it has one, then its
     general one or the CompositeImplicit kernel), whose pieces come back through dispatch
     and meet their own rules;
  4. the general fallback (forward/fallback.py), counted and warned about.
"""
import weakref

import torch
from torch.utils._mode_utils import no_dispatch
from torch.utils._python_dispatch import _disable_current_modes

from ..core.levels import Interpreter, lowering
from ..core.ops import decomposition, decomposition_for_jvp, functional_twin, twin_call
from ..core.wrapper import (
    LevelTensor,
    mutated_arg_positions,
    rebind_instead_of_writing,
    tracked_below,
)
from .fallback import general_jvp, op_name
from .registry import JVP_RULES

aten = torch.ops.aten


class DualTensor(LevelTensor):
    # True when the tangent object is also another dual's tangent (a rule handed back an
    # input's tangent, ``x + c``): an in-place op must not write into it.
    _tangent_shared = False
    # A view of a dual knows the dual it views (its root), and a root its live views: a
    # write a tangent cannot hold re-derives them all (_promote_root_tangent).
    _root = None
    _views = None

    @staticmethod
    def __new__(cls, primal, tangent, level):
        self = LevelTensor._make(cls, primal, level, primal.shape, primal.stride())
        self._tangent = tangent
        return self

    def __repr__(self, *, tensor_contents=None):
        return (
            f"DualTensor(lvl={self._level.depth + 1}, primal={self._value!r}, "
            f"tangent={self._tangent!r})"
        )


class JvpInterpreter(Interpreter):
    kind = "jvp"

    # NOTE [Forward grad enablement]: torch's switch for forward AD
    # (``torch.autograd.forward_ad._set_fwd_grad_enabled``) is one flag; a jvp level turns
    # it on for its own call, as torch.func does, so a jvp under a disabled switch still
    # computes tangents, and a block of ``f`` that turns it off computes constants (ops
    # there run on the primals). torch also turns it off around every autograd.Function's
    # forward; the grad levels that run code below from inside such a forward (custom
    # Functions, collectives) restore it there (GradInterpreter.lower), so the jvp levels
    # below keep their tangents.
    def __enter__(self):
        self._prev_fwd_grad = torch._C._is_fwd_grad_enabled()
        if not self._prev_fwd_grad:
            torch._C._set_fwd_grad_enabled(True)
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            if not self._prev_fwd_grad:
                torch._C._set_fwd_grad_enabled(False)

    def lift(self, primal, tangent):
        return DualTensor(primal, tangent, self)

    def adopt(self, tensor):
        # A tensor the user's function creates: a dual with a zero tangent, so in-place
        # writes of duals into it (buf[i] = x) carry their tangents. Until something is
        # written into that tangent the dual stands for a constant (see _is_constant). The
        # zeros are ours, not the function's: no adopting level may claim them (NOTE [Ops no
        # wrapper reaches]).
        with _disable_current_modes():
            tangent = torch.zeros_like(tensor)
        dual = DualTensor(tensor, tangent, self)
        dual._adopted = (tangent, tangent._version)
        return dual

    def rebind(self, dual, result):
        # NOTE [Writes a wrapper's value cannot hold] in core/wrapper.py.
        if isinstance(result, LevelTensor) and result._level is self:
            dual._value, dual._tangent = result._value, result._tangent
        else:
            dual._value = result
            with lowering(None):
                dual._tangent = torch.zeros_like(result)

    def process(self, func, args, kwargs):
        if not torch._C._is_fwd_grad_enabled() and not mutated_arg_positions(func):
            with lowering(None):
                return func(*[_primal(a, self) for a in args],
                            **{k: _primal(v, self) for k, v in kwargs.items()})
        handler = _HANDLERS.get(id(func))
        if handler is None:
            handler = _choose_handler(func)
        return handler(self, func, args, kwargs)

    def split_args(self, args):
        """(primals, tangents, any_tangent) for the positional args."""
        primals = []
        tangents = []
        found = False
        for a in args:
            if isinstance(a, LevelTensor) and a._level is self:
                primals.append(a._value)
                tangents.append(a._tangent)
                found = True
            elif type(a) in (list, tuple) and a and any(isinstance(b, LevelTensor) for b in a):
                ps, ts = [], []
                for b in a:
                    if isinstance(b, LevelTensor) and b._level is self:
                        ps.append(b._value)
                        ts.append(b._tangent)
                        found = True
                    else:
                        ps.append(b)
                        ts.append(None)
                primals.append(type(a)(ps))
                tangents.append(ts)
            else:
                primals.append(a)
                tangents.append(None)
        return primals, tangents, found

    def wrap_out(self, out, out_tangent):
        if isinstance(out, torch.Tensor):
            if type(out_tangent) in (list, tuple):
                (out_tangent,) = out_tangent
            return out if out_tangent is None else DualTensor(out, out_tangent, self)
        if type(out) in (tuple, list):
            if type(out_tangent) not in (list, tuple):
                out_tangent = (out_tangent,) * len(out)
            return type(out)(
                DualTensor(o, t, self) if (t is not None and isinstance(o, torch.Tensor)) else o
                for o, t in zip(out, out_tangent)
            )
        return out


def _has_dual_kwarg(level, kwargs):
    return any(isinstance(v, LevelTensor) and v._level is level for v in kwargs.values())


def _rule_handler(rule):
    def handle(interp, func, args, kwargs):
        if kwargs and _has_dual_kwarg(interp, kwargs):
            return _fallback_handler(interp, func, args, kwargs)
        primals, tangents, found = interp.split_args(args)
        if not found:
            with lowering(None):
                return func(*primals, **kwargs)
        with lowering(None):
            out, out_tangent = rule(func, primals, tangents, kwargs)
        out = interp.wrap_out(out, out_tangent)
        if type(out) is DualTensor and any(out._tangent is t for t in tangents):
            out._tangent_shared = True
        return out

    return handle


class CapturedMutationError(RuntimeError):
    pass


def _inplace_via_functional(functional):
    def handle(interp, func, args, kwargs):
        target = args[0]
        if not (isinstance(target, LevelTensor) and target._level is interp):
            if not _only_constants(interp, args, kwargs):
                raise CapturedMutationError(captured_mutation_message(func))
            # Only adopted constants of this level (an ``eps`` tensor a composite kernel
            # made) are written into a tensor that is not a dual: nothing to carry.
            with lowering(None):
                return func(*(_primal(a, interp) for a in args),
                            **{k: _primal(v, interp) for k, v in kwargs.items()})
        rebound = rebind_instead_of_writing(interp, func, args, kwargs)
        if rebound is not None:
            return rebound
        result = functional(*args, **kwargs)
        if isinstance(result, LevelTensor) and result._level is interp:
            value, tangent = result._value, result._tangent
        else:
            value, tangent = result, None
        with lowering(None):
            target._value.copy_(value)
            if tangent is None:
                tangent = torch.zeros_like(target._value)
            elif tangent.dtype != target.dtype:
                tangent = tangent.to(target.dtype)
            # NOTE [In-place tangents]: a view of a dual carries the same view of its
            # tangent (forward/rules/linear.py), so a write into a dual must write into its
            # tangent, as torch's forward AD does: views taken before (of the base, or the
            # base of a view) then see the new tangent. Only a tangent that is another
            # dual's too (``_tangent_shared``) or cannot hold the new one (expanded,
            # unbatched under a batched write) is replaced, by a copy the dual owns.
            old = target._tangent
            if old is not None and not torch.is_grad_enabled() and tracked_below(old):
                # An in-place op under no_grad changes values, not history (cosine_similarity
                # clamps its norms so): levels below must keep differentiating the tangent
                # as the old one, which a tangent written under no_grad would not let them.
                with torch.enable_grad():
                    target._tangent = old + (tangent - old).detach()
                target._tangent_shared = False
                return target
            if old is not None and not target._tangent_shared:
                try:
                    old.copy_(tangent)
                    return target
                except RuntimeError:
                    root = target if target._root is None else target._root
                    if root._views:
                        # Other duals alias this tangent: rebinding one of them alone would
                        # silently cut the others off, so all are re-derived or none is.
                        if not _promote_root_tangent(root, tangent):
                            raise
                        target._tangent.copy_(tangent)
                        return target
                    if target._value._base is not None:
                        raise  # a view of something no rule told us about: never cut it off
            target._tangent = tangent.clone()
            target._tangent_shared = False
        return target

    return handle


def _promote_root_tangent(root, tangent):
    """Make ``root``'s tangent able to hold ``tangent`` and re-derive its views' tangents.

    The common case: a tensor created inside ``f`` has unbatched zeros as its tangent, and
    ``buf[i] = x`` under ``jacfwd`` writes a tangent batched by the vmap below into a view of
    them. The root's tangent becomes the same zeros batched like ``tangent`` (adding a batched
    exact zero), and every live view takes the same window of it as before.
    """
    old = root._tangent
    if old is None or old._base is not None or not old.is_contiguous() or old.storage_offset():
        return False
    zero = torch.zeros_like(tangent).sum().to(old.dtype)
    new = (old + zero).contiguous()
    if new.shape != old.shape:
        return False
    root._tangent = new
    root._tangent_shared = False
    for view in list(root._views):
        t = view._tangent
        if t is not None and t._base is old:
            view._tangent = new.as_strided(t.size(), t.stride(), t.storage_offset())
            view._tangent_shared = False
    return True


def _tracking_views(handler):
    # NOTE [In-place tangents]: see _promote_root_tangent.
    def handle(interp, func, args, kwargs):
        out = handler(interp, func, args, kwargs)
        base = args[0]
        if isinstance(base, DualTensor) and base._level is interp:
            root = base if base._root is None else base._root
            for view in (out if type(out) in (tuple, list) else (out,)):  # split, unbind
                if type(view) is DualTensor:
                    view._root = root
                    if root._views is None:
                        root._views = weakref.WeakSet()
                    root._views.add(view)
        return out

    return handle


def _is_constant(dual):
    """An adopted dual whose zero tangent nothing has written into (same object, same
    version: a write through a view of it bumps the shared version counter)."""
    adopted = getattr(dual, "_adopted", None)
    return adopted is not None and adopted[0] is dual._tangent and adopted[0]._version == adopted[1]


def _only_constants(level, args, kwargs):
    for a in (*args, *kwargs.values()):
        if isinstance(a, LevelTensor) and a._level is level and not _is_constant(a):
            return False
        if type(a) in (list, tuple) and any(
            isinstance(b, LevelTensor) and b._level is level and not _is_constant(b) for b in a
        ):
            return False
    return True


def _primal(a, level):
    if isinstance(a, LevelTensor) and a._level is level:
        return a._value
    if type(a) in (list, tuple):
        return type(a)(_primal(b, level) for b in a)
    return a


def _inplace_view(functional):
    def handle(interp, func, args, kwargs):
        target = args[0]
        if not (isinstance(target, LevelTensor) and target._level is interp):
            raise CapturedMutationError(captured_mutation_message(func))
        rest = args[1:]
        with lowering(None):
            func(target._value, *rest, **kwargs)
            tangent = functional(target._tangent, *rest, **kwargs)
        # These ops change only metadata; the wrapper's own sizes and strides must follow.
        with no_dispatch():
            func(target, *rest, **kwargs)
        target._tangent = tangent
        return target

    return handle


def _decomposition_handler(decomp):
    def handle(interp, func, args, kwargs):
        # A decomposition may fill a tensor it created (``out = empty(); out.copy_(x)``):
        # such a tensor is not a dual here, so the whole op goes to the fallback instead.
        # Decompositions also decline some inputs by returning NotImplemented.
        try:
            out = decomp(*args, **kwargs)
        except CapturedMutationError:
            return general_jvp(interp, func, args, kwargs)
        if out is NotImplemented:
            return general_jvp(interp, func, args, kwargs)
        return out

    return handle


def _fallback_handler(interp, func, args, kwargs):
    return general_jvp(interp, func, args, kwargs)


_HANDLERS = {}


_INPLACE_TWINS = {aten.copy_.default: aten.copy.default}


def _choose_handler(func):
    rule = JVP_RULES.get(func)
    if rule is not None and not mutated_arg_positions(func):
        handler = _rule_handler(rule)
        if func.is_view:
            handler = _tracking_views(handler)
    elif torch.Tag.inplace_view in func.tags and functional_twin(func) is not None:
        handler = _inplace_view(functional_twin(func))
    elif mutated_arg_positions(func) and (
        func in _INPLACE_TWINS or (functional_twin(func) and len(mutated_arg_positions(func)) == 1)
    ):
        handler = _inplace_via_functional(
            _INPLACE_TWINS.get(func) or twin_call(func, functional_twin(func))
        )
    else:
        decomp = decomposition_for_jvp(func) or decomposition(func)
        handler = _decomposition_handler(decomp) if decomp is not None else _fallback_handler
    _HANDLERS[id(func)] = handler
    return handler


def captured_mutation_message(func):
    return (
        f"During a jvp transform, the function called the in-place operation "
        f"aten::{op_name(func)} that would mutate a captured Tensor: one that is not a dual "
        f"of this jvp level (captured from outside the transform, or created inside it "
        f"without depending on its inputs). Its tangent would be lost. Pass that tensor as an input of the function, "
        f"or use the out-of-place version of the operation."
    )
