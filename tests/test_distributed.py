"""The DP-SGD example across 2 gloo processes on localhost (issue 17): the parameters after a
few steps equal the single-process run's to float64 rounding; a failing rank fails the test
with its own error, and nothing waits longer than a bounded timeout."""
import os
import pathlib
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


def launch(world_size, args, tmp_path, per_rank_args=None):
    """Start ``world_size`` processes of the example with torchrun's environment; return
    their outputs once all succeed. The first rank to fail fails the call with its own
    stderr, and the others are killed; so is everyone past the deadline."""
    port = _free_port()
    procs = []
    for rank in range(world_size):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                   LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
                   OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
        extra = per_rank_args(rank) if per_rank_args else []
        log = open(tmp_path / f"rank{rank}.log", "w+")
        procs.append((subprocess.Popen(
            [sys.executable, "-m", "functransforms.examples.dp_sgd_distributed", *args, *extra,
             "--timeout", "30"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), log))
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
    outputs = launch(2, ["--steps", str(STEPS), "--global-batch", str(GLOBAL_BATCH)], tmp_path,
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
        launch(2, ["--steps", "1"], tmp_path,
               per_rank_args=lambda r: ["--global-batch", "eight"] if r == 1 else [])
    assert time.monotonic() - start < DEADLINE_S


def test_single_process_without_torchrun(capsys):
    example.main(["--steps", "2", "--global-batch", "8"])
    assert "1 process(es), global batch 8" in capsys.readouterr().out
