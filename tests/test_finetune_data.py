"""Chat records -> harmony training tokens and masks, checked against openai-harmony; bad records; data order.

No model here: these run in seconds.
"""

import json

import numpy as np
import openai_harmony as oh
import pytest

from gptoss_jax.finetune import data
from gptoss_jax.harmony import get_encoding

WEATHER = {"type": "function", "function": {"name": "weather", "description": "Weather now",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
CHATS = {
    "multi_turn": {"messages": [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "thinking": "earlier reasoning, dropped", "content": "4"},
        {"role": "user", "content": "and 3+3?"},
        {"role": "assistant", "content": [{"type": "text", "text": "6"}]},
    ]},
    "tool_call": {"tools": [WEATHER], "reasoning_effort": "low", "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "thinking": "I should call the tool.",
         "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        {"role": "assistant", "content": "Sunny."},
    ]},
    "thinking": {"messages": [
        {"role": "developer", "content": "Think first."},
        {"role": "user", "content": "Why is the sky blue?"},
        {"role": "assistant", "thinking": "Rayleigh scattering.", "content": "Short wavelengths scatter more."},
    ]},
}


def system(effort: str = "Medium", tools: bool = False) -> oh.Message:
    content = oh.SystemContent.new().with_reasoning_effort(oh.ReasoningEffort(effort)).with_knowledge_cutoff("2024-06")
    return oh.Message.from_role_and_content(oh.Role.SYSTEM, content)


def assistant(text: str, channel: str) -> oh.Message:
    return oh.Message.from_role_and_content(oh.Role.ASSISTANT, text).with_channel(channel)


def expected_messages(name: str) -> list[oh.Message]:
    """The harmony messages each chat means, written out by hand from the harmony docs."""
    user = lambda text: oh.Message.from_role_and_content(oh.Role.USER, text)  # noqa: E731
    developer = lambda text: oh.Message.from_role_and_content(oh.Role.DEVELOPER, oh.DeveloperContent.new().with_instructions(text))  # noqa: E731
    if name == "multi_turn":
        return [system(), developer("Answer briefly."), user("2+2?"), assistant("4", "final"), user("and 3+3?"), assistant("6", "final")]
    if name == "tool_call":
        tool = oh.ToolDescription.new("weather", "Weather now", parameters=WEATHER["function"]["parameters"])
        tools = oh.Message.from_role_and_content(oh.Role.DEVELOPER, oh.DeveloperContent.new().with_function_tools([tool]))
        call = (oh.Message.from_role_and_content(oh.Role.ASSISTANT, '{"city": "Paris"}').with_channel("commentary")
                .with_recipient("functions.weather").with_content_type("<|constrain|>json"))
        result = (oh.Message.from_author_and_content(oh.Author.new(oh.Role.TOOL, "functions.weather"), "sunny")
                  .with_channel("commentary").with_recipient("assistant"))
        return [system("Low"), tools, user("Weather in Paris?"), assistant("I should call the tool.", "analysis"), call, result,
                assistant("Sunny.", "final")]
    return [system(), developer("Think first."), user("Why is the sky blue?"), assistant("Rayleigh scattering.", "analysis"),
            assistant("Short wavelengths scatter more.", "final")]


@pytest.mark.parametrize("name", CHATS)
def test_tokens_are_harmonys_training_render(name):
    tokens, mask = data.chat_from_record(CHATS[name]).training_tokens()
    keep_reasoning = oh.RenderConversationConfig(auto_drop_analysis=False)
    conversation = oh.Conversation.from_messages(expected_messages(name))
    assert tokens == get_encoding().render_conversation_for_training(conversation, keep_reasoning)
    assert len(mask) == len(tokens)


@pytest.mark.parametrize("name", CHATS)
def test_mask_is_exactly_what_the_assistant_writes(name):
    """Masked runs = each assistant message as harmony renders it, minus the `<|start|>assistant` the
    prompt supplies; the last one ends in `<|return|>`, the stop token the tuned model must learn."""
    encoding = get_encoding()
    tokens, mask = data.chat_from_record(CHATS[name]).training_tokens()
    runs, run = [], []
    for token, learned in zip(tokens, mask):
        if learned:
            run.append(token)
        elif run:
            runs.append(run)
            run = []
    runs += [run] if run else []
    written = [m for m in expected_messages(name) if m.author.role == oh.Role.ASSISTANT]
    prefix = encoding.encode("<|start|>assistant", allowed_special="all")
    expected = [encoding.render(m)[len(prefix):] for m in written]
    expected[-1][-1] = encoding.encode("<|return|>", allowed_special="all")[0]
    # consecutive assistant messages give one run: compare the concatenations and the run ends
    assert sum(runs, []) == sum(expected, [])
    closers = {encoding.encode(t, allowed_special="all")[0] for t in ("<|end|>", "<|call|>", "<|return|>")}
    assert all(r[-1] in closers for r in runs)
    assert encoding.decode(sum(runs, [])).count("<|channel|>") == len(written)


BAD = [
    ("{not json", "Expecting property name"),
    ('{"messages": []}', 'non-empty "messages"'),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant message"),
    ('{"messages": [{"role": "robot", "content": "hi"}]}', "unknown role 'robot'"),
    ('{"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "x"}]}', "empty or missing content"),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [{"function": {"arguments": "{}"}}]}]}',
     "tool call without a function name"),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, {"role": "tool", "content": "r"}]}',
     "tool result needs"),
    ('[1, 2]', 'non-empty "messages"'),
]


@pytest.mark.parametrize("line, reason", BAD, ids=[reason for _, reason in BAD])
def test_a_bad_record_is_named_by_file_and_line(tmp_path, line, reason):
    good = json.dumps(CHATS["thinking"])
    path = tmp_path / "train.jsonl"
    path.write_text(f"{good}\n\n{good}\n{line}\n{good}\n")
    with pytest.raises(data.DataError, match=f"train.jsonl:4: .*{reason}"):
        data.read_jsonl(path, max_length=4096)


def test_long_records_are_skipped_and_counted_or_refused(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(CHATS[name]) for name in CHATS) + "\n")
    lengths = [len(data.chat_from_record(CHATS[name]).training_tokens()[0]) for name in CHATS]
    limit = sorted(lengths)[1]
    examples, skipped = data.read_jsonl(path, max_length=limit)
    assert len(examples) == 2 and skipped == 1
    with pytest.raises(data.DataError, match=f"train.jsonl:{lengths.index(max(lengths)) + 1}: {max(lengths)} tokens"):
        data.read_jsonl(path, max_length=limit, strict=True)
    with pytest.raises(data.DataError, match="no usable records"):
        data.read_jsonl(path, max_length=min(lengths) - 1)


LENGTHS = np.random.default_rng(0).integers(5, 500, 40)


def test_each_epoch_is_a_seeded_permutation_sorted_in_windows():
    count, batch = len(LENGTHS), 4
    stream = [i for step in range(20) for i in data.step_indices(step, LENGTHS, batch, seed=3, bucket=3)]
    epochs = [stream[:count], stream[count:]]
    assert all(sorted(epoch) == list(range(count)) for epoch in epochs) and epochs[0] != epochs[1]
    for epoch in epochs:  # windows of 3 global batches, each sorted longest first
        for start in range(0, count, 3 * batch):
            assert (np.diff(LENGTHS[epoch[start : start + 3 * batch]]) <= 0).all()
    assert data.step_indices(13, LENGTHS, batch, seed=3, bucket=3) == stream[52:56]  # (seed, step) decide a step's rows
    assert data.step_indices(0, LENGTHS, batch, seed=4, bucket=3) != stream[:4]
    plain = [i for step in range(10) for i in data.step_indices(step, LENGTHS, batch, seed=3, bucket=1)]
    assert [sorted(plain[s : s + batch]) for s in range(0, count, batch)] != [sorted(epochs[0][s : s + batch]) for s in range(0, count, batch)]


def test_length_buckets_cut_the_padding():
    """Padding of a batch = its rows x its longest row - its tokens, summed over an epoch of batches of 4."""
    def padding(bucket: int) -> int:
        batches = [LENGTHS[data.step_indices(step, LENGTHS, 4, seed=0, bucket=bucket)] for step in range(10)]
        return sum(int(rows.max()) * len(rows) - int(rows.sum()) for rows in batches)

    assert padding(8) < 0.5 * padding(1), (padding(8), padding(1))


def test_padding():
    rows = [data.Example(np.arange(1, 4, dtype=np.int32), np.array([0, 1, 1], bool), "a"),
            data.Example(np.arange(1, 71, dtype=np.int32), np.ones(70, bool), "b")]
    assert data.padded_length(rows, 4096) == 128 and data.padded_length(rows, 100) == 100
    tokens, mask = data.pad(rows, 128)
    assert tokens.shape == mask.shape == (2, 128)
    assert tokens[0, :4].tolist() == [1, 2, 3, 0] and mask[0, :4].tolist() == [False, True, True, False]
    assert mask.sum() == 72
