"""Versioned face-index artifacts with an atomic "current" pointer, on a local folder or S3.

Layout under the root::

    versions/<vid>/index.faiss          serialized faiss index
    versions/<vid>/index.faiss.sha256   "<hex>  index.faiss"
    versions/<vid>/<extra files>        e.g. codec.faiss (the empty trained codec for friend caches)
    versions/<vid>/sidecar.json         written last: a version exists once its sidecar does
    CURRENT                             {"version", "previous": [...], "sha256", "published_at"}
    HISTORY                             append-only audit log of publish / rollback events

Readers only ever follow ``CURRENT``, and ``CURRENT`` is replaced in one atomic step: a temp file
renamed over it on a local filesystem (rename(2) replaces atomically), a single PUT on an object
store (an S3 object is replaced whole, never seen half-written). The rollback stack lives inside
the pointer itself (``previous``), so a publish or rollback is one atomic write and the pointer and
its history can never disagree; ``HISTORY`` is the human-readable trail, written after. Versions
are never overwritten, so a rollback serves the earlier index byte for byte (checked by SHA-256 on
every load). One publisher at a time is assumed (the index job); concurrent publishers would race
last-writer-wins on the pointer.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import faiss
import numpy as np
import pyarrow.fs as pafs

from photolens.lake.storage import filesystem_for

__all__ = ["IndexStore", "IntegrityError", "LoadedIndex", "sha256_hex"]

INDEX_FILE: Final[str] = "index.faiss"
SIDECAR_FILE: Final[str] = "sidecar.json"
CURRENT_FILE: Final[str] = "CURRENT"
HISTORY_FILE: Final[str] = "HISTORY"
_RESERVED: Final[frozenset[str]] = frozenset({INDEX_FILE, SIDECAR_FILE, f"{INDEX_FILE}.sha256"})
_NAME_RE: Final[re.Pattern[str]] = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_MAX_PREVIOUS: Final[int] = 100  # rollback depth kept in the pointer


class IntegrityError(RuntimeError):
    """Stored bytes do not match the SHA-256 recorded when they were written."""


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True, eq=False)
class LoadedIndex:
    version: str
    index_bytes: bytes
    sidecar: dict[str, Any]
    sha256: str

    def index(self) -> faiss.Index:
        return faiss.deserialize_index(np.frombuffer(self.index_bytes, dtype=np.uint8))


def _now() -> datetime:
    return datetime.now(UTC)


def _is_local(fs: pafs.FileSystem) -> bool:
    if isinstance(fs, pafs.LocalFileSystem):
        return True
    return isinstance(fs, pafs.SubTreeFileSystem) and _is_local(fs.base_fs)


class IndexStore:
    """Versions of the face index under ``root_uri`` (a local path, ``file://`` or ``s3://``).

    ``filesystem`` overrides how the root is reached (any pyarrow filesystem; then ``root_uri`` is a
    path inside it, an ``s3://`` scheme is stripped). Without it the project's storage settings
    resolve the URI (S3 endpoint and credentials from the environment).
    """

    def __init__(self, root_uri: str, filesystem: pafs.FileSystem | None = None) -> None:
        if filesystem is None:
            self._fs, root = filesystem_for(root_uri)
        else:
            self._fs = filesystem
            root = root_uri.split("://", 1)[1] if "://" in root_uri else root_uri
        self.root_uri = root_uri
        self._root = root.rstrip("/")
        self._local = _is_local(self._fs)
        # A plain local filesystem gets real OS calls, for fsync before the rename.
        self._os_paths = isinstance(self._fs, pafs.LocalFileSystem)

    # -- low level ---------------------------------------------------------------------------
    def _path(self, *parts: str) -> str:
        return "/".join([self._root, *parts]) if self._root else "/".join(parts)

    def _exists(self, path: str) -> bool:
        return bool(self._fs.get_file_info(path).type != pafs.FileType.NotFound)

    def _read(self, path: str) -> bytes:
        with self._fs.open_input_stream(path) as f:
            data: bytes = f.read()
        return data

    def _read_json(self, path: str) -> Any:
        return json.loads(self._read(path).decode("utf-8"))

    def _write(self, path: str, data: bytes) -> None:
        """Plain write: used inside a version folder, which nobody reads until its sidecar exists."""
        parent = path.rsplit("/", 1)[0]
        if self._fs.type_name != "s3":  # S3 has no folders; creating one would add a marker object
            self._fs.create_dir(parent, recursive=True)
        with self._fs.open_output_stream(path) as f:
            f.write(data)

    def _write_atomic(self, path: str, data: bytes) -> None:
        """Readers see the old or the new content, never a torn or missing file."""
        if not self._local:
            self._write(path, data)  # one PUT replaces an object atomically
            return
        tmp = f"{path}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        if self._os_paths:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            return
        self._write(tmp, data)
        self._fs.move(tmp, path)

    @staticmethod
    def _dump(obj: Any) -> bytes:
        return (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode("utf-8")

    # -- versions ----------------------------------------------------------------------------
    def put_version(
        self,
        index_bytes: bytes,
        sidecar: dict[str, Any],
        extra_files: dict[str, bytes] | None = None,
    ) -> str:
        """Store a new immutable version; returns its id (sortable by creation time)."""
        digest = sha256_hex(index_bytes)
        created = _now()
        vid = f"{created:%Y%m%dT%H%M%S%fZ}-{digest[:12]}"
        if self._exists(self._path("versions", vid)):
            raise FileExistsError(f"version {vid} already exists")
        files: dict[str, str] = {INDEX_FILE: digest}
        self._write(self._path("versions", vid, INDEX_FILE), index_bytes)
        for name, data in (extra_files or {}).items():
            if not _NAME_RE.match(name) or name in _RESERVED:
                raise ValueError(f"bad extra file name {name!r}")
            files[name] = sha256_hex(data)
            self._write(self._path("versions", vid, name), data)
        self._write(self._path("versions", vid, f"{INDEX_FILE}.sha256"), f"{digest}  {INDEX_FILE}\n".encode())
        record = {
            "sidecar": sidecar,
            "artifact": {
                "version": vid,
                "sha256": digest,
                "bytes": len(index_bytes),
                "files": files,
                "created_at": created.isoformat(),
            },
        }
        # Last, and atomically: a version without its sidecar is an unfinished write, never listed.
        self._write_atomic(self._path("versions", vid, SIDECAR_FILE), self._dump(record))
        return vid

    def list_versions(self) -> list[str]:
        """Complete versions, oldest first."""
        selector = pafs.FileSelector(self._path("versions"), recursive=True, allow_not_found=True)
        found = set()
        for info in self._fs.get_file_info(selector):
            if info.type == pafs.FileType.File and info.base_name == SIDECAR_FILE:
                found.add(info.path.rstrip("/").rsplit("/", 2)[-2])
        return sorted(found)

    def _record(self, vid: str) -> dict[str, Any]:
        path = self._path("versions", vid, SIDECAR_FILE)
        if not self._exists(path):
            raise KeyError(f"no complete version {vid!r} under {self.root_uri}")
        record: dict[str, Any] = self._read_json(path)
        return record

    def sidecar(self, vid: str) -> dict[str, Any]:
        sidecar: dict[str, Any] = self._record(vid)["sidecar"]
        return sidecar

    def _load_checked(self, vid: str, name: str = INDEX_FILE) -> bytes:
        record = self._record(vid)
        expected = record["artifact"]["files"].get(name)
        if expected is None:
            raise KeyError(f"version {vid} has no file {name!r}")
        data = self._read(self._path("versions", vid, name))
        got = sha256_hex(data)
        if got != expected:
            raise IntegrityError(f"{vid}/{name}: sha256 {got} != recorded {expected}")
        return data

    def load(self, vid: str | None = None) -> LoadedIndex:
        """The index bytes of ``vid`` (default: the published one), verified against their SHA-256."""
        if vid is None:
            vid = self.current()
            if vid is None:
                raise LookupError(f"nothing published under {self.root_uri}")
        data = self._load_checked(vid)
        return LoadedIndex(version=vid, index_bytes=data, sidecar=self.sidecar(vid), sha256=sha256_hex(data))

    def load_extra(self, vid: str, name: str) -> bytes:
        return self._load_checked(vid, name)

    # -- publishing --------------------------------------------------------------------------
    def _pointer(self) -> dict[str, Any] | None:
        path = self._path(CURRENT_FILE)
        return self._read_json(path) if self._exists(path) else None

    def current(self) -> str | None:
        pointer = self._pointer()
        return None if pointer is None else str(pointer["version"])

    def history(self) -> list[dict[str, Any]]:
        path = self._path(HISTORY_FILE)
        return list(self._read_json(path)) if self._exists(path) else []

    def _swap(self, vid: str, previous: list[str], action: str) -> None:
        digest = self._record(vid)["artifact"]["sha256"]
        self._load_checked(vid)  # never point readers at bytes that fail their checksum
        now = _now().isoformat()
        pointer = {"version": vid, "previous": previous[:_MAX_PREVIOUS], "sha256": digest, "published_at": now}
        self._write_atomic(self._path(CURRENT_FILE), self._dump(pointer))
        events = [*self.history(), {"action": action, "version": vid, "at": now}]
        self._write_atomic(self._path(HISTORY_FILE), self._dump(events))

    def repoint(self, vid: str, previous: list[str], action: str) -> None:
        """Point readers at ``vid`` with an explicit rollback chain (forget-a-user swaps in scrubbed copies)."""
        self._swap(vid, previous, action)

    def delete_version(self, vid: str) -> None:
        """Remove a version's files; refuses the published one."""
        if self.current() == vid:
            raise ValueError(f"version {vid} is published: publish or repoint another one first")
        self._fs.delete_dir(self._path("versions", vid))

    def publish(self, vid: str) -> None:
        """Make ``vid`` the version readers load; the one it replaces becomes the rollback target."""
        pointer = self._pointer()
        if pointer is not None and pointer["version"] == vid:
            return
        previous = [] if pointer is None else [pointer["version"], *pointer["previous"]]
        self._swap(vid, previous, "publish")

    def rollback(self) -> str:
        """Re-publish the version that was current before the current one; returns its id."""
        pointer = self._pointer()
        if pointer is None or not pointer["previous"]:
            raise LookupError("no earlier published version to roll back to")
        target, *rest = pointer["previous"]
        self._swap(str(target), list(rest), "rollback")
        return str(target)

    def info(self) -> dict[str, Any]:
        pointer = self._pointer()
        current = None if pointer is None else pointer["version"]
        return {
            "root": self.root_uri,
            "current": current,
            "previous": [] if pointer is None else pointer["previous"],
            "published_at": None if pointer is None else pointer["published_at"],
            "versions": self.list_versions(),
            "sidecar": None if current is None else self.sidecar(current),
        }
