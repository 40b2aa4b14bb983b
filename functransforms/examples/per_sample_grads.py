"""Per-sample gradients of a small CNN with ``vmap(grad(loss))``, checked against a loop.

Run with ``python -m functransforms.examples.per_sample_grads``.
"""
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import functransforms as ft


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3)
        self.fc = nn.Linear(8 * 13 * 13, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv(x)), 2)
        return F.log_softmax(self.fc(x.flatten(1)), dim=-1)


def main(batch_size=32):
    torch.manual_seed(0)
    model = SmallCNN()
    params = {k: v.detach() for k, v in model.named_parameters()}
    data = torch.randn(batch_size, 1, 28, 28)
    targets = torch.randint(0, 10, (batch_size,))

    def loss(params, x, y):
        # One example at a time: add the batch dim the module expects.
        out = ft.functional_call(model, params, (x.unsqueeze(0),))
        return F.nll_loss(out, y.unsqueeze(0))

    per_sample_grads = ft.vmap(ft.grad(loss), in_dims=(None, 0, 0))
    # The first call pays one-time costs (torch imports some modules lazily on the first
    # convolution of a tensor subclass); time the second.
    per_sample_grads(params, data, targets)
    ft.reset_fallback_counts()
    start = time.perf_counter()
    per_sample = per_sample_grads(params, data, targets)
    vmap_time = time.perf_counter() - start

    start = time.perf_counter()
    loop = {k: [] for k in params}
    for x, y in zip(data, targets):
        grads = torch.autograd.grad(
            F.nll_loss(model(x.unsqueeze(0)), y.unsqueeze(0)), list(model.parameters())
        )
        for k, g in zip(params, grads):
            loop[k].append(g)
    loop_time = time.perf_counter() - start

    # For a pure function like this loss, ft.capture records the plain aten ops of one call
    # and replays them on later calls with inputs of the same shapes.
    captured = ft.capture(per_sample_grads)
    captured(params, data, targets)  # records
    start = time.perf_counter()
    replayed = captured(params, data, targets)
    capture_time = time.perf_counter() - start

    worst = max((per_sample[k] - torch.stack(loop[k])).abs().max().item() for k in params)
    worst = max([worst] + [(replayed[k] - per_sample[k]).abs().max().item() for k in params])
    print(f"per-sample gradients for {batch_size} examples:")
    for k, g in per_sample.items():
        print(f"  {k:12s} {tuple(g.shape)}")
    print(f"largest difference from a per-example loop: {worst:.2e}")
    print(f"vmap(grad): {vmap_time * 1e3:.1f} ms, captured and replayed: "
          f"{capture_time * 1e3:.1f} ms, loop: {loop_time * 1e3:.1f} ms")
    print(f"ops that fell back to the per-example loop: {ft.fallback_counts() or 'none'}")
    assert worst < 1e-4


if __name__ == "__main__":
    main()
