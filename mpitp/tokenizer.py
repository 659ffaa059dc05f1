"""Text to token ids and back, through a model folder's ``tokenizer.json``.

The Hugging Face ``tokenizers`` library, an optional extra (``pip install mpitp[text]``) needed only for text,
reads every kind of tokenizer.json offline. ``Tokenizer.stream`` decodes one token at a time without ever
printing half a character: a token may end in the middle of a multi-byte UTF-8 sequence.
"""

import json
import os

from .errors import ConfigError, read_regular

TOKENIZER_FILE = "tokenizer.json"


class Tokenizer:
    """The ``tokenizer.json`` of ``model_dir``; ``bos_token_id`` is added in front when the folder's
    ``tokenizer_config.json`` asks for it (``add_bos_token``)."""

    def __init__(self, model_dir, bos_token_id=None):
        path = os.path.join(model_dir, TOKENIZER_FILE)
        if not os.path.exists(path):
            raise ConfigError(f"{model_dir}: there is no {TOKENIZER_FILE} for text prompts; pass token ids with "
                              "--prompt-ids instead.")
        try:
            import tokenizers
            from tokenizers.decoders import DecodeStream
        except ImportError:
            raise ConfigError(f"{path}: text prompts need the 'tokenizers' library, which is not installed; "
                              "install it with: pip install 'mpitp[text]' (or pass --prompt-ids).") from None
        text = read_regular(path)  # read here, so that a FIFO or a folder is refused before the library opens it
        try:
            self._tok = tokenizers.Tokenizer.from_str(text.decode("utf-8"))
        except Exception as e:  # the library raises its own exception type for every parse error
            raise ConfigError(f"{path}: not a valid tokenizer file ({e}).") from None
        self._decode_stream, self.bos_token_id, self.add_bos = DecodeStream, bos_token_id, False
        config_path = os.path.join(model_dir, "tokenizer_config.json")
        if os.path.exists(config_path):
            try:
                add_bos = json.loads(read_regular(config_path)).get("add_bos_token", False)
            except (ValueError, RecursionError, AttributeError):
                raise ConfigError(f"{config_path}: not readable as a JSON object.") from None
            if not isinstance(add_bos, bool):  # "no" would be true
                raise ConfigError(f"{config_path}: 'add_bos_token' must be true or false, got {add_bos!r}.")
            self.add_bos = add_bos and bos_token_id is not None

    def encode(self, text):
        """Token ids of ``text``, with the special tokens the tokenizer adds."""
        ids = self._tok.encode(text, add_special_tokens=True).ids
        if self.add_bos and (not ids or ids[0] != self.bos_token_id):
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids):
        """Text of ``ids`` (special tokens left out)."""
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def stream(self):
        """A function ``step(token_id) -> str``: the text that token completes ('' while a character is cut)."""
        stream = self._decode_stream(skip_special_tokens=True)
        return lambda token_id: stream.step(self._tok, int(token_id)) or ""
