"""Write CLIP's vocabulary as Hugging Face tokenizer files, so a saved folder works with CLIPProcessor."""

from __future__ import annotations

import json
from pathlib import Path

from clipforge.tokenizer.bpe import EOT_TOKEN, SOT_TOKEN, Tokenizer


def save_hf_tokenizer_files(tokenizer: Tokenizer, folder: str | Path, context_length: int = 77) -> list[Path]:
    """vocab.json, merges.txt and the configs transformers' CLIPTokenizer reads from a folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    merges = sorted(tokenizer.bpe_ranks, key=tokenizer.bpe_ranks.__getitem__)
    special = {"bos_token": SOT_TOKEN, "eos_token": EOT_TOKEN, "unk_token": EOT_TOKEN, "pad_token": EOT_TOKEN}
    files = {
        "vocab.json": json.dumps(tokenizer.encoder, ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
        "special_tokens_map.json": json.dumps(special, indent=2),
        "tokenizer_config.json": json.dumps({"tokenizer_class": "CLIPTokenizer", "model_max_length": context_length,
                                             "do_lower_case": True, "errors": "replace", **special}, indent=2),
    }
    written = []
    for name, text in files.items():
        (folder / name).write_text(text + ("" if text.endswith("\n") else "\n"), encoding="utf-8")
        written.append(folder / name)
    return written
