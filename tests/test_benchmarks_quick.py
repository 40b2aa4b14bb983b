"""Smoke test of the benchmark suite: ``benchmarks/run.py --quick`` runs every workload once.

Nothing about speed (or, here, correctness: RESULTS.md notes any output that differs from
torch.func) is asserted; the test checks that every family ran and wrote its tables and plots.
"""
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import expecttest

ROOT = Path(__file__).resolve().parents[1]


class TestBenchmarksQuick(expecttest.TestCase):
    def test_quick_run(self):
        with tempfile.TemporaryDirectory() as out:
            done = subprocess.run(
                [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--out", out],
                capture_output=True, text=True, timeout=1200,
            )
            self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
            results = (Path(out) / "RESULTS.md").read_text()
            plots = sorted(p.name for p in (Path(out) / "plots").iterdir())
        titles = re.findall(r"^### ([^,(]*?)(?:,| \(|$)", results, flags=re.M)
        self.assertExpectedInline("\n".join(titles), """\
Per-sample gradients
Per-sample gradients
Ensemble of 10 MLPs
jacrev of a 3-layer tanh MLP R^w -> R^w w.r.t. its input
jacfwd of a 3-layer tanh MLP R^w -> R^w w.r.t. its input
hessian of a 3-layer tanh MLP R^w -> R^w w.r.t. its input
jacrev and jacfwd of a tanh layer R^n -> R^m
Peak memory: jacrev of a tanh layer R^8 -> R^64
Hessian-vector product of an MLP's nll loss w.r.t. its parameters
jacfwd of a tanh MLP R^8 -> R^32 w.r.t. its input
grad of a tiny function and of a 0.92M-parameter MLP loss
Per-op overhead on a chain of 20 tiny ops
Peak memory: per-sample gradients
Peak memory: jacrev of the tanh MLP at width 64
DP-SGD step""")
        self.assertNotIn("crashed", results)
        self.assertNotIn("failed", results)
        self.assertEqual(len(plots), len(titles))
