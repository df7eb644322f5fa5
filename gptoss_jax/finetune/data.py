"""Chat data for fine-tuning: OpenAI-style JSONL records -> harmony tokens and loss masks -> step batches.

One record per line: `{"messages": [...], "tools": [...], "reasoning_effort": "low"}` (tools and effort
optional) in the OpenAI chat form. `system` and `developer` messages become harmony developer
instructions; an assistant message's `content` goes on the final channel, each of its `tool_calls` is
a harmony function call, and its `thinking` goes on the analysis channel in the last turn (after the
last user message) and is dropped before it, as harmony drops earlier reasoning at inference; a `tool`
message is that function's result.

The order of examples is a seeded permutation per epoch whose windows of `bucket` global batches are
each sorted by length (length buckets: the rows of a batch have similar lengths, so little padding),
and step `s` takes stream positions `[s * global_batch, (s + 1) * global_batch)`: a step's rows depend
on (seed, step) and the data alone, so a resumed run sees exactly the rows an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import openai_harmony as oh

from gptoss_jax.harmony import Chat, Tool

ROLES = ("system", "developer", "user", "assistant", "tool")
PAD_MULTIPLE = 64  # padded lengths are multiples of this, so a run compiles its step a few times, not per batch


class DataError(ValueError):
    """A record that cannot be trained on, named `file:line: reason`."""


@dataclasses.dataclass(frozen=True)
class Example:
    tokens: np.ndarray  # int32 [length]
    mask: np.ndarray  # bool [length]: tokens the loss learns (the assistant's)
    source: str  # "file:line"


EMPTY = Example(np.zeros(1, np.int32), np.zeros(1, bool), "padding")  # fills a last, short batch; learns nothing


def chat_from_record(record: Any) -> Chat:
    """The harmony conversation of one record; `ValueError` saying what is wrong otherwise."""
    if not isinstance(record, dict) or not isinstance(record.get("messages"), list) or not record["messages"]:
        raise ValueError('expected an object with a non-empty "messages" list')
    effort = record.get("reasoning_effort", "medium")
    if effort not in ("low", "medium", "high"):
        raise ValueError(f"reasoning_effort must be low, medium or high, got {effort!r}")
    chat = Chat(reasoning=effort, tools=[_tool(t) for t in record.get("tools") or []])
    instructions, call_names = [], {}
    last_user = max((n for n, m in enumerate(record["messages"], 1) if isinstance(m, dict) and m.get("role") == "user"), default=0)
    for number, message in enumerate(record["messages"], 1):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            role = message.get("role") if isinstance(message, dict) else message
            raise ValueError(f"message {number}: unknown role {role!r}; expected one of {', '.join(ROLES)}")
        role = message["role"]
        if role in ("system", "developer"):
            instructions.append(_text(message, number))
        elif role == "user":
            chat.add_user(_text(message, number))
        elif role == "tool":
            name = message.get("name") or call_names.get(message.get("tool_call_id"))
            if not isinstance(name, str) or not name:
                raise ValueError(f"message {number}: a tool result needs a \"name\" or the \"tool_call_id\" of an earlier call")
            chat.add_tool_result(name, _text(message, number))
        else:
            chat.history.extend(_assistant_messages(message, number, call_names, thinking=number > last_user))
    if not any(m.author.role == oh.Role.ASSISTANT for m in chat.history):
        raise ValueError("no assistant message to learn from")
    chat.instructions = "\n\n".join(instructions) or None
    return chat


def _text(message: dict, number: int, *, optional: bool = False) -> str | None:
    content = message.get("content")
    if isinstance(content, list):  # OpenAI content parts
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            raise ValueError(f"message {number}: content parts must be {{\"type\": \"text\", \"text\": ...}}")
        content = "".join(p["text"] for p in content)
    if content is None and optional:
        return None
    if not isinstance(content, str) or not content.strip():
        raise ValueError(f"message {number} ({message['role']}): empty or missing content")
    return content


def _assistant_messages(message: dict, number: int, call_names: dict, *, thinking: bool) -> list[oh.Message]:
    """Thinking (analysis, if `thinking`), then tool calls (commentary, to functions.NAME), then the answer (final)."""
    out = []
    reasoning = message.get("thinking")
    if reasoning is not None and (not isinstance(reasoning, str) or not reasoning.strip()):
        raise ValueError(f"message {number} (assistant): \"thinking\" must be non-empty text")
    if reasoning is not None and thinking:
        out.append(oh.Message.from_role_and_content(oh.Role.ASSISTANT, reasoning).with_channel("analysis"))
    for call in message.get("tool_calls") or []:
        function = call.get("function") if isinstance(call, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str) or not name:
            raise ValueError(f"message {number} (assistant): a tool call without a function name")
        arguments = function.get("arguments", "{}")
        arguments = arguments if isinstance(arguments, str) else json.dumps(arguments)
        call_names[call.get("id")] = name
        out.append(
            oh.Message.from_role_and_content(oh.Role.ASSISTANT, arguments)
            .with_channel("commentary").with_recipient(f"functions.{name}").with_content_type("<|constrain|>json")
        )
    answer = _text(message, number, optional=bool(out))
    if answer is not None:
        out.append(oh.Message.from_role_and_content(oh.Role.ASSISTANT, answer).with_channel("final"))
    return out


def _tool(spec: Any) -> Tool:
    function = spec.get("function") if isinstance(spec, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
        raise ValueError('each of "tools" must be {"type": "function", "function": {"name": ..., ...}}')
    return Tool(function["name"], function.get("description", ""), function.get("parameters"))


def read_jsonl(path: str | Path, *, max_length: int, strict: bool = False) -> tuple[list[Example], int]:
    """Every record of a JSONL file as an `Example`, and how many were skipped for being longer than
    `max_length` tokens (an error with `strict`). Raises `DataError` (`file:line: reason`) on the first
    malformed record, and when no record is usable."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: cannot read: {error}") from None
    examples, skipped = [], 0
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            tokens, mask = chat_from_record(json.loads(line)).training_tokens()
        except ValueError as error:  # json.JSONDecodeError is one
            raise DataError(f"{where}: {error}") from None
        if len(tokens) > max_length:
            if strict:
                raise DataError(f"{where}: {len(tokens)} tokens, over --max-length {max_length}")
            skipped += 1
            continue
        examples.append(Example(np.asarray(tokens, np.int32), np.asarray(mask, bool), where))
    if not examples:
        raise DataError(f"{path}: no usable records ({skipped} over --max-length {max_length})")
    return examples, skipped


def step_indices(step: int, lengths: Sequence[int], global_batch: int, seed: int, bucket: int = 8) -> list[int]:
    """Which examples (of `len(lengths)`, with these token counts) step `step` trains on: its slice of the
    seeded per-epoch stream, sorted by length within windows of `bucket` global batches (1: no sorting)."""
    count = len(lengths)
    positions = range(step * global_batch, (step + 1) * global_batch)
    orders = {epoch: _epoch_order(epoch, np.asarray(lengths), seed, bucket * global_batch) for epoch in {p // count for p in positions}}
    return [int(orders[p // count][p % count]) for p in positions]


def _epoch_order(epoch: int, lengths: np.ndarray, seed: int, window: int) -> np.ndarray:
    """A seeded permutation, each window of it sorted longest first (a first batch that does not fit shows at once)."""
    order = np.random.default_rng([seed, epoch]).permutation(len(lengths))
    windows = [order[start : start + window] for start in range(0, len(order), window)]
    return np.concatenate([w[np.argsort(-lengths[w], kind="stable")] for w in windows])


def padded_length(examples: Sequence[Example], max_length: int) -> int:
    longest = max(len(e.tokens) for e in examples)
    return min(-(-longest // PAD_MULTIPLE) * PAD_MULTIPLE, max_length)


def pad(examples: Sequence[Example], length: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded `[rows, length]` tokens (pad 0) and masks (pad false)."""
    tokens, mask = np.zeros((len(examples), length), np.int32), np.zeros((len(examples), length), bool)
    for row, example in enumerate(examples):
        tokens[row, : len(example.tokens)], mask[row, : len(example.mask)] = example.tokens, example.mask
    return tokens, mask


def token_count(examples: Sequence[Example]) -> int:
    return sum(len(e.tokens) for e in examples)

