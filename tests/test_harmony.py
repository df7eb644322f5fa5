"""Our harmony layer renders what openai-harmony renders and parses model output without crashing."""

import openai_harmony as oh

from gptoss_jax import harmony, tokenizer
from gptoss_jax.harmony import Chat, Tool

WEATHER = Tool("get_weather", "Current weather.", {"type": "object", "properties": {"city": {"type": "string"}}})


def test_rendered_prompt_matches_the_spec_example_token_for_token():
    chat = Chat(reasoning="high", date="2025-06-28")
    chat.add_user("What is 2 + 2?")
    expected = (
        "<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\nKnowledge cutoff: 2024-06\n"
        "Current date: 2025-06-28\n\nReasoning: high\n\n# Valid channels: analysis, commentary, final. Channel must be "
        "included for every message.<|end|><|start|>user<|message|>What is 2 + 2?<|end|><|start|>assistant"
    )
    tokens = chat.prompt_tokens()
    assert tokens == tokenizer.get_encoding().encode(expected, allowed_special="all")
    assert len(tokens) == 75  # SPEC section 6.1


def test_developer_tools_and_tool_results_render():
    chat = Chat(instructions="Answer briefly.", tools=[WEATHER])
    chat.add_user("Weather in Paris?")
    text = tokenizer.get_encoding().decode(chat.prompt_tokens())
    assert "# Instructions\n\nAnswer briefly." in text and "type get_weather = (_: {" in text
    assert "Calls to these tools must go to the commentary channel: 'functions'." in text
    call = "<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{\"city\":\"Paris\"}<|call|>"
    completion = chat.add_completion(tokenizer.get_encoding().encode(call, allowed_special="all"))
    assert completion.parse_error is None and completion.tool_calls == [("functions.get_weather", '{"city":"Paris"}')]
    chat.add_tool_result("get_weather", {"temperature": 21})
    assert "<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>{\"temperature\": 21}<|end|>" in (
        tokenizer.get_encoding().decode(chat.prompt_tokens())
    )


def test_earlier_reasoning_is_dropped_after_a_final_answer():
    chat = Chat()
    chat.add_user("Hi")
    reply = "<|channel|>analysis<|message|>SECRET THOUGHTS<|end|><|start|>assistant<|channel|>final<|message|>Hello!<|return|>"
    completion = chat.add_completion(tokenizer.get_encoding().encode(reply, allowed_special="all"))
    assert completion.channel("analysis") == "SECRET THOUGHTS" and completion.channel("final") == "Hello!"
    chat.add_user("Again")
    text = tokenizer.get_encoding().decode(chat.prompt_tokens())
    assert "SECRET THOUGHTS" not in text and "<|channel|>final<|message|>Hello!<|end|>" in text


def test_malformed_output_gives_raw_text_and_a_flag():
    garbage = [200006, 200006, 1428, 200002, 17360]
    completion = harmony.parse_completion(garbage)
    assert completion.messages == [] and completion.parse_error
    assert completion.text == tokenizer.get_encoding().decode(garbage)
    stream = harmony.Stream()
    pieces = [stream.push(t) for t in [200005, 35644, 200008, 13225, 200007, 200006, 200006]]
    assert pieces[3] == ("analysis", tokenizer.get_encoding().decode([13225]))
    broken = harmony.Stream()
    pieces = [broken.push(t) for t in [200005, 200005, 200005, 200008, 1, 2, 200002, 200012]]
    assert broken.broken and pieces[-1] == (None, "<|call|>")  # raw text from the point it broke


def test_stop_tokens_agree_with_openai_harmony():
    assert sorted(harmony.get_encoding().stop_tokens_for_assistant_actions()) == [tokenizer.RETURN, tokenizer.CALL]
