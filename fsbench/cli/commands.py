"""Imports every sub-command module so that each registers itself on the app."""

from fsbench.cli import demo, ls, report, run  # noqa: F401
