"""Benchmarks of mljob against baselines written without it; run each as `python -m bench.<name>`."""
