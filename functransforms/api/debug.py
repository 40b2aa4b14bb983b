"""debug_unwrap: look inside functransforms wrappers while debugging."""
from ..core.wrapper import LevelTensor


def debug_unwrap(tensor, *, recurse=True):
    """The tensor a transform wrapper stands for, one level down (all the way with ``recurse``).

    A BatchedTensor unwraps to its value with the batch dimension in front; any other
    tensor is returned unchanged. Meant for debugging: the result is not tracked by the
    transform it came from.
    """
    while isinstance(tensor, LevelTensor):
        tensor = tensor._value
        if not recurse:
            break
    return tensor
