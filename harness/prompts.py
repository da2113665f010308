"""Prompt sets: built-in sets (registered by name) and prompt files (.txt, .tsv, .csv, I2P CSV)."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import importlib
import io
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from harness.errors import DiffbenchError
from harness.registry import Registry


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One prompt; a per-prompt seed / guidance (from I2P) overrides the cell's."""

    text: str
    seed: int | None = None
    guidance: float | None = None


@dataclasses.dataclass(frozen=True)
class PromptSet:
    """An ordered, named tuple of prompts and a line saying where they came from."""

    name: str
    prompts: tuple[Prompt, ...]
    source: str = ""

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def texts(self) -> list[str]:
        return [p.text for p in self.prompts]

    def head(self, n: int | None) -> PromptSet:
        """The first n prompts; asking for more than the set holds is an error naming both."""
        if n is None:
            return self
        if n < 1:
            raise DiffbenchError(f"number of prompts must be at least 1, got {n}")
        if n > len(self):
            raise DiffbenchError(f"prompt set '{self.name}' has {len(self)} prompts, "
                                 f"but {n} were asked for")
        return dataclasses.replace(self, prompts=self.prompts[:n])


PromptFactory = Callable[[], Sequence[str]]


def _load_builtin_sets() -> None:
    """Prompt sets registered outside this module (the embedded world's captions)."""
    importlib.import_module("harness.mini.prompts")


PROMPTS: Registry[PromptFactory] = Registry("prompt set", loader=_load_builtin_sets)


def register_prompt_set(name: str) -> Callable[[PromptFactory], PromptFactory]:
    """Decorator on a zero-argument function returning prompt texts; the one place a name is set."""
    return PROMPTS.register(name)


# --- built-in sets --------------------------------------------------------------------------


def seeded_order(texts: Sequence[str], seed: int) -> list[str]:
    """A fixed pseudo-random order: sort by sha256(seed, text); same on every Python version."""
    return sorted(texts, key=lambda t: hashlib.sha256(f"{seed}:{t}".encode()).hexdigest())


@register_prompt_set("general")
def general() -> list[str]:
    """24 everyday scenes written for diffbench (people, animals, objects, places, styles)."""
    return [
        "a photo of a cat sleeping on a windowsill in the afternoon sun",
        "a red bicycle leaning against a brick wall",
        "a bowl of fresh fruit on a wooden kitchen table",
        "a lighthouse on a rocky coast at sunset",
        "an astronaut riding a horse on the moon, digital art",
        "a cup of coffee with latte art, top view",
        "a snowy mountain village at night with warm lights in the windows",
        "a golden retriever puppy playing in autumn leaves",
        "a busy city street in the rain, reflections on the pavement",
        "a watercolor painting of a sailboat on a calm lake",
        "a vintage car parked in front of a diner",
        "a child flying a kite on a green hill",
        "a close-up photo of a honeybee on a sunflower",
        "a cozy living room with a fireplace and bookshelves",
        "a plate of sushi on a black slate board",
        "an oil painting of a forest path in spring",
        "a steam locomotive crossing a stone bridge",
        "a pair of running shoes on a gym floor",
        "a hot air balloon floating over a desert canyon",
        "a portrait of an old fisherman wearing a wool hat",
        "a robot reading a newspaper in a park, cartoon style",
        "a glass of orange juice next to a stack of pancakes",
        "a wooden cabin by a lake surrounded by pine trees",
        "a colorful parrot perched on a branch in the jungle",
    ]


# --- prompt files ---------------------------------------------------------------------------
TEXT_COLUMNS = ("caption", "prompt", "text")  # MLPerf COCO TSV: id, caption
I2P_COLUMNS = ("prompt", "sd_seed", "sd_guidance_scale")  # the I2P benchmark CSV
MAX_SEED = 2**64 - 1  # what torch.Generator.manual_seed takes
MAX_GUIDANCE = 100.0  # the range of the cell's own guidance setting


def _fail(path: Path, line: int, message: str) -> DiffbenchError:
    return DiffbenchError(f"{path}:{line}: {message}")


def _text(path: Path) -> str:
    """The file as UTF-8 text (a BOM is dropped); other bytes are an error naming the line."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise _fail(path, line, f"not UTF-8 text (byte 0x{data[exc.start]:02x}); save the file "
                                "as UTF-8") from None


def read_txt(path: Path) -> list[Prompt]:
    """One prompt a line; blank lines and lines starting with # are skipped."""
    lines = [line.strip() for line in _text(path).splitlines()]
    return [Prompt(line) for line in lines if line and not line.startswith("#")]


def _rows(path: Path, delimiter: str) -> Iterator[tuple[int, list[str]]]:
    """(first line number, fields) per row, the header first; strict quoting: an unterminated
    quote or a quoted field over several lines is an error naming the line."""
    reader = csv.reader(io.StringIO(_text(path), newline=""), delimiter=delimiter, strict=True)
    line = 1
    try:
        for row in reader:
            if any("\n" in cell or "\r" in cell for cell in row):
                raise _fail(path, line, "a quoted field runs over several lines (an "
                                        "unterminated quote?)")
            yield line, row
            line = reader.line_num + 1
    except csv.Error as exc:
        raise _fail(path, line, f"bad quoting ({exc})") from None


def _records(path: Path, delimiter: str) -> Iterator[tuple[int, dict[str, str]]]:
    """(first line number, {column: value}) per data row; a wrong field count is an error."""
    rows = _rows(path, delimiter)
    header = [h.strip() for h in next(rows, (1, []))[1]]
    for line, row in rows:
        if row and len(row) != len(header):
            raise _fail(path, line, f"expected {len(header)} fields like the header, "
                                    f"found {len(row)}")
        if any(cell.strip() for cell in row):
            yield line, dict(zip(header, row, strict=True))


def _header(path: Path, delimiter: str) -> list[str]:
    return [h.strip() for h in next(_rows(path, delimiter), (1, []))[1]]


def _parse(path: Path, line: int, column: str, value: str, kind: type,
           high: float) -> int | float | None:
    """A per-prompt number in [0, high] (empty: None); anything else names file and line."""
    value = value.strip()
    if not value:
        return None
    try:
        number = kind(value)
    except ValueError:
        number = None
    if number is None or not math.isfinite(number) or not 0 <= number <= high:
        expected = "an integer" if kind is int else "a number"
        raise _fail(path, line, f"bad {column} {value!r} (expected {expected} in [0, {high}])")
    return number


def read_table(path: Path, delimiter: str) -> list[Prompt]:
    """A caption/prompt/text column; an I2P CSV (sd_seed, sd_guidance_scale) keeps its settings."""
    header = _header(path, delimiter)
    column = next((c for c in TEXT_COLUMNS if c in header), None)
    if column is None:
        raise _fail(path, 1, f"no prompt column: need one of {', '.join(TEXT_COLUMNS)} "
                             f"(header has {', '.join(header) or 'nothing'})")
    i2p = all(c in header for c in I2P_COLUMNS)
    prompts = []
    for line, record in _records(path, delimiter):
        text = " ".join(record[column].split())
        if not text:
            raise _fail(path, line, f"empty prompt in column '{column}'")
        if i2p:
            seed = _parse(path, line, "sd_seed", record["sd_seed"], int, MAX_SEED)
            guidance = _parse(path, line, "sd_guidance_scale", record["sd_guidance_scale"],
                              float, MAX_GUIDANCE)
            prompts.append(Prompt(text, seed, guidance))
        else:
            prompts.append(Prompt(text))
    return prompts


READERS: dict[str, Callable[[Path], list[Prompt]]] = {
    ".txt": read_txt,
    ".tsv": lambda path: read_table(path, "\t"),
    ".csv": lambda path: read_table(path, ","),
}


def looks_like_path(name: str) -> bool:
    """A prompt-set argument is a file when it has a known suffix, a separator, or exists."""
    return Path(name).suffix.lower() in READERS or "/" in name or Path(name).exists()


def read_prompt_file(path: Path) -> PromptSet:
    """Read a prompt file by its suffix; the source records the path and a content hash."""
    if not path.is_file():
        raise DiffbenchError(f"prompt file not found: {path}")
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise DiffbenchError(f"cannot read prompts from {path}: supported file types are "
                             f"{', '.join(READERS)}")
    prompts = tuple(reader(path))
    if not prompts:
        raise DiffbenchError(f"no prompts in {path}")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    return PromptSet(str(path), prompts, f"file {path.resolve()} (sha256 {digest})")


def builtin(name: str) -> PromptSet:
    """A registered prompt set by name (unknown names get the registry's did-you-mean)."""
    factory = PROMPTS.get(name)
    doc = (factory.__doc__ or "").strip().splitlines()
    return PromptSet(name, tuple(Prompt(t) for t in factory()), doc[0] if doc else "built-in")


def load_prompts(name_or_path: str, n: int | None = None) -> PromptSet:
    """A built-in set by name, or a prompt file; the first n prompts (all when n is None)."""
    if name_or_path not in PROMPTS and looks_like_path(name_or_path):
        prompt_set = read_prompt_file(Path(name_or_path).expanduser())
    else:
        prompt_set = builtin(name_or_path)
    return prompt_set.head(n)
