"""The embedded models and their world (ARCHITECTURE.md, "harness/mini")."""
