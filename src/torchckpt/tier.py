"""A CheckpointManager's remote tier: every step committed locally is copied to a remote root in the background.

::

    mgr = CheckpointManager("/local/ckpt", remote="s3://bucket/run", keep=[KeepLast(3)])

- A save commits locally as without a remote and returns at local speed.
  After the local commit, the step is queued for upload
  (:class:`.step_upload.StepUploader`: one thread, one step at a time,
  retries with backoff, bounded by ``UploadConfig.max_pending``: a save waits
  for room). The remote copy has the same step name under the remote root and
  is committed by its manifest, put last (:mod:`.step_copy`).
- Retention applies to each tier on its own, with the same policies: to the
  local steps after each save (never a step whose upload is queued or
  running) and after each upload; to the remote steps after each successful
  upload.
- A load takes the newest step either tier holds, from local disk where it
  is there (and, when the local copy is damaged, from the remote one),
  otherwise from the remote: a step that retention (or a lost disk) removed
  locally loads from the remote.
- A failed upload is logged, kept in ``manager.upload_errors``, raised once
  by ``wait_for_uploads`` or ``close``, and retried by ``retry_uploads``; the
  local copy is never touched by it. An upload a preemption (or a timed-out
  ``close``) abandoned is done when the next run opens the manager: its
  newest local step is queued when the remote has nothing as new.

Only the coordinator (rank 0) uploads and applies retention; it must see the
whole local checkpoint (one node, or a shared file system).
"""

from __future__ import annotations

import errno
import logging
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

from .errors import CheckpointIOError, ConfigError, UploadError
from .load_fallback import DAMAGE
from .retention import CheckpointInfo, RetentionPolicy, doomed
from .step_store import StepStore, delete_steps, open_step_store
from .step_upload import StepUploader, UploadConfig

__all__ = ["LOCAL", "REMOTE", "RemoteTier"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: The names of the two tiers (``CheckpointManager.step_locations``).
LOCAL = "local"
REMOTE = "remote"


class RemoteTier:
    """The remote root of a manager, and the uploads to it.

    Args:
        local: The manager's local steps.
        remote: The remote root (an object store URL, or another directory).
        config: How uploads go (None: the defaults).
        on_uploaded: Called (upload thread) after each upload ended: ``(step, uploaded)``.
        storage_options: The object store client's configuration keys, on top of the environment.

    Raises:
        ConfigError: ``remote`` is the local root.
        UnsupportedURLError: ``remote`` is a URL of a storage torchckpt does not have.
    """

    def __init__(
        self,
        local: StepStore,
        remote: str | os.PathLike[str],
        config: UploadConfig | None,
        on_uploaded: Callable[[int, bool], None],
        storage_options: Mapping[str, str] | None = None,
    ) -> None:
        self.local = local
        self.store = open_step_store(remote, storage_options)
        if self.store.root == local.root:
            raise ConfigError(f"remote must be another root than the local one, got {self.store.root}", field="remote")
        self.config = config or UploadConfig()
        self.uploader = StepUploader(local.path, self.store.path, self.config, on_uploaded, storage_options)

    @property
    def root(self) -> str:
        """The remote root."""
        return self.store.root

    # -- listing --------------------------------------------------------------

    def locations(self, local_steps: Sequence[int]) -> dict[int, tuple[str, ...]]:
        """``{step: ("local",) | ("remote",) | ("local", "remote")}`` of every committed step, ascending.

        Raises:
            CheckpointIOError: The remote cannot be listed and no step is local (names the remote).
        """
        remote = set(self._remote_steps(bool(local_steps)))
        out: dict[int, tuple[str, ...]] = {}
        for step in sorted(set(local_steps) | remote):
            out[step] = tuple(t for t, there in ((LOCAL, step in local_steps), (REMOTE, step in remote)) if there)
        return out

    def _remote_steps(self, tolerate: bool) -> list[int]:
        """The remote committed steps; with ``tolerate``, none (and a warning) when the remote cannot be listed."""
        try:
            return [c.step for c in self.store.committed()]
        except OSError as e:
            if tolerate:
                logger.warning("cannot list the remote steps under %s (using the local ones): %s", self.root, e)
                return []
            raise CheckpointIOError(
                f"cannot list the steps under the remote {self.root}: {getattr(e, 'strerror', None) or e}",
                errno=getattr(e, "errno", None) or errno.EIO, path=self.root, operation="list",
            ) from e  # fmt: skip

    def path_of(self, step: int) -> str:
        """Where a load reads ``step``: its local directory when it is there, else its remote location."""
        return self.local.path(step) if self.local.present(step) else self.store.path(step)

    def present(self, step: int) -> bool:
        """Whether either tier holds ``step``."""
        return self.local.present(step) or self.store.present(step)

    def load(self, step: int, load_at: Callable[[str], T]) -> T:
        """``load_at(location)`` of ``step``: the local copy, else (missing or damaged locally) the remote one."""
        local = self.local.path(step)
        if not self.local.present(step):
            return load_at(self.store.path(step))
        try:
            return load_at(local)
        except DAMAGE as e:
            if not self.store.present(step):
                raise
            remote = self.store.path(step)
            warnings.warn(f"step {step} at {local} cannot be loaded ({e}); loading it from {remote}", stacklevel=4)
            logger.warning("step %d at %s cannot be loaded (%s); loading it from %s", step, local, e, remote)
            return load_at(remote)

    # -- uploads ----------------------------------------------------------------

    def catch_up(self, local_steps: Sequence[int]) -> int | None:
        """When a manager opens: queue the newest local step if the remote has nothing as new; return it (None: none).

        An upload that a preemption or a timed-out ``close`` abandoned is thus
        done by the next run; older local steps are left (retention would soon
        delete them remotely anyway). A remote that cannot be listed queues nothing.
        """
        if not local_steps:
            return None
        try:
            remote = [c.step for c in self.store.committed()]
        except OSError as e:
            logger.warning("cannot list the remote steps under %s: %s; no upload resumed", self.root, e)
            return None
        newest = max(local_steps)
        if remote and max(remote) >= newest:
            return None
        logger.info("step %d is not under the remote %s yet: uploading it", newest, self.root)
        self.upload(newest, replace=False)
        return newest

    def upload(self, step: int, *, replace: bool) -> None:
        """Queue the upload of the committed local ``step``."""
        self.uploader.submit(step, replace=replace)

    def wait_for_room(self, step: int) -> None:
        """Before saving ``step``: wait (bounded) until fewer than ``max_pending`` uploads are pending.

        Raises:
            CheckpointIOError: errno ETIMEDOUT, naming the remote and the steps still pending.
        """
        if not self.uploader.wait_for_room(self.config.room_timeout_s):
            raise CheckpointIOError(
                f"cannot save step {step}: the uploads of steps {sorted(self.uploader.pending())} to {self.root} "
                f"are still pending after {self.config.room_timeout_s:g}s (UploadConfig.max_pending="
                f"{self.config.max_pending})",
                errno=errno.ETIMEDOUT, path=self.root, operation="upload",
            )  # fmt: skip

    def wait(self, timeout_s: float | None) -> None:
        """Wait for the pending uploads; raise the failures not raised before.

        Raises:
            UploadError: An upload failed (names the step and its URL); errno ETIMEDOUT:
                uploads are still pending after ``timeout_s``.
        """
        timeout = self.config.close_timeout_s if timeout_s is None else timeout_s
        left = [] if self.uploader.wait_idle(timeout) else sorted(self.uploader.pending())
        self._raise_failures(left, f"the uploads of steps {left} to {self.root} are still pending after {timeout:g}s")

    def retry(self) -> list[int]:
        """Queue again the failed uploads whose local step is still committed; return those steps."""
        return self.uploader.retry(self.local.present)

    def close(self) -> None:
        """Wait (bounded) for the pending uploads, stop the upload thread; raise the failures not raised before.

        Raises:
            UploadError: An upload failed, or uploads were still pending after
                ``UploadConfig.close_timeout_s`` (they are abandoned; nothing half-copied is committed).
        """
        left = sorted(self.uploader.close(self.config.close_timeout_s))
        self._raise_failures(
            left, f"closing the manager abandoned the uploads of steps {left} to {self.root}: still pending after "
            f"{self.config.close_timeout_s:g}s (the local copies are intact)",
        )  # fmt: skip

    def _raise_failures(self, left: list[int], pending_message: str) -> None:
        """Raise ``UploadError(pending_message)`` (ETIMEDOUT) when uploads are ``left``, else a failure not raised before."""
        if left:
            raise UploadError(pending_message, step=left[0], url=self.store.path(left[0]), errno=errno.ETIMEDOUT)
        error = self.uploader.take_unseen()
        if error is not None:
            raise error

    # -- retention ----------------------------------------------------------------

    def apply_retention(self, policies: Sequence[RetentionPolicy], guarded: set[int]) -> list[int]:
        """Delete the remote steps no policy keeps (never the newest one, nor a ``guarded`` one); return them."""
        try:
            infos: list[CheckpointInfo] = self.store.committed()
        except OSError as e:
            logger.warning("retention: cannot list the remote steps under %s: %s; will retry", self.root, e)
            return []
        gone = doomed(policies, infos, guarded | self.uploader.pending())
        deleted = delete_steps(self.store, gone, tier="remote", log=logger)
        if deleted:
            logger.info("retention deleted the remote steps %s under %s", deleted, self.root)
        return deleted
