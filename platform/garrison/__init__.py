"""Garrison's control plane: gateway, tenancy, router, cluster bring-up, weight store, planner, CLI."""

__version__ = "0.1.0"
