"""Imports every sub-command module so that each registers itself on the app."""

from fsbench.cli import data, demo, ls, report, run, sweep  # noqa: F401
