"""Helpers shared by several methods (no method registers here; ARCHITECTURE.md)."""
