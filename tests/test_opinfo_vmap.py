"""OpInfo sweep of vmap and vmap(vjp) against a per-example loop, with torch.func as a peer.

For every OpInfo with float32 CPU support and each of its first few sample inputs, each
tensor argument is batched in turn (then all together, then one at in_dim=-1); see
tests/opinfo_util.py for how cases and references are built. The vjp sweep vmaps the
pullback of the op over its cotangents, and over primals and cotangents together.

The default tier checks a fixed subset; ``-m slow`` runs everything and writes
benchmarks/coverage/vmap_coverage.{md,json}.
"""
import collections
import json
import os
import pathlib
import subprocess
import sys
import tempfile

import pytest
import torch
import torch.func

import functransforms as ft
from opinfo_util import (
    OPS_BY_KEY, VMAP_OPS, Transforms, is_random, op_key, run_op, vjp_cases, vmap_cases,
)

N_SAMPLES = 3
REPO = pathlib.Path(__file__).resolve().parent.parent
COVERAGE_DIR = REPO / "benchmarks" / "coverage"
FT = Transforms(ft.vmap, ft.vjp)
TF = Transforms(torch.func.vmap, torch.func.vjp)

# One or two ops per family a batching rule serves, plus the composites that reach them.
FAST_SUBSET = [
    "sin", "add", "where", "clamp", "sum", "amax", "softmax", "matmul", "addmm",
    "cat", "transpose", "__getitem__", "index_put", "index_select", "index_add", "gather",
    "scatter", "scatter_add", "take_along_dim", "sort", "topk", "kthvalue", "median",
    "searchsorted", "linalg.solve", "linalg.inv", "linalg.det", "linalg.cholesky",
    "linalg.eigh", "trace",
]
# Served by the rules of batching/rules/{indexing,sorting,linalg}.py alone.
NO_FALLBACK = [
    "index_select", "index_add", "gather", "scatter", "scatter_add", "sort", "topk",
    "kthvalue", "median", "linalg.solve", "linalg.inv", "linalg.det",
    "linalg.cholesky", "linalg.eigh", "trace",
]


def _vmap_cases(op):
    return vmap_cases(op, N_SAMPLES)


def _vjp_cases(op):
    return vjp_cases(op, N_SAMPLES)


def _check(key, make_cases):
    ft.reset_fallback_counts()
    result, used_fallback = run_op(OPS_BY_KEY[key], make_cases, {"ft": FT}, ft.fallback_counts)
    return result["ft"], used_fallback


@pytest.mark.parametrize("key", FAST_SUBSET)
def test_vmap_fast_subset(key):
    status, used_fallback = _check(key, _vmap_cases)
    assert status == "pass", status
    if key in NO_FALLBACK:
        assert not used_fallback, ft.fallback_counts()


@pytest.mark.parametrize("key", [k for k in FAST_SUBSET if OPS_BY_KEY[k].supports_autograd])
def test_vmap_vjp_fast_subset(key):
    status, _ = _check(key, _vjp_cases)
    assert status == "pass", status


def _phases(op):
    if is_random(op, N_SAMPLES):
        yield "random", lambda: True
        return
    for kind, make_cases in (("vmap", _vmap_cases), ("vjp", _vjp_cases)):
        if kind == "vjp" and not op.supports_autograd:
            continue

        def run(make_cases=make_cases):
            ft.reset_fallback_counts()
            status, used_fallback = run_op(op, make_cases, {"torch.func": TF, "ft": FT},
                                           ft.fallback_counts)
            return dict(status, fallback=used_fallback, fallback_ops=sorted(ft.fallback_counts()))

        yield kind, run


def _worker(start, path):
    """Sweep VMAP_OPS[start:], one JSON line when a phase starts and one when it is done."""
    with open(path, "a") as log:
        for op in VMAP_OPS[start:]:
            for kind, run in _phases(op):
                log.write(json.dumps({"start": op_key(op), "kind": kind}) + "\n")
                log.flush()
                log.write(json.dumps({"key": op_key(op), "kind": kind, "entry": run()}) + "\n")
                log.flush()


def sweep():
    """{op key: {'vmap': {...}, 'vjp': {...}}}: ft / torch.func status and whether ft used the
    loop fallback. Ops run in a worker process so that an op crashing the interpreter is
    recorded as a failure instead of ending the sweep."""
    results = collections.OrderedDict()
    index = {op_key(op): i for i, op in enumerate(VMAP_OPS)}
    start = 0
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "sweep.jsonl")
        while start < len(VMAP_OPS):
            proc = subprocess.run(
                [sys.executable, __file__, "--worker", str(start), path],
                cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True,
            )
            started = None
            with open(path) as log:
                for line in log:
                    record = json.loads(line)
                    if "start" in record:
                        started = record
                    else:
                        results.setdefault(record["key"], {})[record["kind"]] = record["entry"]
                        started = None
            if started is None:
                break
            reason = f"error: crashed the process (exit code {proc.returncode})"
            results.setdefault(started["start"], {})[started["kind"]] = {
                "ft": reason, "torch.func": "skip", "fallback": False, "fallback_ops": []}
            start = index[started["start"]] + 1
    return results


def summarize(results, kind):
    counted = [k for k, r in results.items() if kind in r and r[kind]["ft"] != "skip"]
    ft_pass = [k for k in counted if results[k][kind]["ft"] == "pass"]
    no_fallback = [k for k in ft_pass if not results[k][kind]["fallback"]]
    tf_counted = [k for k, r in results.items() if kind in r and r[kind]["torch.func"] != "skip"]
    tf_pass = [k for k in tf_counted if results[k][kind]["torch.func"] == "pass"]
    failed = [results[k][kind]["ft"] for k in counted if k not in ft_pass]
    return {
        "ops": len(counted), "matched": len(ft_pass), "matched_without_fallback": len(no_fallback),
        "mismatched": sum(": mismatch: " in f for f in failed),
        "errored": sum(": mismatch: " not in f for f in failed),
        "torch.func ops": len(tf_counted), "torch.func matched": len(tf_pass),
    }


def _pct(a, b):
    return f"{100 * a / max(b, 1):.1f}%"


def write_report(results):
    COVERAGE_DIR.mkdir(parents=True, exist_ok=True)
    figures = {kind: summarize(results, kind) for kind in ("vmap", "vjp")}
    (COVERAGE_DIR / "vmap_coverage.json").write_text(
        json.dumps({"figures": figures, "ops": results}, indent=1, sort_keys=True))
    n_random = sum(1 for r in results.values() if r.get("random"))
    lines = [
        "# vmap OpInfo coverage (functransforms.vmap vs a per-example loop)",
        "",
        f"torch {torch.__version__}, float32, CPU, first {N_SAMPLES} samples per OpInfo, batch of 3 "
        f"perturbed copies; each tensor argument batched alone, all together, and one at "
        f"in_dim=-1. {len(results)} OpInfos, {n_random} skipped as random (they draw random "
        f"numbers or return uninitialized memory). An op is counted when the loop reference "
        f"runs for at least one case; it matches when every case matches. 'Without fallback' "
        f"means no op ran in the per-example loop. Regenerate with "
        f"`python -m pytest tests/test_opinfo_vmap.py -m slow`.",
        "",
        "| sweep | ops | functransforms matched | without fallback | mismatch / error | "
        "torch.func matched |",
        "|---|---|---|---|---|---|",
    ]
    for kind, title in (("vmap", "vmap(op)"), ("vjp", "vmap(vjp(op))")):
        f = figures[kind]
        lines.append(
            f"| {title} | {f['ops']} | {f['matched']} ({_pct(f['matched'], f['ops'])}) | "
            f"{f['matched_without_fallback']} ({_pct(f['matched_without_fallback'], f['ops'])}) | "
            f"{f['mismatched']} / {f['errored']} | "
            f"{f['torch.func matched']}/{f['torch.func ops']} "
            f"({_pct(f['torch.func matched'], f['torch.func ops'])}) |"
        )
    for kind in ("vmap", "vjp"):
        lines += ["", f"## {kind}: failures", "", "| op | functransforms | torch.func |", "|---|---|---|"]
        for key, r in sorted(results.items()):
            e = r.get(kind)
            if e and (e["ft"] not in ("pass", "skip") or e["torch.func"] not in ("pass", "skip")):
                cells = [c.replace("|", "\\|") for c in (e["ft"], e["torch.func"])]
                lines.append(f"| {key} | {cells[0]} | {cells[1]} |")
        lines += ["", f"## {kind}: matched only through the loop fallback", "",
                  "| op | ops run per example |", "|---|---|"]
        for key, r in sorted(results.items()):
            e = r.get(kind)
            if e and e["ft"] == "pass" and e["fallback"]:
                lines.append(f"| {key} | {', '.join(e['fallback_ops'])} |")
    (COVERAGE_DIR / "vmap_coverage.md").write_text("\n".join(lines) + "\n")
    return figures


@pytest.mark.slow
def test_full_sweep():
    figures = write_report(sweep())
    for kind in ("vmap", "vjp"):
        f = figures[kind]
        rate = f["matched"] / max(f["ops"], 1)
        assert rate >= f["torch.func matched"] / max(f["torch.func ops"], 1), figures
        assert rate >= 0.95, figures
    f = figures["vmap"]
    assert f["matched_without_fallback"] / max(f["ops"], 1) >= 0.80, figures


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    _worker(int(sys.argv[2]), sys.argv[3])
