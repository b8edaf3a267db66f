"""What the predictor reads: the text of a prompt, taken the same way from datasets and requests.

Both `profiler_ft/dataset.py` (building training data) and the router (annotating live requests)
call these functions, so the backbone sees the same kind of text in training and in serving. The
chat template's boilerplate (system prompt, role markers) is left out: it is the same for every
request, and a small backbone's context is better spent on the request's own words.
"""

from __future__ import annotations

from typing import Any


def _content(value: Any) -> str:
    """An OpenAI message content: a string, or a list of parts whose text parts are joined."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "\n".join(p.get("text", "") for p in value
                         if isinstance(p, dict) and p.get("type", "text") == "text")
    return ""


def messages_text(messages: list[dict[str, Any]]) -> str:
    """One user message: its content. Otherwise ``role: content`` lines, in order."""
    if len(messages) == 1 and messages[0].get("role") == "user":
        return _content(messages[0].get("content"))
    return "\n".join(f"{m.get('role', 'user')}: {_content(m.get('content'))}" for m in messages)


def request_text(route: str, body: dict[str, Any]) -> str | None:
    """The predictor's input for a validated router request, or None when it has no text.

    ``route`` is ``chat`` (messages), ``completion`` (prompt: a string, or a list whose first
    element is a string) or ``generate`` (SGLang's ``text``). Token-id prompts have no text.
    """
    if route == "chat":
        messages = body.get("messages")
        return messages_text(messages) if isinstance(messages, list) and messages else None
    value = body.get("prompt") if route == "completion" else body.get("text")
    if isinstance(value, list) and value and isinstance(value[0], str):
        value = value[0]
    return value if isinstance(value, str) and value else None
