"""The service's persistent state: SQLAlchemy tables, alembic migrations, and the Store that all
routes and workers go through."""

from tunery.store.pages import BadCursor, Page
from tunery.store.store import BASE_OWNER, Conflict, Store, base_version_id

__all__ = ["BASE_OWNER", "BadCursor", "Conflict", "Page", "Store", "base_version_id"]
