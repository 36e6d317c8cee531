"""What a checkpoint path may be, decided once where a save or a load first takes it.

Two rules (docs/format.md, "Paths"):

- **Local paths only.** A string that starts with a URL scheme and ``://``
  (``s3://``, ``gs://``, ``az://``, ``memory://``, ``http://``, and
  ``file://`` too) is refused with :class:`UnsupportedURLError`: taken as a
  local path it would silently create a directory named ``s3:``. ``file://``
  is refused rather than translated so that a string has one meaning only;
  the error says which local path to give instead.
- **Symbolic links: followed once, or refused.** The directories *above* a
  checkpoint are resolved once when a save starts (:func:`resolve_parent`),
  so every step of that save happens in one real directory even if a link
  on the way is re-pointed meanwhile. The checkpoint's own name is never
  followed: a save replaces the directory at that name (it would replace
  the link, or write through it into another checkpoint), so a link there
  is refused (:func:`check_not_a_link`); the reader refuses it likewise.
"""

from __future__ import annotations

import errno
import os
import re
from urllib.parse import urlsplit

from ..errors import CheckpointIOError, UnsupportedURLError

__all__ = ["check_not_a_link", "local_path", "resolve_parent"]

#: A URL scheme (RFC 3986: a letter, then letters, digits, ``+``, ``-``, ``.``) followed by ``://``.
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def local_path(path: str | os.PathLike[str]) -> str:
    """``path`` as a string, refused when it is a URL.

    Args:
        path: A checkpoint directory, a manager's root, or a file to write.

    Returns:
        The path, unchanged (``os.fspath``).

    Raises:
        UnsupportedURLError: ``path`` starts with ``scheme://`` (a ``ValueError``).
    """
    text = os.fspath(path)
    match = _URL.match(text) if isinstance(text, str) else None
    if match is None:
        return text
    scheme = match.group(1).lower()
    hint = ""
    if scheme == "file":
        hint = f"; give the local path {urlsplit(text).path or '/'} instead"
    raise UnsupportedURLError(
        f"{text}: {scheme}:// URLs are not supported here: torchckpt reads and writes local (or mounted) "
        f"file systems and the object stores s3://, gs://, az:// and memory://{hint}",
        path=text,
        scheme=scheme,
    )


def resolve_parent(path: str) -> str:
    """``path`` made absolute, the directories above it resolved (links followed, once); its own name kept.

    Directories that do not exist yet are kept as they are written (realpath's non-strict mode).
    """
    parent, name = os.path.split(os.path.abspath(path))
    return os.path.join(os.path.realpath(parent), name)


def check_not_a_link(path: str, *, rank: int = 0) -> None:
    """Refuse to save to ``path`` when it is a symbolic link (dangling or not).

    Raises:
        CheckpointIOError: errno ELOOP, operation ``"prepare"``, naming the
            link, its target and the rank.
    """
    try:
        target = os.readlink(path)
    except OSError:
        return  # not a link (or nothing there)
    raise CheckpointIOError(
        f"rank {rank}: cannot save to {path}: {path} is a symbolic link (to {target}); a save replaces the "
        "directory at its path and never follows a link there: save to the target, or remove the link",
        errno=errno.ELOOP,
        path=path,
        rank=rank,
        operation="prepare",
    )
