"""User-facing errors: one clear line, CLI exit code 2."""


class DiffbenchError(Exception):
    """Bad input from the user (unknown name, bad parameter, missing file): one-line message."""


class MissingExtraError(DiffbenchError):
    """An optional dependency is not installed; the message names the extra to install."""

    def __init__(self, module: str, extra: str, purpose: str):
        super().__init__(
            f"{purpose} needs the optional package '{module}': pip install 'diffbench[{extra}]'"
        )


def require(module: str, extra: str, purpose: str):
    """Import an optional dependency lazily, or raise MissingExtraError naming the extra."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise MissingExtraError(module, extra, purpose) from exc
