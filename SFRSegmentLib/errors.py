"""The one exception type for bad user input.

Every check on files, labels, cohorts and configuration raises :class:`InputError` with a message that names the
file, the field and what was expected, so that the command line can print it and exit with status 2, and the Slicer
module can show it as is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

PathLike = Union[str, Path]

EXIT_BAD_INPUT = 2
"""The command line's exit status for an InputError, whose message is then its last line on stderr, after
:data:`ERROR_PREFIX` (the Slicer module shows that line as the whole message)."""
ERROR_PREFIX = "error: "


class InputError(ValueError):
    """Bad input: a file, a field of it, or an option. ``str(error)`` is the message to show to the user."""

    def __init__(self, message: str, path: Optional[PathLike] = None, field: Optional[str] = None):
        self.path = Path(path) if path is not None else None
        self.field = field
        self.message = message
        """The message without the path prefix (to extend it, e.g. with what to do)."""
        prefix = f"{self.path}: " if self.path is not None else ""
        super().__init__(prefix + message)
