"""Benchmarks: run from the project folder as `.venv/bin/python -m benchmarks.<name>`."""
