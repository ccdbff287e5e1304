"""Reports built from the pipeline's tables: plain functions and templates, no Dagster."""
