"""Chat templates: one way to turn messages into tokens for training, `lorakit generate --chat` and the server's
/v1/chat/completions, so that what an adapter is taught is exactly what it is later asked."""

from __future__ import annotations

from typing import Any

from .errors import ChatTemplateError

ROLES = ("system", "developer", "user", "assistant", "tool")  # the roles OpenAI's chat API accepts


def has_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def check_messages(messages: Any) -> list[dict[str, str]] | str:
    """`messages` as [{"role", "content"}] with text content, or a problem description (for a data row)."""
    if not isinstance(messages, list) or not messages:
        return "'messages' must be a non-empty list of {\"role\": ..., \"content\": ...} objects"
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            role = m.get("role") if isinstance(m, dict) else None
            return f"message {i} has role {role!r}; expected one of {', '.join(ROLES)}"
        text = message_text(m.get("content"))
        if text is None:
            return f"message {i} ({m['role']}) has no text content (a string, or a list of {{\"type\": \"text\"}} parts)"
        out.append({"role": m["role"], "content": text})
    return out


def message_text(content: Any) -> str | None:
    """A message's text: a string, or OpenAI's list of text parts joined (as the server reads them)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    return None


def prompt_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """The tokens of `messages` plus the template's opening of an assistant turn: what the model continues."""
    return _tokens(tokenizer, render(tokenizer, messages, add_generation_prompt=True))


def conversation_ids(tokenizer, messages: list[dict[str, str]], first_target: int = 0) -> tuple[list[int], list[bool]]:
    """Token ids of a whole conversation and, per token, whether it is trained on: the assistant turns from
    message `first_target` on, each with the template's end-of-turn marker (so the model learns to stop).

    Each assistant turn is found as the text the template adds to the conversation before it (rendered with
    the generation prompt, as `prompt_ids` does when serving). Pieces are tokenised separately, like a prompt
    and its completion, so a prompt becomes the same tokens here as in `prompt_ids`.
    """
    ids: list[int] = []
    target: list[bool] = []
    done = ""  # the rendered text already turned into tokens

    def add(text: str, trained: bool) -> None:
        piece = _tokens(tokenizer, text) if text else []
        ids.extend(piece)
        target.extend([trained] * len(piece))

    for i, m in enumerate(messages):
        if m["role"] != "assistant" or i < first_target:
            continue
        before = render(tokenizer, messages[:i], add_generation_prompt=True)
        after = render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        _require_prefix(done, before, i)
        _require_prefix(before, after, i)
        add(before[len(done):], False)
        add(after[len(before):], True)
        done = after
    full = render(tokenizer, messages, add_generation_prompt=False)
    _require_prefix(done, full, len(messages) - 1)
    add(full[len(done):], False)
    return ids, target


def render(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    if not has_template(tokenizer):
        raise ChatTemplateError("the tokenizer has no chat template, so chat messages cannot be turned into tokens; "
                                "use a chat/instruct model, or set tokenizer.chat_template and save the tokenizer")
    if not messages:
        return ""
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # templates raise their own errors for conversations they refuse (roles out of order, ...)
        raise ChatTemplateError(f"the chat template rejected the messages: {e}") from None


def _tokens(tokenizer, text: str) -> list[int]:
    # Templates write their own special tokens (BOS included where the model wants one): add none here.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _require_prefix(head: str, text: str, index: int) -> None:
    if not text.startswith(head):
        raise ChatTemplateError(f"the chat template renders the turns before message {index} differently once it is "
                                "added (e.g. it drops earlier reasoning), so the assistant's tokens cannot be told "
                                "apart; split the conversation into one row per assistant turn")
