"""Helpers shared by the experiments (atomic writes, sweep harness, plotting style)."""
