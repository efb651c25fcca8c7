"""The sparsefs exception tree.

Every error that a user can cause (a bad image, a missing file, a feature we
cannot read) is a :class:`SparsefsError` whose message names the file and the
problem in one line.  The CLI prints that line and exits non-zero; the FUSE
layer answers EIO for a :class:`ImageReadError` and keeps serving the rest.

This module imports nothing from sparsefs.
"""

from __future__ import annotations


class SparsefsError(Exception):
    """Base class: a problem the user can act on, described in one line."""


class ImageFormatError(SparsefsError):
    """The file is not a valid image of the format it was opened as."""


class UnsupportedFeatureError(SparsefsError):
    """The image uses a feature sparsefs refuses to read (never served wrong)."""


class ImageReadError(SparsefsError):
    """A range of an otherwise valid image cannot be read (EIO for that range)."""


class MissingFileError(SparsefsError):
    """A file the image depends on (backing file, data file) cannot be opened."""


class ImageLockedError(SparsefsError):
    """Another process holds the image in a way that forbids reading it now."""
