"""Services started from the Python API run on background threads: zmserve/lifecycle.py runs them (the same
lifecycle as the command line's), and `stop` ends them all."""

from __future__ import annotations

from zmserve.lifecycle import Service, run_in_background
from zmserve.lifecycle import stop_background as stop

__all__ = ["Service", "run_in_background", "stop"]
