"""profiler_ft.dataset and profiler_ft.text: record shapes, skipping, errors, splits, labelling."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import pytest

from profiler_ft.buckets import Buckets
from profiler_ft.dataset import Conversation, label, load_conversations, split_indices
from profiler_ft.errors import ProfilerError
from profiler_ft.text import messages_text, request_text

TINY = os.path.join(os.path.expanduser("~"), ".cache", "banaserve", "models", "tiny")
DATA = Path(__file__).resolve().parents[3] / "shared" / "data"


def _write_json(path: Path, records: Any) -> str:
    path.write_text(json.dumps(records), encoding="utf-8")
    return str(path)


def _write_jsonl(path: Path, records: list[Any]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


def _load(path: str, strict: bool = False) -> list[Conversation]:
    return load_conversations((path,), strict)


# --- shapes -------------------------------------------------------------------------------------


def test_alpaca_without_input_is_the_instruction(tmp_path: Path) -> None:
    path = _write_json(tmp_path / "a.json", [{"instruction": "Name a colour.", "input": "",
                                              "output": "Blue."}])
    [conv] = _load(path)
    assert conv.messages == [{"role": "user", "content": "Name a colour."}]
    assert conv.output == "Blue."
    assert conv.source == "a.json#0"


def test_alpaca_with_input_appends_it_after_a_blank_line(tmp_path: Path) -> None:
    path = _write_json(tmp_path / "a.json", [
        {"instruction": "Sort these.", "input": "3, 1, 2", "output": "1, 2, 3"},
        {"instruction": "No input key.", "output": "Fine."},
    ])
    first, second = _load(path)
    assert first.messages == [{"role": "user", "content": "Sort these.\n\n3, 1, 2"}]
    assert first.output == "1, 2, 3"
    assert second.messages == [{"role": "user", "content": "No input key."}]


def test_sharegpt_gives_one_example_per_assistant_turn_with_history(tmp_path: Path) -> None:
    path = _write_json(tmp_path / "s.json", [{"conversations": [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "Hi"},
        {"from": "gpt", "value": "Hello!"},
        {"from": "human", "value": "How are you?"},
        {"from": "gpt", "value": "Well, thanks."},
    ]}])
    first, second = _load(path)
    assert first.messages == [{"role": "system", "content": "Be brief."},
                              {"role": "user", "content": "Hi"}]
    assert first.output == "Hello!"
    assert first.source == "s.json#0#2"
    assert second.messages == [{"role": "system", "content": "Be brief."},
                               {"role": "user", "content": "Hi"},
                               {"role": "assistant", "content": "Hello!"},
                               {"role": "user", "content": "How are you?"}]
    assert second.output == "Well, thanks."
    assert second.source == "s.json#0#4"


def test_sharegpt_assistant_turn_before_any_user_turn_is_not_an_example(tmp_path: Path) -> None:
    path = _write_json(tmp_path / "s.json", [{"conversations": [
        {"from": "gpt", "value": "Welcome."},
        {"from": "human", "value": "Thanks"},
        {"from": "chatgpt", "value": "You're welcome."},
    ]}])
    [conv] = _load(path)
    assert conv.output == "You're welcome."
    assert conv.messages == [{"role": "assistant", "content": "Welcome."},
                             {"role": "user", "content": "Thanks"}]


def test_openai_messages(tmp_path: Path) -> None:
    path = _write_json(tmp_path / "m.json", [{"messages": [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
    ]}])
    [conv] = _load(path)
    assert conv.messages == [{"role": "user", "content": "What is 2+2?"}]
    assert conv.output == "4"


def test_prompt_response_pairs(tmp_path: Path) -> None:
    path = _write_json(tmp_path / "p.json", [
        {"prompt": "Say hi", "response": "hi"},
        {"prompt": "Say bye", "output": "bye"},
    ])
    first, second = _load(path)
    assert first.messages == [{"role": "user", "content": "Say hi"}]
    assert first.output == "hi"
    assert second.output == "bye"


def test_jsonl_file(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "d.jsonl", [
        {"instruction": "one", "output": "1"},
        {"prompt": "two", "response": "2"},
        {"messages": [{"role": "user", "content": "three"}, {"role": "assistant", "content": "3"}]},
    ])
    convs = _load(path)
    assert [c.output for c in convs] == ["1", "2", "3"]
    assert [c.source for c in convs] == ["d.jsonl#0", "d.jsonl#1", "d.jsonl#2#1"]


def test_jsonl_content_under_a_json_name(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "d.json", [{"prompt": "a", "response": "A"},
                                              {"prompt": "b", "response": "B"}])
    assert [c.output for c in _load(path)] == ["A", "B"]


def test_json_object_with_data_list(tmp_path: Path) -> None:
    path = _write_json(tmp_path / "d.json", {"data": [{"prompt": "a", "response": "A"}]})
    assert [c.output for c in _load(path)] == ["A"]


def test_several_files_are_concatenated_in_order(tmp_path: Path) -> None:
    a = _write_json(tmp_path / "a.json", [{"prompt": "a", "response": "A"}])
    b = _write_jsonl(tmp_path / "b.jsonl", [{"prompt": "b", "response": "B"}])
    assert [c.output for c in load_conversations((a, b), strict=False)] == ["A", "B"]


# --- skipping and errors ------------------------------------------------------------------------


def _mixed(tmp_path: Path) -> str:
    return _write_json(tmp_path / "mixed.json", [
        {"instruction": "ok", "output": "yes"},
        {"instruction": "no answer", "output": ""},
        {"conversations": [{"from": "human", "value": "only a question"}]},
        "not an object",
        {"unknown": "shape"},
        {"prompt": "ok too", "response": "sure"},
    ])


def test_records_without_answers_are_skipped_and_counted(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = _mixed(tmp_path)
    with caplog.at_level(logging.WARNING, logger="profiler_ft.dataset"):
        convs = _load(path)
    assert [c.output for c in convs] == ["yes", "sure"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "skipped 4 record(s)" in warnings[0]
    assert "record 1" in warnings[0]


def test_strict_raises_on_the_first_record_without_an_answer(tmp_path: Path) -> None:
    path = _mixed(tmp_path)
    with pytest.raises(ProfilerError, match=r"record 1 has no reference answer"):
        _load(path, strict=True)


def test_strict_accepts_a_clean_file(tmp_path: Path) -> None:
    path = _write_json(tmp_path / "a.json", [{"instruction": "x", "output": "y"}])
    assert len(_load(path, strict=True)) == 1


def test_file_with_no_usable_record_raises_a_readable_error(tmp_path: Path) -> None:
    path = _write_json(tmp_path / "q.json", [
        {"conversations": [{"from": "human", "value": "hi"}]},
        {"conversations": [{"from": "human", "value": "anyone?"}]},
    ])
    with pytest.raises(ProfilerError) as excinfo:
        _load(path)
    message = str(excinfo.value)
    assert path in message
    assert "no record with a reference answer" in message
    assert "record 0 has no assistant answer" in message


@pytest.mark.parametrize("content", ["[]", "", "\n\n"])
def test_empty_file_raises(tmp_path: Path, content: str) -> None:
    path = tmp_path / "empty.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ProfilerError, match="the file is empty"):
        _load(str(path))


@pytest.mark.parametrize(("name", "content"), [
    ("bad.json", '[{"prompt": "a", '),
    ("bad.json", '{"prompt": "a"'),
    ("bad.jsonl", '{"prompt": "a", "response": "b"}\n{oops}\n'),
])
def test_invalid_json_raises(tmp_path: Path, name: str, content: str) -> None:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ProfilerError, match="not valid JSON or JSONL"):
        _load(str(path))


def test_json_that_is_not_a_list_of_records_raises(tmp_path: Path) -> None:
    path = _write_json(tmp_path / "d.json", {"data": "nope"})
    with pytest.raises(ProfilerError, match="expected a list of records"):
        _load(path)


def test_missing_file_raises(tmp_path: Path) -> None:
    path = str(tmp_path / "missing.json")
    with pytest.raises(ProfilerError, match="no such data file"):
        _load(path)


# --- split_indices ------------------------------------------------------------------------------


def test_split_indices_is_deterministic_for_a_seed() -> None:
    assert split_indices(100, 0.15, 0.15, seed=7) == split_indices(100, 0.15, 0.15, seed=7)


def test_split_indices_depends_on_the_seed() -> None:
    assert split_indices(100, 0.15, 0.15, seed=0) != split_indices(100, 0.15, 0.15, seed=1)


@pytest.mark.parametrize(("n", "val", "test"), [(100, 0.15, 0.15), (7, 0.2, 0.3), (1, 0.0, 0.0),
                                                (0, 0.1, 0.1), (50, 0.0, 0.5)])
def test_split_indices_are_disjoint_and_cover_every_index(n: int, val: float, test: float) -> None:
    parts = split_indices(n, val, test, seed=3)
    assert set(parts) == {"train", "validation", "test"}
    every = parts["train"] + parts["validation"] + parts["test"]
    assert sorted(every) == list(range(n))
    assert len(every) == len(set(every))
    assert len(parts["test"]) == round(n * test)
    assert len(parts["validation"]) == round(n * val)
    for indices in parts.values():
        assert indices == sorted(indices)


# --- label() with a real tokenizer --------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_tokenizer() -> Any:
    if not os.path.isfile(os.path.join(TINY, "tokenizer.json")):
        pytest.skip(f"the tiny model's tokenizer is absent ({TINY}); "
                    "run `python -m runtime_patches.models prepare tiny`")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TINY)


def test_label_counts_output_tokens_and_buckets_them(tiny_tokenizer: Any) -> None:
    buckets = Buckets((2, 8, 20))
    outputs = ["ok", "a short answer of a few words",
               "a much longer answer " * 6, "x " * 60]
    convs = [Conversation([{"role": "user", "content": f"question {i}"}], out, f"t#{i}")
             for i, out in enumerate(outputs)]
    examples = label(convs, tiny_tokenizer, buckets, progress=False)
    assert len(examples) == len(convs)
    for conv, ex in zip(convs, examples, strict=True):
        expected = len(tiny_tokenizer(conv.output, add_special_tokens=False)["input_ids"])
        assert ex.output_tokens == expected
        assert ex.bucket == buckets.index(expected)
        assert ex.text == messages_text(conv.messages)
        assert ex.source == conv.source
        rendered = tiny_tokenizer.apply_chat_template(conv.messages, tokenize=False,
                                                      add_generation_prompt=True)
        assert ex.prompt == rendered
        assert ex.prompt_tokens == len(tiny_tokenizer(rendered,
                                                      add_special_tokens=False)["input_ids"])
    assert len({ex.bucket for ex in examples}) > 1, "the outputs should span several buckets"
    assert examples[0].output_tokens < examples[3].output_tokens


def test_label_multi_turn_prompt_text_has_roles(tiny_tokenizer: Any) -> None:
    conv = Conversation([{"role": "user", "content": "Hi"},
                         {"role": "assistant", "content": "Hello"},
                         {"role": "user", "content": "More?"}], "Sure.", "t#0")
    [ex] = label([conv], tiny_tokenizer, Buckets.parse("pow2"), progress=False)
    assert ex.text == "user: Hi\nassistant: Hello\nuser: More?"
    assert "Hello" in ex.prompt
    assert ex.bucket == 0


# --- real data (optional) -----------------------------------------------------------------------


def test_real_alpaca_file_loads() -> None:
    path = DATA / "alpaca_4000.json"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    convs = _load(str(path))
    assert len(convs) > 3000
    assert all(len(c.messages) == 1 and c.messages[0]["role"] == "user" for c in convs)
    assert all(c.output.strip() for c in convs)


def test_real_sharegpt_file_loads() -> None:
    path = DATA / "sharegpt_sample_chatdemo.json"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    convs = _load(str(path))
    assert convs
    assert all(c.messages[-1]["role"] == "user" for c in convs)
    assert all(c.output.strip() for c in convs)


# --- profiler_ft.text ---------------------------------------------------------------------------


def test_messages_text_single_user_message_is_its_content() -> None:
    assert messages_text([{"role": "user", "content": "Hello"}]) == "Hello"


def test_messages_text_several_messages_are_role_lines() -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert messages_text(messages) == "system: Be brief.\nuser: Hi"


def test_messages_text_single_non_user_message_keeps_its_role() -> None:
    assert messages_text([{"role": "system", "content": "Rules"}]) == "system: Rules"


def test_messages_text_missing_role_defaults_to_user() -> None:
    messages = [{"content": "a"}, {"role": "assistant", "content": "b"}]
    assert messages_text(messages) == "user: a\nassistant: b"


def test_messages_text_joins_text_parts_of_content_lists() -> None:
    content = [{"type": "text", "text": "Look at this"},
               {"type": "image_url", "image_url": {"url": "http://x/y.png"}},
               {"text": "and this"},
               "not a part"]
    assert messages_text([{"role": "user", "content": content}]) == "Look at this\nand this"


def test_messages_text_non_text_content_is_empty() -> None:
    assert messages_text([{"role": "user", "content": None}]) == ""
    assert messages_text([{"role": "user", "content": 42}]) == ""


def test_request_text_chat() -> None:
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi there"}]}]}
    assert request_text("chat", body) == "Hi there"
    body = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]}
    assert request_text("chat", body) == "system: S\nuser: U"


@pytest.mark.parametrize("body", [{}, {"messages": []}, {"messages": "Hi"}])
def test_request_text_chat_without_messages_is_none(body: dict[str, Any]) -> None:
    assert request_text("chat", body) is None


@pytest.mark.parametrize(("body", "expected"), [
    ({"prompt": "Once upon a time"}, "Once upon a time"),
    ({"prompt": ["first", "second"]}, "first"),
    ({"prompt": [1, 2, 3]}, None),
    ({"prompt": [[1, 2], [3]]}, None),
    ({"prompt": []}, None),
    ({"prompt": ""}, None),
    ({}, None),
    ({"text": "ignored for completions"}, None),
])
def test_request_text_completion(body: dict[str, Any], expected: str | None) -> None:
    assert request_text("completion", body) == expected


@pytest.mark.parametrize(("body", "expected"), [
    ({"text": "SGLang text"}, "SGLang text"),
    ({"text": ["batch a", "batch b"]}, "batch a"),
    ({"input_ids": [1, 2, 3]}, None),
    ({"text": ""}, None),
    ({"prompt": "not read for generate"}, None),
])
def test_request_text_generate(body: dict[str, Any], expected: str | None) -> None:
    assert request_text("generate", body) == expected
