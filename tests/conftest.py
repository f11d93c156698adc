"""Shared pytest fixtures.  Keep this file a list of registrations; the logic lives in named modules."""

from slurm_cluster import slurm_cluster  # noqa: F401  session-scoped two-node SLURM cluster (or a skip + reason)
