"""One settings object for the kernel ops: backend, debug checks, dk/dv mode, tile sizes.

The environment is read once, at the first use (`environment_settings`); afterwards it only
changes through `kernel_settings` (a context manager, per thread / asyncio task) or through
explicit arguments of the ops. Precedence: explicit argument > `kernel_settings` > environment >
defaults.

Environment variables (read once):

* ``AFFMAE_KERNELS=auto|triton|reference`` - backend (default ``auto``: Triton for CUDA tensors
  when it imports, the reference otherwise);
* ``AFFMAE_KERNELS_DEBUG=1`` - range-check every neighbour index and NaN-poison kernel outputs;
* ``AFFMAE_KERNELS_DKDV=atomic|reverse`` - how the Triton backward accumulates dk/dv;
* ``AFFMAE_KERNELS_TOKEN_TILE`` / ``AFFMAE_KERNELS_CLUSTER_TILE`` = ``ROWS,NEIGHBOURS,WARPS`` -
  launch tiles of the per-token / cluster attention kernels.

A backend that cannot serve a call (Triton missing, CPU tensors without the interpreter, a
dtype or shape the kernels do not take) is refused with a reason, logged once per reason on
the ``affmae_kernels`` logger.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import logging
import os
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

logger = logging.getLogger("affmae_kernels")

BACKENDS = ("auto", "triton", "reference")
DKDV_MODES = ("atomic", "reverse")
#: dk/dv path unless chosen otherwise: not yet measured on a GPU (docs/kernels.md, "Owed").
DEFAULT_DKDV = "atomic"

_TRUE_WORDS = ("1", "true", "yes", "on")
_FALSE_WORDS = ("", "0", "false", "no", "off")


@dataclass(frozen=True)
class Tile:
    """Launch shape of one attention kernel: rows (queries) and neighbours per step, warps."""

    rows: int
    neighbours: int
    num_warps: int

    def __post_init__(self) -> None:
        for value in (self.rows, self.neighbours, self.num_warps):
            if value < 1 or value & (value - 1):
                raise ValueError(f"tile {self.spec()!r}: every entry must be a power of two")

    def spec(self) -> str:
        """The ``ROWS,NEIGHBOURS,WARPS`` text form."""
        return f"{self.rows},{self.neighbours},{self.num_warps}"

    @classmethod
    def parse(cls, text: str, name: str = "tile") -> Tile:
        """``'16,16,4'`` -> Tile(16, 16, 4)."""
        try:
            rows, neighbours, warps = (int(x) for x in text.split(","))
        except ValueError as err:
            raise ValueError(f"{name}={text!r}: expected 'ROWS,NEIGHBOURS,WARPS', e.g. '16,16,4'") from err
        try:
            return cls(rows, neighbours, warps)
        except ValueError as err:
            raise ValueError(f"{name}={text!r}: every entry must be a power of two") from err


@dataclass(frozen=True)
class KernelSettings:
    """How the kernel ops run. Frozen: derive variants with `replace` or `kernel_settings`.

    backend: ``auto`` | ``triton`` | ``reference``. debug: index range checks and NaN-poisoned
    kernel outputs. dkdv: ``atomic`` | ``reverse`` (Triton backward; deterministic algorithms
    always take ``reverse``). token_tile / cluster_tile: Triton launch tiles (None = heuristic).
    compile_only: kernels launch on host tensors only to compile (`affmae_kernels.compile_report`).
    """

    backend: str = "auto"
    debug: bool = False
    dkdv: str = DEFAULT_DKDV
    token_tile: Tile | None = None
    cluster_tile: Tile | None = None
    compile_only: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "backend", str(self.backend).lower())
        object.__setattr__(self, "dkdv", str(self.dkdv).lower())
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown kernel backend {self.backend!r}: use one of {BACKENDS}")
        if self.dkdv not in DKDV_MODES:
            raise ValueError(f"unknown dk/dv mode {self.dkdv!r}: use one of {DKDV_MODES}")
        if self.cluster_tile is not None and (self.cluster_tile.rows < 16 or self.cluster_tile.neighbours < 16):
            raise ValueError("cluster tile: tl.dot needs at least 16 rows and 16 neighbours")

    def replace(self, **changes: object) -> KernelSettings:
        """A copy with the given fields changed; ``None`` values leave a field as it is."""
        changes = {k: v for k, v in changes.items() if v is not None}
        return dataclasses.replace(self, **changes) if changes else self

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> KernelSettings:
        """Settings from ``AFFMAE_KERNELS*`` variables (defaults where unset)."""
        env = os.environ if environ is None else environ
        debug_text = env.get("AFFMAE_KERNELS_DEBUG", "0").strip().lower()
        if debug_text not in _TRUE_WORDS + _FALSE_WORDS:
            raise ValueError(f"AFFMAE_KERNELS_DEBUG={debug_text!r}: use 1 or 0")
        tiles = {}
        for field_name, variable in (("token_tile", "AFFMAE_KERNELS_TOKEN_TILE"),
                                     ("cluster_tile", "AFFMAE_KERNELS_CLUSTER_TILE")):
            text = env.get(variable, "").strip()
            tiles[field_name] = Tile.parse(text, variable) if text else None
        return cls(backend=env.get("AFFMAE_KERNELS", "").strip() or "auto",
                   debug=debug_text in _TRUE_WORDS,
                   dkdv=env.get("AFFMAE_KERNELS_DKDV", "").strip() or DEFAULT_DKDV,
                   **tiles)


@functools.lru_cache(maxsize=1)
def environment_settings() -> KernelSettings:
    """The settings the environment gave at the first call (read once per process)."""
    return KernelSettings.from_env()


def reload_environment() -> KernelSettings:
    """Read the environment again (for processes that change it on purpose, and tests)."""
    environment_settings.cache_clear()
    return environment_settings()


_OVERRIDE: contextvars.ContextVar[KernelSettings | None] = contextvars.ContextVar("affmae_kernel_settings",
                                                                                   default=None)


def current_settings() -> KernelSettings:
    """The innermost `kernel_settings` override, else the environment's settings."""
    override = _OVERRIDE.get()
    return override if override is not None else environment_settings()


@contextlib.contextmanager
def kernel_settings(settings: KernelSettings | None = None, **changes: object) -> Iterator[KernelSettings]:
    """Run a block with other settings: ``with kernel_settings(backend="reference"): ...``.

    ``settings`` replaces the current settings as a whole; ``changes`` (field=value) apply on top.
    """
    new = (settings or current_settings()).replace(**changes)
    token = _OVERRIDE.set(new)
    try:
        yield new
    finally:
        _OVERRIDE.reset(token)


_LOGGED: set[tuple[str, str]] = set()
_LOGGED_LOCK = threading.Lock()


def log_once(level: int, key: str, message: str) -> None:
    """Log ``message`` on the ``affmae_kernels`` logger the first time ``(key, message)`` occurs."""
    with _LOGGED_LOCK:
        if (key, message) in _LOGGED:
            return
        _LOGGED.add((key, message))
    logger.log(level, message)
