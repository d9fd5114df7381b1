"""ImgCapTokenizer: vocabulary layout, spelling of out-of-vocabulary words, robustness, save/load, remote-code use."""

import functools
import json
import os
import random
import subprocess
import sys
import textwrap

import pytest
import spacy
import torch
from datasets.fingerprint import Hasher

# Importing the package registers ImgCapTokenizer for AutoTokenizer remote code (save_pretrained writes auto_map).
from imgcap_hf.models.imgcap.tokenization_imgcap import ARABIC_LETTERS, LATIN_LETTERS, SPACE_TOKEN, ImgCapTokenizer

SPECIAL_TOKENS = ["<unk>", "<pad>", "<sos>", "<eos>"]

TINY_CAPTIONS = [
    "A man rides a bike .",
    "A dog runs on the grass .",
    "Two children play in the park .",
    "A woman in a red shirt walks a dog .",
]

ARABIC_CAPTIONS = [
    "رجل يركب دراجة في الشارع .",
    "كلب يجري على العشب .",
    "امرأة تمشي مع كلب في الحديقة .",
    "طفلان يلعبان في الحديقة .",
    "رجل يقف أمام مبنى كبير .",
]


@pytest.fixture(scope="module")
def tiny_tokenizer() -> ImgCapTokenizer:
    return ImgCapTokenizer.from_captions(TINY_CAPTIONS, min_frequency=1)


@pytest.fixture(scope="module")
def flickr_tokenizer(flickr_captions) -> ImgCapTokenizer:
    """The published recipe: at most 4096 entries, words seen at least 5 times."""
    return ImgCapTokenizer.from_captions(flickr_captions)


@pytest.fixture(scope="module")
def small_flickr_tokenizer(flickr_captions) -> ImgCapTokenizer:
    """Built from 300 captions only, so most words of the other captions are out of vocabulary."""
    return ImgCapTokenizer.from_captions(flickr_captions[:300], min_frequency=1)


@functools.cache
def spacy_tokenizer(lang: str):
    return spacy.blank(lang).tokenizer


def spacy_words(text: str, lang: str = "en") -> list[str]:
    """The lower-cased words spaCy's rule-based tokenizer finds in `text`, computed here independently."""
    return [token.text.lower() for token in spacy_tokenizer(lang)(text) if not token.is_space]


def expected_decodings(tokenizer: ImgCapTokenizer, texts: list[str]) -> list[str]:
    """What round trips must give: vocabulary words and spellable words unchanged, any other word `<unk>`."""
    vocab = tokenizer.get_vocab()
    letters = set(tokenizer.spelling_alphabet)
    return [
        " ".join(word if word in vocab or set(word) <= letters else "<unk>" for word in spacy_words(text))
        for text in texts
    ]


def test_special_token_ids(tiny_tokenizer):
    assert (tiny_tokenizer.unk_token_id, tiny_tokenizer.pad_token_id) == (0, 1)
    assert (tiny_tokenizer.bos_token_id, tiny_tokenizer.eos_token_id) == (2, 3)
    assert tiny_tokenizer.convert_ids_to_tokens([0, 1, 2, 3]) == SPECIAL_TOKENS


def test_letters_and_space_are_plain_vocabulary_not_added_tokens(tiny_tokenizer):
    vocab = tiny_tokenizer.get_vocab()
    assert [vocab[letter] for letter in LATIN_LETTERS] == list(range(4, 30))
    assert vocab[SPACE_TOKEN] == 30
    # Only the four specials go through the added-token trie; letters and " " would otherwise be cut out of any text.
    assert set(tiny_tokenizer.added_tokens_encoder) == set(SPECIAL_TOKENS)
    assert tiny_tokenizer.tokenize("a   man\n rides\ta  bike") == ["a", "man", "rides", "a", "bike"]


def test_encoding_is_sos_words_eos(tiny_tokenizer):
    ids = tiny_tokenizer("A man rides a bike .")["input_ids"]
    words = tiny_tokenizer.convert_tokens_to_ids(["a", "man", "rides", "a", "bike", "."])
    assert ids == [2, *words, 3]
    assert tiny_tokenizer("A man rides a bike .")["attention_mask"] == [1] * len(ids)


def test_flickr_vocabulary_layout(flickr_tokenizer, flickr_captions):
    vocab = flickr_tokenizer.get_vocab()
    assert len(vocab) == len(flickr_tokenizer) == flickr_tokenizer.vocab_size <= 4096
    assert sorted(vocab.values()) == list(range(len(vocab)))
    assert [vocab[token] for token in [*SPECIAL_TOKENS, *LATIN_LETTERS, SPACE_TOKEN]] == list(range(31))

    counts = {}
    for caption in flickr_captions:
        for word in spacy_words(caption):
            counts[word] = counts.get(word, 0) + 1
    words = sorted(vocab, key=vocab.get)[31:]
    # Most frequent first, ties alphabetical, nothing rarer than min_frequency, no word repeated (e.g. "a").
    assert [(-counts[word], word) for word in words] == sorted((-counts[word], word) for word in words)
    assert min(counts[word] for word in words) >= 5
    eligible = {word for word, count in counts.items() if count >= 5} - set(LATIN_LETTERS)
    assert set(words) == eligible  # Flickr30k has fewer than 4096 - 31 such words: all of them are in.


def test_vocab_size_caps_the_vocabulary():
    tokenizer = ImgCapTokenizer.from_captions(TINY_CAPTIONS, vocab_size=33, min_frequency=1)
    assert tokenizer.vocab_size == 33
    # "a" (5 times) is already a letter; "." (4) and "dog" (2) are the next most frequent.
    assert tokenizer.convert_ids_to_tokens([31, 32]) == [".", "dog"]


def test_vocabulary_is_deterministic(flickr_tokenizer, flickr_captions):
    shuffled = list(flickr_captions)
    random.Random(0).shuffle(shuffled)
    rebuilt = ImgCapTokenizer.from_captions(shuffled)
    assert list(rebuilt.get_vocab().items()) == list(flickr_tokenizer.get_vocab().items())


@pytest.mark.parametrize("tokenizer_name", ["flickr_tokenizer", "small_flickr_tokenizer"])
def test_flickr_round_trip(tokenizer_name, request, flickr_captions):
    tokenizer = request.getfixturevalue(tokenizer_name)
    encodings = tokenizer(flickr_captions)["input_ids"]
    decoded = tokenizer.batch_decode(encodings, skip_special_tokens=True)
    expected = expected_decodings(tokenizer, flickr_captions)
    mismatches = [
        (caption, text) for caption, text, wanted in zip(flickr_captions, decoded, expected) if text != wanted
    ]
    assert mismatches == []

    space_id = tokenizer.convert_tokens_to_ids(SPACE_TOKEN)
    captions_with_spelled_words = sum(space_id in ids for ids in encodings)
    captions_with_unk = sum(tokenizer.unk_token_id in ids for ids in encodings)
    # The check above really covered spelled words (and words that had to become <unk>).
    minimum_spelled = 10_000 if tokenizer_name == "small_flickr_tokenizer" else 3000
    assert captions_with_spelled_words > minimum_spelled
    assert captions_with_unk > 0


def test_oov_word_is_spelled_between_two_spaces(tiny_tokenizer):
    assert tiny_tokenizer.tokenize("Zebu") == [" ", "z", "e", "b", "u", " "]


@pytest.mark.parametrize(
    "text",
    ["A zebu a dog .", "A zebu grazes near a yak .", "Zebu", "A man rides a zebu"],
)
def test_spelled_words_round_trip(tiny_tokenizer, text):
    ids = tiny_tokenizer(text)["input_ids"]
    assert tiny_tokenizer.decode(ids, skip_special_tokens=True) == " ".join(spacy_words(text))


def test_word_outside_the_alphabet_becomes_unk(tiny_tokenizer):
    tokens = tiny_tokenizer.tokenize("A café near 42 😀 .")
    assert tokens == ["a", "<unk>", " ", "n", "e", "a", "r", " ", "<unk>", "<unk>", "."]
    ids = tiny_tokenizer.convert_tokens_to_ids(tokens)
    assert tiny_tokenizer.decode(ids) == "a <unk> near <unk> <unk> ."


def test_skip_special_tokens_keeps_unk(tiny_tokenizer):
    man = tiny_tokenizer.convert_tokens_to_ids("man")
    ids = [2, man, 0, 3, 1, 1]
    assert tiny_tokenizer.decode(ids) == "<sos> man <unk> <eos> <pad> <pad>"
    assert tiny_tokenizer.decode(ids, skip_special_tokens=True) == "man <unk>"


def test_arabic_round_trip_and_spelling():
    tokenizer = ImgCapTokenizer.from_captions(ARABIC_CAPTIONS, lang="ar", min_frequency=1)
    assert tokenizer.spelling_alphabet == ARABIC_LETTERS
    assert len(ARABIC_LETTERS) == 36 and {"ا", "ي", "ء", "أ", "إ", "آ", "ؤ", "ئ", "ة", "ى"} <= set(ARABIC_LETTERS)
    for caption in ARABIC_CAPTIONS:
        decoded = tokenizer.decode(tokenizer(caption)["input_ids"], skip_special_tokens=True)
        assert decoded == " ".join(spacy_words(caption, "ar"))

    # "يطعم" (feeds) and "قطة" (cat) are not in the vocabulary: both are spelled and come back unchanged.
    text = "رجل يطعم قطة ."
    tokens = tokenizer.tokenize(text)
    assert tokens == ["رجل", " ", "ي", "ط", "ع", "م", " ", " ", "ق", "ط", "ة", " ", "."]
    assert tokenizer.decode(tokenizer(text)["input_ids"], skip_special_tokens=True) == "رجل يطعم قطة ."
    # Short-vowel marks are not spelling letters: an OOV word carrying them cannot be spelled.
    assert tokenizer.tokenize("قِطّة") == ["<unk>"]


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   \n\t ",
        "😀🎉🐕",
        "123 456 !!! ??? ...",
        "رجل يركب دراجة في الشارع .",
        "<unk> <eos> < sos >",
        "ZEBU ZEBU zebu",
        "a man rides a bike . " * 5000,
    ],
)
def test_encoding_never_raises(tiny_tokenizer, text):
    ids = tiny_tokenizer(text)["input_ids"]
    assert ids[0] == 2 and ids[-1] == 3
    assert all(0 <= index < len(tiny_tokenizer) for index in ids)
    assert isinstance(tiny_tokenizer.decode(ids, skip_special_tokens=True), str)


def test_truncation_keeps_sos_and_eos(tiny_tokenizer):
    ids = tiny_tokenizer("a man rides a bike . " * 5000, truncation=True, max_length=16)["input_ids"]
    assert len(ids) == 16 and ids[0] == 2 and ids[-1] == 3
    # Cut inside a spelled word: the partial word is still decoded.
    ids = tiny_tokenizer("zebu zebu", truncation=True, max_length=11)["input_ids"]
    assert tiny_tokenizer.decode(ids, skip_special_tokens=True) == "zebu ze"


def test_decode_edge_cases(tiny_tokenizer):
    space, z, e = tiny_tokenizer.convert_tokens_to_ids([SPACE_TOKEN, "z", "e"])
    man = tiny_tokenizer.convert_tokens_to_ids("man")
    assert tiny_tokenizer.decode([99999]) == "<unk>"
    assert tiny_tokenizer.decode([-100, 2]) == "<unk> <sos>"
    assert tiny_tokenizer.decode([]) == ""
    assert tiny_tokenizer.decode([z, e]) == "z e"  # letters outside a spelled word are one-letter words
    assert tiny_tokenizer.decode([space, z, e]) == "ze"  # missing closing space
    assert tiny_tokenizer.decode([space, z, man]) == "z man"  # a non-letter ends the spelled word
    assert tiny_tokenizer.decode([space, space, space]) == ""
    assert tiny_tokenizer.decode(torch.tensor([[2, man, 3], [2, space, z]])) == [
        "<sos> man <eos>",
        "<sos> z",
    ]


def test_decode_never_raises_on_random_ids(tiny_tokenizer):
    generator = random.Random(0)
    space = tiny_tokenizer.convert_tokens_to_ids(SPACE_TOKEN)
    letters = tiny_tokenizer.convert_tokens_to_ids(list(LATIN_LETTERS))
    pools = [
        list(range(-5, len(tiny_tokenizer) + 50)),  # includes ids outside the vocabulary
        letters,
        [space, *letters],  # unbalanced spaces
        [space, 0, 1, 2, 3],
    ]
    for _ in range(300):
        pool = generator.choice(pools)
        ids = [generator.choice(pool) for _ in range(generator.randint(0, 40))]
        for skip_special_tokens in (False, True):
            assert isinstance(tiny_tokenizer.decode(ids, skip_special_tokens=skip_special_tokens), str)


def test_words_with_positions_are_the_decoded_words_and_the_tokens_that_spell_them(tiny_tokenizer):
    """On random id sequences crowded with spaces, letters and special tokens: the words are exactly those that
    `decode` prints (with and without `skip_special_tokens`), each word's positions hold its letters (or the word
    itself) in order, and no position serves two words."""
    generator = random.Random(1)
    space = tiny_tokenizer.convert_tokens_to_ids(SPACE_TOKEN)
    pool = [space, space, *tiny_tokenizer.convert_tokens_to_ids(list("zeb")), 0, 1, 2, 3, 99999]
    pool += tiny_tokenizer.convert_tokens_to_ids(["a", "man", "dog"])  # "a" is a word and a letter
    for _ in range(500):
        ids = [generator.choice(pool) for _ in range(generator.randint(0, 15))]
        tokens = tiny_tokenizer.convert_ids_to_tokens(ids)
        for skip_special_tokens in (False, True):
            words = tiny_tokenizer.words_with_positions(tokens, skip_special_tokens=skip_special_tokens)
            decoded = tiny_tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
            assert [word for word, _ in words] == decoded.split(), ids
            for word, positions in words:
                assert positions == sorted(positions)
                assert "".join(tokens[position] for position in positions if tokens[position] != SPACE_TOKEN) == word
            every_position = [position for _, positions in words for position in positions]
            assert len(every_position) == len(set(every_position))


def test_save_and_load_round_trip(tiny_tokenizer, tmp_path):
    tiny_tokenizer.save_pretrained(tmp_path)
    saved_names = {path.name for path in tmp_path.iterdir()}
    assert {"tokenizer_config.json", "vocab.json"} <= saved_names
    # JSON only (plus this module's source when the class is registered for remote code): no pickles, no binaries.
    assert {name.rsplit(".", 1)[-1] for name in saved_names} <= {"json", "py"}

    vocab = json.loads((tmp_path / "vocab.json").read_text(encoding="utf-8"))
    assert vocab == tiny_tokenizer.get_vocab()
    config = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["tokenizer_class"] == "ImgCapTokenizer"
    assert (config["lang"], config["spelling_alphabet"]) == ("en", LATIN_LETTERS)

    loaded = ImgCapTokenizer.from_pretrained(tmp_path)
    assert list(loaded.get_vocab().items()) == list(tiny_tokenizer.get_vocab().items())
    assert loaded.all_special_ids == tiny_tokenizer.all_special_ids
    texts = [*TINY_CAPTIONS, "A zebu a dog .", "A café 😀", ""]
    assert loaded(texts)["input_ids"] == tiny_tokenizer(texts)["input_ids"]


def test_arabic_settings_survive_save_and_load(tmp_path):
    alphabet = ARABIC_LETTERS + "پچژگ"  # a user-chosen alphabet, with Persian letters
    tokenizer = ImgCapTokenizer.from_captions(ARABIC_CAPTIONS, lang="ar", min_frequency=1, spelling_alphabet=alphabet)
    tokenizer.save_pretrained(tmp_path)
    loaded = ImgCapTokenizer.from_pretrained(tmp_path)
    assert (loaded.lang, loaded.spelling_alphabet) == ("ar", alphabet)
    assert loaded.tokenize("گربه") == [" ", "گ", "ر", "ب", "ه", " "]


def test_batch_encoding_pads_with_pad_id(tiny_tokenizer):
    batch = tiny_tokenizer(["A man .", "A dog runs on the grass ."], padding=True, return_tensors="pt")
    assert set(batch) == {"input_ids", "attention_mask"}
    assert batch["input_ids"].shape == (2, 9) and batch["input_ids"].dtype == torch.long
    assert batch["input_ids"][0].tolist()[-5:] == [3, 1, 1, 1, 1]
    assert batch["attention_mask"].sum(dim=1).tolist() == [5, 9]

    batch = tiny_tokenizer(
        ["A man .", "a man " * 100], padding="max_length", truncation=True, max_length=12, return_tensors="pt"
    )
    assert batch["input_ids"].shape == (2, 12)
    assert batch["input_ids"][:, -1].tolist() == [1, 3]


def test_remote_code_decodes_without_spacy(tiny_tokenizer, tmp_path):
    """A Hub user without spaCy loads the saved folder as remote code and decodes; encoding asks for spaCy."""
    tiny_tokenizer.save_pretrained(tmp_path / "tokenizer")
    ids = tiny_tokenizer("A zebu a dog .")["input_ids"]
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["spacy"] = None  # any import of spaCy now fails
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained({str(tmp_path / "tokenizer")!r}, trust_remote_code=True)
        print(type(tokenizer).__module__)
        print(tokenizer.decode({ids!r}, skip_special_tokens=True))
        try:
            tokenizer("A man .")
        except ImportError as error:
            print(error)
        """
    )
    # The remote module is copied into HF_MODULES_CACHE: keep it out of the user's home.
    environment = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=environment, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    module_name, decoded, encode_error = result.stdout.strip().splitlines()
    assert module_name.startswith("transformers_modules.")  # the shipped copy, not this repository's package
    assert decoded == "a zebu a dog ."
    assert "pip install spacy" in encode_error


def test_encoding_does_not_change_the_datasets_fingerprint(tiny_tokenizer):
    """`datasets.map` caches on a hash of the tokenizer: using it must not change that hash."""
    tokenizer = ImgCapTokenizer(vocab=tiny_tokenizer.get_vocab())
    fingerprint = Hasher.hash(tokenizer)
    tokenizer("A zebu a dog .")
    assert Hasher.hash(tokenizer) == fingerprint


@pytest.mark.parametrize(
    ("captions", "kwargs", "error", "message"),
    [
        (TINY_CAPTIONS, {"vocab_size": 30}, ValueError, "vocab_size=30 is too small: it must be at least 31"),
        (TINY_CAPTIONS, {"min_frequency": 0}, ValueError, "min_frequency must be an integer >= 1"),
        (TINY_CAPTIONS, {"spelling_alphabet": "abca"}, ValueError, "repeats 'a'"),
        (TINY_CAPTIONS, {"spelling_alphabet": "abC"}, ValueError, "'C' .* not lower-case"),
        (TINY_CAPTIONS, {"spelling_alphabet": "ab c"}, ValueError, "whitespace"),
        (TINY_CAPTIONS, {"spelling_alphabet": ""}, ValueError, "non-empty string"),
        (TINY_CAPTIONS, {"lang": "not-a-language"}, ValueError, "spaCy has no tokenizer rules"),
        (TINY_CAPTIONS, {"unk_token": "a"}, ValueError, "must differ"),
        ("A man rides a bike .", {}, TypeError, "not a single string"),
        (["A man .", None], {}, TypeError, r"captions\[1\] is a NoneType"),
    ],
)
def test_from_captions_rejects_bad_arguments(captions, kwargs, error, message):
    with pytest.raises(error, match=message):
        ImgCapTokenizer.from_captions(captions, **kwargs)


def test_loading_a_vocabulary_without_letters_fails_clearly(tmp_path):
    vocab_file = tmp_path / "vocab.json"
    vocab_file.write_text(json.dumps({"<unk>": 0, "<pad>": 1, "<sos>": 2, "<eos>": 3, "dog": 4}), encoding="utf-8")
    with pytest.raises(ValueError, match=r"vocab.json lacks \[' ', 'a', 'b'"):
        ImgCapTokenizer(vocab_file=str(vocab_file))
