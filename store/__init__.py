"""fimio.store: the content-addressed store library (no click, no CLI imports)."""

__version__ = "0.1.0"
