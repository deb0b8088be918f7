"""Model packages: everything needed to reuse a trained model, without pickle.

A package is a directory or a single ``.affmae`` zip file holding two members:

``affmae.json``
    manifest: format name and version, napari-affmae version, model name, task, config,
    number of classes, class names, label mode, the label value of each class, normalisation statistics, pixel size,
    training provenance and the SHA-256 of the weights file.
``model.safetensors``
    the weights (``state_dict``) in safetensors format.

Loading checks the format and version, the weights' checksum (a modified or truncated file is
refused), that the model name is known and that every weight matches the architecture that the
config describes. Zip members are read by name, never extracted; a zip with absolute or ``..``
member paths is refused. Writes are atomic: a temporary file or directory renamed into place.
"""
from __future__ import annotations

import hashlib
import io
import logging
import json
import os
import shutil
import uuid
import zipfile
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from .. import __version__
from ..data.normalize import NormalizationStats
from ..io.files import probe_writable_dir, replace_path

log = logging.getLogger(__name__)

FORMAT_NAME = "napari-affmae-model"
FORMAT_VERSION = 1
MANIFEST_NAME = "affmae.json"
WEIGHTS_NAME = "model.safetensors"
PACKAGE_SUFFIX = ".affmae"
LABEL_MODES = ("sparse", "dense")
NORMALIZATION_SCOPES = ("image", "slice")  # one set of intensity statistics per image / per slice
_ZIP_DATE = (2020, 1, 1, 0, 0, 0)  # fixed timestamp: the same package always gives the same bytes


class PackageError(ValueError):
    """A file is not a valid model package (foreign, damaged, or of an incompatible kind/version)."""


@dataclass
class ModelPackage:
    """A trained model plus what is needed to apply it to new images.

    ``state_dict`` holds CPU tensors. For segmentation, predicted label = argmax + ``label_offset``:
    1 in sparse mode (classes 1..K, 0 was "unlabelled"), 0 in dense mode (0 = background).
    """

    model_name: str
    task: str  # "mae" | "segmentation"
    config: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    num_classes: int | None = None
    class_names: list[str] = field(default_factory=list)
    label_mode: str = "sparse"
    label_values: list[int] | None = None  # label value written for each class (None: 1..K sparse, 0..K-1 dense)
    normalization: dict[str, Any] | None = None
    normalization_mode: str = "percentile"
    #: "image": one set of statistics (``normalization``) for the whole image; "slice": each slice normalised by
    #: its own statistics (the model was trained that way; segmentation does the same)
    normalization_scope: str = "image"
    pixel_size: list[float] | None = None  # (z,) y, x in the image's units, when known
    provenance: dict[str, Any] = field(default_factory=dict)
    package_version: str = __version__
    format_version: int = FORMAT_VERSION
    path: Path | None = None  # where it was loaded from / saved to

    @property
    def label_offset(self) -> int:
        return 1 if self.label_mode == "sparse" else 0

    @property
    def output_values(self) -> list[int]:
        """The label value that segmentation writes for each class (the values the model was trained on)."""
        if self.label_values is not None:
            return [int(v) for v in self.label_values]
        return [i + self.label_offset for i in range(int(self.num_classes or 0))]

    @property
    def stats(self) -> NormalizationStats | None:
        return None if self.normalization is None else NormalizationStats.from_dict(self.normalization)

    @classmethod
    def from_model(cls, model: nn.Module, *, normalization: NormalizationStats | dict | None = None,
                   class_names: list[str] | None = None, label_mode: str = "sparse",
                   label_values: list[int] | None = None, pixel_size: list[float] | tuple[float, ...] | None = None,
                   provenance: dict[str, Any] | None = None) -> ModelPackage:
        """Package a model made by `create_model` (it carries ``model_name`` and ``config``)."""
        model = getattr(model, "module", model)  # unwrap DistributedDataParallel
        name = getattr(model, "model_name", None)
        if name is None or not is_dataclass(getattr(model, "config", None)):
            raise ValueError("only models built with napari_affmae.models.create_model can be packaged")
        num_classes = getattr(model, "num_classes", None)
        task = "segmentation" if num_classes is not None else "mae"
        if isinstance(normalization, NormalizationStats):
            normalization = normalization.to_dict()
        state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
        return cls(model_name=name, task=task, config=_jsonable(asdict(model.config)), state_dict=state,
                   num_classes=num_classes, class_names=list(class_names or []), label_mode=label_mode,
                   label_values=None if label_values is None else [int(v) for v in label_values],
                   normalization=normalization, pixel_size=None if pixel_size is None else [float(p) for p in pixel_size],
                   provenance=dict(provenance or {}))

    def build_model(self, device: torch.device | str = "cpu") -> nn.Module:
        """Instantiate the architecture and load the weights (strict); eval mode."""
        from ..models import create_model  # noqa: PLC0415 (models import is heavy)

        try:
            model = create_model(self.model_name, task=self.task, num_classes=self.num_classes, **self.config)
        except (ValueError, TypeError) as err:
            raise PackageError(f"package model {self.model_name!r} cannot be built by this napari-affmae "
                               f"{__version__}: {err}") from err
        expected = model.state_dict()
        missing = sorted(set(expected) - set(self.state_dict))
        unexpected = sorted(set(self.state_dict) - set(expected))
        wrong = sorted(k for k in set(expected) & set(self.state_dict)
                       if tuple(expected[k].shape) != tuple(self.state_dict[k].shape))
        if missing or unexpected or wrong:
            raise PackageError(
                f"the weights do not fit the {self.model_name} architecture described in the package "
                f"(missing {missing[:3]}, unexpected {unexpected[:3]}, wrong shape {wrong[:3]}); the package "
                "was made by another architecture or version, or was modified")
        model.load_state_dict(self.state_dict, strict=True)
        return model.to(device).eval()

    def manifest(self, weights_sha256: str) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "package_version": self.package_version,
            "model_name": self.model_name,
            "task": self.task,
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "label_mode": self.label_mode,
            "label_values": self.label_values,
            "normalization": self.normalization,
            "normalization_mode": self.normalization_mode,
            "normalization_scope": self.normalization_scope,
            "pixel_size": self.pixel_size,
            "config": self.config,
            "provenance": self.provenance,
            "weights_sha256": weights_sha256,
        }

    def summary(self) -> dict[str, Any]:
        """Manifest plus parameter count (for ``affmae info``)."""
        info = self.manifest(weights_sha256="")
        info.pop("weights_sha256")
        info["parameters"] = int(sum(t.numel() for t in self.state_dict.values()))
        info["path"] = None if self.path is None else str(self.path)
        return info


def _jsonable(value: Any) -> Any:
    """Tuples -> lists, recursively (JSON has no tuples)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _encode(package: ModelPackage) -> tuple[bytes, bytes]:
    weights = save_safetensors_bytes(package.state_dict, metadata={"format": FORMAT_NAME})
    manifest = package.manifest(hashlib.sha256(weights).hexdigest())
    text = json.dumps(manifest, indent=2, sort_keys=True, allow_nan=False) + "\n"
    return text.encode("utf-8"), weights


def save_package(package: ModelPackage | nn.Module, path: str | os.PathLike, **metadata: Any) -> Path:
    """Write ``package`` (or a model plus `ModelPackage.from_model` keyword metadata) to ``path``.

    A path ending in ``.affmae`` gives a zip file, any other path a directory. The write is
    atomic (temporary sibling + rename) and deterministic (same package -> same bytes).
    Returns the path written.
    """
    if isinstance(package, nn.Module):
        package = ModelPackage.from_model(package, **metadata)
    elif metadata:
        raise TypeError("metadata keywords are only accepted together with a model")
    if package.label_mode not in LABEL_MODES:
        raise ValueError(f"label_mode must be one of {LABEL_MODES}; got {package.label_mode!r}")
    path = Path(path)
    manifest, weights = _encode(package)
    parent = path.parent if str(path.parent) else Path(".")
    _make_writable_dir(parent)
    tmp = parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        if path.suffix == PACKAGE_SUFFIX:
            with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as archive:
                for name, data in ((MANIFEST_NAME, manifest), (WEIGHTS_NAME, weights)):
                    info = zipfile.ZipInfo(name, date_time=_ZIP_DATE)
                    info.external_attr = 0o644 << 16
                    archive.writestr(info, data)
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        else:
            if path.exists() and not path.is_dir():
                raise PackageError(f"{path} exists and is not a package directory; choose another output path")
            tmp.mkdir()
            _write_file(tmp / WEIGHTS_NAME, weights)
            _write_file(tmp / MANIFEST_NAME, manifest)
            replace_path(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()
    package.path = path
    return path


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def check_writable_dir(directory: str | os.PathLike) -> None:
    """Raise PermissionError with a clear message unless files could be written in ``directory``; creates
    nothing (a missing folder is checked through its nearest existing parent, which must be a writable
    folder)."""
    directory = Path(directory)
    existing = next((p for p in (directory, *directory.parents) if p.exists()), Path("."))
    if not existing.is_dir():
        raise PermissionError(f"cannot write to {directory}: {existing} is a file, not a folder; choose a writable "
                              "output location")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write to {directory}: {existing} is not writable; choose a writable output "
                              "location")


def _make_writable_dir(directory: Path) -> None:
    """Create ``directory`` and check by writing a probe file there (clear PermissionError if it fails)."""
    try:
        probe_writable_dir(directory)
    except OSError as err:
        raise PermissionError(f"cannot write to {directory}: {err.strerror or err}; choose a writable output "
                              "location") from err


def _safe_member(name: str) -> bool:
    pure = PurePosixPath(name.replace("\\", "/"))
    return not pure.is_absolute() and ".." not in pure.parts and not (len(name) > 1 and name[1] == ":")


def _read_members(path: Path) -> tuple[bytes, bytes]:
    if path.is_dir():
        manifest_path, weights_path = path / MANIFEST_NAME, path / WEIGHTS_NAME
        if not manifest_path.is_file() or not weights_path.is_file():
            raise PackageError(f"{path} is not a model package: it needs {MANIFEST_NAME} and {WEIGHTS_NAME}")
        return manifest_path.read_bytes(), weights_path.read_bytes()
    if not zipfile.is_zipfile(path):
        raise PackageError(f"{path} is not a model package (expected a {PACKAGE_SUFFIX} zip or a package "
                           "directory); PyTorch .pt/.pth pickles are never loaded")
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            unsafe = [n for n in names if not _safe_member(n)]
            if unsafe:
                raise PackageError(f"{path} was refused: it contains unsafe member paths {unsafe[:3]} "
                                   "(absolute or with '..')")
            if MANIFEST_NAME not in names or WEIGHTS_NAME not in names:
                raise PackageError(f"{path} is a zip file but not a model package: it needs {MANIFEST_NAME} "
                                   f"and {WEIGHTS_NAME}; found {names[:5]}")
            return archive.read(MANIFEST_NAME), archive.read(WEIGHTS_NAME)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as err:
        raise PackageError(f"{path} is a damaged package archive: {err}") from err


def _current_config(manifest: dict[str, Any], path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The model config and provenance of a manifest as this version builds them: AFFMAE fields a package
    predates filled in as they behaved then; the masking that older packages kept in the model config
    (``mask_ratio`` / ``mask_type``, now a pretraining setting) dropped, and for a pretraining package
    recorded as its provenance's ``mask`` when that is missing."""
    from ..models import masking_of  # noqa: PLC0415 (models import is heavy)
    from ..models.affmae import with_package_defaults  # noqa: PLC0415
    from ..models.masking import without_mask_fields  # noqa: PLC0415

    name, provenance = manifest["model_name"], dict(manifest.get("provenance") or {})
    config, dropped = without_mask_fields(manifest["config"])
    if dropped:
        log.info("%s: %s in the model config ignored (masking is a pretraining setting now)", path, dropped)
        if manifest["task"] == "mae" and "mask" not in provenance:
            spec = masking_of(name).mask_spec(dropped.get("mask_ratio"), dropped.get("mask_type"))
            provenance["mask"] = spec.to_dict()
    if name.startswith("affmae_"):  # packages written before newer AFFMAE options existed
        config = with_package_defaults(config, manifest["task"])
    return config, provenance


def load_package(path: str | os.PathLike, *, expect_task: str | None = None,
                 expect_model: str | None = None) -> ModelPackage:
    """Read and verify a package (directory or ``.affmae`` zip). Never unpickles anything.

    ``expect_task`` / ``expect_model`` turn a package of another kind into a clear error.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model package not found: {path}")
    manifest_bytes, weights = _read_members(path)
    try:
        manifest = json.loads(manifest_bytes.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise PackageError(f"{path}: the package manifest is not valid JSON ({err})") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise PackageError(f"{path} is not a napari-affmae model package (manifest format "
                           f"{manifest.get('format') if isinstance(manifest, dict) else None!r})")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
        raise PackageError(
            f"{path} uses package format version {version!r} (written by napari-affmae "
            f"{manifest.get('package_version', '?')}); this napari-affmae {__version__} reads format "
            f"{FORMAT_VERSION} only — use a matching napari-affmae version")
    digest = hashlib.sha256(weights).hexdigest()
    if digest != manifest.get("weights_sha256"):
        raise PackageError(f"{path}: the weights do not match the checksum in the manifest; the package was "
                           "modified or damaged")
    try:
        state_dict = load_safetensors_bytes(weights)
    except (SafetensorError, ValueError, RuntimeError) as err:
        raise PackageError(f"{path}: the weights file is not valid safetensors ({err})") from err
    required = ("model_name", "task", "config")
    missing = [k for k in required if k not in manifest]
    if missing or not isinstance(manifest.get("config"), dict):
        raise PackageError(f"{path}: the manifest lacks {missing or ['config']}")
    task = manifest["task"]
    if task not in ("mae", "segmentation"):
        raise PackageError(f"{path}: unknown task {task!r} in the manifest")
    from ..models import list_models  # noqa: PLC0415

    if manifest["model_name"] not in list_models():
        raise PackageError(f"{path} holds a {manifest['model_name']!r} model, which this napari-affmae "
                           f"{__version__} does not know (known: {', '.join(list_models())})")
    if expect_task is not None and task != expect_task:
        what = {"mae": "a pretraining (MAE) package", "segmentation": "a segmentation package"}
        raise PackageError(f"{path} is {what[task]}, but {what.get(expect_task, expect_task)} is needed here")
    if expect_model is not None and manifest["model_name"] != expect_model:
        raise PackageError(f"{path} holds a {manifest['model_name']} model, but {expect_model} was requested")
    if manifest.get("label_mode", "sparse") not in LABEL_MODES:
        raise PackageError(f"{path}: unknown label_mode {manifest.get('label_mode')!r}")
    if manifest.get("normalization_scope", "image") not in NORMALIZATION_SCOPES:
        raise PackageError(f"{path}: unknown normalization_scope {manifest.get('normalization_scope')!r}; "
                           f"expected one of {', '.join(NORMALIZATION_SCOPES)}")
    config, provenance = _current_config(manifest, path)
    package = ModelPackage(
        model_name=manifest["model_name"], task=task, config=config, state_dict=state_dict,
        num_classes=manifest.get("num_classes"), class_names=list(manifest.get("class_names") or []),
        label_mode=manifest.get("label_mode", "sparse"), label_values=manifest.get("label_values"),
        normalization=manifest.get("normalization"),
        normalization_mode=manifest.get("normalization_mode", "percentile"),
        normalization_scope=manifest.get("normalization_scope", "image"), pixel_size=manifest.get("pixel_size"),
        provenance=provenance, package_version=str(manifest.get("package_version", "")),
        format_version=version, path=path,
    )
    values = package.label_values
    if values is not None and (not isinstance(values, list) or len(values) != (package.num_classes or 0)
                               or not all(isinstance(v, int) and v >= 0 for v in values)):
        raise PackageError(f"{path}: label_values {values!r} must list one non-negative integer per class")
    if package.normalization is not None:
        try:
            package.stats  # noqa: B018 (validates)
        except ValueError as err:
            raise PackageError(f"{path}: {err}") from err
    return package


def package_bytes(package: ModelPackage) -> bytes:
    """Deterministic bytes of a package (manifest + weights), e.g. to compare two packages."""
    manifest, weights = _encode(package)
    buffer = io.BytesIO()
    buffer.write(manifest)
    buffer.write(weights)
    return buffer.getvalue()
