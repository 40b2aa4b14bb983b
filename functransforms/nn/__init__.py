"""nn.Module utilities: run modules with swapped-in state, stack state for ensembles."""
from .batch_norm import replace_all_batch_norm_modules_
from .ensembling import combine_state_for_ensemble, stack_module_state
from .functional_call import functional_call
from .make_functional import make_functional, make_functional_with_buffers

__all__ = [
    "functional_call",
    "stack_module_state",
    "combine_state_for_ensemble",
    "make_functional",
    "make_functional_with_buffers",
    "replace_all_batch_norm_modules_",
]
