"""Making BatchNorm modules usable under vmap."""
from torch.nn.modules.batchnorm import _BatchNorm


def replace_all_batch_norm_modules_(root):
    """Stop every BatchNorm in ``root`` from tracking running statistics, in place.

    A BatchNorm in training mode writes its batch statistics into ``running_mean`` and
    ``running_var``; under vmap those statistics differ per example while the buffers are
    shared, so the write cannot be done. Without running stats it normalises with the
    statistics of each example's own batch, which vmap handles. Returns ``root``.
    """
    for module in root.modules():
        if isinstance(module, _BatchNorm) and module.track_running_stats:
            module.running_mean = None
            module.running_var = None
            module.num_batches_tracked = None
            module.track_running_stats = False
    return root
