"""A checkpoint's Hugging Face tokenizer: load it, encode prompts (one or a padded batch), decode answers.

Expected failures (no tokenizer, an unreadable one, no chat template) raise ``TokenizerError``, a
``ValueError`` that the ``surelock`` command reports as one line.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .models.llada import read_json_object

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
TOKENIZER_JSON = ("tokenizer_config.json", "tokenizer.json", "special_tokens_map.json", "vocab.json")


class TokenizerError(ValueError):
    """The checkpoint's tokenizer is missing or unreadable, or lacks what the prompt needs."""


def load_tokenizer(path: str | Path):
    """The Hugging Face tokenizer saved in the checkpoint directory, from local files only.

    Its class comes from tokenizer_config.json: AutoTokenizer is given an empty model config, since
    the checkpoint's config.json (model_type 'llada', remote code) is not one transformers can read.
    """
    from transformers import AutoTokenizer, PretrainedConfig  # slow to import: only when a tokenizer is loaded

    path = Path(path)
    if not path.is_dir():
        raise TokenizerError(f"checkpoint directory {path} does not exist")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise TokenizerError(
            f"{path} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); save the model's tokenizer "
            "there with tokenizer.save_pretrained"
        )
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True, config=PretrainedConfig())
    except Exception as err:  # transformers and tokenizers fail on bad files with any exception type
        reason = first_line(err)
    for name in TOKENIZER_JSON:  # name the file if one of them is the culprit
        if (path / name).is_file():
            read_json_object(path / name, TokenizerError)
    raise TokenizerError(f"could not load the tokenizer in {path} ({reason}); restore its files or save them "
                         "again with tokenizer.save_pretrained")


def first_line(err: BaseException) -> str:
    """The first line of the error's message, or its type's name if it has none."""
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]


def encode_prompt(tokenizer, prompt: str, chat: bool) -> list[int]:
    """Token ids of the prompt; with ``chat``, wrapped as a user turn by the tokenizer's chat template."""
    if not chat:
        return list(tokenizer(prompt)["input_ids"])
    if not getattr(tokenizer, "chat_template", None):
        raise TokenizerError("--chat needs a tokenizer with a chat_template; this tokenizer has none")
    encoded = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True, return_dict=True
    )
    return list(encoded["input_ids"])


def encode_batch(tokenizer, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompt ids [B, P] (chat template when the tokenizer has one) and the attention mask."""
    chat = bool(getattr(tokenizer, "chat_template", None))
    rows = [encode_prompt(tokenizer, p, chat) for p in prompts]
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row)
        mask[i, width - len(row):] = 1
    return ids, mask


def decode_answer(tokenizer, generated: list[int], stop_ids) -> str:
    """The generated text up to (not including) the first stop token, special tokens skipped."""
    stops = {i for i in stop_ids if i is not None}
    end = next((pos for pos, tok in enumerate(generated) if tok in stops), len(generated))
    return tokenizer.decode(generated[:end], skip_special_tokens=True).strip()
