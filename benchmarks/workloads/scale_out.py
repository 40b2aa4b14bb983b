"""DP-SGD data-parallel over gloo processes on this machine: time per step and the share
spent in communication, at 1 and 2 processes.

functransforms runs the recipe of ``functransforms/examples/dp_sgd_distributed.py``
(``psum(clipped, ("batch", "ranks"))`` inside ``vmap(grad)``); torch.func runs the same
step by hand (``vmap(grad)``, clipping, a sum over the batch, one ``dist.all_reduce`` of
all the sums in one buffer). Every process takes an equal share of the same global batch. Both
implementations run in the same processes, interleaved round by round over a fixed number
of steps (time budgets would differ between processes, and every process must issue the
same collectives). Communication is the wall time inside torch.distributed calls, waiting
for the slower process included.
"""
import datetime
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from .harness import ORACLE, OURS, Row, Table

TIMEOUT_S = 300


def _steps(axis, world, global_batch, impl):
    import torch.distributed as dist
    import torch.func
    import torch.nn.functional as F

    from functransforms.examples import dp_sgd_distributed as example

    max_norm, sigma, lr = 1.0, 1.0, 0.1
    local = global_batch // world
    model, x_train, y_train = example.make_problem(0, n_train=4096, n_features=64, hidden=256,
                                                   n_classes=10, dtype=torch.float32)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    batches = torch.Generator().manual_seed(1)
    noise = torch.Generator().manual_seed(2)
    rank = axis.rank
    comm = {"s": 0.0}

    if impl == OURS:
        step = example.make_step(model, max_norm)

        def summed_grads(params, x, y):
            before = axis.seconds
            out = step(params, x, y)
            comm["s"] += axis.seconds - before
            return out
    else:
        def loss(params, x, y):
            return F.cross_entropy(torch.func.functional_call(model, params, (x.unsqueeze(0),)),
                                   y.unsqueeze(0))

        psg = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))

        def summed_grads(params, x, y):
            g = psg(params, x, y)
            norms = torch.stack([v.flatten(1).pow(2).sum(1) for v in g.values()], 1).sum(1).sqrt()
            scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)
            sums = {k: (v * scale.view(-1, *[1] * (v.dim() - 1))).sum(0) for k, v in g.items()}
            if world == 1:
                return sums
            # one bucket, as DDP and functransforms' psum of a pytree do
            flat = torch.cat([v.reshape(-1) for v in sums.values()])
            t0 = time.perf_counter()
            dist.all_reduce(flat)
            comm["s"] += time.perf_counter() - t0
            pieces = flat.split([v.numel() for v in sums.values()])
            return {k: p.view_as(v) for (k, v), p in zip(sums.items(), pieces)}

    def one_step():
        idx = torch.randint(len(x_train), (global_batch,), generator=batches)
        mine = idx[rank * local:(rank + 1) * local]
        params = {k: p.detach() for k, p in model.named_parameters()}
        summed = summed_grads(params, x_train[mine], y_train[mine])
        for name, p in model.named_parameters():
            z = torch.normal(0.0, sigma * max_norm, p.shape, generator=noise)
            p.grad = (summed[name] + z) / global_batch
        optimizer.step()

    one_step()  # warm-up
    return one_step, comm, lambda: {k: p.detach().clone() for k, p in model.named_parameters()}


def worker(spec):
    """One process: time both implementations, interleaved; rank 0 prints the medians."""
    import torch.distributed as dist

    torch.set_num_threads(spec["threads"])
    world = spec["world"]
    if world > 1:
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    import functransforms as ft

    binding = ft.process_axis("ranks")
    axis = binding.__enter__()
    impls = {name: _steps(axis, world, spec["global_batch"], name) for name in (OURS, ORACLE)}
    times = {name: [] for name in impls}
    shares = {name: [] for name in impls}
    names = list(impls)
    for r in range(spec["rounds"]):
        for name in names[r % 2:] + names[:r % 2]:
            step, comm, _ = impls[name]
            for _ in range(spec["steps"]):
                comm["s"] = 0.0
                t0 = time.perf_counter()
                step()
                elapsed = time.perf_counter() - t0
                times[name].append(elapsed)
                shares[name].append(comm["s"] / elapsed)
    params = {name: impls[name][2]() for name in names}
    agree = all(torch.allclose(params[OURS][k], params[ORACLE][k], rtol=1e-4, atol=1e-5)
                for k in params[OURS])
    binding.__exit__(None, None, None)
    if world > 1:
        dist.destroy_process_group()
    if int(os.environ.get("RANK", 0)) == 0:
        print(json.dumps({name: {"step_s": statistics.median(times[name]),
                                 "comm_share": statistics.median(shares[name])}
                          for name in names} | {"agree": agree}))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(spec):
    """``spec["world"]`` worker processes with torchrun's environment; rank 0's result. A
    rank that fails ends the launch with its error; so does the timeout."""
    root = Path(__file__).resolve().parents[2]
    port = _free_port()
    procs = []
    for rank in range(spec["world"]):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                   WORLD_SIZE=str(spec["world"]), OMP_NUM_THREADS=str(spec["threads"]),
                   PYTHONPATH=os.pathsep.join([str(root), str(root / "benchmarks")]))
        procs.append(subprocess.Popen(
            [sys.executable, "-W", "ignore", "-m", "workloads.scale_out", json.dumps(spec)],
            cwd=root / "benchmarks", env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True))
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while any(p.poll() is None for p in procs):
            failed = [p for p in procs if p.poll() not in (None, 0)]
            if failed or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        failed = [(rank, p) for rank, p in enumerate(procs) if p.poll() not in (None, 0)]
        if failed or any(p.poll() is None for p in procs):
            for p in procs:
                if p.poll() is None:
                    p.kill()
            if failed:
                rank, p = failed[0]
                err = p.stderr.read().strip().splitlines()
                return {"failed": f"rank {rank}: {err[-1] if err else p.returncode}"}
            return {"failed": f"timed out after {TIMEOUT_S} s"}
        return json.loads(procs[0].stdout.read().strip().splitlines()[-1])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=10)


def run(settings):
    global_batch = 16 if settings.quick else 128
    rounds, steps = (1, 1) if settings.quick else (settings.rounds, 4)
    table = Table(
        key="scale_out_dp_sgd",
        title=f"DP-SGD step, data-parallel over gloo processes (MLP 64-256-10, float32, "
              f"global batch {global_batch})",
        config_label="processes", impls=[OURS, ORACLE],
    )
    shares = {}
    # quick mode: the two-process path only (its processes cost seconds each to start)
    for world in (2,) if settings.quick else (1, 2):
        got = launch({"world": world, "global_batch": global_batch, "rounds": rounds,
                      "steps": steps, "threads": 1})
        row = Row(str(world), {})
        if "failed" in got:
            row.notes.append(f"failed: {got['failed'][:300]}")
            row.values = {OURS: None, ORACLE: None}
        else:
            row.values = {name: got[name]["step_s"] for name in (OURS, ORACLE)}
            shares[row.config] = {name: got[name]["comm_share"] for name in (OURS, ORACLE)}
            if not got["agree"]:
                row.notes.append("parameters after the timed steps differ between the two")
        table.rows.append(row)

    def share(name):
        return lambda row: (f"{100 * shares[row.config][name]:.0f}%"
                            if row.config in shares else "n/a")

    table.extra_columns = [(f"communication, {OURS}", share(OURS)),
                           (f"communication, {ORACLE}", share(ORACLE))]
    table.notes.append(
        "Median time per step (per-sample gradients, clipping, sums, all-reduce, noise, SGD "
        "step) on rank 0; each process has its share of the global batch and one torch "
        "thread. Communication: median share of a step spent inside torch.distributed calls "
        "(waiting for the other process included). Both implementations end with the same "
        "parameters (checked).")
    return [table]


if __name__ == "__main__":
    worker(json.loads(sys.argv[1]))
