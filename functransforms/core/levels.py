"""The level stack: which transforms are active, innermost last.

NOTE [Levels]
Every transform call (grad, vjp, vmap, jvp) pushes one interpreter onto a thread-local
stack and pops it when the call returns or raises. An interpreter's ``depth`` is its
position in the stack at the moment it was pushed; wrappers created by it carry the
interpreter object itself, so dispatch reads the level straight off the tensors and never
consults the stack on the hot path. A popped interpreter is marked dead; wrappers of a
dead level that are still reachable (in an autograd graph, in a user's global) behave as
their inner values.

NOTE [Lowering]
When a level handles an op it runs the op again on the values one level down. Two pieces
of thread-local state must be put right for that inner call:
  * PyTorch has removed the autograd dispatch keys before calling ``__torch_dispatch__``,
    so the inner call would record nothing. Lower grad levels (and plain torch autograd
    around the whole transform) must record it, so the keys are re-enabled. So are the
    conjugate/negative/zero-tensor keys, which complex values and forward-AD zeros need.
  * Re-enabling costs about as much as a cheap op, so interpreters skip it when no value
    passed down needs it (see ``needs_lowering`` in core/wrapper.py).
  * Grad *mode*: a grad level's backward runs with grad mode off, yet the levels below
    must record what it computes. Each grad level remembers the grad mode that was in
    force when it was entered and restores it when lowering. This is how a ``no_grad``
    inside ``f`` is respected at that level while one around ``grad(f)(x)`` is not.
"""
import threading

import torch
from torch._C import DispatchKey

# Keys PyTorch excludes before calling ``__torch_dispatch__`` that the levels below need
# back: autograd (lower grad levels and plain autograd record there), and the lazy
# conjugate/negative/zero-tensor handling (without it kernels would read a conj view's raw
# data, or get a storage-less zero tensor).
_RESTORED_KEYS = (
    DispatchKey.ADInplaceOrView,
    DispatchKey.AutogradFunctionality,
    DispatchKey.AutogradOther,
    DispatchKey.AutogradNestedTensor,
    DispatchKey.Conjugate,
    DispatchKey.Negative,
    DispatchKey.ZeroTensor,
)

_local = threading.local()


def level_stack():
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    return stack


def current_level():
    stack = level_stack()
    return stack[-1] if stack else None


_exclude_cache = {}


def _exclude_without_restored_keys(exclude):
    raw = exclude.raw_repr()
    cached = _exclude_cache.get(raw)
    if cached is None:
        cached = exclude
        for key in _RESTORED_KEYS:
            cached = cached.remove(key)
        _exclude_cache[raw] = cached
    return cached


class lowering:
    """Context for running ops one level down: excluded keys back on, grad mode set.

    ``grad_mode=None`` keeps the current grad mode (vmap and jvp levels do not touch it);
    ``fwd_grad``, when given, sets torch's forward-AD switch the jvp levels below read.
    """

    __slots__ = ("grad_mode", "fwd_grad", "_key_guard", "_prev_grad_mode", "_prev_fwd_grad")

    def __init__(self, grad_mode=None, fwd_grad=None):
        self.grad_mode = grad_mode
        self.fwd_grad = fwd_grad

    def __enter__(self):
        include = torch._C._dispatch_tls_local_include_set()
        exclude = torch._C._dispatch_tls_local_exclude_set()
        self._key_guard = torch._C._ForceDispatchKeyGuard(include, _exclude_without_restored_keys(exclude))
        self._key_guard.__enter__()
        if self.grad_mode is not None:
            self._prev_grad_mode = torch.is_grad_enabled()
            torch._C._set_grad_enabled(self.grad_mode)
        if self.fwd_grad is not None:
            self._prev_fwd_grad = torch._C._is_fwd_grad_enabled()
            torch._C._set_fwd_grad_enabled(self.fwd_grad)
        return self

    def __exit__(self, *exc):
        if self.fwd_grad is not None:
            torch._C._set_fwd_grad_enabled(self._prev_fwd_grad)
        if self.grad_mode is not None:
            torch._C._set_grad_enabled(self._prev_grad_mode)
        self._key_guard.__exit__(*exc)
        return False


class Interpreter:
    """One active transform. Subclasses implement ``process`` for the ops they own."""

    kind = "?"
    # Whether the level claims new tensors of every dtype, not only floating/complex ones
    # (functionalize must own integer buffers the function writes into, too).
    adopts_every_dtype = False

    def __init__(self):
        self.depth = -1
        self.alive = False
        # True while the user's function runs under this level and the level claims the
        # tensors it creates (grad and jvp do; see NOTE [Ops no wrapper reaches]).
        self.adopting = False

    def adopt(self, tensor):
        return tensor

    def process(self, func, args, kwargs):
        raise NotImplementedError

    def lower(self):
        return lowering(None)

    # Entering/leaving is the only place the stack changes; both are exception-safe.
    def __enter__(self):
        stack = level_stack()
        self.depth = len(stack)
        self.alive = True
        stack.append(self)
        return self

    def __exit__(self, *exc):
        stack = level_stack()
        # A user function that raised may have left inner levels behind only if our own
        # code is broken; popping down to self keeps the process usable either way.
        while stack:
            top = stack.pop()
            top.alive = False
            if top is self:
                break
        return False

    def __repr__(self):
        return f"{self.kind}@{self.depth}" + ("" if self.alive else "(dead)")
