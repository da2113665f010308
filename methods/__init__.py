"""Method adapters: one module per method (config dataclass + apply)."""
