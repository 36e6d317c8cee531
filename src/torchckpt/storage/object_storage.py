"""An object store location as a :class:`~.base.Storage`: a commit without rename.

An object store cannot rename a directory, so a checkpoint at
``s3://bucket/ckpt`` is laid out as (docs/format.md, "Object stores")::

    ckpt/<marker>                 the marker (the format's manifest), put last: the commit;
                                  its metadata ``torchckpt-generation`` names the generation
    ckpt/gen-<id>/<object>        the objects of generation <id> (rank files, records)

Why this works:

- **Atomic switch.** A save writes its objects under a generation name no
  other save uses (``gen-<save_id>``: the ranks of one save share the id), then
  puts the marker with one PUT, which the store makes visible whole or not at
  all. A reader reads the marker first and then only objects of the
  generation it names, so it sees the old checkpoint or the new one, never a
  mix; when the old generation's objects vanish under it (deleted after the
  next commit) it asks :meth:`ObjectGeneration.replaced` and reads again.
- **Racing writers are detected.** The coordinator notes the marker's ETag
  when it begins; the commit is a conditional PUT (``If-Match`` that ETag, or
  ``If-None-Match: *`` where there was none), so of two saves racing for one
  location exactly one commits and the other fails naming the location.
  Stores without conditional writes get a plain PUT (last writer wins).
- **Cleanup.** After its commit, the coordinator deletes the generations it
  saw when it began (the old checkpoint, and what crashed saves left) — never
  one that appeared later, which may be a save in progress. A save that fails
  with one rank deletes its own generation; what a crashed multi-rank save left
  is deleted by the next save, or by ``torchckpt gc``.
- Objects at the location that are not generations (a user's ``config.yaml``)
  are never touched.
"""

from __future__ import annotations

import errno
import logging
import re
import time
from collections.abc import Callable, Mapping
from typing import Any, NoReturn

from ..errors import CheckpointIOError, CheckpointNotFoundError, CorruptCheckpointError
from .object_client import ObjectURL, is_connection_error, os_error, parse_object_url, store_for
from .object_io import BytesReader, ObjectStoreReader, ObjectStoreWriter, layout_of

__all__ = [
    "GENERATION_ATTRIBUTE",
    "ObjectGeneration",
    "ObjectSaveSession",
    "ObjectStorage",
    "generation_prefix",
    "list_children",
]

logger = logging.getLogger(__name__)

#: How many times a commit sends its conditional put when the connection fails (see ``commit``).
COMMIT_ATTEMPTS = 3
#: The marker's metadata key naming its generation.
GENERATION_ATTRIBUTE = "torchckpt-generation"
_GEN = re.compile(r"^gen-[0-9A-Za-z_-]{1,64}$")


def generation_prefix(save_id: str) -> str:
    """The name of the generation a save with id ``save_id`` writes (``gen-<id>``)."""
    name = f"gen-{save_id}"
    if not _GEN.match(name):
        raise ValueError(f"a save id must be 1-64 letters, digits, '-' or '_', got {save_id!r}")
    return name


def _call(op: str, url: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except Exception as e:
        raise os_error(e, op, url) from e


class ObjectStorage:
    """A checkpoint location in an object store (``s3://``, ``gs://``, ``az://``, ``memory://``).

    Args:
        url: The checkpoint's URL.
        options: The client's configuration keys, on top of the environment (see ``object_client.py``).
    """

    def __init__(self, url: str, options: Mapping[str, str] | None = None) -> None:
        self.loc: ObjectURL = parse_object_url(url)
        self.location = self.loc.url
        self._options = dict(options or {})

    @property
    def store(self) -> Any:
        """The client's store of the bucket."""
        return store_for(self.loc, self._options)

    def begin_save(
        self, *, rank: int, world_size: int, coordinator: bool, timeout_s: float, marker: str, save_id: str
    ) -> ObjectSaveSession:
        """Start this rank's part of a save into generation ``gen-<save_id>`` (see ``storage/base.py``).

        The coordinator notes the committed marker's ETag (for the conditional
        commit) and the generations present now (deleted after the commit).

        Raises:
            CheckpointIOError: The store cannot be reached or refuses (names rank, operation, URL).
        """
        session = ObjectSaveSession(self, rank=rank, marker=marker, generation=generation_prefix(save_id))
        if coordinator:
            try:
                session.survey()
            except OSError as e:
                raise CheckpointIOError(
                    f"rank {rank}: cannot save to {self.location}: {e.strerror or e}",
                    errno=e.errno, path=self.location, rank=rank, operation="prepare",
                ) from e  # fmt: skip
        return session

    def open_generation(self, marker: str) -> ObjectGeneration:
        """The committed generation, its marker ``marker`` read (see ``storage/base.py``).

        Raises:
            CheckpointNotFoundError: No marker at the location (or no bucket).
            CorruptCheckpointError: The marker names no generation.
            OSError: The store cannot be reached or refuses.
        """
        return ObjectGeneration.read_at(self, marker)

    def generations(self) -> list[str]:
        """The names of the generations present at the location (``gen-...``), committed or not."""
        return [n for n in list_children(self.location, self._options) if _GEN.match(n)]

    def delete_generation(self, name: str) -> int:
        """Delete every object of generation ``name``; return how many.

        Raises:
            OSError: The listing or a delete failed.
        """
        prefix = self.loc.child(name) + "/"
        paths = [m["path"] for m in self._listed(prefix)]
        if paths:
            _call("delete", self.loc.url_of(prefix), _obstore().delete, self.store, paths)
        return len(paths)

    def _listed(self, prefix: str) -> list[dict[str, Any]]:
        """Every object below ``prefix`` (the listing's pages read here, so that a failure is an ``OSError``)."""
        store = self.store

        def listed() -> list[dict[str, Any]]:
            return [m for page in _obstore().list(store, prefix or None) for m in page]

        return list(_call("list", self.loc.url_of(prefix), listed))

    def leftovers(self, marker: str) -> dict[str, float]:
        """The generations the marker does not name, each with the age in seconds of its newest object.

        They are what crashed or failed saves left, or a save in progress (a young one).
        """
        got = self.read_marker(marker)
        committed = got[1] if got is not None else None
        base = self.loc.child("")
        newest: dict[str, float] = {}
        for m in self._listed(base):  # one listing of the location, grouped by generation
            name, inside, _ = m["path"][len(base) :].partition("/")
            if inside and _GEN.match(name) and name != committed:
                newest[name] = max(newest.get(name, 0.0), m["last_modified"].timestamp())
        now = time.time()
        return {name: now - stamp for name, stamp in sorted(newest.items())}

    def delete_all(self, marker: str) -> int:
        """Delete the checkpoint: the marker first (it is no longer committed), then every generation.

        Objects at the location that are not generations are kept. Returns the objects deleted.

        Raises:
            OSError: A listing or a delete failed (the marker's delete first: a failure later
                leaves generations that ``gc`` removes).
        """
        key = self.loc.child(marker)
        store = self.store
        deleted = 0
        try:
            _obstore().delete(store, key)
            deleted += 1
        except Exception as e:
            err = os_error(e, "delete", self.loc.url_of(key))
            if err.errno != errno.ENOENT:
                raise err from e
        for name in self.generations():
            deleted += self.delete_generation(name)
        return deleted

    def read_marker(self, marker: str) -> tuple[bytes, str, str] | None:
        """The marker's bytes, its generation and its ETag (None: no marker).

        Raises:
            CorruptCheckpointError: The marker names no generation.
            OSError: The store cannot be reached or refuses.
        """
        key = self.loc.child(marker)
        url = self.loc.url_of(key)
        store = self.store
        try:
            got = _obstore().get(store, key)
            data = bytes(got.bytes())
        except Exception as e:
            err = os_error(e, "read", url)
            if err.errno == errno.ENOENT and "bucket" not in str(err):
                return None
            raise err from e
        generation = got.attributes.get(GENERATION_ATTRIBUTE, "")
        if not _GEN.match(generation):
            raise CorruptCheckpointError(
                f"corrupt checkpoint {self.location}: its {marker} names no generation "
                f"(metadata {GENERATION_ATTRIBUTE} is {generation!r})",
                path=self.location,
            )
        return data, generation, str(got.meta.get("e_tag") or "")

    def marker_etag(self, marker: str) -> str | None:
        """The marker's ETag now (None: no marker)."""
        key = self.loc.child(marker)
        store = self.store
        try:
            return str(_obstore().head(store, key).get("e_tag") or "")
        except Exception as e:
            err = os_error(e, "head", self.loc.url_of(key))
            if err.errno == errno.ENOENT:
                return None
            raise err from e


def list_children(url: str, options: Mapping[str, str] | None = None) -> list[str]:
    """The names directly below ``url`` (its "subdirectories": common prefixes), sorted.

    Raises:
        OSError: The listing failed (names the URL).
    """
    loc = parse_object_url(url)
    store = store_for(loc, options)
    listing = _call("list", loc.url, _obstore().list_with_delimiter, store, loc.child("") or None)
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in listing["common_prefixes"])


def _obstore() -> Any:
    import obstore

    return obstore


class ObjectSaveSession:
    """One rank's part of a save into a new generation of an object store location (see ``storage/base.py``)."""

    def __init__(self, storage: ObjectStorage, *, rank: int, marker: str, generation: str) -> None:
        self._storage = storage
        self._rank = rank
        self._marker = marker
        self.generation = generation
        self.location = storage.loc.url_of(storage.loc.child(generation))
        self._etag: str | None = None
        self._old: list[str] = []
        self._committed = False
        self._kept = False  # the commit's outcome is unknown: the marker may name this generation

    def survey(self) -> None:
        """The coordinator's first step: the committed marker's ETag and the generations present now."""
        self._etag = self._storage.marker_etag(self._marker)
        self._old = [g for g in self._storage.generations() if g != self.generation]

    def _key(self, name: str) -> str:
        return self._storage.loc.child(f"{self.generation}/{name}")

    def create(self, name: str) -> ObjectStoreWriter:
        """A new object ``name`` of the generation, written by a streamed multipart upload."""
        key = self._key(name)
        return ObjectStoreWriter(self._storage.store, key, self._storage.loc.url_of(key))

    def put(self, name: str, data: bytes) -> None:
        """Put the small object ``name`` whole."""
        key = self._key(name)
        _call("put", self._storage.loc.url_of(key), _obstore().put, self._storage.store, key, data, use_multipart=False)

    def get(self, name: str) -> bytes:
        """The bytes of the object ``name`` of the generation (FileNotFoundError: none)."""
        key = self._key(name)
        got = _call("read", self._storage.loc.url_of(key), _obstore().get, self._storage.store, key)
        return bytes(got.bytes())

    def delete(self, name: str) -> None:
        """Remove the object ``name`` from the generation (absent: nothing to do)."""
        key = self._key(name)
        try:
            _obstore().delete(self._storage.store, key)
        except Exception as e:
            err = os_error(e, "delete", self._storage.loc.url_of(key))
            if err.errno != errno.ENOENT:
                raise err from e

    def commit(self, data: bytes, *, owned: Callable[[str], bool]) -> None:
        """Put the marker naming this generation (conditionally), then delete the generations seen at the start.

        ``owned`` is not needed: objects outside generations are never touched.

        The conditional put is one request the client does not retry on a
        dropped connection (it cannot know whether the put took effect), and
        its answer can be lost after the store made it. So a failed put is
        followed by a read of the marker: if it names this generation, the
        commit happened; if the put never reached the store (a connection
        error, no answer), it is sent again (:data:`COMMIT_ATTEMPTS` in all).

        Raises:
            CheckpointIOError: The put failed, or another save committed to the location meanwhile (EEXIST),
                or the store could not say whether the put took effect (then this generation is kept:
                the marker may name it; the next save or ``gc`` deletes it otherwise).
        """
        url = self._storage.loc.url_of(self._storage.loc.child(self._marker))
        for attempt in range(COMMIT_ATTEMPTS):
            try:
                self._put_marker(data)
                break
            except Exception as e:
                err = os_error(e, "commit", url)
                landed = self._names_this_generation()
                if landed:
                    logger.info("the commit of %s took effect although its answer was an error: %s", url, err)
                    break
                if landed is None:
                    self._kept = True
                    self._fail(e, f"{err.strerror}; the store cannot say whether the commit took effect", err.errno)
                if err.errno == errno.EEXIST:
                    self._fail(e, f"another save committed to {self._storage.location} while this one was writing; "
                               "nothing was committed", err.errno)  # fmt: skip
                if not is_connection_error(e) or attempt == COMMIT_ATTEMPTS - 1:
                    self._fail(e, err.strerror, err.errno)
                time.sleep(0.1 * 2**attempt)
        self._committed = True
        for old in self._old:
            try:
                self._storage.delete_generation(old)
            except OSError as e:  # committed: what is left is cleaned by the next save or gc
                logger.warning("could not delete the old generation %s of %s: %s", old, self._storage.location, e)

    def _put_marker(self, data: bytes) -> None:
        store, key = self._storage.store, self._storage.loc.child(self._marker)
        attributes = {GENERATION_ATTRIBUTE: self.generation}
        mode: Any = {"e_tag": self._etag} if self._etag else "create"
        try:
            _obstore().put(store, key, data, attributes=attributes, mode=mode, use_multipart=False)
        except Exception as e:
            if type(e).__name__ != "NotSupportedError":
                raise
            _obstore().put(store, key, data, attributes=attributes, use_multipart=False)  # last writer wins

    def _names_this_generation(self) -> bool | None:
        """Whether the marker names this generation now (None: the store cannot say)."""
        try:
            got = self._storage.read_marker(self._marker)
        except (OSError, CorruptCheckpointError):
            return None
        return got is not None and got[1] == self.generation

    def _fail(self, cause: BaseException, why: str | None, code: int | None) -> NoReturn:
        raise CheckpointIOError(
            f"rank {self._rank}: commit failed for {self._storage.location}: {why}",
            errno=code, path=self._storage.location, rank=self._rank, operation="commit",
        ) from cause  # fmt: skip

    def close(self, *, discard: bool) -> None:
        """End the session; ``discard`` deletes this generation when it was not committed (and may not have been)."""
        if discard and not self._committed and not self._kept:
            try:
                self._storage.delete_generation(self.generation)
            except OSError as e:
                logger.warning("could not delete the unfinished save %s: %s", self.location, e)


class ObjectGeneration:
    """The committed generation of an object store location: its marker read, its objects opened by key."""

    def __init__(self, storage: ObjectStorage, marker: str, data: bytes, generation: str, etag: str) -> None:
        self._storage = storage
        self._marker = marker
        self._data = data
        self.generation = generation
        self._etag = etag
        self.location = storage.location

    @classmethod
    def read_at(cls, storage: ObjectStorage, marker: str) -> ObjectGeneration:
        """Read the marker at ``storage`` and hold its generation."""
        try:
            got = storage.read_marker(marker)
        except OSError as e:
            if e.errno == errno.ENOENT:
                raise CheckpointNotFoundError(f"no checkpoint at {storage.location}: {e.strerror}", path=storage.location) from e
            raise
        if got is None:
            raise CheckpointNotFoundError(
                f"no checkpoint at {storage.location} (no {marker} there)", path=storage.location
            )
        data, generation, etag = got
        return cls(storage, marker, data, generation, etag)

    def open(self, name: str) -> BytesReader | ObjectStoreReader:
        """Open the object ``name`` of this generation (FileNotFoundError: none)."""
        if name == self._marker:
            return BytesReader(self._data, self._storage.loc.url_of(self._storage.loc.child(name)))
        key = self._storage.loc.child(f"{self.generation}/{name}")
        url = self._storage.loc.url_of(key)
        got = _call("open", url, _obstore().get, self._storage.store, key, options={"head": True})
        layout = layout_of(key, url, int(got.meta["size"]), got.attributes)
        return ObjectStoreReader(self._storage.store, layout, url)

    def replaced(self) -> bool:
        """Whether the marker now names another generation (or is gone)."""
        return self._storage.marker_etag(self._marker) != self._etag

    def close(self) -> None:
        """Nothing is held open."""
