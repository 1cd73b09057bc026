"""A run's self-describing outputs: manifest.json and the weights archive."""

from tunery.artifacts.manifest import (
    ARCHIVE_NAME,
    build_manifest,
    read_manifest,
    write_archive,
    write_manifest,
)

__all__ = ["ARCHIVE_NAME", "build_manifest", "read_manifest", "write_archive", "write_manifest"]
