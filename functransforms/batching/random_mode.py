"""Random ops that no batched tensor reaches: ``torch.rand(3)`` inside ``vmap``.

NOTE [Randomness]
A random op whose arguments include a BatchedTensor reaches the batching interpreter like
any op (batching/rules/random.py). A random *factory* (``torch.rand(3)``,
``torch.randint(0, 5, (2,))``) or a random op on plain tensors has no batched argument, so
it would run once and silently give every example the same draw. While a vmap level with
randomness 'error' or 'different' is active, the transform mode (core/mode.py) sends such
ops here (this module registers itself with ``register_random_handler``):
  * 'error' on any enclosing level: raise, naming the op and the two fixes;
  * 'different': factories draw with the level's batch size in front
    (rules/random.py:random_factory, which also handles randperm); random ops on plain
    tensors draw with their inputs expanded to the batch sizes of the 'different' levels;
  * 'same': the plain draw is already shared by every example, so nothing is done.
Only ops tagged ``nondeterministic_seeded`` come here.

Dropout of an unbatched input under 'different' draws its mask with an in-place op
(``empty_like(x).bernoulli_(p)``) into a tensor that is not batched, which could only give
every example the same mask. Like torch.func, which intercepts dropout before it
decomposes, a torch-function mode (active only under 'different') batches the input first:
each example then gets its own mask.
"""
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..core.levels import level_stack
from ..core.mode import one_mode_while_held, register_random_handler
from .fallback import op_name
from ..core.wrapper import LevelTensor
from .interpreter import (
    BatchedTensor, VmapInterpreter, check_random, random_in_error_mode_message,
)
from .rules.random import random_factory


def unbatched_random(func, args, kwargs):
    levels = [lvl for lvl in level_stack() if lvl.kind == "vmap" and lvl.alive]
    if not levels:
        return func(*args, **kwargs)
    if not any(isinstance(a, torch.Tensor) for a in list(args) + list(kwargs.values())):
        # Factories (rand, randn, randint, normal(float, float, size), randperm): each
        # vmap level, innermost first, adds its batch dim or shares the draw.
        return random_factory(levels[-1], func, args, kwargs)
    for lvl in levels:
        if lvl.randomness == "error":
            raise RuntimeError(random_in_error_mode_message(func))
    different = [lvl for lvl in levels if lvl.randomness == "different"]
    if not different:
        return func(*args, **kwargs)
    return _draw_with_batched_inputs(func, args, kwargs, different)


def _draw_with_batched_inputs(func, args, kwargs, levels):
    """Random ops on plain tensors (bernoulli(p), rand_like(x), multinomial(probs)): give
    their tensor inputs every 'different' level's batch dim, and let the batching rules
    draw once per example."""
    if any(arg.alias_info is not None and arg.alias_info.is_write
           for arg in func._schema.arguments):
        raise RuntimeError(
            f"vmap: aten::{op_name(func)} would write independent random draws into a tensor "
            f"that is not batched (cannot ask for different inplace randomness on an unbatched "
            f"tensor). Use randomness='same', or make the tensor batched."
        )

    def batched(a):
        return _expand_into(a, levels) if isinstance(a, torch.Tensor) else a

    return func(*[batched(a) for a in args], **{k: batched(v) for k, v in kwargs.items()})


def _expand_into(x, levels):
    """``x``, the same for every example, as a tensor batched at each of ``levels``."""
    # Outermost first: each level's wrapper must hold the outer ones.
    for lvl in levels:
        x = BatchedTensor(x.expand(lvl.batch_size, *x.shape), lvl)
    return x


_DROPOUTS = frozenset([
    F.dropout, F.alpha_dropout, F.feature_alpha_dropout, F.dropout1d, F.dropout2d,
    F.dropout3d, torch.dropout, torch.alpha_dropout, torch.feature_dropout,
    torch.feature_alpha_dropout,
])


def _batched_at(x, level):
    while isinstance(x, LevelTensor):
        if x._level is level:
            return True
        x = x._value
    return False


class _DropoutDrawsPerExample(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _DROPOUTS and args and isinstance(args[0], torch.Tensor):
            levels = [lvl for lvl in level_stack()
                      if lvl.kind == "vmap" and lvl.alive and lvl.randomness == "different"]
            x = args[0]
            if not any(_batched_at(x, lvl) for lvl in levels):
                args = (_expand_into(x, levels), *args[1:])
        return func(*args, **kwargs)


# One mode on the stack however many 'different' levels are nested.
_dropout_draws_per_example = one_mode_while_held(_DropoutDrawsPerExample)


def refuse_in_error_mode(func, args, kwargs):
    """A random op that a jvp or grad level handles (jacfwd's tangents are batched, its
    primals are not) is still a random op under the vmap levels below."""
    for lvl in level_stack():
        if lvl.kind == "vmap" and lvl.alive:
            check_random(lvl, func, args, kwargs)


register_random_handler(unbatched_random, check=refuse_in_error_mode)
VmapInterpreter.different_randomness_context = _dropout_draws_per_example
