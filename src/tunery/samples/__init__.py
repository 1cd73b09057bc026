"""Bundled sample datasets, generated deterministically (seeded, no network)."""
