"""A run's folder (`Run`, addressed by URL: every name inside it), its job, and its manifest."""

from tunery.artifacts.manifest import build_manifest
from tunery.artifacts.run import ARCHIVE, Run, Storage, TrainingJob, check_storage

__all__ = ["ARCHIVE", "Run", "Storage", "TrainingJob", "build_manifest", "check_storage"]
