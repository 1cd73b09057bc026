"""tunery's version, in a module of its own so any package can read it without importing `tunery`
(the package facade, which sits above them all)."""

__version__ = "0.1.0"
