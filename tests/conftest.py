"""Shared fixtures: real photos from ../shared/data, a real S3-compatible store, one local Ray, a model store."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"
DATA = SHARED / "data"

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        has_gpu = False
    if has_gpu:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; none here")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not DATA.is_dir():
        pytest.skip(f"real test photos not found at {DATA} (they live in ../shared/data beside the checkout)")
    return DATA


@pytest.fixture(scope="session")
def local_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """A SeaweedFS server on 127.0.0.1 for the whole session; the environment points every client at it."""
    from photolens.lake.seaweed import LocalS3
    from photolens.lake.storage import reset_s3_settings

    server = LocalS3(tmp_path_factory.mktemp("seaweedfs")).start()
    saved = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    reset_s3_settings()
    try:
        yield server
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        reset_s3_settings()


@pytest.fixture(scope="session")
def ray_local(local_s3: object) -> Iterator[None]:
    """One local Ray for the session, started after the object store so workers inherit its environment."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def model_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    from photolens.models.store import ModelStore

    store = ModelStore(str(tmp_path_factory.mktemp("models")))
    store.install()
    return store.uri
