"""clipforge.tokenizer.factory must give open_clip 3.3.0's ids for every model's tokenizer.

open_clip is the reference (imported here only). Hugging Face tokenizers are built locally in a
temporary folder (a BERT WordPiece like CLIPA's, a Unigram like mT5's), since tests cannot reach the Hub.
"""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import pytest
import torch

import clipforge
from clipforge.errors import TokenizerError, UnknownModelError
from clipforge.models import config_from_dict
from clipforge.models.config import ModelConfig
from clipforge.tokenizer.factory import CLIPTokenizer, HFTokenizer, get_tokenizer
from conftest import flickr_captions

open_clip = pytest.importorskip("open_clip")
transformers = pytest.importorskip("transformers")

HARD_CASES = [
    "", " ", "\t\n ", "A dog runs.", "x " * 200 + "end", "word " * 76, "word " * 75,
    "Tom &amp; Jerry &amp;amp; &lt;b&gt; &quot;hi&quot; &#39;x&#39; &eacute; &#28;", "cafÃ© â€œquotedâ€\x9d",
    "emoji 🐶🐱👍🏽 and ❤️", "日本語のテキスト 中文字幕 한국어", "<|endoftext|> inside <|startoftext|> text",
    "<start_of_text> open_clip's own <end_of_text> specials", "<START_OF_TEXT> Mixed <End_Of_Text>",
    "snake_case_word, __dunder__ (yes!) -- it's 'quoted' & \"double\"", "tab\there\nnew\u00a0nbsp\u3000ideo\x1cfs",
    "ΣΑΣ ΑΣ İstanbul ﬁ ＦＵＬＬ", "don't I'LL we'Re YOU'VE", "\u200b zero width \ufeff bom",
]
SUBJECTS = ["a dog", "two children", "a man", "the woman", "a brown cat", "three girls", "an old bike", "a surfer"]
VERBS = ["runs", "plays", "jumps", "sits", "is walking", "rides", "looks", "stands"]
PLACES = ["on the grass", "in a park", "near the water", "at the beach", "down the street", "under a tree"]
WORDS = sorted({w for phrase in SUBJECTS + VERBS + PLACES for w in phrase.split()})


def synthetic_captions() -> list[str]:
    """Captions that exist without the shared data folder: every subject/verb/place combination."""
    captions = [f"{s} {v} {p}." for s, v, p in itertools.product(SUBJECTS, VERBS, PLACES)]
    random.Random(0).shuffle(captions)
    return captions


def hf_texts() -> list[str]:
    """Short, long (over any context here) and hard captions for the HF comparisons."""
    long = " and ".join(synthetic_captions()[:30])
    return synthetic_captions()[:100] + [long, long.upper()] + HARD_CASES


def text_config(**text: object) -> ModelConfig:
    data = {"embed_dim": 32, "vision": None,
            "text": {"context_length": 77, "vocab_size": 49408, "width": 64, "layers": 1, "heads": 1, **text}}
    return config_from_dict(data, name="text-only")


def assert_same(actual: torch.Tensor, expected: torch.Tensor, texts: list[str]) -> None:
    assert actual.dtype == expected.dtype == torch.int64
    assert actual.shape == expected.shape
    bad = [texts[i] for i in range(len(texts)) if not torch.equal(actual[i], expected[i])]
    assert not bad, f"{len(bad)} texts differ from open_clip, first: {bad[0]!r}"


# -- CLIP BPE -----------------------------------------------------------------------------------


@pytest.mark.parametrize("context_length", [77, 32])
def test_clip_bpe_matches_open_clip_on_flickr(context_length: int) -> None:
    """Built-in-style configs must tokenize real captions exactly as open_clip's models do."""
    texts = flickr_captions(2000) + HARD_CASES
    ours = get_tokenizer(text_config(context_length=context_length))
    if context_length == 77:
        reference = open_clip.get_tokenizer("ViT-B-32")
    else:
        reference = open_clip.tokenizer.SimpleTokenizer(context_length=context_length)
    assert isinstance(ours, CLIPTokenizer) and ours.context_length == context_length
    assert_same(ours(texts), reference(texts), texts)


@pytest.mark.parametrize("clean", ["lower", "whitespace", "canonicalize"])
@pytest.mark.parametrize("context_length", [77, 16, 2, 1])
def test_clip_bpe_clean_modes_and_truncation(clean: str, context_length: int) -> None:
    """Each clean mode and tiny contexts (EOT forced into the last slot) follow SimpleTokenizer(clean=...)."""
    texts = HARD_CASES + synthetic_captions()[:50]
    reference = open_clip.tokenizer.SimpleTokenizer(context_length=context_length, clean=clean)
    ours = get_tokenizer(context_length=context_length, clean=clean)
    assert_same(ours(texts), reference(texts), texts)
    for text in HARD_CASES:
        assert ours.encode(text) == reference.encode(text), text
        row = reference([text])[0]
        assert ours.decode(row) == reference.decode(row.tolist()), text


def test_clip_bpe_call_context_override_and_specials() -> None:
    """A per-call context wins; a literal <|endoftext|> is text for open_clip (unlike OpenAI's clip.tokenize)."""
    ours, reference = get_tokenizer(), open_clip.tokenizer.SimpleTokenizer()
    text = "a <|endoftext|> b"
    assert_same(ours(text, context_length=5), reference(text, context_length=5), [text])
    assert 49407 not in ours.encode(text) and ours.encode("<end_of_text>") == [49407]
    assert 49407 in clipforge.tokenize(text)[0, 1:3].tolist()  # OpenAI semantics stay in clipforge.tokenize
    assert ours.vocab_size == reference.vocab_size == 49408
    assert ours([]).shape == (0, 77)


def test_builtin_architecture_name_and_cache() -> None:
    """A name resolves through get_model_config; equal requests share one cached tokenizer."""
    ours = get_tokenizer("ViT-B-32")
    assert ours is get_tokenizer("ViT-B-32") and ours.context_length == 77
    assert get_tokenizer("ViT-B-32", context_length=32) is not ours
    texts = HARD_CASES
    assert_same(ours(texts), open_clip.get_tokenizer("ViT-B-32")(texts), texts)


# -- Hugging Face tokenizers built locally -------------------------------------------------------


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A small lowercase WordPiece vocab saved like bert-base-uncased ([PAD]=0, [CLS], [SEP])."""
    folder = tmp_path_factory.mktemp("bert")
    pieces = ["##s", "##ing", "##ed", "##er", "##y", "##e", "##a", "##o", "##t", "##n"]
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "!", "'", "-", "(", ")", "&", "_"]
    vocab += WORDS + pieces + letters + ["##" + c for c in letters] + [str(d) for d in range(10)]
    vocab_file = folder / "vocab.txt"
    vocab_file.write_text("\n".join(dict.fromkeys(vocab)) + "\n", encoding="utf-8")
    transformers.BertTokenizerFast(vocab_file=str(vocab_file), do_lower_case=True).save_pretrained(folder / "tok")
    return str(folder / "tok")


@pytest.fixture(scope="module")
def unigram_folder(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny sentencepiece-style Unigram (Metaspace, </s> appended) saved like mT5's tokenizer."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    folder = tmp_path_factory.mktemp("unigram")
    tokenizer = Tokenizer(models.Unigram())
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=200, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>")
    tokenizer.train_from_iterator(synthetic_captions(), trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    wrapped = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>",
                                                   eos_token="</s>", unk_token="<unk>")
    wrapped.save_pretrained(folder / "tok")
    return str(folder / "tok")


def test_bert_clipa_style_matches_open_clip(bert_folder: str) -> None:
    """CLIPA: BERT ids, [SEP] replaced by padding, 32 tokens, long captions truncated."""
    config = text_config(context_length=32, hf_tokenizer_name=bert_folder, tokenizer_kwargs={"strip_sep_token": True})
    ours = get_tokenizer(config)
    reference = open_clip.tokenizer.HFTokenizer(bert_folder, context_length=32, strip_sep_token=True)
    texts = hf_texts()
    expected = reference(texts)
    assert isinstance(ours, HFTokenizer) and ours.vocab_size == len(reference.tokenizer)
    assert_same(ours(texts), expected, texts)
    assert (expected[:, 0] == 2).all() and not (expected == 3).any()  # [CLS] first, no [SEP] left
    assert_same(ours(texts, context_length=8), reference(texts, context_length=8), texts)
    assert_same(get_tokenizer(config, strip_sep_token=False)(texts),
                open_clip.tokenizer.HFTokenizer(bert_folder, context_length=32)(texts), texts)


@pytest.mark.parametrize("clean", ["canonicalize", "whitespace", "lower"])
def test_unigram_mt5_style_matches_open_clip(unigram_folder: str, clean: str) -> None:
    """mT5/XLM style: canonicalize cleaning (the worldwide models), EOS kept when truncating, pad id 0."""
    config = text_config(hf_tokenizer_name=unigram_folder, tokenizer_kwargs={"clean": clean})
    reference = open_clip.tokenizer.HFTokenizer(unigram_folder, context_length=77, clean=clean)
    texts = hf_texts()
    expected = reference(texts)
    assert_same(get_tokenizer(config)(texts), expected, texts)
    assert (expected == 1).sum(dim=1).eq(1).all()  # exactly one </s> per row, also when truncated
    # No [SEP] token: open_clip's strip_sep_token crashes in torch.where; here it changes nothing.
    assert_same(get_tokenizer(config, strip_sep_token=True)(texts), expected, texts)


def test_model_tokenize_uses_hf_tokenizer(bert_folder: str) -> None:
    """model.tokenize picks the config's tokenizer and context length."""
    model = clipforge.create_model(text_config(context_length=32, hf_tokenizer_name=bert_folder,
                                               vocab_size=200, tokenizer_kwargs={"strip_sep_token": True}))
    ids = model.tokenize(["a dog runs on the grass", "two children play"])
    reference = open_clip.tokenizer.HFTokenizer(bert_folder, context_length=32, strip_sep_token=True)
    assert torch.equal(ids, reference(["a dog runs on the grass", "two children play"]))


# -- errors ------------------------------------------------------------------------------------


def one_sentence(error: pytest.ExceptionInfo, *names: str) -> None:
    message = str(error.value)
    assert message.endswith(".") and message.count(". ") == 0 and "\n" not in message, message
    for name in names:
        assert name in message, message


def test_missing_hf_tokenizer_is_one_sentence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline, a Hub id that is not cached, a missing folder or an empty folder say what to do."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time
    name = "no-such-org/no-such-tokenizer"
    with pytest.raises(TokenizerError) as error:
        get_tokenizer(text_config(hf_tokenizer_name=name), cache_dir=tmp_path / "cache")
    one_sentence(error, name, "cached", "folder")
    missing = str(tmp_path / "missing" / "tok")
    with pytest.raises(TokenizerError) as error:
        get_tokenizer(text_config(hf_tokenizer_name=missing))
    one_sentence(error, missing, "does not exist")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenizerError) as error:
        get_tokenizer(text_config(hf_tokenizer_name=str(tmp_path / "empty")))
    one_sentence(error, str(tmp_path / "empty"))


def test_missing_transformers_names_the_install(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without transformers, an HF model's tokenizer asks for `pip install transformers`."""
    import sys

    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(TokenizerError) as error:
        get_tokenizer(text_config(hf_tokenizer_name="org/not-installed"))
    one_sentence(error, "org/not-installed", "pip install transformers")


def test_configuration_errors(bert_folder: str) -> None:
    """No text tower, unknown names, unknown or unsupported options all fail before tokenizing."""
    image_only = config_from_dict({"embed_dim": 32, "text": None,
                                   "vision": {"type": "vit", "image_size": 32, "patch_size": 8, "width": 64,
                                              "layers": 1, "heads": 1}}, name="image-only")
    with pytest.raises(TokenizerError) as error:
        get_tokenizer(image_only)
    one_sentence(error, "image-only", "no text tower")
    assert isinstance(get_tokenizer(text_config()), CLIPTokenizer)  # text-only models do tokenize
    with pytest.raises(UnknownModelError):
        get_tokenizer("ViT-NOPE-99")
    cases = [({"reduction_mask": "random"}, "reduction_mask"), ({"bpe_path": "x"}, "bpe_path"),
             ({"clean": "upper"}, "upper"), ({"strip_sep_token": True}, "strip_sep_token")]
    for kwargs, named in cases:
        with pytest.raises(TokenizerError) as error:
            get_tokenizer(**kwargs)
        one_sentence(error, named)
    for kwargs, named in [({"tokenizer_mode": "clips"}, "clips"), ({"use_fast": False}, "use_fast")]:
        with pytest.raises(TokenizerError) as error:
            get_tokenizer(text_config(hf_tokenizer_name=bert_folder), **kwargs)
        one_sentence(error, named)
    for bad in (0, -1, 2.0):
        with pytest.raises(TokenizerError):
            get_tokenizer(context_length=bad)
    with pytest.raises(TokenizerError):
        get_tokenizer(42)


# -- model.tokenize ------------------------------------------------------------------------------


def test_model_tokenize_and_encode_text() -> None:
    """A model tokenizes to its own context length, and the ids feed encode_text."""
    config = config_from_dict({"embed_dim": 32,
                               "vision": {"type": "vit", "image_size": 32, "patch_size": 8, "width": 64,
                                          "layers": 1, "heads": 1},
                               "text": {"context_length": 32, "vocab_size": 49408, "width": 64, "layers": 1,
                                        "heads": 1}}, name="tiny-32")
    model = clipforge.create_model(config).eval()
    texts = ["a photo of a dog", "word " * 100]
    ids = model.tokenize(texts)
    assert ids.shape == (2, 32) and ids.dtype == torch.int64 and ids[1, -1] == 49407
    assert torch.equal(ids, open_clip.tokenizer.SimpleTokenizer(context_length=32)(texts))
    assert get_tokenizer(model) is get_tokenizer(config)  # per-batch calls hit the cache
    with torch.no_grad():
        features = model.encode_text(model.tokenize(texts))
    assert features.shape == (2, 32) and torch.isfinite(features).all()
    assert model.tokenize(texts, context_length=16).shape == (2, 16)


@pytest.mark.parametrize("clean", ["lower", "whitespace", "canonicalize"])
def test_clip_bpe_all_flickr_captions_match_open_clip(clean: str) -> None:
    """All 40,455 Flickr8k captions (5,000 for canonicalize), each clean mode, equal open_clip's ids; in
    "whitespace" mode capitalised words are not tokens, so they take the merge loop, not the whole-word lookup."""
    texts = flickr_captions(5000 if clean == "canonicalize" else None)
    reference = open_clip.tokenizer.SimpleTokenizer(clean=clean)
    ours = get_tokenizer(clean=clean)
    assert_same(ours(texts), reference(texts), texts)
    upper = [text.upper() for text in texts[:2000]]
    assert_same(ours(upper), reference(upper), upper)
