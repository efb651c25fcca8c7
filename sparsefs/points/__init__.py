"""Restore points: a backup set of verified points in time per disk.

A backup set is a directory (DEST_DIR) holding, for each disk NAME, a chain of
points: a full point (``NAME/NAME@ID.raw``, or ``.qcow2`` with ``--format
qcow2``), then delta points (``NAME/NAME@ID.qcow2``, a qcow2 overlay whose
backing file is the previous point's file, named relative, with an explicit
backing format).  No run writes to a file an existing point reads: a new point
is written under a temporary name, synced, read back and verified, and only
then renamed into place and recorded in the manifest.

Modules:

- :mod:`sparsefs.points.blocks`: the per-point block-digest file (per-MiB
  sparsefs1 block digests and per-64 KiB XXH3-128 digests of non-zero blocks).
- :mod:`sparsefs.points.scan`: reads a source once and hashes it in both block
  sizes, on worker threads.
- :mod:`sparsefs.points.engine`: writes a point (or a restore target) from a
  source and the previous point's digests, then verifies it.
- :mod:`sparsefs.points.set`: :class:`~sparsefs.points.set.BackupSet`, the
  manifest, point ids and names, the lock, damage checks.
- :mod:`sparsefs.points.restore`: restore targets (raw file, qcow2 file,
  block device).

Imports flow one way: points reads images through the format registry and
writes qcow2 through qcow2's writer; it never imports the CLI.
"""
