"""router.validation: each bad input raises InvalidRequest naming the field; good input parses."""

from __future__ import annotations

import json
from typing import Any

import pytest

from router.errors import InvalidRequest
from router.model_info import ModelInfo
from router.validation import validate_chat, validate_completion, validate_generate


class FakeCounter:
    """Counts one token per character; records whether it was asked."""

    def __init__(self) -> None:
        self.calls = 0

    def count_text(self, text: str) -> int:
        self.calls += 1
        return len(text)

    def count_chat(self, messages: list[dict[str, Any]]) -> int:
        self.calls += 1
        return sum(len(m.get("content") or "") for m in messages) + 10


def info(counter: FakeCounter | None = None, context: int = 1000) -> ModelInfo:
    return ModelInfo(frozenset({"m"}), context, 100, counter)


def raw(body: Any) -> bytes:
    return json.dumps(body).encode()


USER = [{"role": "user", "content": "hello"}]


def code_of(fn: Any, body: bytes, model: ModelInfo | None = None) -> tuple[str | None, str | None]:
    with pytest.raises(InvalidRequest) as excinfo:
        fn(body, model or info())
    error = excinfo.value.body()["error"]
    assert isinstance(error, dict)
    assert error["type"] == "invalid_request_error" and error["message"]
    return error["code"], error["param"]


def test_valid_chat_parses_stream_and_max_tokens() -> None:
    parsed = validate_chat(raw({"model": "m", "messages": USER, "stream": True,
                                "max_tokens": 7}), info())
    assert (parsed.route, parsed.stream, parsed.max_tokens) == ("chat", True, 7)


@pytest.mark.parametrize(("body", "code", "param"), [
    (b"{", "invalid_json", None),
    (b"", None, None),
    (b"[1, 2]", None, None),
    (raw({"messages": USER}), "missing_field", "model"),
    (raw({"model": 3, "messages": USER}), "invalid_type", "model"),
    (raw({"model": "other", "messages": USER}), "model_not_found", "model"),
    (raw({"model": "m"}), "missing_field", "messages"),
    (raw({"model": "m", "messages": []}), "empty_messages", "messages"),
    (raw({"model": "m", "messages": "hi"}), "invalid_type", "messages"),
    (raw({"model": "m", "messages": ["hi"]}), "invalid_type", "messages[0]"),
    (raw({"model": "m", "messages": [{"role": "robot", "content": "x"}]}), "invalid_value",
     "messages[0].role"),
    (raw({"model": "m", "messages": [{"role": "user", "content": 5}]}), "invalid_type",
     "messages[0].content"),
    (raw({"model": "m", "messages": USER, "max_tokens": "5"}), "invalid_type", "max_tokens"),
    (raw({"model": "m", "messages": USER, "max_tokens": 0}), "invalid_value", "max_tokens"),
    (raw({"model": "m", "messages": USER, "max_tokens": True}), "invalid_type", "max_tokens"),
    (raw({"model": "m", "messages": USER, "stream": "yes"}), "invalid_type", "stream"),
    (raw({"model": "m", "messages": USER, "temperature": 3}), "invalid_value", "temperature"),
    (raw({"model": "m", "messages": USER, "top_p": "x"}), "invalid_type", "top_p"),
    (raw({"model": "m", "messages": USER, "stop": [1]}), "invalid_type", "stop"),
])
def test_bad_chat_bodies(body: bytes, code: str | None, param: str | None) -> None:
    got_code, got_param = code_of(validate_chat, body)
    if code is not None:
        assert got_code == code
    assert got_param == param


def test_assistant_message_without_content_is_allowed() -> None:
    messages = [*USER, {"role": "assistant", "content": None, "tool_calls": []}]
    assert validate_chat(raw({"model": "m", "messages": messages}), info()).route == "chat"


def test_short_chat_skips_tokenization() -> None:
    counter = FakeCounter()
    validate_chat(raw({"model": "m", "messages": USER, "max_tokens": 10}), info(counter))
    assert counter.calls == 0


def test_long_chat_is_counted_exactly_and_rejected() -> None:
    counter = FakeCounter()
    long = [{"role": "user", "content": "x" * 995}]
    code, param = code_of(validate_chat, raw({"model": "m", "messages": long}), info(counter))
    assert (code, param) == ("context_length_exceeded", "messages")
    assert counter.calls == 1


def test_chat_near_limit_but_fitting_passes_after_exact_count() -> None:
    counter = FakeCounter()
    body = raw({"model": "m", "messages": [{"role": "user", "content": "x" * 900}],
                "max_tokens": 50})
    assert validate_chat(body, info(counter)).max_tokens == 50
    assert counter.calls == 1


@pytest.mark.parametrize(("prompt", "code"), [
    ("", "empty_prompt"),
    ([], "empty_prompt"),
    (5, "invalid_type"),
    ([1, 2, 100], "invalid_token_id"),
    ([1, -1], "invalid_token_id"),
    ([[1, 2], [3, 999]], "invalid_token_id"),
    ([1, 2.5], "invalid_type"),
    (["ok", ""], "empty_prompt"),
    ([{"a": 1}], "invalid_type"),
])
def test_bad_completion_prompts(prompt: Any, code: str) -> None:
    got_code, got_param = code_of(validate_completion, raw({"model": "m", "prompt": prompt}))
    assert (got_code, got_param) == (code, "prompt")


def test_completion_token_ids_within_vocab_pass() -> None:
    parsed = validate_completion(raw({"model": "m", "prompt": [0, 99]}), info())
    assert parsed.route == "completion"


def test_completion_over_context_counts_ids_and_max_tokens() -> None:
    model = info(context=10)
    code, _ = code_of(validate_completion, raw({"model": "m", "prompt": list(range(10))}), model)
    assert code == "context_length_exceeded"
    code, _ = code_of(validate_completion, raw({"model": "m", "prompt": [1, 2],
                                                "max_tokens": 9}), model)
    assert code == "context_length_exceeded"
    assert validate_completion(raw({"model": "m", "prompt": [1, 2], "max_tokens": 8}), model)


def test_text_prompt_over_context_is_rejected() -> None:
    counter = FakeCounter()
    code, _ = code_of(validate_completion, raw({"model": "m", "prompt": "y" * 2000}),
                      info(counter))
    assert code == "context_length_exceeded"


def test_without_vocab_size_ids_are_only_checked_for_sign() -> None:
    model = ModelInfo(frozenset({"m"}), None, None, None)
    assert validate_completion(raw({"model": "m", "prompt": [10**6]}), model)
    code, _ = code_of(validate_completion, raw({"model": "m", "prompt": [-1]}), model)
    assert code == "invalid_token_id"


@pytest.mark.parametrize(("body", "code", "param"), [
    ({"sampling_params": {}}, "missing_field", "text"),
    ({"text": "a", "input_ids": [1]}, "invalid_value", "input_ids"),
    ({"input_ids": [1, 100]}, "invalid_token_id", "input_ids"),
    ({"input_ids": "1 2"}, "invalid_type", "input_ids"),
    ({"text": 5}, "invalid_type", "text"),
    ({"text": "a", "sampling_params": []}, "invalid_type", "sampling_params"),
    ({"text": "a", "sampling_params": {"max_new_tokens": -1}}, "invalid_value",
     "max_new_tokens"),
    ({"text": "a", "stream": 1}, "invalid_type", "stream"),
])
def test_bad_generate_bodies(body: dict[str, Any], code: str, param: str) -> None:
    assert code_of(validate_generate, raw(body)) == (code, param)


def test_generate_needs_no_model_field() -> None:
    parsed = validate_generate(raw({"text": "hi", "sampling_params": {"max_new_tokens": 3},
                                    "stream": True}), info())
    assert (parsed.route, parsed.stream, parsed.max_tokens) == ("generate", True, 3)


def test_raw_body_is_kept_byte_for_byte() -> None:
    body = b'{"model":"m",  "messages":[{"role":"user","content":"hi"}], "extra_field": 1}'
    assert validate_chat(body, info()).raw == body
