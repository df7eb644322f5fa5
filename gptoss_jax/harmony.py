"""The harmony chat format through openai-harmony: build a conversation, render it, parse completions.

A thin typed layer: the format itself (rendering, parsing, dropping earlier reasoning once a turn
has a final answer) is entirely openai-harmony's. The vocabulary comes from `tokenizer.vocab_folder`,
so it works offline.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal

import openai_harmony as oh

from gptoss_jax.tokenizer import vocab_folder

if TYPE_CHECKING:
    from gptoss_jax.sampling import Generation, Sampler

ReasoningEffort = Literal["low", "medium", "high"]


@functools.cache
def get_encoding() -> oh.HarmonyEncoding:
    """openai-harmony's gpt-oss encoding, reading the verified vocabulary."""
    os.environ.setdefault("TIKTOKEN_ENCODINGS_BASE", str(vocab_folder()))
    return oh.load_harmony_encoding(oh.HarmonyEncodingName.HARMONY_GPT_OSS)


@dataclasses.dataclass(frozen=True)
class Tool:
    """A developer function the model may call: name, description and a JSON schema of its arguments."""

    name: str
    description: str
    parameters: dict[str, Any] | None = None


@dataclasses.dataclass(frozen=True)
class Completion:
    """A parsed assistant completion; on malformed output `messages` is empty and `parse_error` says why."""

    messages: list[oh.Message]
    text: str  # the raw decoded completion, special tokens included
    parse_error: str | None = None

    def channel(self, name: str) -> str:
        """All text the completion put on `name` ("analysis", "commentary" or "final")."""
        return "".join(c.text for m in self.messages if m.channel == name for c in m.content if hasattr(c, "text"))

    @property
    def tool_calls(self) -> list[tuple[str, str]]:
        """(recipient, arguments) of each tool call."""
        return [(m.recipient, "".join(c.text for c in m.content)) for m in self.messages if m.recipient]


def parse_completion(tokens: Sequence[int]) -> Completion:
    """Parses the tokens an assistant produced (stop token included or not); never raises on bad output."""
    encoding = get_encoding()
    text = encoding.decode(list(tokens))
    try:
        return Completion(encoding.parse_messages_from_completion_tokens(list(tokens), oh.Role.ASSISTANT), text)
    except oh.HarmonyError as error:
        return Completion([], text, str(error))


@dataclasses.dataclass
class Chat:
    """A harmony conversation: system and developer settings, then user, assistant and tool turns."""

    reasoning: ReasoningEffort = "medium"
    identity: str | None = None  # the system message's model identity line (harmony's default if None)
    date: str | None = None  # "YYYY-MM-DD", the conversation start date shown to the model
    knowledge_cutoff: str = "2024-06"
    instructions: str | None = None  # developer message
    tools: Sequence[Tool] = ()
    history: list[oh.Message] = dataclasses.field(default_factory=list)

    def add_user(self, text: str) -> None:
        self.history.append(oh.Message.from_role_and_content(oh.Role.USER, text))

    def add_tool_result(self, tool: str, output: str | dict) -> None:
        """The result of a call to developer function `tool`, returned to the model on commentary."""
        content = output if isinstance(output, str) else json.dumps(output)
        author = oh.Author.new(oh.Role.TOOL, f"functions.{tool}")
        message = oh.Message.from_author_and_content(author, content).with_channel("commentary")
        self.history.append(message.with_recipient("assistant"))

    def add_completion(self, tokens: Sequence[int]) -> Completion:
        """Parses the model's reply and keeps its messages for the next turn."""
        completion = parse_completion(tokens)
        self.history.extend(completion.messages)
        return completion

    def prompt_tokens(self) -> list[int]:
        """The conversation rendered for the assistant's next turn (earlier reasoning dropped by harmony's rule)."""
        return get_encoding().render_conversation_for_completion(self._conversation(), oh.Role.ASSISTANT)

    def training_tokens(self) -> tuple[list[int], list[bool]]:
        """The whole conversation as harmony renders it for training, and which tokens to learn.

        The tokens are `render_conversation_for_training`'s with every message kept (drop earlier turns'
        reasoning before, as `finetune.data` does: the model never sees it at inference; the last
        answer ends in `<|return|>`). The mask is true on what the model writes after a prompt ends in
        `<|start|>assistant`: each assistant message's header rest (recipient, channel), content and
        closing `<|end|>`/`<|call|>`/`<|return|>`, so a tuned model learns to stop.
        """
        encoding = get_encoding()
        keep_all = oh.RenderConversationConfig(auto_drop_analysis=False)
        tokens = encoding.render_conversation_for_training(self._conversation(), keep_all)
        start, assistant = (encoding.encode(text, allowed_special="all") for text in ("<|start|>", "assistant"))
        closers = {encoding.encode(t, allowed_special="all")[0] for t in ("<|end|>", "<|call|>", "<|return|>")}
        mask, learning = [], False
        for i, token in enumerate(tokens):
            if tokens[i - len(start) - len(assistant) + 1 : i + 1] == start + assistant:
                learning = True
                mask.append(False)
                continue
            mask.append(learning)
            learning = learning and token not in closers
        return tokens, mask

    def _conversation(self) -> oh.Conversation:
        return oh.Conversation.from_messages([*self._preamble(), *self.history])

    def _preamble(self) -> list[oh.Message]:
        system = (
            oh.SystemContent.new()
            .with_reasoning_effort(oh.ReasoningEffort(self.reasoning.capitalize()))
            .with_knowledge_cutoff(self.knowledge_cutoff)
        )
        if self.identity:
            system = system.with_model_identity(self.identity)
        if self.date:
            system = system.with_conversation_start_date(self.date)
        messages = [oh.Message.from_role_and_content(oh.Role.SYSTEM, system)]
        if self.instructions or self.tools:
            developer = oh.DeveloperContent.new()
            if self.instructions:
                developer = developer.with_instructions(self.instructions)
            if self.tools:
                developer = developer.with_function_tools(
                    [oh.ToolDescription.new(t.name, t.description, parameters=t.parameters) for t in self.tools]
                )
            messages.append(oh.Message.from_role_and_content(oh.Role.DEVELOPER, developer))
        return messages


class Stream:
    """Follows a completion token by token: which channel each piece of text belongs to."""

    def __init__(self) -> None:
        self._parser = oh.StreamableParser(get_encoding(), oh.Role.ASSISTANT)
        self.broken = False  # set once the output stops being valid harmony; text is then raw

    def push(self, token: int) -> tuple[str | None, str]:
        """(channel, new text) for one token; (None, raw text) once the output is malformed."""
        if not self.broken:
            try:
                self._parser.process(token)
                return self._parser.current_channel, self._parser.last_content_delta or ""
            except oh.HarmonyError:
                self.broken = True
        return None, get_encoding().decode([token])


def reply(
    chat: Chat, sampler: Sampler, *, on_text: Callable[[str | None, str], None] | None = None, **generate_args: Any
) -> tuple[Completion, Generation]:
    """Generates the assistant's next turn, streaming `(channel, text)` pieces, and adds it to the chat."""
    stream = Stream()
    on_token = (lambda _row, token: on_text(*stream.push(token))) if on_text is not None else None
    generation = sampler.generate([chat.prompt_tokens()], on_token=on_token, **generate_args)
    return chat.add_completion(generation.tokens[0]), generation
