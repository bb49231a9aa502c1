"""The errors a user can fix, and only those.

The CLI prints a ``RetinaError`` as one line, ``retina: error: MESSAGE``, and exits with status 2;
any other exception is a bug and keeps its traceback. Each contract keeps its own error class
next to it (``ConfigError`` in retina/config, ``CheckpointError`` in engine/checkpoint.py,
``BadImageError`` in data/coco.py, ...), derived from ``RetinaError``; the classes below are for
the files and arguments a user names. Each also derives from the builtin error it refines
(``ValueError``, ``FileNotFoundError``), so callers that catch those keep working.
"""

from __future__ import annotations


class RetinaError(Exception):
    """Base of every error a user can fix; ``str(e)`` is one line naming the culprit."""


class MissingFileError(RetinaError, FileNotFoundError):
    """A file or folder that the user named, or that the config points to, does not exist."""


class InputError(RetinaError, ValueError):
    """A file or argument the user gave cannot be used (not COCO json, no images, ...)."""


class UsageError(RetinaError):
    """A command line that parses but cannot run (``retina data check`` without ``--ann``)."""
