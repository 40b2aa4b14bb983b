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
"""
import torch

from ..core.levels import Interpreter, lowering
from ..core.wrapper import LevelTensor, mutated_arg_positions, wrap_output

aten = torch.ops.aten

_REWRAP_OPS = frozenset({aten.detach.default, aten.alias.default})


class GradTensor(LevelTensor):
    @staticmethod
    def __new__(cls, value, level, requires_grad=False):
        return LevelTensor._make(cls, value, level, value.shape, value.stride(), requires_grad)

    def __repr__(self, *, tensor_contents=None):
        return f"GradTensor(level={self._level.depth}, value={self._value!r})"


class GradInterpreter(Interpreter):
    kind = "grad"

    def __init__(self):
        super().__init__()
        self.prev_grad_mode = torch.is_grad_enabled()

    def lower(self):
        return lowering(self.prev_grad_mode)

    def lift(self, value, requires_grad):
        return GradTensor(value, self, requires_grad)

    def process(self, func, args, kwargs):
        if func in _REWRAP_OPS:
            return GradTensor(args[0]._value, self)
        mutated = mutated_arg_positions(func)
        if mutated:
            for i in mutated:
                if not (isinstance(args[i], LevelTensor) and args[i]._level is self):
                    raise RuntimeError(_captured_mutation_message(func))
        unwrapped_args = tuple(_unwrap(a, self) for a in args)
        unwrapped_kwargs = {k: _unwrap(v, self) for k, v in kwargs.items()} if kwargs else kwargs
        with lowering(self.prev_grad_mode):
            out = func(*unwrapped_args, **unwrapped_kwargs)
        if mutated:
            # In-place ops return their (already mutated) input: hand back the same wrapper
            # so autograd's version counter and history bookkeeping stay on one object.
            if len(mutated) == 1 and isinstance(out, torch.Tensor):
                return args[mutated[0]]
            return tuple(args[i] for i in mutated)
        return wrap_output(out, lambda t: GradTensor(t, self))


def _unwrap(a, level):
    if isinstance(a, LevelTensor):
        return a._value if a._level is level else a
    if type(a) in (list, tuple):
        return type(a)(b._value if isinstance(b, LevelTensor) and b._level is level else b for b in a)
    return a


def unwrap_at(x, level):
    """The value one level below ``level`` (unchanged if ``x`` is not ``level``'s wrapper)."""
    if isinstance(x, LevelTensor) and x._level is level:
        return x._value
    return x


def _captured_mutation_message(func):
    return (
        f"During a grad transform (grad, vjp, jacrev, ...), the function called the in-place "
        f"operation {func._schema.name}.{func._overloadname} on a tensor captured from outside "
        f"the transform. Its gradient would be lost. Pass that tensor as an input of the "
        f"transformed function, or use the out-of-place version of the operation."
    )
