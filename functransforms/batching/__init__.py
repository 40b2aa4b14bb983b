"""vmap's machinery. Importing this package registers every batching-rule family and the
handler for random ops that no batched tensor reaches."""
from . import random_mode  # noqa: F401
from .rules import pointwise  # noqa: F401
from .rules import matmul  # noqa: F401
from .rules import conv  # noqa: F401
from .rules import indexing  # noqa: F401
from .rules import sorting  # noqa: F401
from .rules import linalg  # noqa: F401
from .rules import pooling  # noqa: F401
from .rules import norms  # noqa: F401
from .rules import views  # noqa: F401
from .rules import reductions  # noqa: F401
from .rules import factories  # noqa: F401
from .rules import joins  # noqa: F401
from .rules import random  # noqa: F401
from .rules import softmax  # noqa: F401
from .rules import embedding  # noqa: F401
from .rules import loss  # noqa: F401
from .rules import attention  # noqa: F401
from .rules import collectives  # noqa: F401
