"""Stable Diffusion 1.5 for imagegen-pipeline, declared through an entry point."""
