"""The error every config problem raises: one line naming the file (or ``--set`` item) and key."""

from __future__ import annotations

from retina.errors import RetinaError


class ConfigError(RetinaError, ValueError):
    """A config problem the user can fix; its message is one line naming the file (or ``--set``
    item) and key. A ``ValueError`` too, for callers that catch that."""

    def __init__(self, message: str) -> None:
        # Values echoed from the user (an override, a YAML string) may hold newlines.
        super().__init__(message.replace("\r", "\\r").replace("\n", "\\n"))
