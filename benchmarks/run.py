"""One command for every benchmark: functransforms beside its peers, in one process.

    python benchmarks/run.py            # full mode: writes benchmarks/RESULTS.md and plots/
    python benchmarks/run.py --quick    # every workload once at a small size (CI smoke)

Each workload family lives in ``benchmarks/workloads/``; its ``run(settings)`` returns
tables of medians (see NOTE [interleaved medians] in workloads/harness.py). Where
functransforms is more than 1.5x slower than torch.func, the row is profiled with cProfile
and RESULTS.md says where the time goes. Peers that are not installed (JAX, Opacus) and
transforms functransforms does not have yet are skipped with a note.
"""
import argparse
import cProfile
import datetime
import os
import platform
import pstats
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch

# The checkout this script belongs to, not whichever functransforms the environment finds
# first (another checkout on PYTHONPATH), is the one measured and named in the header.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import functransforms as ft  # noqa: E402
# ``python benchmarks/run.py`` puts this directory first on sys.path, so the workloads
# package imports as a top-level one.
from workloads import harness  # noqa: E402
from workloads import (
    ensembling, forward_mode, grad_micro, jacobian_shapes, jacobians, memory, overhead,
    per_sample_grads, scale_out,
)
from workloads.harness import (
    COMPILED, ORACLE, OURS, PAIRED, TF_COMPILED, Settings, peer_versions,
)

HERE = Path(__file__).resolve().parent

FAMILIES = {
    "per_sample_grads": per_sample_grads,
    "ensembling": ensembling,
    "jacobians": jacobians,
    "jacobian_shapes": jacobian_shapes,
    "forward_mode": forward_mode,
    "grad_micro": grad_micro,
    "overhead": overhead,
    "memory": memory,
    "scale_out": scale_out,
}
SLOW_RATIO = 1.5


def machine():
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as fh:
            model = next(line.split(":", 1)[1].strip() for line in fh
                         if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return model, os.cpu_count()


def commit():
    def git(*args):
        return subprocess.run(["git", *args], cwd=HERE, capture_output=True, text=True).stdout
    head = git("rev-parse", "--short", "HEAD").strip() or "unknown"
    return head + (" + uncommitted edits" if git("status", "--porcelain", "--", "..").strip()
                   else "")


def ratio(row, num, den):
    a, b = row.values.get(num), row.values.get(den)
    return a / b if a and b else None


def ours_ratio(row):
    return row.ratio if row.ratio is not None else ratio(row, OURS, ORACLE)


def fmt(value):
    if value is None:
        return "n/a"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


def render_table(table):
    is_time = table.unit != "MiB"
    heads = [table.config_label] + [f"{name} ({table.unit})" for name in table.impls]
    heads.append(f"{OURS} / {ORACLE}")
    if table.loop and is_time:
        heads.append(f"{OURS} speedup over {table.loop}")
    heads += [h for h, _ in table.extra_columns]
    pairs = [p for p in PAIRED if any(p in row.ratios for row in table.rows)]
    heads += [f"{num} / {den}" for num, den in pairs]
    compiled = [n for n in (COMPILED, TF_COMPILED) if any(n in row.compile_s for row in table.rows)]
    if compiled:
        heads.append("compile s (" + " / ".join(compiled) + ")")
    lines = [f"### {table.title}", "", "| " + " | ".join(heads) + " |",
             "|" + "---|" * len(heads)]
    footnotes = []
    for row in table.rows:
        cells = [str(row.config)]
        cells += [fmt(None if row.values.get(n) is None else row.values[n] * table.scale)
                  for n in table.impls]
        r = ours_ratio(row)
        cells.append("n/a" if r is None else f"**{r:.2f}**" if r > SLOW_RATIO else f"{r:.2f}")
        if table.loop and is_time:
            s = ratio(row, table.loop, OURS)
            cells.append("n/a" if s is None else f"{s:.1f}x")
        cells += [cell(row) for _, cell in table.extra_columns]
        cells += [fmt(row.ratios.get(p)) for p in pairs]
        if compiled:
            cells.append(" / ".join(fmt(row.compile_s.get(n)) for n in compiled))
        lines.append("| " + " | ".join(cells) + " |")
        footnotes += [f"- {table.config_label} {row.config}: {note}" for note in row.notes]
    lines.append("")
    lines += [f"- {note}" for note in table.notes] + footnotes
    lines.append(f"\n![{table.title}](plots/{table.key}.png)\n")
    return "\n".join(lines)


# cProfile self time, grouped by where the code lives.
BUCKETS = (
    ("functransforms Python", lambda f: "/functransforms/" in f),
    ("torch Python (ops, autograd, pytree, decompositions, torch.func)", lambda f: "/torch/" in f),
    ("C++ (aten kernels, dispatcher, autograd engine, wrapper creation)", lambda f: f == "~"),
)


def _profile(fn, calls):
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    buckets = {name: 0.0 for name, _ in BUCKETS}
    buckets["other Python"] = 0.0
    top = []
    dispatches = 0
    for (filename, line, func), (_, ncalls, tottime, _, _) in pstats.Stats(prof).stats.items():
        bucket = next((name for name, match in BUCKETS if match(filename)), "other Python")
        buckets[bucket] += tottime / calls
        where = "aten op calls" if func.startswith("<built-in method torch._ops.") else (
            func if filename == "~" else f"{Path(filename).name}:{line}({func})")
        top.append((tottime / calls, where))
        if func == "__torch_dispatch__" and "/functransforms/" in filename:
            dispatches += ncalls / calls
    return buckets, sorted(top, reverse=True)[:6], dispatches


def _fallback_counters():
    counters = [(ft.reset_fallback_counts, ft.fallback_counts, "vmap")]
    if hasattr(ft, "jvp_fallback_counts"):
        counters.append((ft.reset_jvp_fallback_counts, ft.jvp_fallback_counts, "jvp"))
    return counters


def explain(table, row, seconds):
    """Profile-backed account of one slow row (functransforms and torch.func side by side)."""
    calls = {name: max(1, int(seconds / row.values[name])) for name in (OURS, ORACLE)}
    counters = _fallback_counters()
    for reset, _, _ in counters:
        reset()
    ft_buckets, top, dispatches = _profile(table.profile_targets[row.config], calls[OURS])
    fallbacks = {f"{kind}:{op}": n / calls[OURS]
                 for _, counts, kind in counters for op, n in counts().items()}
    tf_buckets, _, _ = _profile(table.reference_targets[row.config], calls[ORACLE])
    lines = [f"**{table.title}, {table.config_label} {row.config}** "
             f"(cProfile self time per call, ms; profiling inflates Python-heavy code):", ""]
    lines.append("| where | " + OURS + " | " + ORACLE + " |")
    lines.append("|---|---|---|")
    for name in ft_buckets:
        lines.append(f"| {name} | {ft_buckets[name] * 1e3:.2f} | {tf_buckets[name] * 1e3:.2f} |")
    lines.append("")
    py = ft_buckets["functransforms Python"] + ft_buckets["other Python"]
    extra = sum(ft_buckets.values()) - sum(tf_buckets.values())
    cpp = BUCKETS[2][0]
    reason = (f"functransforms handles {dispatches:.0f} ops in `__torch_dispatch__` per call; "
              f"its own Python costs {py * 1e3:.2f} ms per call, C++ time differs by "
              f"{(ft_buckets[cpp] - tf_buckets[cpp]) * 1e3:+.2f} ms, out of "
              f"{extra * 1e3:+.2f} ms more in total than torch.func.")
    profiled_ratio = sum(ft_buckets.values()) / max(sum(tf_buckets.values()), 1e-12)
    if fallbacks:
        worst = sorted(fallbacks.items(), key=lambda kv: -kv[1])
        reason += (" Per-example loop fallbacks run in every call ("
                   + ", ".join(f"`{op}` x{n:g}" for op, n in worst[:8])
                   + (", ..." if len(worst) > 8 else "")
                   + "): each is a Python loop over the batch, the main cost when the batch is "
                   "large.")
    elif profiled_ratio < 1.2:
        reason += (f" No loop fallback ran, and under the profiler the two are close "
                   f"(ratio {profiled_ratio:.2f}): the timed gap did not reproduce, so it is "
                   f"most likely load from other processes on the shared machine.")
    else:
        reason += (f" No loop fallback ran: the gap (ratio {profiled_ratio:.2f} under the "
                   f"profiler) is per-op Python dispatch.")
    lines.append("Reason: " + reason)
    lines.append("")
    lines.append("Top self time in functransforms' run: " + "; ".join(
        f"`{where}` {t * 1e3:.2f} ms" for t, where in top))
    return "\n".join(lines) + "\n"


def slow_rows(table):
    rows = [row for row in table.rows if row.config in table.reference_targets
            and (ours_ratio(row) or 0) > SLOW_RATIO]
    return sorted(rows, key=lambda row: -ours_ratio(row))


def plot(table, directory):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = [str(row.config) for row in table.rows]
    impls = [n for n in table.impls if any(row.values.get(n) for row in table.rows)]
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(configs) * max(1, len(impls)) / 3), 4))
    width = 0.8 / max(1, len(impls))
    for i, name in enumerate(impls):
        xs = [k + (i - (len(impls) - 1) / 2) * width for k in range(len(configs))]
        ys = [(row.values.get(name) or 0) * table.scale for row in table.rows]
        ax.bar(xs, ys, width, label=name)
    ax.set_xticks(range(len(configs)), configs)
    ax.set_xlabel(table.config_label)
    ax.set_ylabel(table.unit + (" (log scale)" if table.unit != "MiB" else ""))
    if table.unit != "MiB":
        ax.set_yscale("log")
    ax.set_title(table.title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(directory / f"{table.key}.png", dpi=100)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="every workload once at a small size; no meaningful numbers")
    parser.add_argument("--out", type=Path, default=HERE,
                        help="directory for RESULTS.md and plots/ (default: benchmarks/)")
    parser.add_argument("--only", default=",".join(FAMILIES),
                        help="comma-separated families: " + ", ".join(FAMILIES))
    parser.add_argument("--budget", type=float, default=1.0,
                        help="seconds of timed calls per implementation and configuration")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (JAX is pinned to one thread)")
    parser.add_argument("--profile-seconds", type=float, default=1.0)
    parser.add_argument("--compile-backend", default=None,
                        help="torch.compile backend of the compiled columns (default: inductor; "
                             "eager with --quick)")
    opts = parser.parse_args(argv)
    harness.COMPILE_BACKEND = opts.compile_backend or ("eager" if opts.quick else "inductor")
    warnings.filterwarnings("ignore")  # fallback warnings are reported from fallback_counts
    torch.set_num_threads(opts.threads)
    settings = Settings(quick=opts.quick, rounds=1 if opts.quick else opts.rounds,
                        budget_s=opts.budget)
    started, load_start, t0 = datetime.datetime.now(), os.getloadavg(), time.perf_counter()

    sections, tables, failures = [], [], []
    for name in opts.only.split(","):
        family_t0 = time.perf_counter()
        try:
            got = FAMILIES[name].run(settings)
        except Exception:  # noqa: BLE001  (one broken family must not hide the others)
            failures.append(f"- `{name}` crashed:\n\n```\n{traceback.format_exc()}```")
            continue
        finally:
            print(f"[run.py] {name}: {time.perf_counter() - family_t0:.1f} s", flush=True)
        tables += got
        sections += [render_table(t) for t in got]

    explanations = []
    profiled = 0
    for table in tables:
        if table.unit == "MiB" or (opts.quick and profiled):
            continue
        for row in slow_rows(table)[:1 if opts.quick else None]:
            print(f"[run.py] profiling {table.key} {row.config} ...", flush=True)
            explanations.append(explain(table, row, opts.profile_seconds))
            profiled += 1

    cpu, cores = machine()
    versions = peer_versions()
    header = [
        "# functransforms benchmarks",
        "",
        f"Generated by `python benchmarks/run.py{' --quick' if opts.quick else ''}` on "
        f"{started:%Y-%m-%d %H:%M} in {time.perf_counter() - t0:.0f} s."
        + (" **Quick mode: single calls at toy sizes, the numbers mean nothing.**"
           if opts.quick else ""),
        "",
        f"- Machine: {cpu}, {cores} cores (shared: load average {load_start[0]:.1f} at the "
        f"start, {os.getloadavg()[0]:.1f} at the end)",
        f"- torch {torch.__version__} with {opts.threads} intra-op thread(s); JAX "
        f"{versions['jax']} pinned to one thread; Opacus {versions['opacus']}; Python "
        f"{platform.python_version()}; functransforms at {commit()}",
        f"- Method: calls are timed in CPU time of the process (every implementation runs on "
        f"one thread; on a loaded machine wall-clock time also counts the waits for a core), "
        f"compile times in wall-clock time. All implementations of a configuration run in one "
        f"process, interleaved "
        f"round by round ({settings.rounds} rounds, order rotated, about "
        f"{settings.budget_s:g} s of calls each after warm-up, at least one per round); the "
        f"figure is the median call, and {OURS} / {ORACLE} is the median over rounds of the "
        f"ratio of the two implementations' medians in that round, so load drift between "
        f"rounds cancels. Every output is checked against torch.func's before timing. "
        f"Ratio > {SLOW_RATIO} in bold: explained under \"Where functransforms is slower\".",
        f"- Compiled columns: `{COMPILED}` is `ft.capture(f, backend=\"{harness.COMPILE_BACKEND}\")` "
        f"(the recorded aten graph compiled once per signature, NOTE [Compiled capture] in "
        f"functransforms/api/capture.py), `{TF_COMPILED}` is `torch.compile` of the same "
        f"torch.func program with the same backend, the fair compiled peer. Their warm-up "
        f"(record + compile, or compile) is not in the timed calls; the `compile s` column "
        f"gives it. Ratios between implementations other than {OURS} / {ORACLE} are paired "
        f"round by round in the same way.",
        "",
    ]
    text = "\n".join(header) + "\n" + "\n".join(sections)
    text += f"\n## Where functransforms is slower than {SLOW_RATIO}x torch.func\n\n"
    text += "\n".join(explanations) if explanations else "Nowhere in this run.\n"
    if failures:
        text += "\n## Families that crashed\n\n" + "\n".join(failures) + "\n"

    plots = opts.out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    for table in tables:
        plot(table, plots)
    (opts.out / "RESULTS.md").write_text(text)
    print(f"[run.py] wrote {opts.out / 'RESULTS.md'} and {len(tables)} plots", flush=True)
    return tables, failures


if __name__ == "__main__":
    _, crashed = main()
    sys.exit(1 if crashed else 0)
