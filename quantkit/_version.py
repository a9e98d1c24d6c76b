"""quantkit version: one place, read by the package, the checkpoint record and reports."""

__version__ = "0.1.0"
