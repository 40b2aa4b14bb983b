"""How fast the compiled rows could possibly be: the kernels a row cannot avoid, timed alone.

The compiled targets of issue 15 ask for <= 0.5x torch.func eager on every per-sample-gradient
and ensemble row. Where the matrix products and the writes of the results take more than half
of torch.func's time by themselves, no program, compiled or not, meets that target. For
each such row this times torch.func eager and a lower bound, in one process, interleaved:
  * per-sample gradients of the MLP: the three forward products, the two backward products
    and the per-example weight gradients (one batched outer product per layer, written to
    fresh memory as every call must), from activations and output gradients made up front;
  * ensembles: the three batched products of the ten stacked models, nothing else.
The ReLUs, the loss and the bias gradients are left out, so the bound is low.

    python benchmarks/kernel_floor.py
"""
import time

import torch
import torch.func as tf
import torch.nn.functional as F

from workloads import models

ROUNDS = 7


def _median_ms(fn, seconds=0.5):
    fn()
    calls, start = 0, time.process_time()
    while time.process_time() - start < seconds or calls < 3:
        fn()
        calls += 1
    return (time.process_time() - start) / calls * 1e3


def _ratio(peer, floor):
    """Median over interleaved rounds of floor / peer, and the two medians."""
    ratios, peers, floors = [], [], []
    for r in range(ROUNDS):
        pair = [peer, floor] if r % 2 == 0 else [floor, peer]
        times = {id(f): _median_ms(f) for f in pair}
        peers.append(times[id(peer)])
        floors.append(times[id(floor)])
        ratios.append(floors[-1] / peers[-1])
    mid = ROUNDS // 2
    return sorted(ratios)[mid], sorted(peers)[mid], sorted(floors)[mid]


def per_sample_mlp(batch):
    model = models.mlp()
    params = {k: v.detach() for k, v in model.named_parameters()}
    x = torch.randn(batch, 784)
    y = torch.randint(0, 10, (batch,))

    def loss(p, xi, yi):
        return F.nll_loss(tf.functional_call(model, p, (xi[None],)), yi[None])

    psg = tf.vmap(tf.grad(loss), in_dims=(None, 0, 0))
    weights = [params[f"{i}.weight"] for i in (0, 2, 4)]
    acts = [torch.randn(batch, w.shape[1]) for w in weights]
    grads = [torch.randn(batch, w.shape[0]) for w in weights]

    def floor():
        for a, w in zip(acts, weights):
            a @ w.T
        for g, w in zip(grads[1:], weights[1:]):
            g @ w
        for g, a in zip(grads, acts):
            torch.bmm(g[:, :, None], a[:, None, :])

    return lambda: psg(params, x, y), floor


def ensemble(width, batch, per_model):
    nets = models.mlp_ensemble(10, width)
    params, buffers = tf.stack_module_state(nets)
    params = {k: v.detach() for k, v in params.items()}
    base = nets[0].to("meta")
    x = torch.randn(10, batch, 64) if per_model else torch.randn(batch, 64)

    def one(p, b, xi):
        return tf.functional_call(base, (p, b), (xi,))

    program = tf.vmap(one, in_dims=(0, 0, 0 if per_model else None))
    stacked = [params[f"{i}.weight"].transpose(1, 2).contiguous() for i in (0, 2, 4)]
    xs = x if per_model else x.expand(10, batch, 64)

    def floor():
        h = xs
        for w in stacked:
            h = torch.bmm(h, w)

    def peer():
        with torch.no_grad():
            program(params, buffers, x)

    return peer, floor


def main():
    torch.set_num_threads(1)
    rows = [("per-sample grads MLP, batch 256", per_sample_mlp(256))]
    for width, batch in [(512, 64), (512, 512)]:
        for per_model in (False, True):
            label = f"ensembles, width {width}, batch {batch}, {'per model' if per_model else 'shared'}"
            rows.append((label, ensemble(width, batch, per_model)))
    print("| row | torch.func eager (ms) | unavoidable kernels alone (ms) | kernels / torch.func | target |")
    print("|---|---|---|---|---|")
    for label, (peer, floor) in rows:
        ratio, peer_ms, floor_ms = _ratio(peer, floor)
        print(f"| {label} | {peer_ms:.3g} | {floor_ms:.3g} | {ratio:.2f} | 0.5 |")


if __name__ == "__main__":
    main()
