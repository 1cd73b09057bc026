"""Alembic migrations of the store (run by `Store(..., migrate=True)`; no alembic.ini needed)."""
