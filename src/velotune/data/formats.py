"""Recognise a dataset's layout and convert its rows into training samples.

Two kinds of sample come out: a `ChatSample` (a conversation, a list of {"role", "content"} with
roles system/user/assistant; only assistant turns are trained) and a `TextSample` (raw text for
continued pre-training; every token is trained).

Layouts (`dataset_format`):
- "alpaca":   instruction, optional input, output, optional system;
- "sharegpt": conversations = [{"from": human|gpt|system|user|assistant, "value": ...}, ...]
              (role/content inside `conversations` is accepted as well);
- "messages": messages = [{"role": ..., "content": ...}, ...] (OpenAI / Hugging Face chat); a
              content may be a list of parts, {"type": "text", "text": ...} and {"type": "image",
              "path" | "image" | "url": FILE} as in Hugging Face's chat-template convention, or a
              row may list `images` (files) that go, in order, in front of its first user turn;
              relative image paths are read from the data file's folder;
- "text":     text = "..." for continued pre-training;
- "auto":     the one layout whose columns every one of the first rows has.

Rows whose columns match none of these go through a column template (`data/templates.py`).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from velotune.data.files import DataError, Row

Message = dict[str, Any]        # role, and content: a string or a list of text and image parts
Conversation = list[Message]
IMAGE_KEYS = ("path", "image", "url")

FORMATS = ("alpaca", "sharegpt", "messages", "text")
FORMAT_CHOICES = (*FORMATS, "auto")
# The columns that identify each layout during auto-detection.
SIGNATURE_COLUMNS = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "output"),
    "text": ("text",),
}
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system",
                  "user": "user", "assistant": "assistant"}
DETECTION_ROWS = 8


@dataclass(frozen=True)
class ChatSample:
    messages: Conversation
    where: str
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def images(self) -> list[str]:
        """The image files of the conversation, in the order the chat template writes them."""
        return [part["path"] for message in self.messages if isinstance(message["content"], list)
                for part in message["content"] if part["type"] == "image"]


def message_text(message: Message) -> str:
    """A message's text: its content, or its text parts joined."""
    content = message["content"]
    if isinstance(content, str):
        return content
    return "".join(part["text"] for part in content if part["type"] == "text")


@dataclass(frozen=True)
class TextSample:
    text: str
    where: str


Sample = ChatSample | TextSample


def detect_format(rows: Sequence[Row]) -> str:
    """The layout all of the first rows match; DataError naming the columns found otherwise."""
    head = rows[:DETECTION_ROWS]
    for name, columns in SIGNATURE_COLUMNS.items():
        if all(all(column in row.data for column in columns) for row in head):
            return name
    expected = "; ".join(f"{name}: {', '.join(cols)}" for name, cols in SIGNATURE_COLUMNS.items())
    raise DataError(
        f"{head[0].where}: cannot tell the dataset format from columns {sorted(head[0].data)}; "
        f"expected columns for {expected}. Name the format with dataset_format, or map your "
        "columns with a template"
    )


def convert_rows(rows: Sequence[Row], dataset_format: str = "auto") -> list[Sample]:
    """Convert every row with the named layout (or the detected one)."""
    if dataset_format not in FORMAT_CHOICES:
        raise DataError(
            f"unknown dataset_format {dataset_format!r}; choose one of {', '.join(FORMAT_CHOICES)}"
        )
    name = detect_format(rows) if dataset_format == "auto" else dataset_format
    convert = CONVERTERS[name]
    return [convert(row) for row in rows]


def _field(row: Row, name: str, kind: type = str, *, optional: bool = False) -> Any:
    value = row.data.get(name)
    if value is None:
        if optional:
            return None
        raise DataError(
            f"{row.where}: missing field {name!r} (row has {sorted(row.data)})"
        )
    if not isinstance(value, kind):
        raise DataError(
            f"{row.where}: field {name!r} must be a {kind.__name__}, found {type(value).__name__}"
        )
    return value


def from_alpaca(row: Row) -> ChatSample:
    instruction = _field(row, "instruction")
    extra = _field(row, "input", optional=True)
    output = _field(row, "output")
    system = _field(row, "system", optional=True)
    prompt = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
    messages = [{"role": "system", "content": system}] if system and system.strip() else []
    messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
    return ChatSample(messages, row.where)


def from_sharegpt(row: Row) -> ChatSample:
    turns = _field(row, "conversations", list)
    messages = []
    for i, turn in enumerate(turns):
        sharegpt_keys = isinstance(turn, dict) and "from" in turn
        role_key, content_key = ("from", "value") if sharegpt_keys else ("role", "content")
        role = _turn_field(row, "conversations", i, turn, role_key)
        if role not in SHAREGPT_ROLES:
            raise DataError(
                f"{row.where}: conversations[{i}] has role {role!r}; "
                f"expected one of {', '.join(SHAREGPT_ROLES)}"
            )
        messages.append({"role": SHAREGPT_ROLES[role],
                         "content": _turn_field(row, "conversations", i, turn, content_key)})
    return ChatSample(_checked(messages, row, "conversations"), row.where)


def from_messages(row: Row) -> ChatSample:
    turns = _field(row, "messages", list)
    messages = []
    for i, turn in enumerate(turns):
        role = _turn_field(row, "messages", i, turn, "role")
        if role not in ROLES:
            raise DataError(
                f"{row.where}: messages[{i}] has role {role!r}; expected one of {', '.join(ROLES)}"
            )
        messages.append({"role": role, "content": _content(row, i, turn)})
    images = row.data.get("images")
    if images:
        _attach_images(messages, images, row)
    return ChatSample(_checked(messages, row, "messages"), row.where)


def _content(row: Row, i: int, turn: Any) -> str | list[dict[str, str]]:
    """A message's content: a string, or a list of text and image parts (image paths resolved)."""
    if isinstance(turn, dict) and isinstance(turn.get("content"), list):
        return [_part(row, f"messages[{i}].content[{j}]", part) for j, part in enumerate(turn["content"])]
    return _turn_field(row, "messages", i, turn, "content")


def _part(row: Row, where: str, part: Any) -> dict[str, str]:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text" and isinstance(part.get("text"), str):
        return {"type": "text", "text": part["text"]}
    if kind == "image":
        path = next((part[key] for key in IMAGE_KEYS if isinstance(part.get(key), str)), None)
        if path is None:
            raise DataError(f"{row.where}: {where} is an image part without a file "
                            f"(one of {', '.join(IMAGE_KEYS)})")
        return {"type": "image", "path": _image_path(row, path, where)}
    raise DataError(f"{row.where}: {where} must be {{\"type\": \"text\", \"text\": ...}} or "
                    f"{{\"type\": \"image\", \"path\": ...}}, found {part!r:.80}")


def _image_path(row: Row, path: str, where: str) -> str:
    """A local file path (file:// accepted) resolved from the data file's folder."""
    if path.startswith("file://"):
        path = path[len("file://"):]
    elif "://" in path:
        raise DataError(f"{row.where}: {where}: {path!r} is not a local file (images are read from disk only)")
    folder = Path(row.source).parent if Path(row.source).is_file() else Path.cwd()
    return str(folder / Path(path).expanduser())


def _attach_images(messages: Conversation, images: Any, row: Row) -> None:
    """A row's `images` list, in front of the text of its first user turn."""
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        raise DataError(f"{row.where}: field 'images' must be a list of file paths")
    first = next((m for m in messages if m["role"] == "user"), None)
    if first is None:
        raise DataError(f"{row.where}: field 'images' needs a user turn to put the images in")
    parts = [{"type": "image", "path": _image_path(row, p, f"images[{k}]")} for k, p in enumerate(images)]
    content = first["content"]
    first["content"] = parts + (content if isinstance(content, list) else [{"type": "text", "text": content}])


def from_text(row: Row) -> TextSample:
    return TextSample(_field(row, "text"), row.where)


def _turn_field(row: Row, column: str, i: int, turn: Any, key: str) -> str:
    if not isinstance(turn, dict):
        raise DataError(
            f"{row.where}: {column}[{i}] must be an object, found {type(turn).__name__}")
    value = turn.get(key)
    if not isinstance(value, str):
        problem = "missing field" if value is None else f"non-string ({type(value).__name__})"
        raise DataError(f"{row.where}: {column}[{i}] has {problem} {key!r}")
    return value


def _checked(messages: Conversation, row: Row, column: str) -> Conversation:
    if not any(message["role"] == "assistant" for message in messages):
        raise DataError(f"{row.where}: {column} has no assistant turn to train on")
    return messages


CONVERTERS: dict[str, Callable[[Row], Sample]] = {
    "alpaca": from_alpaca,
    "sharegpt": from_sharegpt,
    "messages": from_messages,
    "text": from_text,
}
