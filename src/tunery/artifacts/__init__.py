"""A run's folder (`Run`, addressed by URL: every name inside it), its job, and its manifest."""

from tunery.artifacts.manifest import build_manifest
from tunery.artifacts.run import ARCHIVE, Job, Run, Storage, check_storage

__all__ = ["ARCHIVE", "Job", "Run", "Storage", "build_manifest", "check_storage"]
