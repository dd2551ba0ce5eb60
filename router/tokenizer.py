"""The served model's tokenizer, as the router (pdserve's front end) uses it.

The router tokenizes prompts once (so it can route by prompt length, reject prompts that
do not fit, and hand both engines the same ids), renders chat templates, and turns the
engines' output token ids back into text, as vLLM's own front-end process does.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream


class TokenizerError(ValueError):
    """The request cannot be tokenized (e.g. the chat template rejects the messages)."""


class ModelTokenizer:
    """A Hugging Face fast tokenizer (tokenizer.json) with its chat template, read with the
    `tokenizers` library and a sandboxed Jinja environment (no torch in the router)."""

    def __init__(self, model_path: Path, max_model_len: int | None = None):
        self.model_path = Path(model_path)
        tokenizer_file = self.model_path / "tokenizer.json"
        if not tokenizer_file.exists():
            raise TokenizerError(f"{self.model_path} has no tokenizer.json (a fast tokenizer is required)")
        self._tok = Tokenizer.from_file(str(tokenizer_file))
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)  # valid ids: below it
        tok_config = _read_json(self.model_path / "tokenizer_config.json")
        self._bos_token = _token_text(tok_config.get("bos_token"))
        self._eos_token = _token_text(tok_config.get("eos_token"))
        template = tok_config.get("chat_template")
        template_file = self.model_path / "chat_template.jinja"
        if template is None and template_file.exists():
            template = template_file.read_text()
        self._chat_template = _compile_template(template) if isinstance(template, str) else None
        config = _read_json(self.model_path / "config.json")
        self.max_model_len = int(max_model_len or config.get("max_position_embeddings") or 2048)
        self.eos_token_ids = frozenset(self._eos_ids(config))

    def _eos_ids(self, config: dict) -> set[int]:
        ids: set[int] = set()
        gen = _read_json(self.model_path / "generation_config.json")
        eos_from_vocab = self._tok.token_to_id(self._eos_token) if self._eos_token else None
        for source in (gen.get("eos_token_id"), config.get("eos_token_id"), eos_from_vocab):
            if isinstance(source, int):
                ids.add(source)
            elif isinstance(source, list):
                ids.update(int(i) for i in source)
        return ids

    @property
    def primary_eos_token_id(self) -> int | None:
        """The tokenizer's own EOS. The other EOS ids (from generation_config.json) act as
        stop token ids, as vLLM treats them (they show in `stop_reason`)."""
        return self._tok.token_to_id(self._eos_token) if self._eos_token else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # JSON may escape lone surrogates ("\ud800")
            raise TokenizerError(f"the text is not valid Unicode: {e.reason} at character "
                                 f"{e.start}") from e
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def apply_chat_template(self, messages: list[dict], **template_kwargs) -> list[int]:
        """Prompt ids of a chat, ending with the assistant's turn prompt."""
        # The template writes any BOS itself, as vLLM's chat path assumes.
        return self.encode(self.render_chat(messages, **template_kwargs), add_special_tokens=False)

    def render_chat(self, messages: list[dict], *, chat_template: str | None = None,
                    add_generation_prompt: bool = True, **template_kwargs) -> str:
        """The chat as prompt text. `template_kwargs` become template variables (tools,
        documents, continue_final_message, the client's chat_template_kwargs), as vLLM
        passes them; `chat_template` replaces the model's template for this call."""
        template = self._chat_template
        if chat_template is not None:
            try:
                template = _compile_template(chat_template)
            except jinja2.TemplateError as e:
                raise TokenizerError(f"chat_template does not compile: {e}") from e
        if template is None:
            raise TokenizerError("this model has no chat template; use /v1/completions")
        variables = dict(template_kwargs)
        variables.update(messages=messages, add_generation_prompt=add_generation_prompt,
                         bos_token=self._bos_token or "", eos_token=self._eos_token or "")
        try:
            text = template.render(**variables)
        except jinja2.TemplateError as e:
            raise TokenizerError(f"chat template failed: {e}") from e
        if template_kwargs.get("continue_final_message") and messages:
            # Leave the last message open: cut what the template wrote after its content.
            last = messages[-1].get("content") or ""
            if isinstance(last, str) and last and last in text:
                text = text[: text.rindex(last) + len(last)]
        return text

    def decode_with_special(self, token_ids: list[int]) -> str:
        """Ids as text, special tokens kept (how vLLM writes tokens in logprobs)."""
        return self._tok.decode(token_ids, skip_special_tokens=False)

    def decode(self, token_ids: list[int]) -> str:
        return self._tok.decode(token_ids, skip_special_tokens=True)

    def detokenizer(self, prompt_token_ids: list[int],
                    skip_special_tokens: bool = True) -> "IncrementalDetokenizer":
        return IncrementalDetokenizer(self, prompt_token_ids, skip_special_tokens)


class IncrementalDetokenizer:
    """Text deltas for a stream of output ids; multi-byte characters split across tokens
    are held back until complete (tokenizers' DecodeStream)."""

    def __init__(self, tokenizer: ModelTokenizer, prompt_token_ids: list[int],
                 skip_special_tokens: bool = True):
        self._backend = tokenizer._tok
        # Primed with the prompt's tail so the first output token's leading space decodes
        # as it would mid-text.
        self._stream = DecodeStream(ids=list(prompt_token_ids[-6:]),
                                    skip_special_tokens=skip_special_tokens)

    def step(self, token_id: int) -> str:
        return self._stream.step(self._backend, token_id) or ""


def _raise_exception(message: str):
    raise jinja2.TemplateError(message)


def _compile_template(source: str) -> jinja2.Template:
    # The same environment settings Hugging Face chat templates are written for.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def _token_text(value) -> str | None:
    if isinstance(value, dict):  # {"content": "<s>", ...} in older tokenizer configs
        return value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
