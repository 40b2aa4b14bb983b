"""custom_vjp and custom_jvp: functions with their own derivative rules, JAX's decorators.

NOTE [Custom rules travel down the levels]
A call of a decorated function goes to the innermost live level among its arguments' tensors
(as an autograd.Function call does, see autograd_function.py), and each level does what
JAX's corresponding trace does with ``custom_vjp_call``/``custom_jvp_call``:
  * vmap: strips its level and sends the call one level down with *batched rules*: ``fun``,
    ``fwd``, ``bwd`` and the jvp rule, each run under a fresh vmap level (``_Batched``).
    Nobody writes a batching rule; a rule is batched by vmapping it.
  * grad: records one torch autograd node. For custom_vjp its forward runs ``fwd`` one
    level down *as ordinary code* and keeps the residuals; its backward runs ``bwd``, again
    as ordinary code one level down. So lower levels differentiate ``fwd`` and ``bwd``
    themselves: grad(grad(f)) uses bwd's own derivative, jvp(grad(f)) works. For
    custom_jvp the forward sends the call on down (lower levels apply the rule too) and the
    backward is the transpose of the rule in its tangents (a vjp of ``t -> rule(p, t)``:
    the rule is linear in ``t``).
  * jvp: custom_jvp runs the rule one level down, as ordinary code; custom_vjp raises, as
    JAX does (forward mode of a function known only by its vjp is not defined).
When no grad or jvp level is reached by the arguments the rules are irrelevant and ``fun``
runs as ordinary code (vmap then batches it like any code), unless torch autograd records
the call (an argument requires grad, outside every transform): then the same node as a grad
level's is recorded for torch autograd, so ``.backward()`` uses the rules too.
Every handler checks that what came back from one level down holds no wrapper of its own
level or a deeper one: that only happens when the function closes over a tensor of that
level (or is handed one through ``nondiff_argnums``), which JAX refuses as well.
"""
import contextlib
import functools
import inspect

import torch
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from ..batching.interpreter import BatchedTensor, VmapInterpreter
from ..core.wrapper import LevelTensor
from ..reverse.interpreter import GradTensor
from .reverse import vjp

__all__ = ["custom_vjp", "custom_jvp", "live_levels", "strip_wrappers", "checkpoint_rules",
           "ClosureError", "BatchedClosureError"]

_Function = torch.autograd.Function


# ---------------------------------------------------------------------------------------
# Reading wrappers (shared with control_flow.py)


def live_levels(x):
    """The live levels whose wrappers ``x`` carries, outermost wrapper first."""
    levels = []
    while isinstance(x, LevelTensor):
        if x._level.alive:
            levels.append(x._level)
        x = x._value
    return levels


def strip_wrappers(x):
    """The plain tensor under every wrapper of ``x``: all examples of every vmap level, the
    primal of every jvp level."""
    while isinstance(x, LevelTensor):
        x = x._value
    return x


def _strip_dead(x):
    while isinstance(x, LevelTensor) and not x._level.alive:
        x = x._value
    return x


def _innermost(leaves):
    best = None
    for a in leaves:
        if isinstance(a, LevelTensor) and a._level.alive:
            if best is None or a._level.depth > best.depth:
                best = a._level
    return best


def _unwrap(x, level):
    if isinstance(x, LevelTensor) and x._level is level:
        return x._value
    return x


def _is_float(x):
    return isinstance(x, torch.Tensor) and (x.is_floating_point() or x.is_complex())


_DERIVATIVE_KINDS = ("grad", "jvp")


def _reaches_derivative_level(leaves):
    for a in leaves:
        for lvl in live_levels(a):
            if lvl.kind in _DERIVATIVE_KINDS:
                return True
    return False


# ---------------------------------------------------------------------------------------
# Errors


def _closure_message(kind, name):
    what = "VJP" if kind == "vjp" else "JVP"
    return (
        f"Detected differentiation of a custom_{kind.lower()} function with respect to a "
        f"closed-over value. That isn't supported because the custom {what} rule only "
        f"specifies how to differentiate the custom_{kind.lower()} function with respect to "
        f"explicit input parameters. Try passing the closed-over value into the "
        f"custom_{kind.lower()} function ({name}) as an argument, and adapting the rules."
    )


def _batched_closure_message(kind, name):
    return (
        f"custom_{kind}: {name} closes over (or takes through nondiff_argnums) a tensor that "
        f"is batched by an enclosing vmap deeper than its arguments. Pass that tensor to "
        f"{name} as a regular argument, so that its rules are vmapped over it."
    )


class ClosureError(TypeError):
    """A custom rule met a closed-over tensor it cannot see (JAX raises a TypeError too)."""


class BatchedClosureError(RuntimeError):
    pass


def _check_no_deeper(leaves, depth, kind, name):
    """Values one level down from a handler at ``depth`` must carry no wrapper of that level
    or a deeper one: such a wrapper can only come from a closure (see the module NOTE)."""
    for x in leaves:
        for lvl in live_levels(x):
            if lvl.depth >= depth:
                if lvl.kind == "vmap":
                    raise BatchedClosureError(_batched_closure_message(kind, name))
                raise ClosureError(_closure_message(kind, name))


def _check_nondiff(nondiff, kind, name):
    leaves, _ = tree_flatten(nondiff)
    if _reaches_derivative_level(leaves):
        raise TypeError(
            f"Found a tensor being differentiated passed as an argument to a custom_{kind} "
            f"function ({name}) in a position indicated by nondiff_argnums as "
            f"non-differentiable. Tracers cannot be passed as non-differentiable arguments to "
            f"custom_{kind} functions; instead, nondiff_argnums should only be used for "
            f"arguments that can't be or contain tensors being transformed, e.g. "
            f"function-valued arguments. Pass the tensor as a regular argument."
        )


def _describe(x):
    if isinstance(x, torch.Tensor):
        return f"{str(x.dtype).replace('torch.', '')}{list(x.shape)}"
    return type(x).__name__


# ---------------------------------------------------------------------------------------
# The user's function and rules, seen through the flat leaves of its differentiable args


class _UserRules:
    """``fun``/``fwd``/``bwd``/``jvp`` of one call, taking and returning flat leaf lists."""

    def __init__(self, owner, kind, args):
        self.kind = kind
        self.name = owner.__name__
        self.owner = owner
        self.plain_forward_mode = getattr(owner, "plain_forward_mode", False)
        nondiff_argnums = owner.nondiff_argnums
        self.nondiff = tuple(args[i] for i in nondiff_argnums)
        self.positions = tuple(i for i in range(len(args)) if i not in nondiff_argnums)
        self.nargs = len(args)
        diff_args = tuple(args[i] for i in self.positions)
        self.leaves, self.in_spec = tree_flatten(diff_args)
        self.out_spec = None
        self.res_spec = None
        self.leaf_meta = None

    def _full_args(self, diff_args):
        full = [None] * self.nargs
        for i, a in zip(self.owner.nondiff_argnums, self.nondiff):
            full[i] = a
        for i, a in zip(self.positions, diff_args):
            full[i] = a
        return full

    def _args(self, leaves):
        return self._full_args(tree_unflatten(list(leaves), self.in_spec))

    def fun(self, leaves):
        out = self.owner.fun(*self._args(leaves))
        out_leaves, self.out_spec = tree_flatten(out)
        return out_leaves

    # -- custom_vjp --------------------------------------------------------------------

    def fwd(self, leaves):
        self.leaf_meta = [(x.shape, x.dtype) if isinstance(x, torch.Tensor) else None
                          for x in leaves]
        result = self.owner.fwd(*self._args(leaves))
        if not (isinstance(result, (tuple, list)) and len(result) == 2):
            raise TypeError(
                f"Custom VJP fwd rule {_fn_name(self.owner.fwd)} for function {self.name} must "
                f"produce a pair (list or tuple of length two) where the first element "
                f"represents the primal output (equal to the output of the "
                f"custom_vjp-decorated function {self.name}) and the second element represents "
                f"residuals (i.e. values stored from the forward pass for use on the backward "
                f"pass), but instead the fwd rule output's type was {type(result).__name__}."
            )
        out, res = result
        out_leaves, self.out_spec = tree_flatten(out)
        res_leaves, self.res_spec = tree_flatten(res)
        return out_leaves, res_leaves

    def bwd(self, res_leaves, ct_leaves):
        res = tree_unflatten(list(res_leaves), self.res_spec)
        ct = tree_unflatten(list(ct_leaves), self.out_spec)
        cts = self.owner.bwd(*self.nondiff, res, ct)
        arg_specs = [tree_flatten(a)[1] for a in tree_unflatten(list(self.leaves), self.in_spec)]
        if isinstance(cts, list):
            cts = tuple(cts)
        if not isinstance(cts, tuple) or len(cts) != len(arg_specs):
            got = type(cts).__name__ if not isinstance(cts, tuple) else f"a tuple of {len(cts)}"
            raise TypeError(
                f"Custom VJP bwd rule must produce an output with the same container (pytree) "
                f"structure as the args tuple of the primal function, and in particular must "
                f"produce a tuple of length equal to the number of arguments to the primal "
                f"function, but got bwd output structure {got} for primal input structure of "
                f"{len(arg_specs)} differentiable argument(s) (function {self.name})."
            )
        flat = []
        for i, (c, spec) in enumerate(zip(cts, arg_specs)):
            if c is None:
                flat += [None] * spec.num_leaves
                continue
            # None stands for a zero cotangent at any leaf too.
            c_leaves, c_spec = tree_flatten(c, is_leaf=_is_none)
            if c_spec != spec:
                raise TypeError(
                    f"Custom VJP bwd rule of {self.name} must produce an output with the same "
                    f"container (pytree) structure as the args tuple of the primal function, but "
                    f"output {i} has structure {c_spec} for an input of structure {spec}."
                )
            flat += c_leaves
        result = []
        for j, (g, meta) in enumerate(zip(flat, self.leaf_meta)):
            if meta is None or g is None:
                result.append(None)
                continue
            shape, dtype = meta
            if not isinstance(g, torch.Tensor) or g.shape != shape:
                raise ValueError(
                    f"Custom VJP bwd rule must produce an output with the same shape/dtypes as "
                    f"the args tuple of the primal function, but at leaf {j} of the output the "
                    f"bwd rule of {self.name} produced an output of shape/dtype {_describe(g)} "
                    f"corresponding to an input of shape/dtype "
                    f"{str(dtype).replace('torch.', '')}{list(shape)}."
                )
            result.append(g if g.dtype == dtype else g.to(dtype))
        return result

    # -- custom_jvp --------------------------------------------------------------------

    def jvp(self, primal_leaves, tangent_leaves):
        primals = tree_unflatten(list(primal_leaves), self.in_spec)
        tangents = tree_unflatten(list(tangent_leaves), self.in_spec)
        result = self.owner.jvp_rule(*self.nondiff, primals, tangents)
        if not (isinstance(result, (tuple, list)) and len(result) == 2):
            raise TypeError(
                f"Custom JVP rule {_fn_name(self.owner.jvp_rule)} for function {self.name} must "
                f"produce a pair (list or tuple of length two) representing primal and tangent "
                f"outputs, but got {type(result).__name__}."
            )
        out, t_out = result
        out_leaves, out_spec = tree_flatten(out)
        t_leaves, t_spec = tree_flatten(t_out)
        if out_spec != t_spec:
            raise TypeError(
                f"Custom JVP rule {_fn_name(self.owner.jvp_rule)} for function {self.name} must "
                f"produce primal and tangent outputs with equal container (pytree) structures, "
                f"but got {out_spec} and {t_spec} respectively."
            )
        for o, t in zip(out_leaves, t_leaves):
            if isinstance(o, torch.Tensor) and (
                    not isinstance(t, torch.Tensor) or t.shape != o.shape):
                raise ValueError(
                    f"Custom JVP rule {_fn_name(self.owner.jvp_rule)} for function {self.name} "
                    f"must produce primal and tangent outputs with corresponding shapes, but got "
                    f"a primal output {_describe(o)} with a tangent {_describe(t)}."
                )
        self.out_spec = out_spec
        t_leaves = [t.to(o.dtype) if isinstance(t, torch.Tensor) and t.dtype != o.dtype else t
                    for o, t in zip(out_leaves, t_leaves)]
        return out_leaves, t_leaves


def _is_none(x):
    return x is None


def _fn_name(fn):
    return getattr(fn, "__name__", repr(fn))


# ---------------------------------------------------------------------------------------
# Batched rules


def _batch(vl, leaves, dims):
    return [BatchedTensor(x, vl) if d == 0 and isinstance(x, torch.Tensor) else x
            for x, d in zip(leaves, dims)]


def _unbatch(vl, leaves):
    values, dims = [], []
    for x in leaves:
        if isinstance(x, LevelTensor) and x._level is vl:
            values.append(x._value)
            dims.append(0)
        else:
            values.append(x)
            dims.append(None)
    return values, dims


def _expand(x, batch_size):
    return x.unsqueeze(0).expand(batch_size, *x.shape)


def _match(vl, g, want, batch_size):
    """A cotangent computed under ``vl``, brought to its input's layout: summed over the
    batch for an input every example shared, expanded for a batched input."""
    if not isinstance(g, torch.Tensor):
        return g
    value, dim = _unbatch(vl, [g])
    value, dim = value[0], dim[0]
    if dim == want:
        return value
    if want is None:
        return value.sum(0)
    return _expand(value, batch_size)


class _Batched:
    """The rules of ``inner`` vmapped over ``in_dims`` of their leaves: rules in their own
    right, one level down. ``out_dims``/``res_dims`` say which outputs came out batched."""

    def __init__(self, inner, in_dims, level):
        self.inner = inner
        self.kind = inner.kind
        self.name = inner.name
        self.plain_forward_mode = inner.plain_forward_mode
        self.in_dims = in_dims
        self.batch_size = level.batch_size
        self.randomness = level.randomness
        # The rules see the vmap's axis name too (a psum inside bwd reduces over the batch).
        self.axis_name = level.axis.name if getattr(level, "axis", None) is not None else None
        self.out_dims = None
        self.res_dims = None

    def _level(self):
        return VmapInterpreter(self.batch_size, self.randomness, axis_name=self.axis_name)

    def fun(self, leaves):
        with self._level() as vl:
            out = self.inner.fun(_batch(vl, leaves, self.in_dims))
            out, self.out_dims = _unbatch(vl, out)
        return out

    def fwd(self, leaves):
        with self._level() as vl:
            out, res = self.inner.fwd(_batch(vl, leaves, self.in_dims))
            out, self.out_dims = _unbatch(vl, out)
            res, self.res_dims = _unbatch(vl, res)
        return out, res

    def bwd(self, res, cts):
        with self._level() as vl:
            grads = self.inner.bwd(_batch(vl, res, self.res_dims),
                                   _batch(vl, cts, self.out_dims))
            return [_match(vl, g, d, self.batch_size) for g, d in zip(grads, self.in_dims)]

    def jvp(self, primals, tangents):
        with self._level() as vl:
            out, t_out = self.inner.jvp(_batch(vl, primals, self.in_dims),
                                        _batch(vl, tangents, self.in_dims))
            out, out_dims = _unbatch(vl, out)
            t_out, t_dims = _unbatch(vl, t_out)
        # A primal and its tangent leave with the same layout.
        dims = []
        for i, (d, td) in enumerate(zip(out_dims, t_dims)):
            if d != td:
                if d is None and isinstance(out[i], torch.Tensor):
                    out[i] = _expand(out[i], self.batch_size)
                elif td is None and isinstance(t_out[i], torch.Tensor):
                    t_out[i] = _expand(t_out[i], self.batch_size)
                d = 0
            dims.append(d)
        self.out_dims = dims
        return out, t_out


# ---------------------------------------------------------------------------------------
# The call, level by level


def _call(rules, leaves):
    """The primal outputs (flat) of the custom function ``rules`` at the innermost level."""
    level = _innermost(leaves)
    if level is None:
        if _torch_autograd(leaves):
            return _grad_call(None, rules, leaves)
        return rules.fun(leaves)
    if level.kind == "vmap":
        return _vmap_call(level, rules, leaves)
    if level.kind == "grad":
        return _grad_call(level, rules, leaves)
    if level.kind == "jvp":
        return _jvp_call(level, rules, leaves)
    raise RuntimeError(
        f"custom_{rules.kind}: {rules.name} is called under the '{level.kind}' transform with "
        f"a grad or jvp level outside it, which custom rules cannot pass through. Apply "
        f"'{level.kind}' outside the derivative transforms instead (e.g. "
        f"functionalize(grad(f)) rather than grad(functionalize(f)))."
    )


def _vmap_call(level, rules, leaves):
    values, dims = _unbatch(level, leaves)
    batched = _Batched(rules, dims, level)
    with level.lower():
        out = _call(batched, values)
    _check_no_deeper(out, level.depth, rules.kind, rules.name)
    return _batch(level, out, batched.out_dims)


def _jvp_call(level, rules, leaves):
    if rules.kind == "vjp":
        if rules.plain_forward_mode:
            # A checkpointed function is differentiated as the code it is.
            return rules.fun(leaves)
        raise TypeError(
            f"can't apply forward-mode autodiff (jvp) to a custom_vjp function ({rules.name}). "
            f"Use reverse mode (grad, vjp, jacrev) on it, or define it with ft.custom_jvp to "
            f"use jvp, jacfwd or hessian-by-jacfwd."
        )
    primals, tangents = [], []
    for x in leaves:
        if isinstance(x, LevelTensor) and x._level is level:
            primals.append(x._value)
            tangents.append(x._tangent)
        else:
            primals.append(x)
            tangents.append(torch.zeros_like(x) if _is_float(x) else None)
    with level.lower():
        out, t_out = rules.jvp(primals, tangents)
    _check_no_deeper(list(out) + list(t_out), level.depth, rules.kind, rules.name)
    return [level.lift(o, t) if _is_float(o) and t is not None else o
            for o, t in zip(out, t_out)]


class _Pack:
    """What a node needs besides its tensor inputs (handed to apply as one non-tensor
    argument, so that torch autograd sees only the differentiated tensors as inputs).
    ``level`` is the grad level, or None for torch autograd outside every transform."""

    __slots__ = ("level", "rules", "leaves", "positions", "out", "out_positions")

    def __init__(self, level, rules, leaves, positions):
        self.level = level
        self.rules = rules
        self.leaves = leaves
        self.positions = positions
        self.out = None
        self.out_positions = None


def _torch_autograd(leaves):
    """Whether plain torch autograd, outside every transform, records this call."""
    return torch.is_grad_enabled() and any(
        isinstance(x, torch.Tensor) and x.requires_grad for x in leaves)


def _grad_call(level, rules, leaves):
    if level is None:
        positions = [i for i, x in enumerate(leaves)
                     if isinstance(x, torch.Tensor) and x.requires_grad]
    else:
        positions = [i for i, x in enumerate(leaves)
                     if isinstance(x, LevelTensor) and x._level is level]
    pack = _Pack(level, rules, leaves, positions)
    node = _VjpNode if rules.kind == "vjp" else _JvpTransposeNode
    # torch's own apply: ours (autograd_function.py) would route a Function applied to live
    # wrappers to the autograd.Function machinery.
    tensors = super(_Function, node).apply(pack, *[leaves[i] for i in positions])
    out = list(pack.out)
    for j, t in zip(pack.out_positions, tensors):
        out[j] = t
    return out


def _lower(level):
    # torch runs a node's forward with grad mode off; what runs one level down must be
    # recorded there (so outer levels differentiate fwd's residuals and bwd).
    return torch.enable_grad() if level is None else level.lower()


class _GradNode(_Function):
    """The autograd node a grad level (or torch autograd) records for a custom rule."""

    @staticmethod
    def _values(pack):
        return [_unwrap(x, pack.level) for x in pack.leaves]

    @staticmethod
    def _outputs(ctx, pack, out):
        level = pack.level
        pack.out_positions = [j for j, o in enumerate(out) if isinstance(o, torch.Tensor)]
        pack.out = out
        ctx.pack = pack
        if level is None:
            return tuple(out[j].detach() for j in pack.out_positions)
        return tuple(GradTensor(out[j], level) for j in pack.out_positions)

    @staticmethod
    def _cotangents(ctx, cts):
        """One cotangent per output leaf, one level down; zeros for unused or integer
        tensor outputs, so that rules see the output's structure."""
        pack = ctx.pack
        full = [None] * len(pack.out)
        for j, c in zip(pack.out_positions, cts):
            full[j] = _unwrap(c, pack.level) if c is not None else torch.zeros_like(pack.out[j])
        return full

    @staticmethod
    def _grads(ctx, grads):
        pack = ctx.pack
        level = pack.level
        result = [None]
        for i in pack.positions:
            g = grads[i]
            result.append(g if g is None or level is None else GradTensor(g, level))
        return tuple(result)


class _VjpNode(_GradNode):
    """custom_vjp: ``fwd`` and ``bwd`` run one level down as ordinary code."""

    @staticmethod
    def forward(ctx, pack, *tensors):
        rules, level = pack.rules, pack.level
        with _lower(level):
            out, res = rules.fwd(_GradNode._values(pack))
        _check_no_deeper(list(out) + list(res), 0 if level is None else level.depth, "vjp",
                         rules.name)
        ctx.res = res
        return _GradNode._outputs(ctx, pack, out)

    @staticmethod
    def backward(ctx, *cts):
        pack = ctx.pack
        cts = _GradNode._cotangents(ctx, cts)
        with pack.level.lower() if pack.level is not None else contextlib.nullcontext():
            grads = pack.rules.bwd(ctx.res, cts)
        return _GradNode._grads(ctx, grads)


class _JvpTransposeNode(_GradNode):
    """custom_jvp: the primal goes on down (lower levels apply the rule too); backward is
    the transpose of the rule in its tangents."""

    @staticmethod
    def forward(ctx, pack, *tensors):
        rules, level = pack.rules, pack.level
        values = _GradNode._values(pack)
        if level is None:
            out = rules.fun(values)
        else:
            with level.lower():
                out = _call(rules, values)
        _check_no_deeper(out, 0 if level is None else level.depth, "jvp", rules.name)
        ctx.values = values
        return _GradNode._outputs(ctx, pack, out)

    @staticmethod
    def backward(ctx, *cts):
        pack = ctx.pack
        cts = _GradNode._cotangents(ctx, cts)
        with pack.level.lower() if pack.level is not None else contextlib.nullcontext():
            grads = _transpose(pack.rules, ctx.values, pack.out, cts)
        return _GradNode._grads(ctx, grads)


def _transpose(rules, primals, outs, cts):
    """Cotangents of the primals: the vjp of ``t -> rule(primals, t)[1]``, linear in ``t``."""
    diff = [i for i, p in enumerate(primals) if _is_float(p)]
    out_pos = [j for j, o in enumerate(outs) if _is_float(o)]

    def tangent_map(*ts):
        tangents = [None] * len(primals)
        for i, t in zip(diff, ts):
            tangents[i] = t
        _, t_out = rules.jvp(primals, tangents)
        return tuple(t_out[j] for j in out_pos)

    _, pullback = vjp(tangent_map, *[torch.zeros_like(primals[i]) for i in diff])
    flat = pullback(tuple(cts[j] for j in out_pos))
    grads = [None] * len(primals)
    for i, g in zip(diff, flat):
        grads[i] = g
    return grads


# ---------------------------------------------------------------------------------------
# The decorators


class _CustomFunction:
    kind = "?"

    def __init__(self, fun, nondiff_argnums=()):
        functools.update_wrapper(self, fun)
        self.fun = fun
        self.nondiff_argnums = tuple(sorted(set(int(i) for i in nondiff_argnums)))
        self._signature = None

    def _positional(self, args, kwargs):
        if not kwargs:
            return args
        if self._signature is None:
            self._signature = inspect.signature(self.fun)
        bound = self._signature.bind(*args, **kwargs)
        bound.apply_defaults()
        return bound.args

    def _check_rules(self):
        raise NotImplementedError

    def __call__(self, *args, **kwargs):
        self._check_rules()
        args = self._positional(args, kwargs)
        for i in self.nondiff_argnums:
            if i >= len(args):
                raise TypeError(
                    f"custom_{self.kind} {self.__name__}: nondiff_argnums={self.nondiff_argnums} "
                    f"names argument {i}, but the function was called with {len(args)} "
                    f"positional argument(s)."
                )
        rules = _UserRules(self, self.kind, args)
        _check_nondiff(rules.nondiff, self.kind, self.__name__)
        leaves = [_strip_dead(x) for x in rules.leaves]
        if not _reaches_derivative_level(leaves) and not _torch_autograd(
                [strip_wrappers(x) for x in leaves]):
            # Only vmap levels (or none) see the arguments: the rules never run.
            out = self.fun(*args)
            out_leaves, _ = tree_flatten(out)
            for x in out_leaves:
                if any(lvl.kind in _DERIVATIVE_KINDS for lvl in live_levels(x)):
                    raise ClosureError(_closure_message(self.kind, self.__name__))
            return out
        out = _call(rules, leaves)
        return tree_unflatten(out, rules.out_spec)

    def __get__(self, obj, objtype=None):
        if obj is None:
            return self
        return functools.partial(self, obj)


class custom_vjp(_CustomFunction):
    """A function with a custom reverse-mode rule, with JAX's ``jax.custom_vjp`` semantics.

    >>> @custom_vjp
    ... def clip_gradient(x):
    ...     return x
    >>> def fwd(x):
    ...     return x, None
    >>> def bwd(res, g):
    ...     return (g.clamp(-1, 1),)
    >>> clip_gradient.defvjp(fwd, bwd)

    ``fwd(*args)`` returns ``(output, residuals)``; ``bwd(*nondiff_args, residuals, g)``
    returns one cotangent per differentiable argument (``None`` for zero). Under vmap the
    rules are vmapped; under grad/vjp/jacrev ``fwd`` and ``bwd`` are used, and outer levels
    differentiate them as ordinary code (grad of grad uses bwd's own derivative). Forward
    mode (jvp, jacfwd) of a custom_vjp function raises, as in JAX; differentiating it with
    respect to a closed-over tensor raises too.
    """

    kind = "vjp"

    def __init__(self, fun, nondiff_argnums=()):
        super().__init__(fun, nondiff_argnums)
        self.fwd = None
        self.bwd = None

    def defvjp(self, fwd, bwd, symbolic_zeros=False):
        if symbolic_zeros:
            raise NotImplementedError("custom_vjp.defvjp: symbolic_zeros=True is not supported.")
        self.fwd = fwd
        self.bwd = bwd

    def _check_rules(self):
        if self.fwd is None:
            raise AttributeError(
                f"No VJP defined for custom_vjp function {self.__name__} using defvjp."
            )


class custom_jvp(_CustomFunction):
    """A function with a custom forward-mode rule, with JAX's ``jax.custom_jvp`` semantics.

    >>> @custom_jvp
    ... def softplus(x):
    ...     return torch.log1p(torch.exp(x))
    >>> @softplus.defjvp
    ... def softplus_jvp(primals, tangents):
    ...     (x,), (t,) = primals, tangents
    ...     return softplus(x), torch.sigmoid(x) * t

    The rule ``jvp(*nondiff_args, primals, tangents)`` returns ``(output, tangent_out)``
    and must be linear in ``tangents``: reverse mode (grad, vjp, jacrev) transposes it.
    Under vmap the rule is vmapped; outer levels differentiate it as ordinary code.
    """

    kind = "jvp"

    def __init__(self, fun, nondiff_argnums=()):
        super().__init__(fun, nondiff_argnums)
        self.jvp_rule = None

    def defjvp(self, jvp, symbolic_zeros=False):
        if symbolic_zeros:
            raise NotImplementedError("custom_jvp.defjvp: symbolic_zeros=True is not supported.")
        self.jvp_rule = jvp
        return jvp

    def defjvps(self, *jvps):
        """One rule per differentiable argument, ``jvp_i(t_i, primal_out, *primals)`` (or
        None for an argument with no tangent contribution), summed, as JAX's ``defjvps``."""
        if self.nondiff_argnums:
            raise TypeError("Can't use ``defjvps`` with ``nondiff_argnums``.")

        def rule(primals, tangents):
            out = self.fun(*primals)
            total = None
            for jvp, t in zip(jvps, tangents):
                if jvp is None or t is None:
                    continue
                contribution = jvp(t, out, *primals)
                total = contribution if total is None else tree_map(torch.add, total,
                                                                     contribution)
            if total is None:
                total = tree_map(torch.zeros_like, out)
            return out, total
        self.defjvp(rule)

    def _check_rules(self):
        if self.jvp_rule is None:
            raise AttributeError(
                f"No JVP defined for custom_jvp function {self.__name__} using defjvp."
            )


# ---------------------------------------------------------------------------------------
# Checkpointing (scan(checkpoint=True)): a custom_vjp whose bwd recomputes its forward


def checkpoint_rules(f, name):
    """``f`` as a custom_vjp that keeps only its inputs for reverse mode and recomputes
    the rest in backward."""
    def fwd(*args):
        return f(*args), args

    def bwd(res, ct):
        leaves, spec = tree_flatten(res)
        diff = [i for i, x in enumerate(leaves) if _is_float(x)]
        out_floats = []

        def of_floats(*xs):
            full = list(leaves)
            for i, x in zip(diff, xs):
                full[i] = x
            out_leaves, _ = tree_flatten(f(*tree_unflatten(full, spec)))
            out_floats[:] = [j for j, o in enumerate(out_leaves) if _is_float(o)]
            return tuple(out_leaves[j] for j in out_floats)

        _, pullback = vjp(of_floats, *[leaves[i] for i in diff])
        ct_leaves, _ = tree_flatten(ct)
        grads = pullback(tuple(ct_leaves[j] for j in out_floats))
        flat = [None] * len(leaves)
        for i, g in zip(diff, grads):
            flat[i] = g
        return tuple(tree_unflatten(flat, spec))

    fun = custom_vjp(f)
    fun.__name__ = name
    fun.plain_forward_mode = True
    fun.defvjp(fwd, bwd)
    return fun
