"""Random ops that no batched tensor reaches: ``torch.rand(3)`` inside ``vmap``.

NOTE [Randomness]
A random op whose arguments include a BatchedTensor reaches the batching interpreter like
any op (batching/rules/random.py). A random *factory* (``torch.rand(3)``,
``torch.randint(0, 5, (2,))``) or a random op on plain tensors has no batched argument, so
it would run once and silently give every example the same draw. While a vmap level with
randomness 'error' or 'different' is active, the transform mode (core/mode.py) sends such
ops here:
  * 'error' on any enclosing level: raise, naming the op and the two fixes;
  * 'different': draw once with the batch sizes of the 'different' levels in front and
    wrap the result level by level, outermost first;
  * 'same': the plain draw is already shared by every example, so nothing is done.
Only ops tagged ``nondeterministic_seeded`` come here.
"""
import torch

from ..core.levels import level_stack
from .fallback import op_name


def unbatched_random(func, args, kwargs):
    levels = [lvl for lvl in level_stack() if lvl.kind == "vmap"]
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
    batch_shape = tuple(lvl.batch_size for lvl in different)
    if func._schema.arguments and any(a.name == "size" for a in func._schema.arguments):
        draw = _draw_with_batch_shape(func, args, kwargs, batch_shape)
    else:
        draw = _draw_by_expanding_inputs(func, args, kwargs, batch_shape)
    for lvl in different:
        draw = _wrap(draw, lvl)
    return draw


def _draw_with_batch_shape(func, args, kwargs, batch_shape):
    names = [a.name for a in func._schema.arguments]
    index = names.index("size")
    args = list(args)
    if index < len(args):
        args[index] = batch_shape + tuple(args[index])
    else:
        kwargs = dict(kwargs, size=batch_shape + tuple(kwargs["size"]))
    return func(*args, **kwargs)


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


def _wrap(value, level):
    from .interpreter import BatchedTensor

    return BatchedTensor(value, level)
