"""Exceptions for unreadable or unsupported image inputs.

Both subclass ValueError, so callers (the CLI exits with code 2) can catch bad input in one place.
"""
from __future__ import annotations


class ImageFormatError(ValueError):
    """An input image that cannot be used: corrupt, RGB, ambiguous axes, missing metadata, ...
    The message says what was wrong and what to do."""


class ImageNotFoundError(ImageFormatError, FileNotFoundError):
    """The input path does not exist (also a FileNotFoundError)."""
