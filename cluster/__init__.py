"""Cluster configs and `ray job submit` entrypoints."""
