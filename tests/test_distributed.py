"""The DP-SGD example across 2 gloo processes on localhost (issue 17): the parameters after a
few steps equal the single-process run's to float64 rounding; a failing rank fails the test
with its own error, and nothing waits longer than a bounded timeout."""
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

import functransforms as ft
from functransforms.examples import dp_sgd_distributed as example

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEADLINE_S = 120
STEPS, GLOBAL_BATCH = 3, 8


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world_size, args, tmp_path, per_rank_args=None,
           command=("-m", "functransforms.examples.dp_sgd_distributed", )):
    """Start ``world_size`` processes (by default of the example) with torchrun's
    environment; return their outputs once all succeed. The first rank to fail fails the
    call with its own stderr, and the others are killed; so is everyone past the deadline."""
    port = _free_port()
    procs = []
    for rank in range(world_size):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                   LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
                   OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
        extra = per_rank_args(rank) if per_rank_args else []
        log = open(tmp_path / f"rank{rank}.log", "w+")
        procs.append((subprocess.Popen(
            [sys.executable, *command, *args, *extra], cwd=ROOT, env=env, stdout=log,
            stderr=subprocess.STDOUT), log))
    deadline = time.monotonic() + DEADLINE_S
    try:
        while True:
            codes = [p.poll() for p, _ in procs]
            for rank, code in enumerate(codes):
                if code not in (None, 0):
                    log = procs[rank][1]
                    log.seek(0)
                    raise AssertionError(f"rank {rank} exited with {code}:\n{log.read()}")
            if all(c == 0 for c in codes):
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"ranks still running after {DEADLINE_S}s: {codes}")
            time.sleep(0.05)
        outputs = []
        for _, log in procs:
            log.seek(0)
            outputs.append(log.read())
        return outputs
    finally:
        for p, log in procs:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=10)
            log.close()


def _single_process():
    with ft.process_axis("ranks"):
        params, _, _ = example.train(STEPS, GLOBAL_BATCH)
    return params


def test_two_processes_match_one(tmp_path):
    outputs = launch(2, ["--steps", str(STEPS), "--global-batch", str(GLOBAL_BATCH),
                         "--timeout", "30"], tmp_path,
                     per_rank_args=lambda r: ["--out", str(tmp_path / f"params{r}.pt")])
    assert "2 process(es)" in outputs[0]
    expected = _single_process()
    for rank in range(2):
        got = torch.load(tmp_path / f"params{rank}.pt")
        assert got.keys() == expected.keys()
        for k in expected:
            assert got[k].dtype == torch.float64
            torch.testing.assert_close(got[k], expected[k], rtol=1e-12, atol=1e-12)
    # and the training did move the parameters
    model, _, _ = example.make_problem(0)
    assert any(not torch.equal(p.detach(), expected[k]) for k, p in model.named_parameters())


def test_failing_rank_fails_fast_with_its_error(tmp_path):
    start = time.monotonic()
    # rank 1 dies on a bad argument before joining; rank 0 would wait in the rendezvous
    with pytest.raises(AssertionError, match="rank 1 exited with 2:(.|\n)*invalid int value"):
        launch(2, ["--steps", "1", "--timeout", "30"], tmp_path,
               per_rank_args=lambda r: ["--global-batch", "eight"] if r == 1 else [])
    assert time.monotonic() - start < DEADLINE_S


def test_single_process_without_torchrun(capsys):
    example.main(["--steps", "2", "--global-batch", "8"])
    assert "1 process(es), global batch 8" in capsys.readouterr().out


# Every collective over a process axis of 2, alone, mixed with a vmap axis, and under grad
# and jvp; each rank knows the other's data (same seed) and checks against the whole.
WORKER = """
import datetime
import torch, torch.distributed as dist, torch.func
import functransforms as ft
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=30))
rank = dist.get_rank()
data = torch.randn(2, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
mine = data[rank]
with ft.process_axis("ranks"):
    assert ft.axis_size("ranks") == 2 and ft.axis_index("ranks").item() == rank
    close = torch.testing.assert_close
    close(ft.psum(mine, "ranks"), data.sum(0))
    close(ft.pmean(mine, "ranks"), data.mean(0))
    close(ft.pmax(mine, "ranks"), data.amax(0))
    close(ft.pmin(mine, "ranks"), data.amin(0))
    close(ft.all_gather(mine, "ranks", axis=1), data.movedim(0, 1))
    close(ft.all_gather(mine, "ranks", tiled=True), data.reshape(6, 4))
    out = ft.vmap(lambda x: ft.psum(x, ("ranks", "b")), axis_name="b", out_dims=None)(mine)
    close(out, data.sum((0, 1)))
    idx = ft.vmap(lambda x: ft.axis_index(("ranks", "b")), axis_name="b")(mine)
    assert idx.tolist() == [3 * rank + i for i in range(3)], idx
    full = lambda d: (d.sum(0) * d).sin()
    g = ft.grad(lambda x: (ft.psum(x, "ranks") * x).sin().sum())(mine)
    close(g, torch.func.grad(lambda d: full(d).sum())(data)[rank])
    t = torch.randn(2, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    _, jt = ft.jvp(lambda x: (ft.psum(x, "ranks") * x).sin(), (mine,), (t[rank],))
    close(jt, torch.func.jvp(full, (data,), (t,))[1][rank])
    x = mine.clone().requires_grad_()
    (gx,) = torch.autograd.grad(ft.all_gather(x * x, "ranks").sum(), x)
    close(gx, 2 * 2 * mine)
dist.destroy_process_group()
print("rank", rank, "ok")
"""


@pytest.mark.slow
def test_collectives_over_two_processes(tmp_path):
    outputs = launch(2, [], tmp_path, command=("-c", WORKER))
    assert [o.strip().splitlines()[-1] for o in outputs] == ["rank 0 ok", "rank 1 ok"]


@pytest.mark.slow
def test_the_readme_torchrun_command(tmp_path):
    # torchrun itself, as the README says; its workers die with it (own session, killed whole).
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           f"--master_port={_free_port()}", "-m", "functransforms.examples.dp_sgd_distributed",
           "--steps", "2", "--global-batch", "8", "--timeout", "30"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=DEADLINE_S)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    assert proc.returncode == 0, out
    assert "2 process(es), global batch 8" in out
