"""The tokenizer half of a GGUF (export/gguf.py writes the rest): a byte-level BPE vocabulary with
its merges and llama.cpp's pre-tokenizer name, or a SentencePiece one with each piece's score and
type, and in both the special ids, the add-BOS/EOS flags the tokenizer really applies and the
chat template (gguf-py's SpecialVocab, as llama.cpp's converter uses it)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tunery.export import ExportError

# llama.cpp's pre-tokenizer names, recognised from the pre-tokenizer a tokenizer.json declares.
# A runtime picks its split regex by this name, so an unknown one is refused rather than guessed.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")


def load_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ExportError(f"cannot read {path}: {exc}") from None


def read_vocab(model_dir: Path, config: dict) -> dict:
    """The BPE vocabulary in GGUF's terms: tokens by id, their types, the pre-tokenizer name, and
    the special ids, flags, merges and chat template (gguf-py's SpecialVocab, as llama.cpp uses)."""
    import gguf

    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise ExportError(f"cannot export {model_dir}: it has no tokenizer.json (a GGUF needs the BPE tokenizer)")
    data = load_json(path)
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise ExportError(
            f"cannot export {model_dir}: its tokenizer is {model.get('type')!r}, not BPE (tokenizer.json "
            "model.type); only byte-level BPE tokenizers are written"
        )
    if model.get("byte_fallback"):
        return _sentencepiece_vocab(model_dir, config, data)
    pre = _pre_tokenizer_name(data.get("pre_tokenizer"))
    if pre is None:
        raise ExportError(
            f"cannot export {model_dir}: its pre-tokenizer ({_describe_pre(data.get('pre_tokenizer'))}) is not one "
            "a GGUF runtime can be told about (known: GPT-2 byte-level, SmolLM/StarCoder digits, Llama 3, Qwen2)"
        )
    by_id: dict[int, str] = {int(i): t for t, i in model.get("vocab", {}).items()}
    added = {int(a["id"]): a for a in data.get("added_tokens", [])}
    for i, a in added.items():
        by_id[i] = a["content"]
    size = max(int(config["vocab_size"]), max(by_id) + 1 if by_id else 0)
    tokens: list[str] = []
    types: list[int] = []
    for i in range(size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=size)
    if not special.merges:
        raise ExportError(f"cannot export {model_dir}: tokenizer.json has no BPE merges")
    # The flags llama.cpp reads to decide whether to prepend BOS / append EOS: what the tokenizer
    # really does, rather than SpecialVocab's reading of its post-processor.
    special.add_special_token = _adds_special(model_dir, special.special_token_ids)
    return {"tokens": tokens, "types": types, "pre": pre, "special": special}


def _sentencepiece_vocab(model_dir: Path, config: dict, data: dict) -> dict:
    """A SentencePiece tokenizer (Llama 2, Mistral, Gemma, Phi-3: BPE with byte fallback) as
    llama.cpp's converter writes it: tokenizer.ggml.model "llama", every piece of tokenizer.model
    with its score (a runtime merges by score) and type (normal, unknown, control, unused, byte),
    then the added tokens (control when special, else user-defined), padded to the config's
    vocabulary with unused [PADn] pieces."""
    import gguf
    from sentencepiece import SentencePieceProcessor

    path = model_dir / "tokenizer.model"
    if not path.is_file():
        raise ExportError(f"cannot export {model_dir}: its tokenizer is SentencePiece-style (byte fallback) and the "
                          "folder has no tokenizer.model, whose piece scores a GGUF runtime tokenizes with")
    T = gguf.TokenType
    sp = SentencePieceProcessor(model_file=str(path))
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(float(sp.get_score(i)))
        types.append(T.UNKNOWN if sp.is_unknown(i) else T.CONTROL if sp.is_control(i) else
                     T.UNUSED if sp.is_unused(i) else T.BYTE if sp.is_byte(i) else T.NORMAL)
    added = {int(a["id"]): a for a in data.get("added_tokens", [])}
    size = max(int(config["vocab_size"]), sp.vocab_size(), max(added) + 1 if added else 0)
    for i in range(sp.vocab_size(), size):
        tokens.append(f"[PAD{i}]")
        scores.append(-1000.0)
        types.append(T.UNUSED)
    for i, a in added.items():  # the added tokens, new or taking an existing piece's place (Gemma's turns)
        if types[i] in (T.UNKNOWN, T.BYTE) or (types[i] == T.CONTROL and tokens[i] == a["content"]):
            continue
        tokens[i], scores[i] = a["content"], -1000.0
        types[i] = T.CONTROL if a.get("special") else T.USER_DEFINED
    special = gguf.SpecialVocab(model_dir, load_merges=False, n_vocab=size)
    special.add_special_token = _adds_special(model_dir, special.special_token_ids)
    # Whether the model prepends "▁" to a text (its normalizer's add_dummy_prefix: on for Llama 2,
    # Mistral and Phi-3, off for Gemma); llama.cpp assumes it unless told.
    space_prefix = sp.encode("a", out_type=str)[:1] == ["\u2581a"]
    return {"model": "llama", "tokens": tokens, "scores": scores, "types": types, "pre": None, "special": special,
            "add_space_prefix": space_prefix}


def _pre_tokenizer_name(pre: Any) -> str | None:
    steps = pre.get("pretokenizers", []) if isinstance(pre, dict) and pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") if isinstance(s, dict) else None for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        regex = (steps[0].get("pattern") or {}).get("Regex")
        if regex == LLAMA3_SPLIT:
            return "llama-bpe"
        if regex == QWEN2_SPLIT:
            return "qwen2"
    return None


def _describe_pre(pre: Any) -> str:
    if not isinstance(pre, dict):
        return "none"
    if pre.get("type") == "Sequence":
        return " + ".join(str(s.get("type")) for s in pre.get("pretokenizers", []))
    return str(pre.get("type"))


def _adds_special(model_dir: Path, ids: dict[str, int]) -> dict[str, bool]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    enc = tok.encode("hello", add_special_tokens=True).ids
    flags = {"bos": bool(enc) and ids.get("bos") is not None and enc[0] == ids["bos"],
             "eos": bool(enc) and ids.get("eos") is not None and enc[-1] == ids["eos"]}
    cfg_path = model_dir / "tokenizer_config.json"
    if cfg_path.is_file():  # transformers adds these itself for some tokenizers (e.g. LlamaTokenizer)
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        for typ in ("bos", "eos"):
            if isinstance(cfg.get(f"add_{typ}_token"), bool):
                flags[typ] = cfg[f"add_{typ}_token"]
    return flags


def add_vocab(writer: Any, vocab: dict) -> None:
    writer.add_tokenizer_model(vocab.get("model", "gpt2"))
    if vocab["pre"]:
        writer.add_tokenizer_pre(vocab["pre"])
    writer.add_token_list(vocab["tokens"])
    if "scores" in vocab:
        writer.add_token_scores(vocab["scores"])
    writer.add_token_types(vocab["types"])
    if "add_space_prefix" in vocab:
        writer.add_add_space_prefix(vocab["add_space_prefix"])
    vocab["special"].add_to_gguf(writer, quiet=True)
