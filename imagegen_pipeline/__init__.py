"""Batch image generation pipeline built on Dagster."""
