"""Errors raised where bad input enters, so callers can name the record and the file."""


class RecordError(Exception):
    """One record cannot be used (missing/unreadable media, missing field). The run can go on without it."""

    def __init__(self, index, reason, path=None):
        self.index = index
        self.reason = reason
        self.path = path
        where = f" ({path})" if path else ""
        super().__init__(f"record {index!r}{where}: {reason}")


class InputError(Exception):
    """A run-level problem in what the user gave (config, test file, weights). Reported in one line, exit 1."""
