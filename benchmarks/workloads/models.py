"""The benchmark models, in torch and (for the JAX peer) the same networks in jax.numpy.

The JAX version walks the torch ``nn.Sequential`` and reads the very same parameter arrays
(torch layouts: Linear weight ``(out, in)``, Conv2d weight ``OIHW``), so every library
computes the same function of the same numbers and the outputs can be compared directly.
"""
import torch
from torch import nn

from .harness import peer


def mlp(sizes=(784, 128, 128, 10), act=nn.ReLU, log_softmax=True, seed=0):
    torch.manual_seed(seed)
    layers = []
    for i, (n, m) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(n, m))
        if i < len(sizes) - 2:
            layers.append(act())
    if log_softmax:
        layers.append(nn.LogSoftmax(-1))
    return nn.Sequential(*layers)


def cnn(seed=0):
    """A small MNIST-style CNN: conv, relu, maxpool twice, then linear and log_softmax."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 5 * 5, 10), nn.LogSoftmax(-1),
    )


def params_of(model):
    return {k: v.detach() for k, v in model.named_parameters()}


def jax_params(model):
    jnp = peer("jax").numpy
    return {k: jnp.asarray(v.numpy()) for k, v in params_of(model).items()}


def jax_forward(model, params, x):
    """``model(x)`` for a torch ``nn.Sequential``, computed with jax on ``params``."""
    jax = peer("jax")
    jnp, lax = jax.numpy, jax.lax
    for name, mod in model.named_children():
        if isinstance(mod, nn.Linear):
            x = x @ params[f"{name}.weight"].T + params[f"{name}.bias"]
        elif isinstance(mod, nn.Conv2d):
            x = lax.conv_general_dilated(
                x, params[f"{name}.weight"], (1, 1), "VALID",
                dimension_numbers=("NCHW", "OIHW", "NCHW"),
            ) + params[f"{name}.bias"][:, None, None]
        elif isinstance(mod, nn.ReLU):
            x = jax.nn.relu(x)
        elif isinstance(mod, nn.Tanh):
            x = jnp.tanh(x)
        elif isinstance(mod, nn.MaxPool2d):
            k = mod.kernel_size
            x = lax.reduce_window(x, -jnp.inf, lax.max, (1, 1, k, k), (1, 1, k, k), "VALID")
        elif isinstance(mod, nn.Flatten):
            x = x.reshape(x.shape[0], -1)
        elif isinstance(mod, nn.LogSoftmax):
            x = jax.nn.log_softmax(x, axis=-1)
        else:
            raise NotImplementedError(f"jax_forward: no translation for {type(mod).__name__}")
    return x


def block(tree):
    """Wait for jax's asynchronous dispatch, so a timing covers the computation."""
    return peer("jax").block_until_ready(tree)
