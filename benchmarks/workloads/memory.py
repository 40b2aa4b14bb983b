"""Peak memory of per-sample gradients and of jacrev with and without chunk_size.

NOTE [how peak memory is measured]
tracemalloc only sees Python's allocator, and torch's CPU tensors come from malloc. Each
measurement therefore runs in a fresh subprocess that reads the kernel's view of its
resident set: after one warm-up call (kernels, caches, lazy imports), the peak RSS mark is
reset through ``/proc/self/clear_refs``, then one call runs and the reported figure is
``VmHWM`` (peak RSS) minus ``VmRSS`` just before the call: the memory the call added at its
worst moment, its result included. The child runs with ``MALLOC_MMAP_THRESHOLD_`` so glibc
serves every block over 64 KiB with mmap and returns it to the OS when the tensor dies;
otherwise glibc's adaptive threshold keeps freed warm-up blocks in the heap, and the
measured call would reuse them without raising the peak. Smaller blocks still come from the
heap, so ``malloc_trim(0)`` hands the warm-up's free heap pages back before the mark is
reset: without it, torch.func's ``jacrev(chunk_size=1)`` on R^128 -> R^4096, whose
thousands of per-row calls allocate only small blocks, measured -0.1 to 5 MiB from run to
run, and 31 to 50 MiB with it. A calibration row (one 64 MiB tensor) shows that the figure
tracks tensor memory.
"""
import ctypes
import gc
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from . import jacobians, per_sample_grads
from .harness import ORACLE, OURS, Row, Table, Unavailable

CALIBRATION_MIB = 64


def _status_kib(field):
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _thunk(spec):
    if spec["family"] == "calibration":
        return lambda: torch.ones(CALIBRATION_MIB * 2 ** 20 // 4)
    if spec["family"] == "per_sample_grads":
        made = per_sample_grads.builders(spec["model"], spec["batch"])
    elif spec["family"] == "jacrev":
        made = jacobians.builders("jacrev", spec["width"], spec["chunk_size"])
    else:  # other families measure their own workloads through this hook
        made = importlib.import_module(f".{spec['family']}", __package__).memory_builders(spec)
    return made[spec["impl"]]()


def child(spec):
    try:
        fn = _thunk(spec)
    except Unavailable as why:
        return {"skipped": str(why)}
    fn()
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # 5: reset the peak RSS mark to the current RSS
    before = _status_kib("VmRSS")
    out = fn()  # noqa: F841  (the result is alive at the peak, as in real use)
    return {"mib": (_status_kib("VmHWM") - before) / 1024}


def measure(specs):
    """Measure each spec in one fresh subprocess (quick mode shares one between several)."""
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536",
               PYTHONPATH=os.pathsep.join([str(root), str(root / "benchmarks")]))
    done = subprocess.run(
        [sys.executable, "-W", "ignore", "-m", "workloads.memory", json.dumps(specs)],
        capture_output=True, text=True, env=env, cwd=root / "benchmarks",
    )
    if done.returncode != 0:
        why = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "no output"
        return [{"failed": why}] * len(specs)
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_rows(settings, tables):
    """``tables``: (table, {config: {impl: spec}}); one subprocess per spec (quick: one in all)."""
    jobs = [(table, config, impl, dict(spec, impl=impl))
            for table, configs in tables for config, specs in configs.items()
            for impl, spec in specs.items()]
    specs = [job[-1] for job in jobs]
    results = measure(specs) if settings.quick else [measure([s])[0] for s in specs]
    rows = {}
    for (table, config, impl, _), got in zip(jobs, results):
        if (table.key, config) not in rows:
            rows[table.key, config] = Row(config, {})
            table.rows.append(rows[table.key, config])
        row = rows[table.key, config]
        row.values[impl] = got.get("mib")
        if "skipped" in got:
            table.notes.append(f"{impl}: skipped, {got['skipped']}.")
        if "failed" in got:
            row.notes.append(f"{impl}: failed: {got['failed'][:200]}")


def run(settings):
    batch, width, chunk = (16, 64, 8) if settings.quick else (256, 1024, 64)
    psg_impls = [OURS] if settings.quick else [
        OURS, ORACLE, per_sample_grads.LOOP, "Opacus"]
    psg = Table(
        key="memory_per_sample_grads", title=f"Peak memory: per-sample gradients, batch {batch}",
        config_label="model", impls=psg_impls, unit="MiB", scale=1.0,
    )
    psg_configs = {
        model: {impl: {"family": "per_sample_grads", "model": model, "batch": batch}
                for impl in psg_impls}
        for model in (["MLP"] if settings.quick else per_sample_grads.MODELS)
    }
    jac_impls = [OURS] if settings.quick else [OURS, ORACLE]
    jac = Table(
        key="memory_jacrev",
        title=f"Peak memory: jacrev of the tanh MLP at width {width} (Jacobian {width}x{width})",
        config_label="chunk_size", impls=jac_impls, unit="MiB", scale=1.0,
    )
    jac_configs = {
        str(chunk_size): {impl: {"family": "jacrev", "width": width, "chunk_size": chunk_size}
                          for impl in jac_impls}
        for chunk_size in (None, chunk)
    }
    measure_rows(settings, [(psg, psg_configs), (jac, jac_configs)])
    if not settings.quick:
        calib = measure([{"family": "calibration"}])[0]
        psg.notes.append(
            f"Calibration: allocating one {CALIBRATION_MIB} MiB tensor measures "
            f"{calib.get('mib', float('nan')):.1f} MiB with this method.")
    for table in (psg, jac):
        table.notes.append(
            "Peak RSS growth during one call, result included, in a fresh subprocess per "
            "measurement (quick mode: one for all); see NOTE in benchmarks/workloads/memory.py.")
    return [psg, jac]


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(json.dumps([child(spec) for spec in json.loads(sys.argv[1])]))
