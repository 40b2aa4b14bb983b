"""Benchmark workload families; each module's ``run(settings)`` returns result tables."""
