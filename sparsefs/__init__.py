"""sparsefs: qcow2 images as sparse raw files, for backups that copy only what is stored."""

__version__ = "0.1.0"
