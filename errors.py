"""The two kinds of bad input, importable from every package: a run-level problem, and one record's problem; and
how an error is told in one line."""


class InputError(Exception):
    """A run-level problem in what the user gave (config, test file, weights, flags). Reported in one line, exit 1."""


class RecordError(Exception):
    """One record cannot be used (missing or unreadable media, a missing field). The run goes on without it.

    It crosses process boundaries (DataLoader workers, ranks): pickling keeps its three fields."""

    def __init__(self, index, reason, path=None):
        self.index = index
        self.reason = reason
        self.path = path
        where = f" ({path})" if path else ""
        super().__init__(f"record {index!r}{where}: {reason}")

    def __reduce__(self):
        return type(self), (self.index, self.reason, self.path)


def first_line(err: BaseException) -> str:
    """The first line of an error's message ('' when it has none)."""
    lines = str(err).strip().splitlines()
    return lines[0] if lines else ""


def described(err: BaseException) -> str:
    """`Type: first line of the message`: an unexpected failure told in one line."""
    return f"{type(err).__name__}: {first_line(err)}"
