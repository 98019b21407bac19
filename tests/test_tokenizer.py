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
from clipforge.tokenizer.bpe import (
    _PRETOKEN_PAT,
    DEFAULT_BPE_PATH,
    DEFAULT_MERGES_SHA256,
    DEFAULT_WHOLE_WORD_EXCEPTIONS,
    NUM_MERGES,
    byte_encode,
    compute_whole_word_exceptions,
    is_fast_text,
)

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


# -- fast paths: each shortcut proved against the plain algorithm -----------------------------------


def test_whole_word_shortcut_holds_for_every_vocabulary_token(ref):
    """If ``w</w>`` is a token, BPE of ``w`` is that one token: proved for all 34,483 such tokens, against
    OpenAI's own ``bpe`` and against clipforge's merge loop (no shortcut); the shipped exceptions are exact."""
    _, simple = ref
    tok = Tokenizer()
    words = [t for t in tok.encoder if t.endswith("</w>") and len(t) > 4]
    assert len(words) == 34483
    not_single = [t for t in words if simple.bpe(t[:-4]) != t]
    assert sorted(not_single) == sorted(DEFAULT_WHOLE_WORD_EXCEPTIONS) == []
    assert compute_whole_word_exceptions(tok) == DEFAULT_WHOLE_WORD_EXCEPTIONS
    assert tok._merges_sha256 == DEFAULT_MERGES_SHA256 and tok.whole_word_exceptions == DEFAULT_WHOLE_WORD_EXCEPTIONS


def test_merge_loop_matches_openai_bpe(ref, captions):
    """The incremental merge loop (no shortcut) equals OpenAI's ``bpe`` on every vocabulary word, each
    word's prefixes and suffixes, and every caption pretoken, upper-cased too (nothing is in the vocabulary)."""
    _, simple = ref
    tok = Tokenizer()
    vocab_words = [t[:-4] for t in tok.encoder if t.endswith("</w>") and len(t) > 4]
    words = set(vocab_words)
    words.update(w[:k] for w in vocab_words[::7] for k in range(1, len(w)))
    words.update(w[k:] for w in vocab_words[::11] for k in range(1, len(w)))
    pretokens = {p for text in captions[:5000] for p in _PRETOKEN_PAT.findall(text.lower())}
    words.update(byte_encode(p) for p in pretokens)
    words.update(byte_encode(p.upper()) for p in pretokens)
    words.update(["aaaaaaaaaaaaaaaaa", "abababababab", "\u0100" * 9, "!!!!!!!!!!!!!!"])
    for word in sorted(words):
        expected = tuple(tok.encoder[s] for s in simple.bpe(word).split(" "))
        assert tok._merge_word(word) == expected, repr(word)


def test_pair_ranks_equal_openai_bpe_ranks(ref):
    """The on-demand pair table agrees with OpenAI's ``bpe_ranks`` on every merge and on non-merges."""
    _, simple = ref
    tok = Tokenizer()
    assert "bpe_ranks" not in tok.__dict__ and "_pair_ranks" not in tok.__dict__  # lazy
    ranks = tok._pair_ranks
    for pair, rank in simple.bpe_ranks.items():
        assert ranks[" ".join(pair)] == rank
    vocab = list(tok.encoder)
    rng = random.Random(3)
    for _ in range(20000):
        pair = (rng.choice(vocab), rng.choice(vocab))
        assert (ranks[" ".join(pair)] == simple.bpe_ranks[pair]) if pair in simple.bpe_ranks else ranks[" ".join(pair)] >= NUM_MERGES
    assert tok.bpe_ranks == simple.bpe_ranks


def test_ascii_letter_chunk_is_one_pretoken():
    """The regex is skipped for an all-ASCII-letters chunk: the pattern gives that chunk as its one match."""
    from clipforge.tokenizer.factory import _PRETOKEN_PAT as OPEN_CLIP_PAT

    rng = random.Random(5)
    letters = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
    chunks = [c for c in letters] + ["s", "t", "re", "ve", "m", "ll", "d", "S", "LL", "startoftext", "endoftext"]
    chunks += ["".join(rng.choice(letters) for _ in range(rng.randint(1, 30))) for _ in range(20000)]
    for chunk in chunks:
        assert chunk.isalpha() and chunk.isascii()
        assert _PRETOKEN_PAT.findall(chunk) == [chunk] == OPEN_CLIP_PAT.findall(chunk), chunk


def test_construction_is_lazy_and_tables_agree():
    """Construction builds the encoder only; the rank and decoder tables appear on first need."""
    tok = Tokenizer()
    tok.tokenize(["a dog on the grass", "the cat"])  # whole vocabulary words: no merge table needed
    assert not {"bpe_ranks", "_pair_ranks", "decoder"} & set(tok.__dict__)
    tok.tokenize("skateboarder")  # not a token: merges
    assert "_pair_ranks" in tok.__dict__ and "bpe_ranks" not in tok.__dict__
    assert tok.decoder == {i: t for t, i in tok.encoder.items()} == get_tokenizer().decoder


def test_other_merge_file_is_read_like_openai(tmp_path, ref):
    """A merge file other than the shipped one (here: CRLF lines, doubled spaces) is normalised like
    OpenAI's ``split()``, gets its whole-word exceptions computed, and gives the same ids."""
    import gzip

    clip, _ = ref
    with gzip.open(DEFAULT_BPE_PATH, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    crlf = tmp_path / "crlf.txt.gz"
    with gzip.open(crlf, "wb") as f:
        f.write("\r\n".join([lines[0], *(line.replace(" ", "  ") for line in lines[1:NUM_MERGES + 1])]).encode())
    tok = Tokenizer(crlf)
    assert tok._merges_sha256 != DEFAULT_MERGES_SHA256 and tok._exceptions is None
    assert tok.encoder == get_tokenizer().encoder and tok.bpe_ranks == get_tokenizer().bpe_ranks
    texts = HARD_CASES + ["skateboarders somersaulting", "ｆｕｌｌ"]
    _assert_same(tok.tokenize(texts, truncate=True), clip.tokenize(texts, truncate=True), texts)
    assert tok.whole_word_exceptions == frozenset()
    short = tmp_path / "short.txt.gz"
    with gzip.open(short, "wt", encoding="utf-8") as f:
        f.write("\n".join(lines[:1000]))
    with pytest.raises(TokenizerError, match="49408-token vocabulary"):
        Tokenizer(short)
    with pytest.raises(TokenizerError, match="cannot read"):
        Tokenizer(tmp_path / "missing.txt.gz")


def test_all_flickr8k_captions_cold_match_openai(ref, captions):
    """Every Flickr8k caption (40,455), by a new tokenizer (empty caches), equals OpenAI's ids; the
    batch of all-fast texts and a mixed batch take different paths."""
    clip, _ = ref
    assert len(captions) == 40455
    expected = clip.tokenize(captions, truncate=True)
    _assert_same(Tokenizer().tokenize(captions, truncate=True), expected, captions)
    mixed = captions[:3000] + ["Tom &amp; Jerry", "café"]
    _assert_same(Tokenizer().tokenize(mixed, truncate=True), clip.tokenize(mixed, truncate=True), mixed)
    upper = [c.upper() for c in captions[:3000]]  # no upper-case word is a token: every word merges
    _assert_same(Tokenizer().tokenize(upper, truncate=True), clip.tokenize(upper, truncate=True), upper)


def test_merge_file_in_two_gzip_members(tmp_path):
    """gzip allows concatenated members (gzip.open reads them all); the prefix reader does too."""
    import gzip

    data = gzip.decompress(DEFAULT_BPE_PATH.read_bytes())
    cut = data.index(b"\n", 1000) + 1
    two = tmp_path / "two.txt.gz"
    two.write_bytes(gzip.compress(data[:cut]) + gzip.compress(data[cut:]))
    tok = Tokenizer(two)
    assert tok._merges_sha256 == DEFAULT_MERGES_SHA256 and tok.encoder == get_tokenizer().encoder
