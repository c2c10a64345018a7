"""Run leases: at most one live driver per run id, and a crashed driver's run recoverable after a bound.

The lease lives in the run's ledger document (``<lake>/_photolens/runs/<run_id>.json``, key ``lease``):
who holds it (a random owner token, host, pid), until when (``expires_at``, epoch seconds) and whether it
was released. Every change is a conditional write (``If-None-Match: *`` to create the ledger,
``If-Match: <etag>`` to change it), so two drivers racing for one run id cannot both win, and a driver
whose lease was taken over finds out at its next write or check instead of overwriting the new holder.

A lease is *live* while it is unreleased, unexpired and its holder is not known to be dead. The holder
renews it from a daemon thread (every third of its length) while the pipeline runs, so a live lease
means a live driver; a driver that dies stops renewing and its lease expires after ``seconds``. A holder
on this same machine whose process is gone is dead at once (a restarted cron job or a rerun by hand does
not wait out the lease). Expiry compares wall clocks: drivers' clocks must agree to well under a lease.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from typing import TYPE_CHECKING, Any

from photolens.lake.storage import PreconditionFailedError, StorageUnavailableError, delete_conditional

if TYPE_CHECKING:
    from photolens.lake.delta import Lake

log = logging.getLogger(__name__)

DEFAULT_LEASE_SECONDS = 300.0
MIN_LEASE_SECONDS = 2.0


class LeaseHeldError(RuntimeError):
    """Another live driver holds the run; this one must not touch it."""


class LeaseLostError(RuntimeError):
    """This driver's lease was taken over (or ran out unrenewed): it must not commit."""


@cache
def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/<pid>/stat); None if no such
    process. Pid + start time names a process uniquely, even after the pid is reused."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except FileNotFoundError:
        return None
    except OSError:
        return ""
    return stat.rsplit(")", 1)[-1].split()[19]


@dataclass(frozen=True)
class Holder:
    owner: str = field(default_factory=lambda: uuid.uuid4().hex)
    host: str = field(default_factory=socket.gethostname)
    boot_id: str = field(default_factory=_boot_id)
    pid: int = field(default_factory=os.getpid)
    pid_start: str | None = field(default_factory=lambda: _process_start(os.getpid()))

    def fields(self) -> dict[str, Any]:
        return {"owner": self.owner, "host": self.host, "boot_id": self.boot_id, "pid": self.pid,
                "pid_start": self.pid_start}


def holder_is_dead_here(lease: dict[str, Any]) -> bool:
    """True only when the holder ran on this machine (same host and boot) and its process is gone."""
    if not _boot_id() or lease.get("host") != socket.gethostname() or lease.get("boot_id") != _boot_id():
        return False
    pid = lease.get("pid")
    if not isinstance(pid, int):
        return False
    start = _process_start(pid)
    if start is None:
        return True
    recorded = lease.get("pid_start")
    return bool(start and recorded and start != recorded)


def lease_is_live(doc: dict[str, Any] | None, now: float | None = None) -> bool:
    """Whether ``doc`` (a ledger) carries a lease some driver still holds."""
    lease = (doc or {}).get("lease")
    if not lease or lease.get("released"):
        return False
    if float(lease.get("expires_at", 0)) <= (time.time() if now is None else now):
        return False
    return not holder_is_dead_here(lease)


def describe(doc: dict[str, Any]) -> str:
    lease = doc.get("lease") or {}
    left = float(lease.get("expires_at", 0)) - time.time()
    return (f"attempt {doc.get('attempt')} held by pid {lease.get('pid')} on {lease.get('host')} "
            f"(lease renewed {time.strftime('%H:%M:%SZ', time.gmtime(float(lease.get('renewed_at', 0))))}, "
            f"expires in {max(left, 0):.0f}s)")


class RunLease:
    """This driver's lease on one run id (see the module docstring)."""

    def __init__(self, lake: Lake, run_id: str, seconds: float = DEFAULT_LEASE_SECONDS,
                 holder: Holder | None = None, uri: str | None = None) -> None:
        if seconds < MIN_LEASE_SECONDS:
            raise ValueError(f"lease of {seconds}s: use at least {MIN_LEASE_SECONDS}s")
        self.lake = lake
        self.run_id = run_id
        self.uri = uri or lake.meta_uri("runs", f"{run_id}.json")
        self.seconds = float(seconds)
        self.holder = holder or Holder()
        self.doc: dict[str, Any] | None = None
        self.etag: str | None = None
        self.lost: str | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------- acquiring
    def acquire(self, make_doc: Callable[[dict[str, Any] | None], dict[str, Any]], *,
                skip_live: bool = False) -> dict[str, Any] | None:
        """Take the run: create its ledger, or take it over when no live driver holds it.

        ``make_doc(current ledger or None)`` builds the new ledger (the lease is added here). A live lease
        of another driver raises :class:`LeaseHeldError`, or returns None with ``skip_live``.
        """
        for _ in range(8):
            current = self.lake.get_json_versioned(self.uri)
            doc = None if current is None else current[0]
            if doc is not None and lease_is_live(doc) and (doc.get("lease") or {}).get("owner") != self.holder.owner:
                if skip_live:
                    return None
                raise LeaseHeldError(f"run {self.run_id} is being driven by another driver: {describe(doc)}; "
                                     "this driver stops without touching it")
            new = {**make_doc(doc), "lease": self._lease_fields()}
            try:
                if current is None:
                    etag = self.lake.put_json_conditional(self.uri, new, if_absent=True)
                else:
                    etag = self.lake.put_json_conditional(self.uri, new, if_match=current[1])
            except PreconditionFailedError:
                continue  # another driver wrote between our read and write: look again
            with self._lock:
                self.doc, self.etag, self.lost = new, etag, None
            return new
        raise LeaseHeldError(f"run {self.run_id}: its ledger kept changing under this driver; another driver "
                             "is taking it")

    def acquire_waiting(self, make_doc: Callable[[dict[str, Any] | None], dict[str, Any]],
                        on_wait: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Like :meth:`acquire`, but waits while another driver holds the lease: a live holder renews it
        only while it runs, so the wait ends when it releases, or when it dies and the lease expires."""
        waited = False
        while True:
            try:
                return self.acquire(make_doc)  # type: ignore[return-value]
            except LeaseHeldError:
                if not waited and on_wait is not None:
                    on_wait(self.lake.get_json(self.uri) or {})
                waited = True
                time.sleep(min(1.0, self.seconds / 10))

    def _lease_fields(self, released: bool = False) -> dict[str, Any]:
        now = time.time()
        return {**self.holder.fields(), "seconds": self.seconds, "renewed_at": now,
                "expires_at": now if released else now + self.seconds, "released": released}

    # ---------------------------------------------------------------- holding
    def _write(self, changes: dict[str, Any], released: bool = False) -> dict[str, Any]:
        with self._lock:
            if self.lost:
                raise LeaseLostError(self.lost)
            assert self.doc is not None and self.etag is not None, "acquire() first"
            new = {**self.doc, **changes, "lease": self._lease_fields(released)}
            for _ in range(2):
                try:
                    etag = self.lake.put_json_conditional(self.uri, new, if_match=self.etag)
                    break
                except PreconditionFailedError:
                    # A write of ours that landed although its answer was lost (a timeout) also moves the
                    # version: the document is still ours if it carries our owner token.
                    current = self.lake.get_json_versioned(self.uri)
                    if current is None or (current[0].get("lease") or {}).get("owner") != self.holder.owner:
                        self.lost = (f"run {self.run_id}: another driver took over its ledger (this driver's "
                                     "lease ran out unrenewed); this driver must not commit")
                        raise LeaseLostError(self.lost) from None
                    self.etag = current[1]
            else:
                raise LeaseLostError(f"run {self.run_id}: its ledger keeps changing under this driver")
            self.doc, self.etag = new, etag
            return new

    def renew(self) -> None:
        self._write({})

    def update(self, **changes: Any) -> dict[str, Any]:
        """Change ledger fields (state, report...) while keeping the lease."""
        return self._write(changes)

    def release(self, **changes: Any) -> dict[str, Any]:
        """The final ledger write of this driver: the lease ends now."""
        self.stop_heartbeat()
        return self._write(changes, released=True)

    def discard(self) -> None:
        """Delete the ledger this driver created, when the run ends before anything of it exists."""
        self.stop_heartbeat()
        with self._lock:
            if self.etag is not None and not self.lost:
                delete_conditional(self.uri, self.etag, self.lake.s3)
            self.doc, self.etag = None, None

    def check(self) -> None:
        """Right before a commit: the stored ledger is still ours, with time left; renews when short."""
        with self._lock:
            if self.lost:
                raise LeaseLostError(self.lost)
        current = self.lake.get_json_versioned(self.uri)
        # Only this driver writes its owner token (the heartbeat may have renewed since: compare owners).
        if current is None or (current[0].get("lease") or {}).get("owner") != self.holder.owner:
            with self._lock:
                self.lost = (f"run {self.run_id}: its ledger was changed by another driver; this driver must "
                             "not commit")
            raise LeaseLostError(self.lost)
        expires = float((current[0].get("lease") or {}).get("expires_at", 0))
        if expires - time.time() < self.seconds / 2:
            self.renew()  # conditional on the etag just checked: fails if anyone got in between

    # ---------------------------------------------------------------- heartbeat
    def start_heartbeat(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name=f"lease-{self.run_id}", daemon=True)
        self._thread.start()

    def stop_heartbeat(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def _beat(self) -> None:
        while not self._stop.wait(self.seconds / 3):
            try:
                self.renew()
            except LeaseLostError:
                log.error("lease of run %s lost; the run will not commit", self.run_id)
                return
            except (StorageUnavailableError, OSError) as exc:
                # Retried at the next beat; two more misses and the lease may expire, which the check
                # before each commit then finds.
                log.warning("renewing the lease of run %s failed: %s", self.run_id, exc)

