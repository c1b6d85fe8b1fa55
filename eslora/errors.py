"""The one base class of the errors eslora reports to a user as one line (no traceback).

A subclass names what the user gave that cannot be used (a config key, a data file, an adapter,
a checkpoint, a cluster that lacks a resource) or a fault past its budget. The command line
prints `error: <message>` and exits non-zero; everything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class EsloraError(Exception):
    """An error with a message meant for the user (names the key, file or resource)."""
