"""What one turn of a chat session adds to the token stream.

A session consumes a conversation one turn at a time. Rendering each turn on
its own would repeat template text (SmolLM2's template adds its default system
message whenever the first message is not a system message), so a turn renders
to the *difference* the model's own chat template makes when the turn is
appended to a conversation:

    first turn   render([user], add_generation_prompt=True)
    later turns  closing text of the previous answer (whatever of the template's
                 end-of-message text was not generated: "\\n" after a sampled
                 <|im_end|>, "<|im_end|>\\n" after a max_tokens cut)
                 + render(history + [user], gen) - render(history)

The oracle, the replay command and the server all use this, so one
conversation is one token stream on every path.

A chat-API session turn may bring several new messages (a system message
mid-session, a client-written assistant message): `messages_ids` renders them
by the same difference rule; for one user message it is exactly `turn_ids`.
"""

from __future__ import annotations

from dataclasses import dataclass

_PLACEHOLDER = "\u0000SIRVLLM\u0000"


@dataclass
class ChatRenderer:
    tokenizer: object  # a transformers tokenizer with a chat template
    chat_template: str | None = None  # a template of its own (`vllm serve --chat-template`)

    def render(self, messages: list[dict], **kwargs) -> str:
        """The template's text for `messages` (the tokenizer's own template unless one was given)."""
        if self.chat_template is not None:
            kwargs["chat_template"] = self.chat_template
        return self.tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)

    def __post_init__(self):
        u = {"role": "user", "content": "u"}
        a = {"role": "assistant", "content": _PLACEHOLDER}
        prompt = self.render([u], add_generation_prompt=True)
        full = self.render([u, a])
        if not full.startswith(prompt) or _PLACEHOLDER not in full:
            raise ValueError("the chat template is not prefix-stable; sessions need one that is")
        head, self.answer_suffix = full[len(prompt):].split(_PLACEHOLDER)
        if head:
            raise ValueError(f"the chat template puts {head!r} before the answer text")
        self._history = [u, {"role": "assistant", "content": "a"}]
        self._history_text = self.render(self._history)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def user_text(self, content: str, first: bool, role: str = "user") -> str:
        """Template text of a new message followed by the generation prompt."""
        msg = {"role": role, "content": content}
        if first:
            return self.render([msg], add_generation_prompt=True)
        full = self.render(self._history + [msg], add_generation_prompt=True)
        assert full.startswith(self._history_text)
        return full[len(self._history_text):]

    def closing_text(self, answer_ids: list[int]) -> str:
        """The end-of-message text still owed after a generated answer."""
        tail = answer_ids[-8:]  # enough tokens to hold the whole suffix
        generated = self.tokenizer.decode(tail, skip_special_tokens=False) if tail else ""
        suffix = self.answer_suffix
        for cut in range(len(suffix), 0, -1):  # longest generated prefix of the suffix
            if generated.endswith(suffix[:cut]):
                return suffix[cut:]
        return suffix

    def turn_ids(self, content: str, previous_answer: list[int] | None) -> list[int]:
        """Token ids a user turn adds; previous_answer None means the first turn."""
        first = previous_answer is None
        text = ("" if first else self.closing_text(previous_answer)) + self.user_text(content, first)
        return self.encode(text)

    def messages_text(self, messages: list[dict], first: bool) -> str:
        """Template text of several new messages followed by the generation prompt."""
        msgs = [{"role": m["role"], "content": m["content"]} for m in messages]
        if first:
            return self.render(msgs, add_generation_prompt=True)
        full = self.render(self._history + msgs, add_generation_prompt=True)
        if not full.startswith(self._history_text):
            raise ValueError("the chat template renders these messages differently after a history")
        return full[len(self._history_text):]

    def messages_ids(self, messages: list[dict], previous_answer: list[int] | None) -> list[int]:
        """Token ids a turn of new messages adds; previous_answer None means the first turn.
        `messages_ids([user], prev) == turn_ids(user["content"], prev)`."""
        first = previous_answer is None
        text = ("" if first else self.closing_text(previous_answer)) + self.messages_text(messages, first)
        return self.encode(text)

    def message_text(self, role: str, content: str, first: bool) -> str:
        """Template text of one whole message (a stream fed for perplexity)."""
        msg = {"role": role, "content": content}
        if first:
            return self.render([msg])
        full = self.render(self._history + [msg])
        return full[len(self._history_text):]

    def answer_ids(self, text: str) -> list[int]:
        """A whole assistant message (text + end-of-message), as the choice
        tasks put the picked answer into the cache."""
        return self.encode(text) + self.encode(self.answer_suffix)
