"""Data: load splits -> rows to (prompt, completion) -> token ids -> length-sorted, dynamically padded batches."""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from .config import TRUNCATION, ConfigError, check_choice, check_number


class DataError(ValueError):
    """The data cannot be used as given; the message says what was found and what is needed."""


@dataclass
class Example:
    """One tokenized row."""

    prompt: list[int]  # prompt token ids (after truncation)
    completion: list[int]  # completion token ids, EOS appended

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.completion)


@dataclass
class Batch:
    """A right-padded batch; row b holds prompt then completion in tokens[b, :lengths[b]]."""

    tokens: np.ndarray  # (B, L) int32
    prompt_lengths: np.ndarray  # (B,) int32
    lengths: np.ndarray  # (B,) int32

    def loss_mask(self) -> np.ndarray:
        """(B, L-1) float32: 1 where the next-token target tokens[:, t+1] is a completion token."""
        target = np.arange(1, self.tokens.shape[1])[None, :]
        inside = (target >= self.prompt_lengths[:, None]) & (target < self.lengths[:, None])
        return inside.astype(np.float32)

    def split(self, parts: int) -> list["Batch"]:
        """The rows in up to `parts` consecutive, nearly equal groups (row_groups), each a Batch of the same width."""
        return [Batch(self.tokens[g], self.prompt_lengths[g], self.lengths[g]) for g in row_groups(len(self.tokens), parts)]


def row_groups(rows: int, parts: int) -> list[np.ndarray]:
    """Row indices in up to `parts` consecutive, nearly equal groups: how a step's rows are split over CPU streams."""
    return np.array_split(np.arange(rows), min(parts, rows))


# ---------------------------------------------------------------------------------------------------
# Loading

_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
_SPLIT_NAMES = {"train": "train", "valid": "valid", "validation": "valid", "val": "valid", "dev": "valid", "test": "test"}


def _load_file(path: Path):
    import datasets

    if path.suffix.lower() != ".parquet":
        _check_utf8(path)  # pyarrow loads invalid bytes and fails only when the row is read
    try:
        rows = datasets.load_dataset(_BUILDERS[path.suffix.lower()], data_files=str(path), split="train")
    except Exception as e:  # pyarrow / datasets errors name neither the file nor the line: find them
        raise DataError(_explain_unreadable(path, e)) from None
    if len(rows) == 0:
        raise DataError(f"{path} holds no rows; add training examples (one JSON object per line for .jsonl)")
    return rows


def _check_utf8(path: Path, chunk: int = 1 << 24) -> None:
    """Raise DataError naming the line of the first bytes in a text file that are not UTF-8."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    with open(path, "rb") as f:
        try:
            while block := f.read(chunk):
                decoder.decode(block)
            decoder.decode(b"", final=True)
        except UnicodeDecodeError as e:
            raise DataError(_explain_unreadable(path, e)) from None


def _explain_unreadable(path: Path, error: Exception) -> str:
    """Why datasets could not read this file: the first bad line, when the file's text shows it."""
    kind = path.suffix.lower()
    if kind != ".parquet":
        raw = path.read_bytes()
        if not raw.strip():
            return f"{path} is empty; add training examples (one JSON object per line for .jsonl)"
        for number, line in enumerate(raw.split(b"\n"), 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                return f"{path} line {number}: bytes that are not UTF-8 at column {e.start + 1}; save the file as UTF-8"
        text = raw.decode("utf-8")
        if kind == ".jsonl" or (kind == ".json" and not text.lstrip().startswith(("[", "{"))):
            for number, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    return f"{path} line {number}: not valid JSON ({e.msg} at column {e.colno}); each line must be one JSON object"
                if not isinstance(row, dict):
                    return f"{path} line {number}: a JSON {type(row).__name__}, not an object; each line must be one JSON object"
        elif kind == ".json":
            try:
                json.loads(text)
            except json.JSONDecodeError as e:
                if e.msg != "Extra data":  # several objects one per line: JSON Lines in a .json file
                    return f"{path} line {e.lineno}: not valid JSON ({e.msg} at column {e.colno})"
        elif kind == ".csv":
            import csv

            reader = csv.reader(io.StringIO(text, newline=""))
            header = next(reader, [])
            start = reader.line_num + 1
            for row in reader:
                if row and len(row) != len(header):
                    return f"{path} line {start}: {len(row)} fields, but the header has {len(header)}"
                start = reader.line_num + 1
    while error.__cause__ is not None or error.__context__ is not None:  # the innermost error says what was wrong
        error = error.__cause__ or error.__context__
    detail = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
    return f"{path}: cannot be read as {kind[1:]} ({detail}); check that every row has the same columns and types"


@dataclass
class RowSource:
    """Where a split's rows come from, so an error about row i can name the file and line."""

    path: Path | None = None  # the file, when the split is one local file
    rows: list[int] | None = None  # row i of the split is row rows[i] of the file (a split-off share)

    def describe(self, split: str, i: int) -> str:
        """'data/train.jsonl line 7' (or 'train row 7' when no file line is known)."""
        k = self.rows[i] if self.rows is not None else i
        if self.path is None:
            return f"{split} row {k + 1}" if self.rows is None else f"{split} row {i + 1} (row {k + 1} of the data)"
        line = _line_of_row(self.path, k)
        return f"{self.path} line {line}" if line is not None else f"{self.path} row {k + 1}"


def _line_of_row(path: Path, k: int) -> int | None:
    """The 1-based line where row k of a .jsonl or .csv file starts (None for other formats)."""
    kind = path.suffix.lower()
    if kind == ".jsonl":
        with open(path, encoding="utf-8") as f:
            seen = -1
            for number, line in enumerate(f, 1):
                seen += bool(line.strip())  # blank lines hold no row
                if seen == k:
                    return number
    elif kind == ".csv":
        import csv

        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.reader(f)
            next(reader, None)  # the header
            start = reader.line_num + 1
            for index, _ in enumerate(reader):
                if index == k:
                    return start
                start = reader.line_num + 1
    return None


def _load_folder(folder: Path, found_files: dict | None = None) -> dict:
    import datasets

    if (folder / "dataset_dict.json").exists() or (folder / "state.json").exists():
        loaded = datasets.load_from_disk(str(folder))  # written by save_to_disk
        return dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
    # index.json beside the data is TransformerLab's metadata about a workspace dataset, not rows
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in _BUILDERS and p.name != "index.json")
    found = {}
    for p in files:
        if p.stem.lower() in _SPLIT_NAMES:
            name = _SPLIT_NAMES[p.stem.lower()]
            if name in found:
                raise DataError(f"{folder}: two files for split {name!r}: {found[name].name} and {p.name}")
            found[name] = p
    if not found and len(files) == 1:  # a lone data file is the training split
        found = {"train": files[0]}
    if not found:
        listing = ", ".join(sorted(p.name for p in folder.iterdir())) or "nothing"
        raise DataError(
            f"{folder}: no data files found (it holds: {listing}); expected train.jsonl (or .json/.csv/.parquet), "
            "optionally valid.* / validation.* and test.*, or a folder written by datasets.save_to_disk"
        )
    if found_files is not None:
        found_files.update(found)
    return {name: _load_file(p) for name, p in found.items()}


def _load_source(source: Any, files: dict | None = None) -> dict:
    """Any supported source -> {split name as found: datasets.Dataset}; files gets {split name: local file}."""
    import datasets

    if isinstance(source, datasets.DatasetDict) or isinstance(source, dict):
        return {k: (datasets.Dataset.from_list(v) if isinstance(v, list) else v) for k, v in source.items()}
    if isinstance(source, datasets.Dataset):
        return {"train": source}
    if isinstance(source, list):
        return {"train": datasets.Dataset.from_list(source)}
    if not isinstance(source, (str, Path)) or not str(source).strip():
        raise ConfigError("dataset", source, "expected a local file or folder, or a Hugging Face dataset id")
    path = Path(source).expanduser()
    if path.is_dir():
        return _load_folder(path, files)
    if path.is_file():
        if path.suffix.lower() not in _BUILDERS:
            raise ConfigError("dataset", str(source), f"unsupported file type; use one of {', '.join(_BUILDERS)}")
        if files is not None:
            files["train"] = path
        return {"train": _load_file(path)}
    if path.suffix.lower() in _BUILDERS or str(source).startswith((".", "/", "~")):
        raise DataError(f"dataset file or folder not found: {source}")
    try:
        loaded = datasets.load_dataset(str(source))
    except Exception as e:  # offline, unknown id, ...: say what was tried
        raise DataError(f"could not load {source!r} as a Hugging Face dataset id (it is no local path): {e}") from e
    return dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}


def load_splits(
    source: Any, *, valid_fraction: float = 0.2, seed: int = 0, splits: Iterable[str] = ("train", "valid", "test"),
    sources: dict | None = None,
) -> dict:
    """Load 'train' / 'valid' / 'test' datasets.Dataset splits; with no validation split, a seeded share of train.

    sources, when given, gets {split: RowSource}, for error messages that name a row's file and line.
    """
    splits = tuple(splits)
    bad = [s for s in splits if s not in ("train", "valid", "test")]
    if bad:
        raise ConfigError("splits", splits, "choose from 'train', 'valid', 'test'")
    check_number("valid_fraction", valid_fraction, 0.0, 0.9)
    files: dict = {}
    raw = _load_source(source, files)
    out, origin = {}, {}
    for name, ds in raw.items():
        key = _SPLIT_NAMES.get(str(name).lower())
        if key and key not in out:
            out[key], origin[key] = ds, RowSource(files.get(name))
    if "valid" in splits and "valid" not in out and "train" in out and valid_fraction > 0:
        n = len(out["train"])
        n_valid = math.ceil(valid_fraction * n)
        if n_valid >= n:
            raise DataError(f"cannot split a validation set off a training split of {n} row(s) with valid_fraction="
                            f"{valid_fraction}; add rows, a valid split, or set valid_fraction=0")
        # datasets' train_test_split draws the same permutation; done here to know each row's origin
        order = np.random.default_rng(seed).permutation(n)
        file = origin["train"].path
        out["train"], out["valid"] = out["train"].select(order[n_valid:]), out["train"].select(order[:n_valid])
        origin["train"], origin["valid"] = RowSource(file, order[n_valid:].tolist()), RowSource(file, order[:n_valid].tolist())
    if sources is not None:
        sources.update(origin)
    if "train" in splits and "train" not in out:
        raise DataError(f"{source}: no training split; found splits: {', '.join(map(str, raw)) or 'none'}")
    return {k: out[k] for k in ("train", "valid", "test") if k in splits and k in out}


# ---------------------------------------------------------------------------------------------------
# Formatting rows

# Used when a dataset has instruction / output (and optionally input) columns and nothing else is said.
ALPACA_PROMPT_TEMPLATE = (
    "### Instruction:\n{{ instruction }}\n\n{% if input %}### Input:\n{{ input }}\n\n{% endif %}### Response:\n"
)
ALPACA_NO_INPUT_TEMPLATE = "### Instruction:\n{{ instruction }}\n\n### Response:\n"  # data without an input column
ALPACA_COMPLETION_TEMPLATE = "{{ output }}"


def jinja_env():
    from jinja2 import StrictUndefined
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    # keep_trailing_newline: a prompt ending in "Response:\n" must keep its newline
    # finalize: a null cell prints as nothing, not as "None" (a null completion is then caught as empty)
    return ImmutableSandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=True, autoescape=False,
                                         finalize=lambda value: "" if value is None else value)


class Formatter:
    """Turns a row into (prompt, completion) text: jinja2 templates, a chat column, or plain columns."""

    def __init__(
        self,
        tokenizer=None,
        prompt_template: str | None = None,
        completion_template: str | None = None,
        chat_column: str | None = None,
        prompt_column: str = "prompt",
        completion_column: str = "completion",
    ):
        self.tokenizer = tokenizer
        self.prompt_template = prompt_template or None
        self.completion_template = completion_template or None
        self.chat_column = chat_column or None
        self.prompt_column = prompt_column
        self.completion_column = completion_column
        self.mode: str | None = None  # 'chat' | 'template' | 'plain', set by check()
        self._env = jinja_env()
        self._compiled: dict[str, Any] = {}
        for side in ("prompt", "completion"):
            self._compile(side, getattr(self, f"{side}_template"))

    def _compile(self, side: str, source: str | None) -> None:
        from jinja2 import TemplateSyntaxError

        if source is None:
            self._compiled.pop(side, None)
            return
        try:
            self._compiled[side] = (source, self._env.from_string(source))
        except TemplateSyntaxError as e:
            raise ConfigError(f"{side}_template", source, f"not a valid jinja2 template ({e})") from e

    def check(self, columns: list[str]) -> None:
        """Settle the mode for a dataset with these columns; raise DataError now for anything a row would lack."""
        from jinja2 import meta

        columns = list(columns)
        present = f"the dataset's columns are: {', '.join(columns) or 'none'}"
        defaults = self.prompt_column == "prompt" and self.completion_column == "completion"
        if self.chat_column:
            self.mode = "chat"
        elif self.prompt_template or self.completion_template:
            self.mode = "template"
        elif not defaults:
            self.mode = "plain"
        elif "messages" in columns:
            self.mode, self.chat_column = "chat", "messages"
        elif "prompt" in columns and "completion" in columns:
            self.mode = "plain"
        elif "instruction" in columns and "output" in columns:
            self.mode = "template"
            prompt = ALPACA_PROMPT_TEMPLATE if "input" in columns else ALPACA_NO_INPUT_TEMPLATE
            self.prompt_template, self.completion_template = prompt, ALPACA_COMPLETION_TEMPLATE
            self._compile("prompt", prompt)
            self._compile("completion", ALPACA_COMPLETION_TEMPLATE)
        else:
            raise DataError(
                f"cannot tell how to split rows into prompt and completion: {present}. Need one of: a 'messages' "
                "column (chat), 'prompt' and 'completion' columns, 'instruction' and 'output' columns, or set "
                "prompt_template / completion_template (jinja2 over the columns), chat_column, or "
                "prompt_column / completion_column"
            )
        if self.mode == "chat":
            if self.chat_column not in columns:
                raise DataError(f"chat_column {self.chat_column!r} is not a column; {present}")
            # before the model loads there is no tokenizer yet: checked again once it is set
            if self.tokenizer is not None and not getattr(self.tokenizer, "chat_template", None):
                raise DataError(f"chat column {self.chat_column!r} needs a tokenizer with a chat template")
            return
        for side in ("prompt", "completion"):
            if side in self._compiled:
                source, _ = self._compiled[side]
                missing = sorted(meta.find_undeclared_variables(self._env.parse(source)) - set(columns))
                if missing:
                    raise DataError(
                        f"{side}_template uses {', '.join(missing)}, which the dataset lacks; {present}"
                    )
            else:
                col = getattr(self, f"{side}_column")
                if col not in columns:
                    raise DataError(
                        f"{side}_column {col!r} is not a column; {present} (set {side}_column or {side}_template)"
                    )

    @property
    def uses_chat_template(self) -> bool:
        """True when prompts are rendered with the tokenizer's chat template."""
        return self.mode == "chat"

    def describe(self) -> str:
        """One line saying how rows are formatted (for logs)."""
        if self.mode == "chat":
            return f"chat messages in column {self.chat_column!r}"
        sides = [
            f"{s}: template {self._compiled[s][0]!r}" if s in self._compiled else f"{s}: column {getattr(self, s + '_column')!r}"
            for s in ("prompt", "completion")
        ]
        return "; ".join(sides)

    def __call__(self, row: dict) -> tuple[str, str]:
        """(prompt, completion) text of one row."""
        if self.mode is None:
            self.check(list(row))
        if self.mode == "chat":
            return self._chat(row[self.chat_column])
        return self._side("prompt", row), self._side("completion", row)

    def _side(self, side: str, row: dict) -> str:
        from jinja2 import TemplateError, UndefinedError

        if side in self._compiled:
            try:
                return self._compiled[side][1].render(row)
            except UndefinedError as e:
                raise DataError(f"{side}_template: {e}; the row's columns are: {', '.join(row)}") from e
            except (TemplateError, TypeError, ValueError) as e:  # e.g. a filter applied to a null value
                raise DataError(f"{side}_template failed on this row ({type(e).__name__}: {e})") from e
        col = getattr(self, f"{side}_column")
        if col not in row:
            raise DataError(f"{side}_column {col!r} is missing; the row's columns are: {', '.join(row)}")
        value = row[col]
        if value is None:
            raise DataError(f"{side} column {col!r} is empty (null)")
        return value if isinstance(value, str) else str(value)

    def _chat(self, messages) -> tuple[str, str]:
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise DataError(f"chat column {self.chat_column!r} needs a tokenizer with a chat template")
        if isinstance(messages, str):  # e.g. a CSV cell holding JSON
            try:
                messages = json.loads(messages)
            except json.JSONDecodeError as e:
                raise DataError(f"chat column {self.chat_column!r} holds text that is not a JSON list of messages") from e
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise DataError(f"chat column {self.chat_column!r} must hold a list of {{'role', 'content'}} messages")
        # Arrow fills keys missing in some messages with None; chat templates test "is defined", so drop them.
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        if messages[-1].get("role") != "assistant":
            raise DataError(
                f"the last message must be the assistant's (the completion); got role {messages[-1].get('role')!r}"
            )
        from jinja2 import TemplateError

        try:
            prompt = self.tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
        except TemplateError as e:  # the template's own checks, e.g. roles that must alternate
            raise DataError(f"the tokenizer's chat template rejects these messages: {e}") from e
        return prompt, str(messages[-1].get("content") or "")


# ---------------------------------------------------------------------------------------------------
# Tokenizing


def column_names(rows) -> list[str]:
    """The columns of a split: a datasets.Dataset's, or the first row's keys of a list of dicts."""
    names = getattr(rows, "column_names", None)
    if names is not None:
        return list(names)
    return list(rows[0]) if len(rows) else []


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Prompt text -> ids: the tokenizer's own special tokens (e.g. BOS), one BOS at most."""
    ids = list(tokenizer.encode(text))
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None and ids[:2] == [bos, bos]:
        ids = ids[1:]  # a chat template that writes BOS itself, plus the tokenizer's BOS
    return ids


def tokenize_rows(
    rows, formatter: Formatter, tokenizer, max_seq_length: int, truncation: str = "left", split: str = "train",
    source: RowSource | None = None,
) -> tuple[list[Example], dict]:
    """Rows -> Examples (EOS appended to the completion) and stats {'rows', 'truncated', 'dropped'}.

    source (from load_splits) lets an error about a row name its file and line.
    """
    check_choice("truncation", truncation, TRUNCATION)
    check_number("max_seq_length", max_seq_length, 2, integer=True)
    where = (lambda i: source.describe(split, i)) if source is not None else (lambda i: f"{split} row {i + 1}")
    if not isinstance(rows, (list, tuple)) and not hasattr(rows, "column_names"):
        rows = list(rows)
    if len(rows) == 0:
        raise DataError(f"the {split} split is empty (0 rows)")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no EOS token; completions must end with one")
    bos = getattr(tokenizer, "bos_token_id", None)
    formatter.check(column_names(rows))  # fail before any row is tokenized

    examples, truncated, dropped = [], 0, 0
    for i, row in enumerate(rows):
        try:
            prompt_text, completion_text = formatter(row)
        except DataError as e:
            raise DataError(f"{where(i)}: {e}") from None
        if not completion_text.strip():
            raise DataError(f"{where(i)}: the completion is empty; every row needs text to learn")
        prompt = encode_prompt(tokenizer, prompt_text)
        completion = list(tokenizer.encode(completion_text, add_special_tokens=False))
        if not completion or completion[-1] != eos:
            completion.append(eos)
        if not prompt:
            raise DataError(f"{where(i)}: the prompt is empty; interventions edit prompt tokens, so one is needed")
        if len(prompt) + len(completion) > max_seq_length:
            budget = max_seq_length - len(completion)
            if truncation == "drop" or budget < 1:
                dropped += 1
                continue
            # keep the prompt's end (nearest the completion), and a leading BOS when there is room for it
            keep_bos = bos is not None and prompt[0] == bos and budget >= 2
            prompt = ([bos] + prompt[len(prompt) - budget + 1 :]) if keep_bos else prompt[len(prompt) - budget :]
            truncated += 1
        examples.append(Example(prompt, completion))
    stats = {"rows": len(rows), "truncated": truncated, "dropped": dropped}
    if not examples:
        raise DataError(
            f"all {len(rows)} {split} rows were dropped as longer than max_seq_length={max_seq_length} "
            f"(truncation={truncation!r}); raise max_seq_length"
            + (" or use truncation='left'" if truncation == "drop" else "")
        )
    return examples, stats


def pad_id_for(tokenizer) -> int:
    """A padding id: the tokenizer's pad token, else EOS, else 0 (padding never reaches the loss)."""
    for name in ("pad_token_id", "eos_token_id"):
        v = getattr(tokenizer, name, None)
        if isinstance(v, int):
            return v
    return 0


# ---------------------------------------------------------------------------------------------------
# Batching


def collate(examples: list[Example], pad_id: int = 0, pad_to: int = 8) -> Batch:
    """Right-pad examples into one Batch whose model inputs (every token but the last) are a multiple of pad_to wide.

    The inputs' width is what the kernels see, and GPU matmul kernels are much slower at odd widths such as
    511 than at 512 (BENCHMARKS.md). mlx-lm's trainer pads the same way.
    """
    if not examples:
        raise DataError("cannot collate an empty batch")
    check_number("pad_to", pad_to, 1, integer=True)
    lengths = np.array([e.length for e in examples], np.int32)
    width = 1 + math.ceil((int(lengths.max()) - 1) / pad_to) * pad_to
    tokens = np.full((len(examples), width), pad_id, np.int32)
    for b, e in enumerate(examples):
        tokens[b, : e.length] = e.prompt + e.completion
    return Batch(tokens, np.array([len(e.prompt) for e in examples], np.int32), lengths)


def _check_sharding(batch_size: int, rank: int, world_size: int, equal_shares: bool = True) -> None:
    check_number("batch_size", batch_size, 1, integer=True)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError("rank", rank, f"must be in [0, world_size) with world_size >= 1 (world_size={world_size})")
    if equal_shares and batch_size % world_size:
        raise ConfigError("batch_size", batch_size, f"the global batch size must be divisible by world_size={world_size}")


def num_batches(num_examples: int, batch_size: int, drop_last: bool = False, world_size: int = 1) -> int:
    """How many batches iterate_batches yields per epoch (the same on every rank)."""
    _check_sharding(batch_size, 0, world_size)
    usable = num_examples - (num_examples % batch_size if drop_last else num_examples % world_size)
    return usable // batch_size if drop_last else math.ceil(usable / batch_size)


def check_enough(examples: list[Example], batch_size: int, split: str = "train") -> None:
    """Raise DataError when a split has fewer examples than one batch."""
    if len(examples) < batch_size:
        raise DataError(
            f"the {split} split has {len(examples)} example(s), fewer than batch_size={batch_size}; "
            "lower batch_size or add data"
        )


def iterate_batches(
    examples: list[Example],
    batch_size: int,
    *,
    seed: int = 0,
    epoch: int = 0,
    shuffle: bool = True,
    pad_id: int = 0,
    pad_to: int = 8,
    drop_last: bool = False,
    rank: int = 0,
    world_size: int = 1,
    equal_shares: bool = True,
) -> Iterator[Batch]:
    """One epoch of length-sorted batches in a (seed, epoch)-shuffled order; this rank's rows [rank::world_size].

    batch_size is the global batch size. Every rank draws the same global batches, so ranks stay in step.
    Rows left over (a partial last batch with drop_last, or a remainder not divisible by world_size) are
    chosen at random per epoch when shuffling, so no example is always the one left out.
    equal_shares=False (evaluation, where ranks need not stay in step) keeps every row instead: the last
    batch may then give some ranks one row fewer, or none (that rank skips it).
    """
    _check_sharding(batch_size, rank, world_size, equal_shares)
    n = len(examples)
    if n == 0:
        return
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(n) if shuffle else np.arange(n)
    leftover = n % batch_size if drop_last else (n % world_size if equal_shares else 0)
    order = order[: n - leftover]
    # stable sort by length: equal lengths keep the shuffled order, so batch contents vary across epochs
    lengths = np.array([examples[i].length for i in order])
    order = order[np.argsort(lengths, kind="stable")]
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if shuffle:
        batches = [batches[j] for j in rng.permutation(len(batches))]
    for idx in batches:
        mine = idx[rank::world_size]
        if len(mine) == 0:
            continue
        yield collate([examples[i] for i in mine], pad_id=pad_id, pad_to=pad_to)
