"""Thin Prefect tasks: one per retryable step, with its retry policy."""
