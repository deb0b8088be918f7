"""Write ``labels/<name>`` into an OME-Zarr image per the NGFF spec, chunk by chunk and resumably.

Layout written (NGFF 0.5 for a zarr 3 image, 0.4 for a zarr 2 image, matching the image)::

    image.zarr/                  image group and arrays: opened read-only, never written
    image.zarr/labels/           {"labels": [..., "<name>"]}
    image.zarr/labels/<name>/    multiscales (same axes, dataset paths and transforms as the image)
                                 + image-label {colors, properties, source: {image: "../../"}}
    image.zarr/labels/<name>/<level path>   one integer array per image level, same shapes
                                 (a channel axis becomes size 1)

Resuming: level 0 is written one chunk at a time; after a chunk is stored a flag is set in a
small ``affmae_progress`` array (one zarr chunk per flag, so parallel writers never touch the same
file). A rerun of the same job skips flagged chunks. `LabelsWriter.finalize` builds the lower
levels by nearest-neighbour downsampling of the level above (``[::2, ::2]`` for the usual halving),
writes the NGFF metadata, lists the name in ``labels/`` and removes the progress array. Until then
the labels are invisible to NGFF readers, so a half-written result is never mistaken for a
finished one.
"""
from __future__ import annotations

import itertools
import logging
import os
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from .errors import ImageFormatError
from .files import replace_path
from .omezarr import Multiscales, chunk_grid, ngff_attrs, nearest_index, read_multiscales

LOGGER = logging.getLogger(__name__)

PROGRESS_ARRAY = "affmae_progress"
STATE_KEY = "affmae_labels"  # our bookkeeping in the labels group's attributes
STAGING_SUFFIX = ".affmae-new"  # labels/<name><suffix>: a replacement being written (overwrite)
SOURCE_IMAGE = "../../"

# RGBA for class values 1, 2, 3, ... (0 = unlabelled stays transparent)
DEFAULT_COLORS: tuple[tuple[int, int, int, int], ...] = (
    (255, 200, 0, 255),
    (0, 200, 255, 255),
    (200, 60, 255, 255),
    (60, 220, 60, 255),
    (255, 80, 80, 255),
    (80, 80, 255, 255),
    (255, 140, 200, 255),
    (160, 160, 160, 255),
)

Region = tuple[slice, ...]


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or name.startswith((".", "__")):
        raise ValueError(
            f"labels name must be a plain name like 'segmentation' (no '/', not starting with '.'); got {name!r}"
        )
    return name


class LabelsWriter:
    """Resumable writer of ``labels/<name>`` next to the OME-Zarr image at ``image_path``.

    Args:
        image_path: the OME-Zarr image group (its arrays are only read for their metadata).
        name: labels group name.
        class_names: names of classes 1..K, or ``{label value: name}`` (stored as image-label properties).
        colors: RGBA (0..255) per class value, ``{value: (r, g, b, a)}``; default a fixed palette.
        chunks: level-0 chunk shape (the unit of resuming); default one plane, at most 512 x 512.
        dtype: integer dtype of the labels (default uint8).
        overwrite: replace an existing ``labels/<name>``: the new labels are written into
            ``labels/<name>.affmae-new`` and swapped in by `finalize`, so the earlier labels stay intact and
            listed until the new ones are complete (an interrupted overwrite leaves them untouched). An
            interrupted overwrite with the same layout and fingerprint is resumed (its finished chunks
            kept); any other is started again. Without ``overwrite`` an unfinished run of the same layout
            is resumed, a finished one is left as is (`complete` is True), an unfinished overwrite is
            refused (finish it with ``overwrite``) and anything else is an error.
        provenance: JSON-able dict stored with the labels (e.g. model package, date).
        fingerprint: identity of what computes the labels (e.g. a package checksum); resuming an unfinished
            run recorded with another fingerprint is refused (FileExistsError), so a result never mixes two.
    """

    def __init__(
        self,
        image_path: str | os.PathLike,
        name: str,
        *,
        class_names: Sequence[str] | Mapping[int, str] | None = None,
        colors: Mapping[int, Sequence[int]] | None = None,
        chunks: Sequence[int] | None = None,
        dtype: str | np.dtype = "uint8",
        overwrite: bool = False,
        provenance: Mapping[str, Any] | None = None,
        fingerprint: str | None = None,
    ) -> None:
        self.name = _check_name(name)
        self.layout: Multiscales = read_multiscales(image_path)
        self.dtype = np.dtype(dtype)
        if not np.issubdtype(self.dtype, np.integer):
            raise ValueError(f"labels dtype must be an integer type; got {self.dtype}")
        self.axes = self.layout.axis_names.lower()
        self.shapes = [self._label_shape(s) for s in self.layout.shapes]
        self.shape = self.shapes[0]
        if chunks is None:
            chunks = tuple(1 if a in "tcz" else min(n, 512) for a, n in zip(self.axes, self.shape))
        self.chunks = tuple(int(c) for c in chunks)
        if len(self.chunks) != len(self.shape) or min(self.chunks) < 1:
            raise ValueError(f"chunks {tuple(chunks)} must give one positive size per axis of {self.axes!r}")
        self.grid = chunk_grid(self.shape, self.chunks)
        if isinstance(class_names, Mapping):
            self.class_values: dict[int, str] = {int(k): str(v) for k, v in class_names.items()}
        else:
            self.class_values = {i + 1: str(n) for i, n in enumerate(class_names or [])}
        self.class_names = list(self.class_values.values()) if class_names is not None else None
        self.fingerprint = fingerprint
        self.colors = {int(k): [int(c) for c in v] for k, v in (colors or {}).items()}
        self.provenance = dict(provenance or {})
        self.zarr_format = self.layout.zarr_format
        self.labels_root = Path(self.layout.path) / "labels"
        self.path = str(self.labels_root / self.name)
        self.staging: str | None = None  # with overwrite: the group written until `finalize` swaps it in
        self.group = self._open_or_create(overwrite)

    # ------------------------------------------------------------------ layout
    def _label_shape(self, image_shape: Sequence[int]) -> tuple[int, ...]:
        """Image level shape with a channel axis reduced to 1."""
        return tuple(1 if a == "c" else int(n) for a, n in zip(self.axes, image_shape))

    def _state(self) -> dict[str, Any]:
        return {
            "status": "in_progress",
            "shape": list(self.shape),
            "chunks": list(self.chunks),
            "dtype": str(self.dtype),
            "class_names": self.class_names,
            "provenance": self.provenance,
            "fingerprint": self.fingerprint,
        }

    def _open_or_create(self, overwrite: bool) -> zarr.Group:
        root = zarr.open_group(str(self.labels_root), mode="a", zarr_format=self.zarr_format)
        if int(root.metadata.zarr_format) != self.zarr_format:
            raise ImageFormatError(
                f"{self.labels_root}: zarr format {root.metadata.zarr_format} differs from the image's "
                f"({self.zarr_format}); remove the labels group or use a fresh copy of the image"
            )
        staging = f"{self.name}{STAGING_SUFFIX}"
        if overwrite and (self.name in root or staging in root):
            return self._open_staging(root, staging)  # the new labels beside the old ones; `finalize` swaps
        if staging in root:
            raise FileExistsError(
                f"{self.path} is being overwritten: an unfinished replacement is in {self.labels_root / staging}; "
                f"rerun with overwrite (--overwrite) to finish it, or delete {staging} to keep the earlier labels"
            )
        if self.name in root:
            group = root[self.name]
            state = dict(group.attrs).get(STATE_KEY)
            if not isinstance(group, zarr.Group) or state is None:
                raise FileExistsError(
                    f"{self.path} already exists and was not written by napari-affmae; choose another "
                    "labels name or pass overwrite=True"
                )
            mismatch = self._layout_mismatch(state)
            if mismatch:
                raise FileExistsError(f"{self.path} was started with {mismatch}; pass overwrite=True to start again")
            theirs = state.get("fingerprint")
            if state.get("status") != "complete" and theirs and self.fingerprint and theirs != self.fingerprint:
                raise FileExistsError(
                    f"{self.path} is half written by another model (package sha256 {theirs[:12]}, this one is "
                    f"{self.fingerprint[:12]}); resume it with the same package, or pass overwrite "
                    "(--overwrite) to start again"
                )
            LOGGER.info("resuming %s (status %s)", self.path, state.get("status"))
            return group
        return self._create_group(root, self.name)

    def _layout_mismatch(self, state: Mapping[str, Any]) -> str | None:
        """How recorded labels ``state`` differs in shape, chunks or dtype from this run (None: it does not)."""
        mine = self._state()
        for key in ("shape", "chunks", "dtype"):
            if state.get(key) != mine[key]:
                return f"{key}={state.get(key)} but this run uses {mine[key]}"
        return None

    def _open_staging(self, root: zarr.Group, staging: str) -> zarr.Group:
        """The staging group of an overwrite: an interrupted one of the same layout and fingerprint is
        resumed (and swapped in at once if it was already complete); any other is started again."""
        self.staging, self.path = staging, str(self.labels_root / staging)
        if staging in root:
            group = root[staging]
            state = dict(group.attrs).get(STATE_KEY) if isinstance(group, zarr.Group) else None
            if isinstance(state, dict) and self._layout_mismatch(state) is None and self.fingerprint is not None \
                    and state.get("fingerprint") == self.fingerprint:
                LOGGER.info("resuming the overwrite in %s (status %s)", self.path, state.get("status"))
                if state.get("status") == "complete":  # interrupted while being swapped in
                    self.group = group
                    self._publish()
                    return self.group
                return group
            LOGGER.info("starting the overwrite in %s again (another package or layout)", self.path)
            shutil.rmtree(self.labels_root / staging)
        return self._create_group(root, staging)

    def _create_group(self, root: zarr.Group, name: str) -> zarr.Group:
        group = root.create_group(name, overwrite=True)
        group.attrs[STATE_KEY] = self._state()
        level0 = self.layout.datasets[0]["path"]
        self._create_array(group, level0, self.shape, self.chunks)
        group.create_array(
            PROGRESS_ARRAY,
            shape=self.grid,
            chunks=(1,) * len(self.grid),
            dtype="uint8",
            fill_value=0,
            **self._array_kwargs(),
        )
        return group

    def _swap_in(self) -> None:
        """Replace the earlier ``labels/<name>`` by the finished staging group (overwrite)."""
        replace_path(self.labels_root / self.staging, self.labels_root / self.name)
        self.staging = None
        self.path = str(self.labels_root / self.name)
        self.group = zarr.open_group(self.path, mode="a", zarr_format=self.zarr_format)

    def _array_kwargs(self) -> dict[str, Any]:
        if self.zarr_format == 2:
            return {"chunk_key_encoding": {"name": "v2", "separator": "/"}}
        return {}

    def _create_array(self, group: zarr.Group, path: str, shape: Sequence[int], chunks: Sequence[int]) -> zarr.Array:
        extra = self._array_kwargs()
        if self.zarr_format == 3:
            extra["dimension_names"] = list(self.axes)
        chunks = tuple(min(c, max(n, 1)) for c, n in zip(chunks, shape))
        return group.create_array(
            path, shape=tuple(shape), chunks=chunks, dtype=self.dtype, fill_value=0, overwrite=True, **extra
        )

    # ------------------------------------------------------------------ chunks
    @property
    def complete(self) -> bool:
        """True once `finalize` has run (the labels are listed and readable)."""
        return dict(self.group.attrs).get(STATE_KEY, {}).get("status") == "complete"

    @property
    def n_chunks(self) -> int:
        return int(np.prod(self.grid))

    def chunk_indices(self) -> Iterator[tuple[int, ...]]:
        """All level-0 chunk indices in row-major order."""
        return itertools.product(*(range(n) for n in self.grid))

    def chunk_region(self, index: Sequence[int]) -> Region:
        """The level-0 slices covered by chunk ``index`` (edge chunks are smaller)."""
        if len(index) != len(self.grid) or any(not 0 <= i < n for i, n in zip(index, self.grid)):
            raise IndexError(f"chunk index {tuple(index)} is outside the chunk grid {self.grid}")
        return tuple(slice(i * c, min((i + 1) * c, n)) for i, c, n in zip(index, self.chunks, self.shape))

    def chunk_region_by_axis(self, index: Sequence[int]) -> dict[str, slice]:
        """`chunk_region` keyed by axis name (``{"z": ..., "y": ..., "x": ...}``), to index an image
        whose axes differ (e.g. `read_image` drops a singleton channel axis)."""
        return dict(zip(self.axes, self.chunk_region(index)))

    def finished_mask(self) -> np.ndarray:
        """Bool ``grid``: True where the chunk has been written (all True once complete)."""
        if self.complete:
            return np.ones(self.grid, dtype=bool)
        return np.asarray(self.group[PROGRESS_ARRAY][...]) > 0

    def pending_chunks(self, rank: int = 0, world_size: int = 1) -> list[tuple[int, ...]]:
        """Chunks not yet written; with ``world_size > 1`` only those of ``rank`` (round-robin)."""
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size; got rank={rank}, world_size={world_size}")
        done = self.finished_mask()
        return [
            idx
            for flat, idx in enumerate(self.chunk_indices())
            if flat % world_size == rank and not done[idx]
        ]

    def write_chunk(self, index: Sequence[int], data: Any) -> None:
        """Store the labels of chunk ``index`` (array of the region's shape; a missing singleton channel
        axis is allowed) and mark the chunk finished."""
        if self.complete:
            raise RuntimeError(f"{self.path} is already finalised; open it with overwrite=True to rewrite it")
        region = self.chunk_region(index)
        want = tuple(s.stop - s.start for s in region)
        values = np.asarray(data)
        if values.shape != want:
            if values.size == int(np.prod(want)) and tuple(n for n in want if n != 1) == tuple(
                n for n in values.shape if n != 1
            ):
                values = values.reshape(want)
            else:
                raise ValueError(f"chunk {tuple(index)} covers shape {want}; got data of shape {values.shape}")
        if not (np.issubdtype(values.dtype, np.integer) or values.dtype == np.bool_):
            raise ValueError(f"labels must be integers; got dtype {values.dtype}")
        if values.size:
            low, high = int(values.min()), int(values.max())
            if low < 0 or high > np.iinfo(self.dtype).max:
                raise ValueError(
                    f"label values must lie in 0..{np.iinfo(self.dtype).max} for {self.dtype}; got {low}..{high}"
                )
        level0 = self.group[self.layout.datasets[0]["path"]]
        level0[region] = values.astype(self.dtype, copy=False)
        self.group[PROGRESS_ARRAY][tuple(slice(i, i + 1) for i in index)] = 1

    # ------------------------------------------------------------------ finish
    def finalize(self) -> str:
        """Build the pyramid, write the NGFF metadata and list the labels. Call once, from one process,
        after every chunk is written. Returns the labels group path."""
        if self.complete:
            return self.path
        missing = int((~self.finished_mask()).sum())
        if missing:
            raise RuntimeError(f"{self.path}: {missing} of {self.n_chunks} chunks are not written yet; cannot finalise")
        paths = [ds["path"] for ds in self.layout.datasets]
        for level in range(1, len(paths)):
            self._downsample_level(paths[level - 1], paths[level], self.shapes[level - 1], self.shapes[level])
        self._write_metadata()
        del self.group[PROGRESS_ARRAY]
        self.group.attrs[STATE_KEY] = {**self._state(), "status": "complete"}
        self._publish()
        LOGGER.info("finalised %s (%d levels)", self.path, len(paths))
        return self.path

    def _publish(self) -> None:
        """Swap a complete staging group in (overwrite) and list the name in ``labels/``."""
        if self.staging is not None:
            self._swap_in()
        root = zarr.open_group(str(self.labels_root), mode="a", zarr_format=self.zarr_format)
        attrs = ngff_attrs(root)
        names = [n for n in attrs.get("labels", []) if n != self.name] + [self.name]
        self._write_ngff_attrs(root, {**attrs, "labels": names})

    def _downsample_level(self, src_path: str, dst_path: str, src_shape: tuple, dst_shape: tuple) -> None:
        """Nearest-neighbour ``dst = src[idx_0, idx_1, ...]`` with ``idx = floor(i * N_src / N_dst)``,
        one destination chunk at a time (bounded memory)."""
        src = self.group[src_path]
        dst = self._create_array(self.group, dst_path, dst_shape, self.chunks)
        index_maps = [nearest_index(n_src, n_dst) for n_src, n_dst in zip(src_shape, dst_shape)]
        for idx in itertools.product(*(range(n) for n in chunk_grid(dst_shape, dst.chunks))):
            region = tuple(
                slice(i * c, min((i + 1) * c, n)) for i, c, n in zip(idx, dst.chunks, dst_shape)
            )
            picks = [m[r] for m, r in zip(index_maps, region)]
            lo = [int(p[0]) for p in picks]
            hi = [int(p[-1]) + 1 for p in picks]
            block = np.asarray(src[tuple(slice(a, b) for a, b in zip(lo, hi))])
            local = np.ix_(*[p - a for p, a in zip(picks, lo)])
            dst[region] = block[local]

    def _colors(self) -> list[dict[str, Any]]:
        values = sorted(set(self.class_values) | set(self.colors))
        return [
            {"label-value": v, "rgba": self.colors.get(v, list(DEFAULT_COLORS[(v - 1) % len(DEFAULT_COLORS)]))}
            for v in values
        ]

    def _write_metadata(self) -> None:
        datasets = [
            {k: v for k, v in ds.items() if k in ("path", "coordinateTransformations")} for ds in self.layout.datasets
        ]
        multiscale: dict[str, Any] = {"name": self.name, "axes": self.layout.axes, "datasets": datasets}
        image_label: dict[str, Any] = {"source": {"image": SOURCE_IMAGE}}
        colors = self._colors()
        if colors:
            image_label["colors"] = colors
        if self.class_values:
            image_label["properties"] = [
                {"label-value": value, "class": name} for value, name in sorted(self.class_values.items())
            ]
        if self.zarr_format == 2:
            version = self.layout.ngff_version if self.layout.ngff_version in ("0.4",) else "0.4"
            multiscale["version"] = version
            image_label["version"] = version
        self._write_ngff_attrs(self.group, {"multiscales": [multiscale], "image-label": image_label})

    def _write_ngff_attrs(self, group: zarr.Group, values: dict[str, Any]) -> None:
        """Set NGFF keys: under ``ome`` (with the version) for zarr 3, at the top level for zarr 2."""
        if self.zarr_format == 3:
            ome = dict(dict(group.attrs).get("ome", {}))
            ome.update(values)
            ome["version"] = self.layout.ngff_version if self.layout.ngff_version.startswith("0.5") else "0.5"
            group.attrs["ome"] = ome
        else:
            group.attrs.update(values)


def write_labels(
    image_path: str | os.PathLike,
    name: str,
    labels: Any | Callable[[Region], Any],
    *,
    class_names: Sequence[str] | None = None,
    colors: Mapping[int, Sequence[int]] | None = None,
    chunks: Sequence[int] | None = None,
    dtype: str | np.dtype = "uint8",
    overwrite: bool = False,
    provenance: Mapping[str, Any] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> str:
    """Write ``labels/<name>`` into the OME-Zarr image at ``image_path`` (resumable) and finalise it.

    ``labels`` is either an array (numpy/zarr/dask) with the image's level-0 shape (a channel axis
    may be left out), or a function ``region -> array`` that computes the labels of one level-0
    chunk (``region`` is a tuple of slices in the image's axes). Only chunks not written by an
    earlier, interrupted run are computed. ``progress(done, total)`` is called after each chunk.
    Returns the labels group path. Already complete labels are left unchanged unless ``overwrite``.
    """
    writer = LabelsWriter(
        image_path,
        name,
        class_names=class_names,
        colors=colors,
        chunks=chunks,
        dtype=dtype,
        overwrite=overwrite,
        provenance=provenance,
    )
    if writer.complete:
        LOGGER.info("%s is already complete; nothing to do", writer.path)
        return writer.path
    if callable(labels):
        compute = labels
    else:
        compute = _region_reader(labels, writer)
    pending = writer.pending_chunks()
    done = writer.n_chunks - len(pending)
    for index in pending:
        writer.write_chunk(index, compute(writer.chunk_region(index)))
        done += 1
        if progress is not None:
            progress(done, writer.n_chunks)
    return writer.finalize()


def _region_reader(labels: Any, writer: LabelsWriter) -> Callable[[Region], np.ndarray]:
    """A function reading one chunk region out of a full label array."""
    shape = tuple(int(s) for s in labels.shape)
    if shape == writer.shape:
        keep = list(range(len(shape)))
    else:
        keep = [i for i, a in enumerate(writer.axes) if a != "c"]
        if shape != tuple(writer.shape[i] for i in keep):
            raise ValueError(
                f"labels shape {shape} does not match the image (axes {writer.axes!r}, shape {writer.shape}); "
                "they must cover the image pixel for pixel"
            )

    def read(region: Region) -> np.ndarray:
        part = labels[tuple(region[i] for i in keep)]
        if hasattr(part, "compute"):
            part = part.compute()
        return np.asarray(part)

    return read
