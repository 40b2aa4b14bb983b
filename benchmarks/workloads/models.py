"""The benchmark models and functions, in torch and (for the JAX peer) the same networks in
jax.numpy. Every workload module takes its models from here.

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


def mlp_ensemble(num_models, width):
    """``num_models`` 64-width-width-10 ReLU MLPs with different weights."""
    torch.manual_seed(0)
    return [
        nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                      nn.Linear(width, 10))
        for _ in range(num_models)
    ]


def tanh_layer(n, m, seed=0):
    """``x -> tanh(W @ x)`` from R^n to R^m, and an input."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(m, n, generator=g) / n ** 0.5
    return (lambda x: torch.tanh(w @ x)), torch.randn(n, generator=g)


CHAIN = 20


def chain(x):
    """``CHAIN`` tiny ops: alternating sin and a multiplication by a Python number."""
    for _ in range(CHAIN // 2):
        x = x.sin()
        x = x * 1.5
    return x


def chain_sum(x):
    return chain(x).sum()


def tiny_grad(m):
    """``m.grad`` of ``(x.sin() * x.exp()).sum()`` on 4 floats: entry and exit dominate."""
    x = torch.randn(4)
    f = m.grad(lambda x: (x.sin() * x.exp()).sum())
    return lambda: f(x)


def big_mlp_grad(m):
    """``m.grad`` of a 1024-512-512-256-10 ReLU MLP's loss (0.92M parameters, batch 64)."""
    gen = torch.Generator().manual_seed(0)
    sizes = [1024, 512, 512, 256, 10]
    params = {
        f"w{i}": torch.randn(o, i_, generator=gen) / i_**0.5
        for i, (i_, o) in enumerate(zip(sizes, sizes[1:]))
    }
    params.update({f"b{i}": torch.zeros(o) for i, o in enumerate(sizes[1:])})
    x = torch.randn(64, sizes[0], generator=gen)
    target = torch.randint(0, sizes[-1], (64,), generator=gen)

    def loss(p, x, target):
        h = x
        for i in range(len(sizes) - 1):
            h = torch.nn.functional.linear(h, p[f"w{i}"], p[f"b{i}"])
            if i < len(sizes) - 2:
                h = h.relu()
        return torch.nn.functional.cross_entropy(h, target)

    g = m.grad(loss)
    return lambda: g(params, x, target)


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
