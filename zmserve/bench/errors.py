"""The bench's one exception type."""

from __future__ import annotations

import click


class BenchError(click.ClickException):
    """A problem the user can fix (bad input line, bad flags, a group that did not form): one line, no trace."""
