"""clipforge.tokenizer must give OpenAI's ids for every input; the reference is clip-anytorch."""

from __future__ import annotations

import csv
import html
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from clipforge.errors import TokenizerError
from clipforge.tokenizer import (
    EOT_TOKEN_ID,
    SOT_TOKEN_ID,
    Tokenizer,
    decode,
    decode_batch,
    get_tokenizer,
    tokenize,
    vocab_size,
)
from clipforge.tokenizer.bpe import is_fast_text

CAPTIONS_TSV = Path(__file__).resolve().parents[2] / "shared/data/flickr8k/captions.tsv"

HARD_CASES = [
    "",
    " ",
    "     ",
    "\t\n\r\n ",
    "A dog runs.",
    "Tom &amp; Jerry",
    "Tom &amp;amp; Jerry &lt;b&gt; &quot;hi&quot; &#39;x&#39; &#x2019; &eacute; &nbsp;x &copy &NTILDE;",
    "<b>bold</b> &amp; <i>it</i>",
    "line one &amp;\nline <two> &amp;amp;",
    "cafÃ© Ã©tÃ© â€œquotedâ€\x9d",
    "“curly” ‘quotes’ — dash … ellipsis",
    "emoji 😀👍🏽🇫🇷 ❤️ family 👨‍👩‍👧",
    "中文字符 日本語のテキスト 한국어",
    "مرحبا بالعالم",
    "àéîõü ÀÉÎÕÜ naïve façade",
    "12345 3.14 1,000,000 ٣٤٥ ½ ²",
    "DON'T YOU'LL I'M WE'VE THEY'RE HE'D IT'S dog's",
    "don't stop 'til ''s 'S 'sss s'",
    "text <|endoftext|> more <|ENDOFTEXT|> <|startoftext|>",
    "!<|endoftext|>! <|endoftext|><|endoftext|>",
    "tab\tseparated\nnew\r\nlines\x0bvt\x0cff\x85nel\u2028ls",
    "\x00null \x1b[31mred\x1b[0m \x07bell \x7f del \x1c\x1d\x1e\x1f",
    "supercalifragilisticexpialidocious" * 4,
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "!!!!!!!!!!!!!!!!!!!!!!!....????",
    "ﬁne ﬂow ﬀ",
    "ＡＢＣ ｆｕｌｌｗｉｄｔｈ　ｓｐａｃｅ １２３",
    "İstanbul ıi İI",
    "straße STRASSE ß ẞ",
    "non\u00a0breaking\u00a0space",
    "zero\u200bwidth\u200cjoiner\u200d",
    "astral 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝟙𝟚𝟛 𐍈",
    "Ǆ ǅ ǆ ΣΑΣ ſ K Å",
    "e\u0301 combining a\u0308",
    "http://example.com/path?q=1&r=2 user@mail.com",
    "#hashtag @mention $100 50% C++ a/b\\c",
    "\ufeffBOM text \ufffd replacement",
]


def _openai():
    clip = pytest.importorskip("clip")
    from clip.simple_tokenizer import SimpleTokenizer

    return clip, SimpleTokenizer()


@pytest.fixture(scope="module")
def ref():
    return _openai()


@pytest.fixture(scope="module")
def captions() -> list[str]:
    if not CAPTIONS_TSV.exists():
        pytest.skip(f"Flickr8k captions not found at {CAPTIONS_TSV}")
    with CAPTIONS_TSV.open(newline="", encoding="utf-8") as f:
        return [row["caption"] for row in csv.DictReader(f, delimiter="\t")]


def _random_texts(n: int, seed: int, ascii_only: bool) -> list[str]:
    rng = random.Random(seed)
    printable = [chr(c) for c in range(32, 127)]
    pieces = ["&amp;", "&amp;amp;", "&lt;", "&gt;", "&quot;", "&#39;", "&#x2019;", "&eacute;", "&nbsp;", "&copy",
              "<|endoftext|>", "<|startoftext|>", "'s", "'T", "'LL", "\t", "\n", "\r\n", "  "]
    unicode = list("éüßİıﬁＡ中文字😀👍🏽\u200b\u00a0’“”—…Ã©â€™\x00\x1bΣſ٣½ąčё")
    words = ["dog", "Dog", "DOG", "running", "a", "the", "12", "x", "photograph", "don't", "!!"]
    out = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(0, 25)):
            r = rng.random()
            if ascii_only:
                parts.append(rng.choice(printable) if r < 0.7 else rng.choice(words))
            elif r < 0.45:
                parts.append(rng.choice(printable))
            elif r < 0.65:
                parts.append(rng.choice(unicode))
            elif r < 0.85:
                parts.append(rng.choice(pieces))
            else:
                parts.append(rng.choice(words))
        out.append("".join(parts))
    return out


def _assert_same(ours: torch.Tensor, theirs: torch.Tensor, texts: list[str]) -> None:
    assert ours.dtype == torch.int32 and ours.shape == theirs.shape
    bad = (ours.long() != theirs.long()).any(dim=1).nonzero().flatten().tolist()
    assert not bad, f"{len(bad)} rows differ, first: {texts[bad[0]]!r}"


def test_constants_and_vocab(ref):
    _, simple = ref
    tok = get_tokenizer()
    assert vocab_size == Tokenizer.vocab_size == len(tok.encoder) == 49408
    assert (SOT_TOKEN_ID, EOT_TOKEN_ID) == (49406, 49407)
    assert tok.encoder == simple.encoder
    assert tok.bpe_ranks == simple.bpe_ranks


def test_default_tokenizer_is_lazy():
    code = "import clipforge.tokenizer as t; assert t._default is None; t.tokenize('x'); assert t._default"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_hard_cases_match_openai(ref):
    clip, simple = ref
    for text in HARD_CASES:
        assert get_tokenizer().encode(text) == simple.encode(text), repr(text)
    _assert_same(tokenize(HARD_CASES, truncate=True), clip.tokenize(HARD_CASES, truncate=True), HARD_CASES)


def test_empty_and_blank_text():
    row = tokenize("")[0].tolist()
    assert row[:2] == [SOT_TOKEN_ID, EOT_TOKEN_ID] and not any(row[2:])
    assert torch.equal(tokenize(["", "   ", "\n\t"]), tokenize([""] * 3))
    assert tokenize([]).shape == (0, 77)


def test_flickr8k_captions_match_openai(ref, captions):
    clip, _ = ref
    _assert_same(tokenize(captions, truncate=True), clip.tokenize(captions, truncate=True), captions)
    # A fresh instance (cold caches, small bound so the caches get cleared) must agree too.
    _assert_same(Tokenizer(cache_size=500).tokenize(captions[:5000]), clip.tokenize(captions[:5000]), captions)


@pytest.mark.parametrize("ascii_only", [False, True])
def test_random_texts_match_openai(ref, ascii_only):
    clip, _ = ref
    texts = _random_texts(2500, seed=1234 + ascii_only, ascii_only=ascii_only)
    _assert_same(tokenize(texts, truncate=True), clip.tokenize(texts, truncate=True), texts)


def test_ascii_fast_path_skips_only_identities():
    """The fast path assumes ftfy.fix_text and html.unescape do nothing to printable ASCII without '&'."""
    ftfy = pytest.importorskip("ftfy")
    chars = [chr(c) for c in range(32, 127) if chr(c) != "&"]
    texts = [a + b for a in chars for b in chars] + _random_texts(3000, seed=7, ascii_only=True)
    texts = [t for t in texts if is_fast_text(t)]
    assert len(texts) > 9000
    for text in texts:
        assert ftfy.fix_text(text) == text and html.unescape(text) == text, repr(text)
    for text in ["a&b", "é", "a\tb", "a\nb", "\x00", "\x7f"]:
        assert not is_fast_text(text)


@pytest.mark.parametrize("context_length", [1, 2, 3, 5, 16, 77, 100])
def test_context_length_and_truncation(ref, captions, context_length):
    clip, _ = ref
    texts = HARD_CASES + captions[:300]
    _assert_same(tokenize(texts, context_length, truncate=True),
                 clip.tokenize(texts, context_length, truncate=True), texts)
    row = tokenize("a " * 200, context_length, truncate=True)[0]
    assert row[-1].item() == EOT_TOKEN_ID and row.shape == (context_length,)


def test_too_long_raises_openai_message(ref):
    clip, _ = ref
    texts = ["short", "word " * 80, "also " * 90]
    with pytest.raises(RuntimeError) as theirs:
        clip.tokenize(texts)
    with pytest.raises(TokenizerError) as ours:
        tokenize(texts)
    assert str(ours.value) == str(theirs.value) == f"Input {texts[1]} is too long for context length 77"
    assert isinstance(ours.value, RuntimeError)
    tokenize("word " * 75)  # 75 + SOT + EOT fits exactly
    with pytest.raises(TokenizerError):
        tokenize("word " * 76)


def test_decode_matches_openai(ref, captions):
    _, simple = ref
    texts = HARD_CASES + captions[:3000] + _random_texts(500, seed=99, ascii_only=False)
    rows = tokenize(texts, context_length=400)
    got = decode_batch(rows)
    for text, row, ours in zip(texts, rows, got):
        expected = simple.decode(simple.encode(text))
        assert ours == expected == decode(row) == decode(row.tolist()), repr(text)
    ids = list(range(vocab_size))
    assert get_tokenizer().decode(ids) == simple.decode(ids)
    assert decode([SOT_TOKEN_ID, 320, 1929, EOT_TOKEN_ID, 0, 0]) == "a dog "
    assert decode([320, 1929, 0, 0]) == "a dog "  # padding without EOT


def test_cache_stays_bounded():
    tok = Tokenizer(cache_size=50)
    texts = [f"word{i} x{i}y zz{i}" for i in range(400)]
    first = tok.tokenize(texts)
    assert len(tok.cache) <= 50 and len(tok._chunk_cache) <= 50
    assert torch.equal(first, tok.tokenize(texts)) and torch.equal(first, tokenize(texts))


def test_rejects_bad_arguments():
    with pytest.raises(TypeError):
        tokenize([b"bytes"])  # type: ignore[list-item]
    with pytest.raises(TokenizerError):
        tokenize("x", context_length=0)


def test_matches_huggingface_on_flickr8k(captions, tmp_path):
    """HF's CLIPTokenizer has no ftfy step, but on plain captions its ids must equal ours."""
    transformers = pytest.importorskip("transformers")
    from clipforge.tokenizer.hf_files import save_hf_tokenizer_files

    tok = get_tokenizer()
    save_hf_tokenizer_files(tok, tmp_path)  # the files clipforge.save(format="hf") writes
    hf = transformers.CLIPTokenizer.from_pretrained(str(tmp_path))
    hf_ids = hf(captions)["input_ids"]
    ours = [[SOT_TOKEN_ID, *tok.encode(c), EOT_TOKEN_ID] for c in captions]
    mismatches = [c for c, h, o in zip(captions, hf_ids, ours) if h != o]
    assert not mismatches, f"{len(mismatches)} captions differ from HF, first: {mismatches[0]!r}"
