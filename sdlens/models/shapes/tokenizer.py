"""Build SD's CLIP tokenizer offline from the BPE vocabulary that ships in ``open-clip-torch``.

SD 1.x uses ``openai/clip-vit-large-patch14``'s tokenizer: byte-level BPE with 49408 ids,
``<|startoftext|>`` = 49406, ``<|endoftext|>`` = 49407 (also the pad token), 77 positions.
The hub files cannot be downloaded here, but the same vocabulary is the gzip file
``bpe_simple_vocab_16e6.txt.gz`` inside the ``open-clip-torch`` wheel. The id order is the one
OpenAI's reference tokenizer uses: 256 byte characters, the same with ``</w>``, one id per merge
(the first 48894 merges), then the two special tokens.

Run ``python -m sdlens.models.shapes.tokenizer OUT_DIR [--vocab PATH]`` to write ``vocab.json``,
``merges.txt`` and the tokenizer configs that ``CLIPTokenizer.from_pretrained(OUT_DIR)`` reads.
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

from sdlens.analysis.tokens import bytes_to_unicode

N_MERGES = 49152 - 256 - 2  # = 48894, the merges OpenAI's tokenizer uses
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def find_open_clip_vocab() -> Path:
    """Path of ``bpe_simple_vocab_16e6.txt.gz`` in an installed ``open_clip`` package."""
    import importlib.util

    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "open_clip is not installed; `pip install --no-deps open-clip-torch` provides "
            "bpe_simple_vocab_16e6.txt.gz, or pass --vocab PATH"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found in the installed open_clip package")
    return path


def build_vocab(vocab_gz: str | Path) -> tuple[dict[str, int], list[str]]:
    """Return ``(token -> id, merge lines)`` exactly as OpenAI's CLIP tokenizer orders them."""
    lines = gzip.open(vocab_gz, "rt", encoding="utf-8").read().split("\n")
    merges = lines[1 : 1 + N_MERGES]  # line 0 is a version header
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars]
    tokens += ["".join(m.split()) for m in merges]
    tokens += [BOS, EOS]
    if len(tokens) != 49408:
        raise ValueError(f"expected 49408 tokens, built {len(tokens)} from {vocab_gz}")
    return {t: i for i, t in enumerate(tokens)}, merges


def write_tokenizer(out_dir: str | Path, vocab_gz: str | Path | None = None) -> Path:
    """Write a ``CLIPTokenizer`` folder (vocab.json, merges.txt, configs) to ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab(vocab_gz or find_open_clip_vocab())
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "do_lower_case": True,
        "errors": "replace",
        "add_prefix_space": False,
        **special,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--vocab", default=None, help="path of bpe_simple_vocab_16e6.txt.gz")
    args = parser.parse_args()
    print(write_tokenizer(args.out_dir, args.vocab))


if __name__ == "__main__":
    main()
