"""The one exception type for bad user input.

Every check on files, labels, cohorts and configuration raises :class:`InputError` with a message that names the
file, the field and what was expected, so that the command line can print it and exit with status 2, and the Slicer
module can show it as is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

PathLike = Union[str, Path]

EXIT_BAD_INPUT = 2
"""The command line's exit status for an InputError, whose message it prints last on stderr, after
:data:`ERROR_PREFIX` (read back by :func:`printed_error`)."""
ERROR_PREFIX = "error: "


def printed_error(stderr_lines: Sequence[str]) -> Optional[str]:
    """The message a command line printed after :data:`ERROR_PREFIX`, or None: from the last line that starts with
    it to the end, since a message may run over several lines (a cohort's problems, one case per line)."""
    lines = list(stderr_lines)
    starts = [i for i, line in enumerate(lines) if line.startswith(ERROR_PREFIX)]
    if not starts:
        return None
    return "\n".join([lines[starts[-1]][len(ERROR_PREFIX):], *lines[starts[-1] + 1:]]).rstrip()


class InputError(ValueError):
    """Bad input: a file, a field of it, or an option. ``str(error)`` is the message to show to the user."""

    def __init__(self, message: str, path: Optional[PathLike] = None, field: Optional[str] = None):
        self.path = Path(path) if path is not None else None
        self.field = field
        self.message = message
        """The message without the path prefix (to extend it, e.g. with what to do)."""
        prefix = f"{self.path}: " if self.path is not None else ""
        super().__init__(prefix + message)
