"""Data sources and grain input pipelines."""
