"""The wrapper tensor base class and the single ``__torch_dispatch__`` entry point.

NOTE [How one op travels]
Take ``vmap(grad(f))(x)`` and an op ``sin`` inside ``f``. The argument is a GradTensor
(level 2) whose value is a BatchedTensor (level 1) whose value is a plain tensor.
  1. Torch autograd records ``sin`` on the GradTensor itself: this *is* level 2's
     reverse-mode tape (see reverse/interpreter.py).
  2. ``LevelTensor.__torch_dispatch__`` finds the innermost level among the arguments
     (level 2) and hands the op to its interpreter.
  3. The grad interpreter unwraps level-2 wrappers and calls ``sin`` on the
     BatchedTensor under ``lowering`` (autograd keys back on, grad mode restored).
  4. That call dispatches again: now the innermost level is 1, the vmap interpreter
     looks up the batching rule for ``aten.sin`` and runs it on the plain value.
  5. Results are re-wrapped on the way back up: plain -> BatchedTensor -> GradTensor.
Tensors of lower levels (or plain tensors) met at a higher level are *lifted*: the higher
level treats them as constants and passes them down untouched. That is what keeps two
levels from confusing each other's perturbations.
"""
import torch
from torch.utils._pytree import tree_map

from .levels import lowering
from .ops import functional_twin, twin_call


class LevelTensor(torch.Tensor):
    """A tensor owned by one transform level; ``_value`` is the tensor one level down."""

    __torch_function__ = torch._C._disabled_torch_function_impl
    # Set by wrapper kinds whose value cannot stand for them once their level is gone.
    _escaped_message = None

    @staticmethod
    def _make(cls, value, level, shape, strides, requires_grad=False):
        """A wrapper of ``cls`` around ``value`` with the given (logical) shape and strides.

        Most values are contiguous, and letting torch derive contiguous strides is the
        cheaper call; that matters because every op of every level allocates wrappers.
        """
        if value.layout is not torch.strided:
            self = torch.Tensor._make_wrapper_subclass(
                cls, shape, dtype=value.dtype, device=value.device, layout=value.layout,
                requires_grad=requires_grad,
            )
        elif value.is_contiguous():
            self = torch.Tensor._make_wrapper_subclass(
                cls, shape, dtype=value.dtype, device=value.device, requires_grad=requires_grad
            )
        else:
            self = torch.Tensor._make_wrapper_subclass(
                cls, shape, strides, dtype=value.dtype, device=value.device,
                requires_grad=requires_grad,
            )
        self._value = value
        self._level = level
        # Lazy conjugation/negation are flags on the tensor, read by composite ops (fft, eig
        # backward) before they reach us: the wrapper must carry its value's flags. Only
        # complex values carry them.
        if value.is_complex():
            if value.is_conj():
                torch._C._set_conj(self, True)
            if value.is_neg():
                torch._C._set_neg(self, True)
        return self

    def example_layout(self):
        """How this wrapper addresses memory with as_strided: ``memory_layout`` of what it
        stands for. Wrappers of the same shape as their value read it as the value does."""
        return memory_layout(self._value)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        level = innermost_level(args, kwargs)
        if not level.alive:
            return run_without_dead_wrappers(func, args, kwargs)
        return level.process(func, args, kwargs if kwargs is not None else {})

    def __repr__(self, *, tensor_contents=None):
        return f"{type(self).__name__}(lvl={self._level.depth + 1}, value={self._value!r})"

    def tolist(self):
        # torch refuses .tolist() on every subclass before dispatch; outside vmap (which
        # overrides this) the values are the wrapper's own, as under torch.func.
        return self._value.tolist()

    # Inside a transform the wrappers are the transform's own bookkeeping: torch autograd on
    # them is the grad levels' tape, so a user's .backward()/.grad would silently read or
    # corrupt it. Wrappers of finished transforms behave as plain tensors again.
    def backward(self, *args, **kwargs):
        if self._level.alive:
            raise RuntimeError(_AUTOGRAD_INSIDE_MESSAGE.format(what=".backward()"))
        return super().backward(*args, **kwargs)

    def requires_grad_(self, requires_grad=True):
        if requires_grad and self._level.alive:
            raise RuntimeError(_REQUIRES_GRAD_INSIDE_MESSAGE)
        return super().requires_grad_(requires_grad)

    def retain_grad(self):
        if self._level.alive:
            raise RuntimeError(_AUTOGRAD_INSIDE_MESSAGE.format(what="Tensor.retain_grad()"))
        return super().retain_grad()

    @property
    def grad(self):
        if self._level.alive:
            raise RuntimeError(_AUTOGRAD_INSIDE_MESSAGE.format(what=".grad"))
        return torch._C.TensorBase.grad.__get__(self)

    @grad.setter
    def grad(self, value):
        if self._level.alive:
            raise RuntimeError(_AUTOGRAD_INSIDE_MESSAGE.format(what=".grad"))
        torch._C.TensorBase.grad.__set__(self, value)


_AUTOGRAD_INSIDE_MESSAGE = (
    "{what} was used on a tensor inside a functransforms transform (grad, vjp, vmap, jvp, "
    "...). Inside a transform, gradients are return values: use ft.grad or ft.vjp on the "
    "function instead, or call {what} outside the transform."
)


# torch.autograd.functional.* calls requires_grad_ on (detached copies of) its inputs, so a
# call of it inside a transform ends here too.
_REQUIRES_GRAD_INSIDE_MESSAGE = (
    "Tensor.requires_grad_() was called (perhaps by torch.autograd.functional.* APIs) on a "
    "tensor inside a functransforms transform (grad, vjp, vmap, jvp, ...). Inside a "
    "transform, use the transforms themselves (ft.grad, ft.vjp, ft.jacrev, ft.jacfwd, "
    "ft.hessian) instead, or call requires_grad_() outside the transformed function."
)


def memory_layout(t):
    """(strides, storage offset, storage elements it may address) of the memory ``t`` reads
    through as_strided, or None when that is not plain strided memory."""
    if type(t) is torch.Tensor:
        if t.layout is not torch.strided:
            return None
        return t.stride(), t.storage_offset(), t.untyped_storage().nbytes() // t.element_size()
    if isinstance(t, LevelTensor):
        return t.example_layout()
    return None


def innermost_level(args, kwargs):
    """The deepest live level among the op's arguments (a dead level wins outright, so its
    wrappers get stripped first). Kept flat and allocation-free: every op runs it."""
    best = None
    depth = -2
    for a in args:
        if isinstance(a, LevelTensor):
            lvl = a._level
            if lvl.depth > depth or not lvl.alive:
                best, depth = lvl, (lvl.depth if lvl.alive else 1 << 30)
        elif type(a) in (list, tuple):
            for b in a:
                if isinstance(b, LevelTensor):
                    lvl = b._level
                    if lvl.depth > depth or not lvl.alive:
                        best, depth = lvl, (lvl.depth if lvl.alive else 1 << 30)
    if kwargs:
        for a in kwargs.values():
            if isinstance(a, LevelTensor):
                lvl = a._level
                if lvl.depth > depth or not lvl.alive:
                    best, depth = lvl, (lvl.depth if lvl.alive else 1 << 30)
    return best


def call_below(func, values, kwargs):
    """Run ``func`` one level down when no dispatch key needs restoring (no ``lowering``).

    Calling the op would only come back through the Python key to the level below;
    handing the op to that level directly skips the round trip through the dispatcher,
    which is the costliest part of a cheap op at a second level.
    """
    level = innermost_level(values, kwargs)
    if level is None:
        return func._op(*values, **kwargs)
    if not level.alive:
        return run_without_dead_wrappers(func, values, kwargs)
    return level.process(func, values, kwargs)


def _strip_dead(x):
    while isinstance(x, LevelTensor) and not x._level.alive:
        if x._escaped_message is not None:
            raise RuntimeError(x._escaped_message)
        x = x._value
    return x


def run_without_dead_wrappers(func, args, kwargs):
    # A wrapper outlived its transform (kept in a graph or a global). It stands for its
    # value from now on, unless that value is not what the wrapper showed (a batch of
    # examples behind one example's shape): such wrappers carry a message instead.
    args = tree_map(_strip_dead, args)
    kwargs = tree_map(_strip_dead, kwargs or {})
    with lowering(None):
        return func(*args, **kwargs)


# Per-op caches are keyed by id(func): OpOverloads live for the whole process, and their
# __hash__ is a Python method that would otherwise run several times on every op.
_aliasing_cache = {}


def aliasing_op(func):
    """Whether ``func`` returns a view of, or writes to, one of its arguments.

    Such ops always run under ``lowering``, even when nothing below is tracked yet: the
    ADInplaceOrView key records view relationships and bumps version counters, and a later
    in-place write of a tracked value into the view must find its base (``buf[0] = x``).
    """
    aliasing = _aliasing_cache.get(id(func))
    if aliasing is None:
        aliasing = _aliasing_cache[id(func)] = func.is_view or bool(mutated_arg_positions(func))
    return aliasing


def needs_lowering(t):
    """Whether an op on ``t`` one level down must run under ``lowering``: some autograd
    below tracks it, or it is complex or a zero tensor (lazy conj/neg/zero handling)."""
    if t.requires_grad or t.is_complex() or t._is_zerotensor():
        return True
    return isinstance(t, LevelTensor) and tracked_below(t._value)


def new_wrapper(cls, value, level, shape):
    """The hot-path constructor: a contiguous, strided, real value (nearly every op's
    result). Anything else goes through ``LevelTensor._make``."""
    self = torch.Tensor._make_wrapper_subclass(cls, shape, dtype=value.dtype, device=value.device)
    self._value = value
    self._level = level
    return self


def is_plain_layout(value):
    return value.layout is torch.strided and value.is_contiguous() and not value.is_complex()


def tracked_below(t):
    """Whether some autograd below records ops on ``t``: its own flag or any value inside.

    A vmap wrapper never requires grad itself, yet its value may be a grad level's leaf
    (grad(vmap(grad(f)))); looking only one level down would skip the lowering there.
    """
    while not t.requires_grad:
        if not isinstance(t, LevelTensor):
            return False
        t = t._value
    return True


def differentiated_below(t):
    """Whether some level below ``t``'s own (a grad level or torch autograd recording it, a
    jvp level carrying a tangent for it) differentiates what is computed from ``t``."""
    while isinstance(t, LevelTensor):
        t = t._value
        if t.requires_grad or (isinstance(t, LevelTensor) and t._level.kind == "jvp"):
            return True
    return False


def wrap_output(out, wrap):
    """Apply ``wrap`` to every tensor of an op's return value (tensor, tuple or list)."""
    if isinstance(out, torch.Tensor):
        return wrap(out)
    if type(out) in (tuple, list):
        return type(out)(wrap(o) if isinstance(o, torch.Tensor) else o for o in out)
    return out


_mutation_cache = {}


def mutated_arg_positions(func):
    """Positions of the positional args an op writes to (in-place and out= ops)."""
    positions = _mutation_cache.get(id(func))
    if positions is None:
        positions = tuple(
            i
            for i, arg in enumerate(func._schema.arguments)
            if arg.alias_info is not None and arg.alias_info.is_write and not arg.kwarg_only
        )
        _mutation_cache[id(func)] = positions
    return positions


_out_names_cache = {}


def out_arg_names(func):
    """Names of the keyword-only args an out= op writes to."""
    names = _out_names_cache.get(id(func))
    if names is None:
        names = _out_names_cache[id(func)] = tuple(
            a.name for a in func._schema.arguments
            if a.kwarg_only and a.alias_info is not None and a.alias_info.is_write
        )
    return names


_returned_cache = {}


def returned_arg_positions(func):
    """For each return of a mutating op, the position of the argument it hands back (or None).

    Only those arguments must belong to the level handling the op. Other written arguments
    are side buffers (batch norm's running stats, rrelu's noise) that the op's rule deals
    with; the op's real outputs are fresh tensors.
    """
    returned = _returned_cache.get(id(func))
    if returned is None:
        written = {}
        for i, arg in enumerate(func._schema.arguments):
            info = arg.alias_info
            if info is not None and info.is_write and not arg.kwarg_only:
                written.update((alias, i) for alias in info.before_set)
        returned = _returned_cache[id(func)] = tuple(
            next((written[a] for a in r.alias_info.before_set if a in written), None)
            if r.alias_info is not None and r.alias_info.is_write
            else None
            for r in func._schema.returns
        )
    return returned


def rebind_instead_of_writing(level, func, args, kwargs):
    """NOTE [Writes a wrapper's value cannot hold]
    An in-place op at ``level`` writes into ``args[i]``, one of this level's wrappers, by
    writing into its value one level down. A derivative formula may build a temporary from
    constants only (layer norm's double backward: ``t = N * ct``) and then write into it a
    value that a lower level carries (``t.sub_(y)``, ``y`` holding an outer jvp's tangent or
    an outer vmap's batch dim). The temporary's value has no wrapper of that lower level, so
    the level below would refuse the write (torch.func wraps every tensor at every level and
    never meets this). The level owning the wrapper can serve it instead: compute the op out
    of place and point the wrapper at the result. That is only right when nothing else sees
    the old value, so the value must own its storage outright (not a view, no views of it).

    Returns the rebound wrapper, or None when the write should go ahead as usual.
    """
    returned = returned_arg_positions(func)
    if len(returned) != 1 or returned[0] is None:
        return None
    i = returned[0]
    target = args[i]
    if not (isinstance(target, LevelTensor) and target._level is level):
        return None
    have = []
    base = target._value
    while isinstance(base, LevelTensor):
        have.append(base._level)
        base = base._value
    if not _writes_unheld_level(have, level, args, kwargs, i):
        return None
    if type(base) is not torch.Tensor or base._base is not None or base.layout is not torch.strided:
        return None
    # One reference is the temporary storage object asked for here, one the value itself.
    if torch._C._storage_Use_Count(base.untyped_storage()._cdata) > 2:
        return None
    twin = functional_twin(func)
    if twin is None:
        return None
    result = twin_call(func, twin)(*args, **kwargs)
    if result.dtype != target.dtype:
        result = result.to(target.dtype)
    level.rebind(target, result)
    return target


def _writes_unheld_level(have, level, args, kwargs, target_position):
    for j, a in enumerate((*args, *kwargs.values())):
        if j == target_position:
            continue
        for b in (a if type(a) in (list, tuple) else (a,)):
            if not isinstance(b, LevelTensor):
                continue
            t = b._value if b._level is level else b
            while isinstance(t, LevelTensor):
                if not any(t._level is h for h in have):
                    return True
                t = t._value
    return False
