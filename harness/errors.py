"""User-facing errors: one line; exit 2 for bad input, 1 when a run could not go on."""

from __future__ import annotations

from pathlib import Path

# Exit codes of every subcommand: all went well / some cell (or comparison) failed / bad input.
EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


class DiffbenchError(Exception):
    """Bad input from the user (unknown name, bad parameter, missing file): one-line message."""

    exit_code = EXIT_BAD_INPUT


class MissingExtraError(DiffbenchError):
    """An optional dependency is not installed; the message names the extra to install."""

    def __init__(self, module: str, extra: str, purpose: str):
        super().__init__(
            f"{purpose} needs the optional package '{module}': pip install 'diffbench[{extra}]'"
        )


class WriteFailed(DiffbenchError):
    """Writing a result failed (disk full, read-only folder): the run stops, finished work
    stays, and a re-run resumes. Not bad input, so exit code 1."""

    exit_code = EXIT_FAILED

    def __init__(self, path: str | Path, exc: OSError, detail: str = ""):
        self.path, self.os_error = Path(path), exc
        super().__init__(f"cannot write {path}: {exc.strerror or exc}"
                         + (f"; {detail}" if detail else ""))


def require(module: str, extra: str, purpose: str):
    """Import an optional dependency lazily, or raise MissingExtraError naming the extra."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise MissingExtraError(module, extra, purpose) from exc
