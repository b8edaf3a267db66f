"""Request validation: every bad input is answered 400 here, before any worker sees it.

Called by ``handlers`` once per request with the raw body and the current ``ModelInfo``; returns a
``ParsedRequest`` or raises ``errors.InvalidRequest`` naming the offending field. Checks: JSON
syntax, body shape, required fields, field types and ranges, the model name, empty messages or
prompts, token ids outside the vocabulary (they crash an SGLang worker), and prompt + completion
length over the context window. Unknown fields are passed through to SGLang untouched.

Prompt length is counted exactly with the model's tokenizer, but only when a cheap upper bound
(UTF-8 bytes of the text, plus a template allowance per message) could exceed the context window;
a byte-level tokenizer never makes more tokens than bytes, so short prompts cost no tokenization.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from router.errors import InvalidRequest
from router.length import LengthEstimate
from router.model_info import ModelInfo

try:
    import orjson

    def _loads(raw: bytes) -> Any:
        return orjson.loads(raw)

    _JSONError: tuple[type[Exception], ...] = (orjson.JSONDecodeError,)
except ImportError:  # pragma: no cover - orjson ships with SGLang
    import json

    def _loads(raw: bytes) -> Any:
        return json.loads(raw)

    _JSONError = (ValueError,)

ROLES = frozenset({"system", "user", "assistant", "tool", "developer", "function"})
TEMPLATE_ALLOWANCE_BYTES = 256
PER_MESSAGE_ALLOWANCE_BYTES = 64


@dataclass(frozen=True)
class ParsedRequest:
    route: str
    """``chat``, ``completion`` or ``generate``."""
    body: dict[str, Any]
    """The decoded body (read-only by convention)."""
    raw: bytes
    """The body exactly as received; forwarded unchanged."""
    stream: bool
    """Whether the client asked for server-sent events."""
    max_tokens: int | None
    """Requested completion tokens, when given."""
    prompt_text: str = ""
    """The prompt as one string (chat: role-tagged messages; ids: comma-joined), for affinity."""
    prompt_tokens: int = 0
    """Prompt length in tokens: exact when counted, else an estimate (UTF-8 bytes / 4)."""
    prediction: LengthEstimate | None = None
    """Predicted output length (``router/length.py``), set by handlers when configured."""


def parse_json(raw: bytes) -> dict[str, Any]:
    if not raw:
        raise InvalidRequest("request body is empty; expected a JSON object")
    try:
        body = _loads(raw)
    except _JSONError as exc:
        raise InvalidRequest(f"could not parse the JSON body of your request: {exc}",
                             code="invalid_json") from None
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a JSON object, got "
                             f"{type(body).__name__}")
    return body


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_type(body: dict[str, Any], name: str, kind: str, *, minimum: float | None = None,
                maximum: float | None = None) -> None:
    if name not in body or body[name] is None:
        return
    value = body[name]
    ok = {"bool": lambda v: isinstance(v, bool), "int": _is_int, "number": _is_number,
          "str": lambda v: isinstance(v, str), "object": lambda v: isinstance(v, dict)}[kind](value)
    if not ok:
        raise InvalidRequest(f"'{name}' must be of type {kind}, got {type(value).__name__}",
                             param=name, code="invalid_type")
    if minimum is not None and value < minimum:
        raise InvalidRequest(f"'{name}' must be >= {minimum}, got {value}", param=name,
                             code="invalid_value")
    if maximum is not None and value > maximum:
        raise InvalidRequest(f"'{name}' must be <= {maximum}, got {value}", param=name,
                             code="invalid_value")


def _check_sampling(body: dict[str, Any], max_name: str) -> int | None:
    _check_type(body, "stream", "bool")
    _check_type(body, max_name, "int", minimum=1)
    _check_type(body, "temperature", "number", minimum=0, maximum=2)
    _check_type(body, "top_p", "number", minimum=0, maximum=1)
    _check_type(body, "n", "int", minimum=1, maximum=128)
    _check_type(body, "seed", "int")
    _check_type(body, "presence_penalty", "number", minimum=-2, maximum=2)
    _check_type(body, "frequency_penalty", "number", minimum=-2, maximum=2)
    stop = body.get("stop")
    if stop is not None and not (isinstance(stop, str) or (
            isinstance(stop, list) and all(isinstance(s, str) for s in stop))):
        raise InvalidRequest("'stop' must be a string or a list of strings", param="stop",
                             code="invalid_type")
    value = body.get(max_name)
    return int(value) if value is not None else None


def _check_model(body: dict[str, Any], info: ModelInfo) -> None:
    if "model" not in body:
        raise InvalidRequest("missing required field 'model'", param="model",
                             code="missing_field")
    model = body["model"]
    if not isinstance(model, str):
        raise InvalidRequest(f"'model' must be of type str, got {type(model).__name__}",
                             param="model", code="invalid_type")
    if info.served_names and model not in info.served_names:
        served = ", ".join(sorted(info.served_names))
        raise InvalidRequest(f"the model '{model}' does not exist; this router serves: {served}",
                             param="model", code="model_not_found")


def _check_token_ids(ids: list[Any], info: ModelInfo, param: str) -> None:
    if not ids:
        raise InvalidRequest(f"'{param}' must not be empty", param=param, code="empty_prompt")
    for token in ids:
        if not _is_int(token):
            raise InvalidRequest(f"'{param}' must contain integer token ids, got "
                                 f"{type(token).__name__}", param=param, code="invalid_type")
        if token < 0 or (info.vocab_size is not None and token >= info.vocab_size):
            limit = f"[0, {info.vocab_size})" if info.vocab_size else "non-negative"
            raise InvalidRequest(f"token id {token} in '{param}' is outside the model's "
                                 f"vocabulary {limit}", param=param, code="invalid_token_id")


def _check_length(num_tokens: int, max_tokens: int | None, info: ModelInfo, param: str) -> None:
    if info.context_length is None:
        return
    total = num_tokens + (max_tokens or 0)
    if num_tokens >= info.context_length or total > info.context_length:
        raise InvalidRequest(
            f"this model's maximum context length is {info.context_length} tokens; the request "
            f"has {num_tokens} prompt tokens and asks for {max_tokens or 0} completion tokens "
            f"({total} in all); shorten the prompt or lower max_tokens",
            param=param, code="context_length_exceeded")


def _count_bound(text_bytes: int, num_messages: int) -> int:
    return text_bytes + TEMPLATE_ALLOWANCE_BYTES + PER_MESSAGE_ALLOWANCE_BYTES * num_messages


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "".join(part["text"] for part in content or ()
                   if isinstance(part, dict) and isinstance(part.get("text"), str))


def _check_messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    if "messages" not in body:
        raise InvalidRequest("missing required field 'messages'", param="messages",
                             code="missing_field")
    messages = body["messages"]
    if not isinstance(messages, list):
        raise InvalidRequest("'messages' must be a list of message objects", param="messages",
                             code="invalid_type")
    if not messages:
        raise InvalidRequest("'messages' must contain at least one message", param="messages",
                             code="empty_messages")
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise InvalidRequest(f"'{where}' must be an object", param=where,
                                 code="invalid_type")
        role = msg.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise InvalidRequest(f"'{where}.role' must be one of {sorted(ROLES)}, got "
                                 f"{msg.get('role')!r}", param=f"{where}.role",
                                 code="invalid_value")
        content = msg.get("content")
        if content is None and msg.get("role") == "assistant":
            continue
        if not isinstance(content, str | list):
            raise InvalidRequest(f"'{where}.content' must be a string or a list of content "
                                 "parts", param=f"{where}.content", code="invalid_type")
    return messages


def validate_chat(raw: bytes, info: ModelInfo) -> ParsedRequest:
    body = parse_json(raw)
    _check_model(body, info)
    messages = _check_messages(body)
    max_tokens = _check_sampling(body, "max_tokens")
    if max_tokens is None:
        _check_type(body, "max_completion_tokens", "int", minimum=1)
        max_tokens = body.get("max_completion_tokens")
    text = "\n".join(f"{m.get('role')}: {_content_text(m.get('content'))}" for m in messages)
    size = len(text.encode())
    tokens = size // 4 + 1
    if info.context_length is not None and info.counter is not None:
        if _count_bound(size, len(messages)) + (max_tokens or 0) > info.context_length:
            tokens = info.counter.count_chat(messages)
            _check_length(tokens, max_tokens, info, "messages")
    return ParsedRequest("chat", body, raw, bool(body.get("stream")), max_tokens, text, tokens)


def validate_completion(raw: bytes, info: ModelInfo) -> ParsedRequest:
    body = parse_json(raw)
    _check_model(body, info)
    max_tokens = _check_sampling(body, "max_tokens")
    if "prompt" not in body:
        raise InvalidRequest("missing required field 'prompt'", param="prompt",
                             code="missing_field")
    text, tokens = _check_prompt(body["prompt"], "prompt", max_tokens, info)
    return ParsedRequest("completion", body, raw, bool(body.get("stream")), max_tokens, text,
                         tokens)


def _check_prompt(prompt: Any, param: str, max_tokens: int | None,
                  info: ModelInfo) -> tuple[str, int]:
    """A prompt is a string, a list of strings, a list of ids or a list of id lists.

    Returns the prompt as one string (for affinity) and its length in tokens (exact for ids and
    for counted text, else an estimate)."""
    if isinstance(prompt, str):
        prompts: list[Any] = [prompt]
    elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt:
        prompts = prompt
    else:
        raise InvalidRequest(f"'{param}' must be a non-empty string, list of strings, or "
                             "list of token ids", param=param, code="empty_prompt"
                             if prompt in ("", []) else "invalid_type")
    texts, total = [], 0
    for item in prompts:
        if isinstance(item, str):
            if not item:
                raise InvalidRequest(f"'{param}' must not be empty", param=param,
                                     code="empty_prompt")
            size = len(item.encode())
            tokens = size // 4 + 1
            if (info.context_length is not None and info.counter is not None
                    and _count_bound(size, 0) + (max_tokens or 0) > info.context_length):
                tokens = info.counter.count_text(item)
                _check_length(tokens, max_tokens, info, param)
            texts.append(item)
        elif isinstance(item, list):
            _check_token_ids(item, info, param)
            _check_length(len(item), max_tokens, info, param)
            tokens = len(item)
            texts.append(",".join(map(str, item)))
        else:
            raise InvalidRequest(f"'{param}' items must be strings or token id lists",
                                 param=param, code="invalid_type")
        total += tokens
    return "\n".join(texts), total


def validate_generate(raw: bytes, info: ModelInfo) -> ParsedRequest:
    """SGLang's native ``/generate``: ``text`` or ``input_ids``, plus ``sampling_params``."""
    body = parse_json(raw)
    has_text, has_ids = body.get("text") is not None, body.get("input_ids") is not None
    if has_text == has_ids:
        raise InvalidRequest("exactly one of 'text' and 'input_ids' is required",
                             param="text" if not has_text else "input_ids",
                             code="missing_field" if not has_text else "invalid_value")
    _check_type(body, "stream", "bool")
    _check_type(body, "sampling_params", "object")
    params = body.get("sampling_params") or {}
    _check_type(params, "max_new_tokens", "int", minimum=0)
    _check_type(params, "temperature", "number", minimum=0)
    _check_type(params, "top_p", "number", minimum=0, maximum=1)
    max_tokens = params.get("max_new_tokens")
    if has_ids:
        ids = body["input_ids"]
        if not isinstance(ids, list):
            raise InvalidRequest("'input_ids' must be a list of token ids", param="input_ids",
                                 code="invalid_type")
        text, tokens = _check_prompt(ids, "input_ids", max_tokens, info)
    else:
        text = body["text"]
        if not (isinstance(text, str) or (isinstance(text, list) and text and
                                          all(isinstance(t, str) for t in text))):
            raise InvalidRequest("'text' must be a string or a list of strings", param="text",
                                 code="invalid_type")
        text, tokens = _check_prompt(text, "text", max_tokens, info)
    return ParsedRequest("generate", body, raw, bool(body.get("stream")), max_tokens, text,
                         tokens)


VALIDATORS = {"chat": validate_chat, "completion": validate_completion,
              "generate": validate_generate}


def _dumps(body: dict[str, Any]) -> bytes:
    try:
        import orjson

        return bytes(orjson.dumps(body))
    except ImportError:  # pragma: no cover - orjson ships with SGLang
        import json

        return json.dumps(body).encode()


def with_custom_params(parsed: ParsedRequest, params: dict[str, Any],
                       drop: tuple[str, ...] = ()) -> ParsedRequest:
    """``parsed`` with ``params`` merged into SGLang's ``custom_params`` (top level for the
    OpenAI routes, inside ``sampling_params`` for ``/generate``) and the top-level fields in
    ``drop`` removed; the body is re-encoded. Keys the client set are kept."""
    body = {k: v for k, v in parsed.body.items() if k not in drop}
    if parsed.route == "generate":
        sampling = dict(body.get("sampling_params") or {})
        sampling["custom_params"] = _merged(sampling.get("custom_params"), params,
                                            "sampling_params.custom_params")
        body["sampling_params"] = sampling
    else:
        body["custom_params"] = _merged(body.get("custom_params"), params, "custom_params")
    return replace(parsed, body=body, raw=_dumps(body))


def _merged(existing: Any, params: dict[str, Any], param: str) -> dict[str, Any]:
    if existing is None:
        return dict(params)
    if not isinstance(existing, dict):
        raise InvalidRequest(f"{param} must be a JSON object, got {type(existing).__name__}",
                             param=param)
    return {**params, **existing}
