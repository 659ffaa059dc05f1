"""tokenizer.json and tokenizer_config.json from a GGUF file's tokenizer metadata, for ``mpitp.convert``.

A GGUF file carries its tokenizer as metadata (llama.cpp's convert_hf_to_gguf.py and llama-vocab.cpp define
it): ``tokenizer.ggml.model`` (``gpt2`` is byte-level BPE), ``tokens`` (in id order, spelled as in
tokenizer.json), ``merges`` (``"a b"``, best first), ``token_type`` (1 normal, 3 control: a special token,
4 user-defined: matched whole but not special), ``pre`` (how text is split before the merges), the special
token ids, ``add_bos_token`` and ``chat_template``. The tokenizer is rebuilt with the ``tokenizers`` library
(the ``gguf`` extra), so that it splits and merges as the original model's tokenizer.json did.

Gemma 3's tokenizer is SentencePiece's (``tokenizer.ggml.model`` = ``llama``): tokens spelled with ``▁`` for a
space, ``<0xNN>`` byte tokens for what the vocabulary lacks, scores, and no merges. It is rebuilt as
transformers rebuilds it from a GGUF file (its ``gemma_tokenizer``): a BPE model with byte fallback whose merges
are every split of a token into two tokens, ranked by the token's place in the vocabulary (Gemma's scores do
not follow its merge order); spaces become ``▁`` in a normalizer, nothing splits the text before the merges;
llama.cpp's converter spelled the user-defined runs of spaces with real spaces, so they are spelled with ``▁``
again.
"""

from ..errors import CheckpointError
from .gguf_reader import shown

# How text is split before the merges, by tokenizer.ggml.pre: GPT-2's regex (the ByteLevel pre-tokenizer's
# own), SmolLM's (every digit alone, then GPT-2's), Llama 3's (and its BPE's ignore_merges: a word that is in
# the vocabulary is one token), as those models' tokenizer.json files and llama.cpp's llama-vocab.cpp have them.
PRE_TOKENIZERS = {"gpt-2": "gpt2", "smollm": "smollm", "llama-bpe": "llama3", "llama3": "llama3", "llama-v3": "llama3"}
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
CONTROL, USER_DEFINED = 3, 4


def build_tokenizer(g, n_vocab, n_ctx):
    """``(tokenizers.Tokenizer, tokenizer_config dict)`` from the metadata of the GGUF file ``g`` (a model with
    ``n_vocab`` embedding rows and ``n_ctx`` positions); a ``CheckpointError`` for what cannot be built."""
    try:
        import tokenizers  # noqa: F401
    except ImportError:
        raise CheckpointError(g.path, None, "building tokenizer.json needs the 'tokenizers' library: pip install "
                                            "'mpitp[gguf]' (or pass --no-tokenizer).") from None
    kind = g.get("tokenizer.ggml.model", "str")
    pre = g.get("tokenizer.ggml.pre", "str", "default")
    sentencepiece = kind == "llama" and g.get("general.architecture", "str") == "gemma3"
    if not sentencepiece and (kind != "gpt2" or pre not in PRE_TOKENIZERS):
        raise CheckpointError(g.path, None, f"tokenizer '{shown(kind)}' with pre-tokenizer '{shown(pre)}' is not "
                                            "supported: mpitp.convert builds byte-level BPE ('gpt2') tokenizers "
                                            f"with {', '.join(PRE_TOKENIZERS)}, and Gemma 3's SentencePiece "
                                            "('llama'); pass --no-tokenizer to convert the weights alone.")
    tokens, merges = g.get("tokenizer.ggml.tokens", "strs"), g.get("tokenizer.ggml.merges", "strs", [])
    types = g.get("tokenizer.ggml.token_type", "ints", [1] * len(tokens))
    if sentencepiece:  # runs of spaces as the model's own vocabulary spells them; merges from the vocabulary
        tokens = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in tokens]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(types) != len(tokens) or len(vocab) != len(tokens) or not 0 < len(tokens) <= n_vocab or "" in vocab:
        raise CheckpointError(g.path, None, f"the tokenizer has {len(tokens)} tokens ({len(vocab)} distinct) and "
                                            f"{len(types)} token types; it needs one type per token, distinct "
                                            f"non-empty tokens, and at most the embedding's {n_vocab} rows.")
    pairs = _split_merges(tokens, vocab) if sentencepiece else [tuple(m.split(" ")) for m in merges]
    bad = next((i for i, p in enumerate(pairs) if len(p) != 2 or p[0] not in vocab or p[1] not in vocab
                or p[0] + p[1] not in vocab), None)
    if bad is not None:
        raise CheckpointError(g.path, None, f"merge {bad} of tokenizer.ggml.merges, {merges[bad]!r}, is not two "
                                            "tokens of the vocabulary that join into a third.")
    special = {}
    for role in ("bos", "eos", "unknown", "padding"):
        i = g.get(f"tokenizer.ggml.{role}_token_id", "int", None)
        if i is not None and not 0 <= i < len(tokens):
            raise CheckpointError(g.path, None, f"tokenizer.ggml.{role}_token_id {i} is not a token id "
                                                f"(0..{len(tokens) - 1}).")
        special[role] = None if i is None else tokens[i]
    add = {e: g.get(f"tokenizer.ggml.add_{e}_token", "bool", False) and special[e] is not None for e in ("bos", "eos")}
    try:
        tok = _build(vocab, pairs, types, "sentencepiece" if sentencepiece else PRE_TOKENIZERS[pre], add, special)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # noqa: BLE001 -- the library's errors, Rust panics included (a BaseException)
        raise CheckpointError(g.path, None, f"its tokenizer metadata does not make a tokenizer ({e}).") from None
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": special["bos"], "eos_token": special["eos"],
              "unk_token": special["unknown"], "pad_token": special["padding"], "add_bos_token": add["bos"],
              "add_eos_token": add["eos"], "clean_up_tokenization_spaces": False, "model_max_length": n_ctx}
    template = g.get("tokenizer.chat_template", "str", None)
    return tok, config if template is None else {**config, "chat_template": template}


def _split_merges(tokens, vocab):
    """SentencePiece's implied merges: each token's splits into two tokens, the tokens in vocabulary order and
    a token's splits with the longer left part first (transformers' order, so that its ids are matched)."""
    merges = []
    for token in tokens:
        splits = [(token[:i], token[i:]) for i in range(len(token) - 1, 0, -1)]
        merges += [(a, b) for a, b in splits if a in vocab and b in vocab]
    return merges


def _build(vocab, pairs, types, style, add, special):
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    if style == "sentencepiece":
        tok = Tokenizer(models.BPE(vocab, pairs, byte_fallback=True, unk_token=special["unknown"], fuse_unk=True))
        tok.normalizer = normalizers.Replace(" ", "\u2581")
        tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    else:
        tok = Tokenizer(models.BPE(vocab, pairs, ignore_merges=style == "llama3"))
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=style != "llama3")
        tok.pre_tokenizer = {"gpt2": byte_level, "smollm": pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]), "llama3": pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), "isolated"), byte_level])}[style]
        tok.decoder = decoders.ByteLevel()
    tok.add_tokens([AddedToken(t, special=k == CONTROL, normalized=False) for t, k in zip(vocab, types)
                    if k in (CONTROL, USER_DEFINED)])
    if any(add.values()):  # bos before the text and/or eos after it, as the template processor adds them
        tok.post_processor = processors.TemplateProcessing(
            single=[special["bos"]] * add["bos"] + ["$A"] + [special["eos"]] * add["eos"],
            special_tokens=[(special[e], vocab[special[e]]) for e in ("bos", "eos") if add[e]])
    elif style != "sentencepiece":
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok
