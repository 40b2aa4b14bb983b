"""cond, while_loop, fori_loop and scan: JAX's structured control flow, run eagerly.

NOTE [Control flow on batched values]
Outside vmap these are Python control flow: one branch runs, the loop runs its trip count,
and every level differentiates whatever ran. Only a predicate that differs between examples
needs more, and it is recognised by its wrappers: a predicate that carries a live vmap
level's BatchedTensor (at any depth) is *batched*.
  * cond runs both branches and picks per example with ``torch.where`` on the outputs. The
    select is an ordinary op, so every level (grad, jvp, outer vmaps) handles it with its
    own rule; the per-example loop is never involved.
  * while_loop runs while *any* example's condition holds (the predicate's plain value,
    under every wrapper, holds every example of every vmap level); each step computes the
    body for all examples and keeps the old state where the condition was already false.
An unbatched predicate is read as a Python bool (through every wrapper: it is the primal).
Under ``ft.capture`` that read is a data-dependent value, so such calls run eagerly there;
``scan``, ``fori_loop`` with static bounds and ``cond`` with a batched predicate record.
"""
import warnings

import torch
from torch.utils._pytree import keystr, tree_flatten, tree_flatten_with_path, tree_unflatten

from .custom_derivatives import (
    BatchedClosureError,
    ClosureError,
    checkpoint_rules,
    live_levels,
    strip_wrappers,
)

__all__ = ["cond", "while_loop", "fori_loop", "scan"]


def _batched(x):
    return any(lvl.kind == "vmap" for lvl in live_levels(x))


def _reverse_level(leaves):
    for x in leaves:
        for lvl in live_levels(x):
            if lvl.kind == "grad":
                return lvl
    return None


def _type_str(x):
    if isinstance(x, torch.Tensor):
        return f"{str(x.dtype).replace('torch.', '')}{list(x.shape)}"
    return type(x).__name__


def _check_same_types(a, b, what, first, second):
    """Raise naming the first leaf where pytrees ``a`` and ``b`` differ in structure,
    shape or dtype."""
    a_leaves, _ = tree_flatten_with_path(a)
    a_spec = tree_flatten(a)[1]
    b_leaves, b_spec = tree_flatten(b)
    if a_spec != b_spec:
        raise TypeError(
            f"{what}: {first} and {second} must have identical types, but their structures "
            f"differ: {a_spec} and {b_spec}."
        )
    for (path, x), y in zip(a_leaves, b_leaves):
        tx, ty = isinstance(x, torch.Tensor), isinstance(y, torch.Tensor)
        if tx != ty and _python_scalar_vs_0d(x, y):
            continue  # 0.0 as an initial carry is a scalar, as JAX's weak types allow
        if tx != ty or (tx and (x.shape != y.shape or x.dtype != y.dtype)):
            raise TypeError(
                f"{what}: {first} and {second} must have identical types, but at leaf "
                f"'{keystr(path) or '<output>'}' {first} is {_type_str(x)} and {second} is "
                f"{_type_str(y)}."
            )


def _python_scalar_vs_0d(x, y):
    number = (bool, int, float)
    return ((isinstance(x, number) and isinstance(y, torch.Tensor) and y.dim() == 0)
            or (isinstance(y, number) and isinstance(x, torch.Tensor) and x.dim() == 0))


def _check_pred(pred, what, name):
    if isinstance(pred, torch.Tensor):
        if pred.dim() != 0:
            raise TypeError(
                f"{what}: {name} must be a scalar (a 0-dim tensor per example), got a tensor of "
                f"shape {tuple(pred.shape)}. Reduce it (e.g. .any() or .all()) first."
            )
        if pred.is_complex():
            raise TypeError(
                f"{what}: {name} type must be either boolean or number, got {pred.dtype}."
            )
        return pred if pred.dtype == torch.bool else pred != 0
    if not isinstance(pred, (bool, int, float)):
        raise TypeError(
            f"{what}: {name} must be a bool or a 0-dim tensor, got {type(pred).__name__}."
        )
    return pred


def _concrete(pred):
    """A Python bool from an unbatched predicate (its primal, under every wrapper)."""
    if isinstance(pred, torch.Tensor):
        return bool(strip_wrappers(pred))
    return bool(pred)


def _select(pred, on_true, on_false):
    if isinstance(on_true, torch.Tensor) or isinstance(on_false, torch.Tensor):
        return torch.where(pred, on_true, on_false)
    if on_true == on_false:
        return on_true
    return torch.where(pred, torch.as_tensor(on_true), torch.as_tensor(on_false))


def _select_tree(pred, on_true, on_false):
    t_leaves, spec = tree_flatten(on_true)
    f_leaves, _ = tree_flatten(on_false)
    return tree_unflatten([_select(pred, t, f) for t, f in zip(t_leaves, f_leaves)], spec)


def _only_where(pred, operands, taken):
    """The operands as a branch sees them: detached for the examples that do not take it.

    Each branch also runs on the other branch's examples, where it may be undefined
    (``sqrt`` of a negative). Its output there is dropped by the select, but in reverse mode
    the zero cotangent still meets the branch's local derivative (``0 * inf = nan``), and
    that NaN would reach the operands' gradients. Detaching those examples' operands drops
    it at the operand boundary instead (``where``'s backward selects, never multiplies).
    """
    leaves, spec = tree_flatten(operands)
    guarded = []
    for x in leaves:
        if _is_float(x):
            x = torch.where(pred, x, x.detach()) if taken else torch.where(pred, x.detach(), x)
        guarded.append(x)
    return tree_unflatten(guarded, spec)


def _is_float(x):
    return isinstance(x, torch.Tensor) and (x.is_floating_point() or x.is_complex())


def cond(pred, true_fun, false_fun, *operands):
    """``true_fun(*operands)`` if ``pred`` else ``false_fun(*operands)``, as ``jax.lax.cond``.

    ``pred`` is a Python bool or a 0-dim tensor. Under ``vmap`` a predicate that differs
    between examples runs *both* branches and selects each example's result with
    ``torch.where``; the branches' outputs must then agree in structure, shape and dtype
    (an error names the first leaf that differs). Gradients flow through the selected
    branch only, and a branch undefined on the other branch's examples (``sqrt`` of a
    negative) does not turn the operands' gradients into NaN; tensors a branch reads through
    a closure rather than ``operands`` get no such guard (as ``torch.where`` in JAX or torch).
    Otherwise only the chosen branch runs.

    >>> x = torch.tensor([-1.0, 2.0])
    >>> vmap(lambda x: cond(x > 0, torch.sin, torch.cos, x))(x)   # per-example branch
    """
    if not (callable(true_fun) and callable(false_fun)):
        raise TypeError("cond: true_fun and false_fun arguments should be callable.")
    pred = _check_pred(pred, "cond", "pred")
    if isinstance(pred, torch.Tensor) and _batched(pred):
        on_true = true_fun(*_only_where(pred, operands, True))
        on_false = false_fun(*_only_where(pred, operands, False))
        _check_same_types(on_true, on_false, "cond", "true_fun output", "false_fun output")
        return _select_tree(pred, on_true, on_false)
    return true_fun(*operands) if _concrete(pred) else false_fun(*operands)


def _no_reverse_mode(leaves, what):
    if _reverse_level(leaves) is not None:
        raise ValueError(
            f"Reverse-mode differentiation does not work for lax.while_loop or lax.fori_loop "
            f"with dynamic start/stop values. Try using lax.scan, or using fori_loop with "
            f"static start/stop. ({what}: the loop carries a value being differentiated by "
            f"grad/vjp/jacrev/hessian; use ft.scan or ft.fori_loop with Python-int or "
            f"unbatched bounds, or forward mode: jvp, jacfwd.)"
        )


def while_loop(cond_fun, body_fun, init_val):
    """``while cond_fun(val): val = body_fun(val)``, as ``jax.lax.while_loop``.

    ``body_fun`` must return a value of the same structure, shapes and dtypes as
    ``init_val``. Under ``vmap`` with a condition that differs between examples, the loop
    runs while any example's condition holds, and an example whose condition is false keeps
    its state (the body still runs on it; its result is discarded). Forward mode (jvp,
    jacfwd) works. Reverse mode (grad, vjp, jacrev) raises, as in JAX: the trip count is
    not known in advance. Use ``fori_loop`` with static bounds or ``scan`` instead.
    """
    if not (callable(cond_fun) and callable(body_fun)):
        raise TypeError("while_loop: cond_fun and body_fun arguments should be callable.")
    val = init_val
    _no_reverse_mode(tree_flatten(val)[0], "while_loop")
    while True:
        pred = _check_pred(cond_fun(val), "while_loop", "cond_fun output")
        batched = isinstance(pred, torch.Tensor) and _batched(pred)
        if batched:
            if not bool(strip_wrappers(pred).any()):
                return val
        elif not _concrete(pred):
            return val
        new = body_fun(val)
        _check_same_types(val, new, "while_loop", "body_fun input", "body_fun output")
        _no_reverse_mode(tree_flatten(new)[0], "while_loop")
        val = _select_tree(pred, new, val) if batched else new


def _static_bound(x, name):
    if isinstance(x, bool) or (isinstance(x, torch.Tensor) and x.dtype == torch.bool):
        raise TypeError(f"fori_loop: {name} must be an integer, got a bool.")
    if isinstance(x, int):
        return x
    if isinstance(x, torch.Tensor):
        if x.is_floating_point() or x.is_complex() or x.dim() != 0:
            raise TypeError(
                f"fori_loop: {name} must be an integer scalar, got a tensor "
                f"{_type_str(x)}."
            )
        return None if _batched(x) else int(strip_wrappers(x))
    raise TypeError(f"fori_loop: {name} must be an int or an integer tensor, got "
                    f"{type(x).__name__}.")


def fori_loop(lower, upper, body_fun, init_val):
    """``for i in range(lower, upper): val = body_fun(i, val)``, as ``jax.lax.fori_loop``.

    With Python-int bounds (or tensors every example shares) the trip count is static:
    ``i`` is a Python int and the loop is differentiable in both modes, like a ``scan``.
    Bounds that differ between examples under ``vmap`` make it a ``while_loop`` (``i`` is
    then an integer tensor), which forward mode differentiates and reverse mode refuses.
    """
    lo, hi = _static_bound(lower, "lower"), _static_bound(upper, "upper")
    if lo is not None and hi is not None:
        val = init_val
        for i in range(lo, hi):
            new = body_fun(i, val)
            _check_same_types(val, new, "fori_loop", "body_fun input", "body_fun output")
            val = new
        return val
    dtype = next(b.dtype for b in (lower, upper) if isinstance(b, torch.Tensor))
    start = lower if isinstance(lower, torch.Tensor) else torch.tensor(lower, dtype=dtype)

    def body(state):
        i, val = state
        return i + 1, body_fun(i, val)

    return while_loop(lambda state: state[0] < upper, body, (start, init_val))[1]


_CLOSURE_WARNING = (
    "scan(checkpoint=True): the body {name} reads a tensor being transformed (differentiated, "
    "or batched by a vmap inside the scan's transforms) through a closure, which a "
    "checkpointed step cannot see; the scan runs without checkpointing. Pass that tensor in "
    "the carry (or xs) to checkpoint the body."
)


def scan(f, init, xs=None, length=None, reverse=False, unroll=1, *, checkpoint=False):
    """Loop ``carry, y = f(carry, x)`` over the leading axis of ``xs``, as ``jax.lax.scan``.

    Returns ``(final_carry, ys)`` with ``ys`` the stacked ``y``s (a pytree like ``y``).
    ``xs`` is a pytree of tensors sharing their leading size, or ``None`` with ``length``
    given; ``reverse=True`` runs from the last element to the first (``ys`` stays in the
    order of ``xs``). ``unroll`` is accepted for JAX compatibility (the loop runs eagerly).

    Every transform differentiates through it. Memory: reverse mode (grad, vjp, jacrev)
    keeps every step's intermediates until the backward pass, so it grows linearly with
    ``length`` times the body's intermediates. ``checkpoint=True`` keeps only each step's
    inputs (carry and x) and recomputes the body during the backward pass (about one
    extra forward per step). A checkpointed body must receive the tensors being
    differentiated through ``carry`` or ``xs``: a body that reads one through a closure runs
    without checkpointing, with a warning.
    """
    if not callable(f):
        raise TypeError("scan: f argument should be callable.")
    xs_leaves, xs_spec = tree_flatten(xs)
    # None stands for an empty subtree, as in JAX (torch's pytree counts it as a leaf).
    scanned = [x for x in xs_leaves if x is not None]
    for x in scanned:
        if not isinstance(x, torch.Tensor) or x.dim() == 0:
            raise ValueError(
                f"scan: every leaf of xs must be a tensor with a leading axis to scan over, got "
                f"{_type_str(x)}."
            )
    lengths = {x.shape[0] for x in scanned}
    if len(lengths) > 1:
        raise ValueError(
            f"scan got values with different leading axis sizes: "
            f"{', '.join(str(x.shape[0]) for x in scanned)}."
        )
    if length is not None:
        length = int(length)
        if lengths and lengths != {length}:
            raise ValueError(
                f"scan got `length` argument of {length} which disagrees with leading axis "
                f"sizes {sorted(lengths)}."
            )
    elif lengths:
        length = lengths.pop()
    else:
        raise ValueError("scan got no values to scan over and `length` not provided.")
    name = getattr(f, "__name__", "scan_body")
    body = [checkpoint_rules(f, name) if checkpoint else f]
    slices = [None if x is None else x.unbind(0) for x in xs_leaves]

    def step(carry, i):
        x = tree_unflatten([None if s is None else s[i] for s in slices], xs_spec)
        try:
            result = body[0](carry, x)
        except (ClosureError, BatchedClosureError):
            if body[0] is f:
                raise
            # The checkpointed step could not see a tensor the body reads through a
            # closure: the rest of the scan runs plain, which is right, only not lighter.
            warnings.warn(_CLOSURE_WARNING.format(name=name), stacklevel=3)
            body[0] = f
            result = f(carry, x)
        if not (isinstance(result, (tuple, list)) and len(result) == 2):
            raise TypeError(
                f"scan: f must return a pair (carry, y), got {type(result).__name__}."
            )
        new, y = result
        _check_same_types(carry, new, "scan", "carry input", "carry output")
        return new, y

    carry = init
    if length == 0:
        # As JAX, whose trace of f gives ys their shapes: run f once and keep none of it.
        zeros = tree_unflatten([None if x is None else x.new_zeros(x.shape[1:])
                                for x in xs_leaves], xs_spec)
        _, y = f(init, zeros)
        y_leaves, y_spec = tree_flatten(y)
        return init, tree_unflatten([None if v is None else torch.as_tensor(v).unsqueeze(0)[:0]
                                     for v in y_leaves], y_spec)
    ys = [None] * length
    for i in (range(length - 1, -1, -1) if reverse else range(length)):
        carry, ys[i] = step(carry, i)
    y_leaves = [tree_flatten(y) for y in ys]
    y_spec = y_leaves[0][1]
    for leaves, spec in y_leaves:
        if spec != y_spec:
            raise TypeError(
                f"scan: f must return y of the same structure at every step, got {y_spec} and "
                f"{spec}."
            )
    columns = zip(*(leaves for leaves, _ in y_leaves))
    stacked = [None if col[0] is None else
               torch.stack([v if isinstance(v, torch.Tensor) else torch.as_tensor(v) for v in col])
               for col in columns]
    return carry, tree_unflatten(stacked, y_spec)
