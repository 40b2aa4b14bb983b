"""The one dispatch mode transforms push: it sees the ops that no wrapper reaches.

NOTE [Ops no wrapper reaches]
Dispatch on wrappers only sees ops that have a wrapper among their arguments. Two kinds of
op matter to a transform without one:
  * random ops inside vmap (``torch.rand(3)``): the vmap interpreter registers how they are
    drawn (``register_random_handler``; NOTE [Randomness] in batching/random_mode.py), so the
    core does not know about batching;
  * factories inside ``f`` under grad or jvp (``buf = torch.zeros(3); buf[0] = x``): as in
    torch.func, a floating-point tensor created by the user's function belongs to the
    innermost transform, so later in-place writes of that level's values into it are
    recorded instead of refused as writes into a captured tensor. (Copies of captured
    tensors, ``w.clone()``, are not claimed: torch's C++ helpers make such copies inside
    ``.tolist()`` and printing, and a wrapper there has no storage to read.)
While either can happen (a vmap level with randomness other than 'same' is alive, or a
grad/jvp level is running the user's function) this mode is on the mode stack. Ops with
wrapper arguments go straight to ``LevelTensor.__torch_dispatch__``, as if no mode were
active; the cost is one Python call per op.
"""
import threading

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .levels import level_stack
from .wrapper import innermost_level, run_without_dead_wrappers

_SEEDED = torch.Tag.nondeterministic_seeded
# How a random op that no wrapper reaches is drawn while a transform is active; one slot,
# filled by the vmap interpreter when it is imported. Plain ``func`` call until then.
_random_handler = [None]
# ``check(func, args, kwargs)``, called for a random op that reaches a level other than vmap's (a jvp
# level under jacfwd's vmap): the vmap levels below still have their say in 'error' mode.
_random_check = [None]


def register_random_handler(handler, check=None):
    """Route random ops with no wrapper argument to ``handler(func, args, kwargs)``, and
    random ops handled by a non-vmap level through ``check(func, args, kwargs)`` first."""
    _random_handler[0] = handler
    _random_check[0] = check


def _has_tensor(args, kwargs):
    for a in args:
        if isinstance(a, torch.Tensor):
            return True
        if type(a) in (list, tuple) and any(isinstance(b, torch.Tensor) for b in a):
            return True
    return any(isinstance(v, torch.Tensor) for v in kwargs.values())


class TransformMode(TorchDispatchMode):
    @classmethod
    def _should_skip_dynamo(cls):
        # TorchDispatchMode wraps __torch_dispatch__ in a dynamo-disable shim by default; it
        # cost several µs on every op, and this mode is never compiled.
        return False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        level = innermost_level(args, kwargs)
        if level is not None:
            # Straight to the level, as LevelTensor.__torch_dispatch__ would: re-dispatching
            # would run autograd kernels that torch skipped on purpose (SavedVariable's
            # detach comes from C++ without them, and a grad level must see it that way:
            # NOTE [detach at a grad level] in reverse/interpreter.py).
            if not level.alive:
                return run_without_dead_wrappers(func, args, kwargs)
            if level.kind != "vmap" and _random_check[0] is not None and _SEEDED in func.tags:
                _random_check[0](func, args, kwargs)
            return level.process(func, args, kwargs)
        handler = _random_handler[0]
        if handler is not None and _SEEDED in func.tags:
            out = handler(func, args, kwargs)
        else:
            out = func(*args, **kwargs)
        if not _has_tensor(args, kwargs):
            # Every grad/jvp level whose user function is running claims it, outermost
            # first, as a lower level's value must be wrapped before a higher one's.
            for level in level_stack():
                if level.adopting:
                    out = _adopt(level, out)
        return out


def _adopt(level, out):
    if isinstance(out, torch.Tensor):
        if level.adopts_every_dtype or out.is_floating_point() or out.is_complex():
            return level.adopt(out)
        return out
    if type(out) in (tuple, list):
        return type(out)(_adopt(level, o) for o in out)
    return out


class one_mode_while_held:
    """Keep one instance of a mode on the mode stack for as long as any holder needs it.

    Nested holders (a vmap inside a vmap) reuse the instance already pushed; the mode is
    made once per thread, since constructing one costs about as much as a cheap op.
    """

    __slots__ = ("_state", "_make")

    def __init__(self, make_mode):
        self._state = threading.local()
        self._make = make_mode

    def __call__(self):
        return _Holder(self)


class _Holder:
    __slots__ = ("_shared", "_mode")

    def __init__(self, shared):
        self._shared = shared

    def __enter__(self):
        self._mode = None
        state = self._shared._state
        if not getattr(state, "active", False):
            mode = getattr(state, "mode", None)
            if mode is None:
                mode = state.mode = self._shared._make()
            state.active = True
            self._mode = mode
            mode.__enter__()
        return self

    def __exit__(self, *exc):
        if self._mode is not None:
            self._shared._state.active = False
            self._mode.__exit__(*exc)
        return False


transform_mode_active = one_mode_while_held(lambda: TransformMode())


class adopting_new_tensors:
    """While the user's function runs under ``level``, tensors it creates belong to it."""

    __slots__ = ("_level", "_previous", "_mode")

    def __init__(self, level):
        self._level = level

    def __enter__(self):
        self._previous = self._level.adopting
        self._level.adopting = True
        self._mode = transform_mode_active()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._level.adopting = self._previous
        self._mode.__exit__(*exc)
        return False


class not_adopting:
    """Code that runs one level below ``level`` on its behalf (a custom Function's forward,
    jvp or vmap staticmethod) creates tensors of the levels below: ``level`` and the levels
    above it must not claim them."""

    __slots__ = ("_depth", "_suspended")

    def __init__(self, level):
        self._depth = level.depth

    def __enter__(self):
        self._suspended = [lv for lv in level_stack() if lv.adopting and lv.depth >= self._depth]
        for lv in self._suspended:
            lv.adopting = False
        return self

    def __exit__(self, *exc):
        for lv in self._suspended:
            lv.adopting = True
        return False

