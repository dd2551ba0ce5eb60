"""The one error type the benchmark reports to its user.

A `BenchError` carries a complete, one-line message (what failed and which file, URL or
flag caused it). The CLI prints it without a traceback and exits with status 2; any other
exception is a bug in the benchmark and keeps its traceback.
"""

from __future__ import annotations


class BenchError(Exception):
    """A problem the user can fix: an unreachable server, a malformed file, a bad flag."""
