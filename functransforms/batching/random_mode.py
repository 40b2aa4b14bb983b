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
"""
import torch

from ..core.levels import level_stack
from ..core.mode import register_random_handler
from .fallback import op_name
from .interpreter import BatchedTensor
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
            raise RuntimeError(
                f"vmap: called random operation aten::{op_name(func)} under vmap with "
                f"randomness='error'. Pass randomness='different' for independent draws per "
                f"example or randomness='same' for one draw shared by every example."
            )
    different = [lvl for lvl in levels if lvl.randomness == "different"]
    if not different:
        return func(*args, **kwargs)
    draw = _draw_by_expanding_inputs(func, args, kwargs, tuple(lvl.batch_size for lvl in different))
    for lvl in different:
        draw = BatchedTensor(draw, lvl)
    return draw


def _draw_by_expanding_inputs(func, args, kwargs, batch_shape):
    """Random ops on plain tensors (bernoulli(p), rand_like(x), normal(mean, std)): give
    their tensor inputs the batch shape, so each example gets its own draw."""
    def expand(a):
        if isinstance(a, torch.Tensor):
            return a.expand(batch_shape + tuple(a.shape))
        return a
    mutated = [i for i, arg in enumerate(func._schema.arguments)
               if arg.alias_info is not None and arg.alias_info.is_write]
    if mutated:
        raise RuntimeError(
            f"vmap: aten::{op_name(func)} would write independent random draws into a tensor "
            f"that is not batched. Use randomness='same', or make the tensor batched."
        )
    args = [expand(a) for a in args]
    kwargs = {k: expand(v) for k, v in kwargs.items()}
    out = func(*args, **kwargs)
    if out.shape[: len(batch_shape)] != batch_shape:
        out = out.expand(batch_shape + tuple(out.shape))
    return out


register_random_handler(unbatched_random)
