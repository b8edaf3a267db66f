"""Request validation (``router.validation``) against a hand-built ``ModelInfo``.

The router can only range-check token ids when it knows the vocabulary, which a fake upstream
never provides, so out-of-vocabulary ids are covered here rather than end to end.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from router.errors import InvalidRequest
from router.model_info import ModelInfo
from router.validation import parse_json, validate_chat, validate_completion, validate_generate

MESSAGES = [{"role": "user", "content": "hi"}]
CHAT = {"model": "m", "messages": MESSAGES}
COMPLETION = {"model": "m", "prompt": "hi"}


class FakeCounter:
    """Stands in for ``PromptCounter``: a fixed token count, and a record of every call."""

    def __init__(self, num_tokens: int = 5) -> None:
        self.num_tokens = num_tokens
        self.calls: list[str] = []

    def count_text(self, text: str) -> int:
        self.calls.append("text")
        return self.num_tokens

    def count_chat(self, messages: list[dict[str, Any]]) -> int:
        self.calls.append("chat")
        return self.num_tokens


def make_info(counter: FakeCounter | None = None, context_length: int | None = 64,
              vocab_size: int | None = 100) -> ModelInfo:
    return ModelInfo(served_names=frozenset({"m"}), context_length=context_length,
                     vocab_size=vocab_size, counter=counter)  # type: ignore[arg-type]


def raw(body: object) -> bytes:
    return json.dumps(body).encode()


def rejects(validator: Any, body: object, info: ModelInfo | None = None) -> InvalidRequest:
    data = body if isinstance(body, bytes) else raw(body)
    with pytest.raises(InvalidRequest) as caught:
        validator(data, info or make_info())
    error = caught.value.body()["error"]
    assert isinstance(error, dict)
    assert caught.value.status == 400
    assert error["type"] == "invalid_request_error" and error["message"]
    return caught.value


# -- parse_json ---------------------------------------------------------------------------------
def test_parse_json_returns_the_object() -> None:
    assert parse_json(b'{"a": [1, 2]}') == {"a": [1, 2]}


def test_parse_json_rejects_an_empty_body() -> None:
    with pytest.raises(InvalidRequest, match="empty"):
        parse_json(b"")


def test_parse_json_rejects_malformed_json_with_code_invalid_json() -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_json(b'{"model": ')
    assert caught.value.code == "invalid_json"


@pytest.mark.parametrize(("data", "kind"), [(b"[1, 2]", "list"), (b'"text"', "str"),
                                            (b"3", "int"), (b"null", "NoneType")])
def test_parse_json_rejects_a_non_object_naming_its_type(data: bytes, kind: str) -> None:
    with pytest.raises(InvalidRequest, match=f"got {kind}"):
        parse_json(data)


def test_error_body_is_openai_style() -> None:
    error = rejects(validate_chat, {"messages": MESSAGES})
    assert error.body() == {"error": {"message": "missing required field 'model'",
                                      "type": "invalid_request_error", "param": "model",
                                      "code": "missing_field"}}


# -- chat ---------------------------------------------------------------------------------------
def test_valid_chat_is_parsed() -> None:
    body = {**CHAT, "stream": True, "max_tokens": 8, "x_unknown": {"kept": 1}}
    parsed = validate_chat(raw(body), make_info(FakeCounter(5)))
    assert parsed.route == "chat"
    assert parsed.body == body and parsed.raw == raw(body)
    assert parsed.stream is True and parsed.max_tokens == 8
    assert parsed.prompt_text == "user: hi"
    assert parsed.prompt_tokens == 5


@pytest.mark.parametrize(("body", "param", "code"), [
    ({"messages": MESSAGES}, "model", "missing_field"),
    ({"model": 3, "messages": MESSAGES}, "model", "invalid_type"),
    ({"model": "other", "messages": MESSAGES}, "model", "model_not_found"),
    ({"model": "m"}, "messages", "missing_field"),
    ({"model": "m", "messages": "hi"}, "messages", "invalid_type"),
    ({"model": "m", "messages": []}, "messages", "empty_messages"),
    ({"model": "m", "messages": ["hi"]}, "messages[0]", "invalid_type"),
    ({"model": "m", "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role",
     "invalid_value"),
    ({"model": "m", "messages": [{"role": "user"}]}, "messages[0].content", "invalid_type"),
    ({"model": "m", "messages": [{"role": "user", "content": 5}]}, "messages[0].content",
     "invalid_type"),
    ({**CHAT, "max_tokens": "5"}, "max_tokens", "invalid_type"),
    ({**CHAT, "max_tokens": 5.0}, "max_tokens", "invalid_type"),
    ({**CHAT, "max_tokens": True}, "max_tokens", "invalid_type"),
    ({**CHAT, "max_tokens": 0}, "max_tokens", "invalid_value"),
    ({**CHAT, "max_completion_tokens": "5"}, "max_completion_tokens", "invalid_type"),
    ({**CHAT, "stream": "yes"}, "stream", "invalid_type"),
    ({**CHAT, "stream": 1}, "stream", "invalid_type"),
    ({**CHAT, "temperature": 2.5}, "temperature", "invalid_value"),
    ({**CHAT, "temperature": 3}, "temperature", "invalid_value"),
    ({**CHAT, "temperature": "hot"}, "temperature", "invalid_type"),
    ({**CHAT, "top_p": 1.5}, "top_p", "invalid_value"),
    ({**CHAT, "top_p": "x"}, "top_p", "invalid_type"),
    ({**CHAT, "n": 0}, "n", "invalid_value"),
    ({**CHAT, "seed": 1.5}, "seed", "invalid_type"),
    ({**CHAT, "presence_penalty": -3}, "presence_penalty", "invalid_value"),
    ({**CHAT, "frequency_penalty": 3}, "frequency_penalty", "invalid_value"),
    ({**CHAT, "stop": 5}, "stop", "invalid_type"),
    ({**CHAT, "stop": ["a", 1]}, "stop", "invalid_type"),
    ({**CHAT, "stop": [1]}, "stop", "invalid_type"),
])
def test_bad_chat_field_is_rejected_naming_the_param(body: dict[str, Any], param: str,
                                                     code: str) -> None:
    error = rejects(validate_chat, body)
    assert (error.param, error.code) == (param, code)


def test_unknown_model_message_lists_the_served_models() -> None:
    error = rejects(validate_chat, {**CHAT, "model": "gpt-9"})
    assert "'gpt-9'" in error.message and "serves: m" in error.message


def test_null_optional_fields_are_accepted() -> None:
    parsed = validate_chat(raw({**CHAT, "max_tokens": None, "stream": None, "stop": None}),
                           make_info())
    assert parsed.max_tokens is None and parsed.stream is False


def test_assistant_message_may_have_null_content() -> None:
    messages = [*MESSAGES, {"role": "assistant", "content": None, "tool_calls": []}]
    assert validate_chat(raw({**CHAT, "messages": messages}), make_info()).route == "chat"


def test_content_parts_are_joined_into_the_prompt_text() -> None:
    parts = [{"type": "text", "text": "a"}, {"type": "image_url"}, {"type": "text", "text": "b"}]
    parsed = validate_chat(raw({**CHAT, "messages": [{"role": "user", "content": parts}]}),
                           make_info())
    assert parsed.prompt_text == "user: ab"


def test_max_completion_tokens_is_used_when_max_tokens_is_missing() -> None:
    parsed = validate_chat(raw({**CHAT, "max_completion_tokens": 7}), make_info())
    assert parsed.max_tokens == 7


@pytest.mark.parametrize("role", [["user"], {"name": "user"}])
def test_unhashable_role_is_rejected_as_invalid_value(role: object) -> None:
    error = rejects(validate_chat, {"model": "m", "messages": [{"role": role, "content": "x"}]})
    assert error.param == "messages[0].role"


def test_chat_over_the_context_window_is_rejected() -> None:
    counter = FakeCounter(num_tokens=60)
    error = rejects(validate_chat, {**CHAT, "max_tokens": 10}, make_info(counter))
    assert (error.param, error.code) == ("messages", "context_length_exceeded")
    assert "64" in error.message and counter.calls == ["chat"]


def test_chat_prompt_filling_the_whole_window_is_rejected() -> None:
    error = rejects(validate_chat, CHAT, make_info(FakeCounter(num_tokens=64)))
    assert error.code == "context_length_exceeded"


def test_chat_that_fits_gets_the_exact_token_count() -> None:
    counter = FakeCounter(10)
    parsed = validate_chat(raw({**CHAT, "max_tokens": 54}), make_info(counter))
    assert parsed.prompt_tokens == 10 and parsed.max_tokens == 54
    assert counter.calls == ["chat"]


def test_short_chat_is_not_tokenized_when_the_bound_fits() -> None:
    counter = FakeCounter()
    parsed = validate_chat(raw(CHAT), make_info(counter, context_length=100_000))
    assert counter.calls == []
    assert parsed.prompt_tokens == len(b"user: hi") // 4 + 1


def test_no_length_check_without_a_known_context_length() -> None:
    counter = FakeCounter(num_tokens=10_000)
    validate_chat(raw({**CHAT, "max_tokens": 10_000}), make_info(counter, context_length=None))
    assert counter.calls == []


# -- completions --------------------------------------------------------------------------------
@pytest.mark.parametrize("prompt", ["hi", ["a", "b"], [1, 2, 99], [[1], [2, 3]]])
def test_valid_prompt_shapes_are_accepted(prompt: object) -> None:
    parsed = validate_completion(raw({"model": "m", "prompt": prompt}), make_info())
    assert parsed.route == "completion" and parsed.stream is False


def test_token_id_prompt_is_counted_exactly() -> None:
    parsed = validate_completion(raw({"model": "m", "prompt": [[1, 2], [3]]}), make_info())
    assert parsed.prompt_tokens == 3 and parsed.prompt_text == "1,2\n3"


@pytest.mark.parametrize(("prompt", "code"), [
    ("", "empty_prompt"), ([], "empty_prompt"), (["a", ""], "empty_prompt"),
    ([[]], "empty_prompt"), (5, "invalid_type"), ({"text": "a"}, "invalid_type"),
    ([1, "a"], "invalid_type"), ([[1, "a"]], "invalid_type"), ([[1.5]], "invalid_type"),
    ([1, 2.5], "invalid_type"), ([{"a": 1}], "invalid_type"),
])
def test_bad_prompt_is_rejected(prompt: object, code: str) -> None:
    error = rejects(validate_completion, {"model": "m", "prompt": prompt})
    assert (error.param, error.code) == ("prompt", code)


def test_missing_prompt_is_rejected() -> None:
    error = rejects(validate_completion, {"model": "m"})
    assert (error.param, error.code) == ("prompt", "missing_field")


def test_completion_checks_model_and_sampling_fields() -> None:
    assert rejects(validate_completion, {"prompt": "x"}).code == "missing_field"
    assert rejects(validate_completion, {**COMPLETION, "model": "z"}).code == "model_not_found"
    assert rejects(validate_completion, {**COMPLETION, "max_tokens": "5"}).param == "max_tokens"
    assert rejects(validate_completion, {**COMPLETION, "stream": "yes"}).param == "stream"


@pytest.mark.parametrize("prompt", [[100], [0, 5, 100], [[1], [100]], [-1], [[2, -5]]])
def test_out_of_vocabulary_token_ids_are_rejected(prompt: list[Any]) -> None:
    error = rejects(validate_completion, {"model": "m", "prompt": prompt})
    assert (error.param, error.code) == ("prompt", "invalid_token_id")


def test_highest_vocabulary_id_is_accepted() -> None:
    parsed = validate_completion(raw({"model": "m", "prompt": [0, 99]}), make_info())
    assert parsed.route == "completion"


def test_large_ids_pass_without_a_known_vocabulary_but_negatives_do_not() -> None:
    info = make_info(vocab_size=None)
    assert validate_completion(raw({"model": "m", "prompt": [10**6]}), info).prompt_tokens == 1
    assert rejects(validate_completion, {"model": "m", "prompt": [-1]}, info).code == \
        "invalid_token_id"


def test_token_id_prompt_over_the_context_window_is_rejected() -> None:
    error = rejects(validate_completion, {"model": "m", "prompt": list(range(60)),
                                          "max_tokens": 10})
    assert error.code == "context_length_exceeded"
    info = make_info(context_length=10)
    error = rejects(validate_completion, {"model": "m", "prompt": list(range(10))}, info)
    assert error.code == "context_length_exceeded"  # the prompt alone fills the window
    error = rejects(validate_completion, {"model": "m", "prompt": [1, 2], "max_tokens": 9}, info)
    assert error.code == "context_length_exceeded"
    body = {"model": "m", "prompt": [1, 2], "max_tokens": 8}  # exactly fills the window
    assert validate_completion(raw(body), info).max_tokens == 8


def test_long_text_prompt_is_counted_and_rejected() -> None:
    counter = FakeCounter(num_tokens=70)
    error = rejects(validate_completion, {"model": "m", "prompt": "x" * 10}, make_info(counter))
    assert error.code == "context_length_exceeded" and counter.calls == ["text"]


# -- generate -----------------------------------------------------------------------------------
def test_valid_generate_with_text() -> None:
    parsed = validate_generate(raw({"text": "hi", "stream": True,
                                    "sampling_params": {"max_new_tokens": 4}}), make_info())
    assert (parsed.route, parsed.stream, parsed.max_tokens) == ("generate", True, 4)


def test_valid_generate_with_input_ids() -> None:
    parsed = validate_generate(raw({"input_ids": [1, 2, 3]}), make_info())
    assert parsed.prompt_tokens == 3 and parsed.max_tokens is None


def test_generate_allows_zero_new_tokens() -> None:
    body = {"text": "hi", "sampling_params": {"max_new_tokens": 0}}
    assert validate_generate(raw(body), make_info()).max_tokens == 0


@pytest.mark.parametrize(("body", "param", "code"), [
    ({}, "text", "missing_field"),
    ({"sampling_params": {}}, "text", "missing_field"),
    ({"text": "a", "input_ids": [1]}, "input_ids", "invalid_value"),
    ({"text": ""}, "text", "empty_prompt"),
    ({"text": 5}, "text", "invalid_type"),
    ({"text": []}, "text", "invalid_type"),
    ({"text": ["a", 1]}, "text", "invalid_type"),
    ({"input_ids": []}, "input_ids", "empty_prompt"),
    ({"input_ids": "1 2"}, "input_ids", "invalid_type"),
    ({"input_ids": [1, 100]}, "input_ids", "invalid_token_id"),
    ({"input_ids": [[1], [100]]}, "input_ids", "invalid_token_id"),
    ({"text": "a", "stream": "yes"}, "stream", "invalid_type"),
    ({"text": "a", "stream": 1}, "stream", "invalid_type"),
    ({"text": "a", "sampling_params": []}, "sampling_params", "invalid_type"),
    ({"text": "a", "sampling_params": {"max_new_tokens": "5"}}, "max_new_tokens",
     "invalid_type"),
    ({"text": "a", "sampling_params": {"max_new_tokens": -1}}, "max_new_tokens",
     "invalid_value"),
    ({"text": "a", "sampling_params": {"top_p": 2}}, "top_p", "invalid_value"),
    ({"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 63}}, "input_ids",
     "context_length_exceeded"),
])
def test_bad_generate_is_rejected(body: dict[str, Any], param: str, code: str) -> None:
    error = rejects(validate_generate, body)
    assert (error.param, error.code) == (param, code)


@pytest.mark.parametrize("validator", [validate_chat, validate_completion, validate_generate])
@pytest.mark.parametrize("data", [b"", b"{oops", b"[]"])
def test_every_route_rejects_bodies_that_are_not_json_objects(validator: Any,
                                                              data: bytes) -> None:
    error = rejects(validator, data)
    assert error.param is None
    assert (error.code == "invalid_json") == (data == b"{oops")


def test_raw_body_is_kept_byte_for_byte() -> None:
    body = b'{"model":"m",  "messages":[{"role":"user","content":"hi"}], "extra_field": 1}'
    assert validate_chat(body, make_info()).raw == body
