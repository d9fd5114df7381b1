"""Word-level caption tokenizer that spells out-of-vocabulary words letter by letter.

Captions are split into words by spaCy's rule-based tokenizer and lower-cased. Frequent words get their own id; an
out-of-vocabulary (OOV) word made only of letters of the spelling alphabet is written as its letters between two
space tokens, so no such word is lost:

    "a zebu grazes"  ->  <sos> a " " z e b u " " grazes <eos>

The closing space token matters: without it, a following word that is also a letter (the word "a" and the letter "a"
share one id) would be read as part of the spelled word. Any other OOV word (digits, accents outside the alphabet,
emoji) becomes `<unk>`.

This file is shipped with the model as remote code, so it imports only the standard library and transformers. spaCy
is needed to *encode* text and is imported lazily at that point; decoding never needs it.
"""

import functools
import importlib
import json
import operator
import os
import re
from collections import Counter
from collections.abc import Iterable
from typing import Any

from transformers import PreTrainedTokenizer

VOCAB_FILES_NAMES = {"vocab_file": "vocab.json"}

# The one token that is a single space. It only ever comes from spelling an OOV word: `_tokenize` drops spaCy's
# whitespace tokens, so the spaces of the input text never produce it.
SPACE_TOKEN = " "

# Ids 0-3 in this order: the project-wide convention (`<unk>`=0, `<pad>`=1, `<sos>`=2, `<eos>`=3).
DEFAULT_SPECIAL_TOKENS = {"unk_token": "<unk>", "pad_token": "<pad>", "bos_token": "<sos>", "eos_token": "<eos>"}

LATIN_LETTERS = "abcdefghijklmnopqrstuvwxyz"

# The 28 base letters of the Arabic alphabet plus the letter forms that are written as letters of their own and occur
# in everyday text: hamza (ء), alef with madda (آ), alef with hamza above (أ) and below (إ), waw with hamza (ؤ),
# yeh with hamza (ئ), teh marbuta (ة) and alef maksura (ى). These are exactly U+0621-U+063A and U+0641-U+064A.
# Left out: tatweel (U+0640, a stretching stroke), the short-vowel marks (tashkeel, U+064B-U+0652) and the Persian and
# Urdu letters; an OOV word containing one of them becomes <unk>.
ARABIC_LETTERS = "".join(chr(code) for code in (*range(0x0621, 0x063B), *range(0x0641, 0x064B)))

# Spelling alphabet used when none is given. Any language missing here gets the Latin letters, which suits English
# and other Latin-script languages (their accented letters are left out: pass `spelling_alphabet` to include them).
DEFAULT_SPELLING_ALPHABETS = {"ar": ARABIC_LETTERS}


def default_spelling_alphabet(lang: str) -> str:
    """The spelling alphabet used for `lang` when the user gives none."""
    return DEFAULT_SPELLING_ALPHABETS.get(lang, LATIN_LETTERS)


def validate_spelling_alphabet(spelling_alphabet: str) -> None:
    """Raise a `ValueError` naming the first character that cannot be a spelling letter."""
    if not isinstance(spelling_alphabet, str) or not spelling_alphabet:
        raise ValueError(f"spelling_alphabet must be a non-empty string of letters, got {spelling_alphabet!r}")
    seen = set()
    for position, letter in enumerate(spelling_alphabet):
        if letter in seen:
            raise ValueError(f"spelling_alphabet repeats {letter!r} (position {position})")
        if letter.isspace():
            raise ValueError(f"spelling_alphabet contains whitespace {letter!r} (position {position})")
        if letter.lower() != letter:
            raise ValueError(
                f"spelling_alphabet contains {letter!r} (position {position}), which is not lower-case: words are "
                "lower-cased before spelling, so it could never be used"
            )
        seen.add(letter)


_LONE_SURROGATES = re.compile("[\ud800-\udfff]")


def clean_text(text: str) -> str:
    """`text` with lone UTF-16 surrogates (which JSON can carry, but UTF-8 and spaCy cannot) replaced by U+FFFD."""
    return _LONE_SURROGATES.sub("\ufffd", text)


@functools.cache
def load_spacy_tokenizer(lang: str) -> Any:
    """
    spaCy's rule-based tokenizer for `lang` (`spacy.blank`: no model download), imported only when needed.

    Cached here, once per language, rather than on the tokenizer instance: `datasets.map` fingerprints the tokenizer
    by pickling its `__dict__`, and a spaCy object there would make pickling slow and the fingerprint change after
    the first encode.
    """
    try:
        spacy = importlib.import_module("spacy")
    except ImportError as error:
        raise ImportError(
            "ImgCapTokenizer needs spaCy to encode text (decoding works without it). Install it with "
            "`pip install spacy`."
        ) from error
    try:
        return spacy.blank(lang).tokenizer
    except ImportError as error:
        raise ValueError(f"spaCy has no tokenizer rules for lang={lang!r}: {error}") from error


class ImgCapTokenizer(PreTrainedTokenizer):
    """
    Word-level tokenizer for ImgCap captions: spaCy words, lower-cased, with OOV words spelled letter by letter.

    Vocabulary layout: `<unk>`=0, `<pad>`=1, `<sos>`=2, `<eos>`=3, then the letters of the spelling alphabet and the
    space token `" "`, then words by descending frequency. Letters and the space token are plain vocabulary entries,
    not special tokens, so they are never stripped from decoded text or matched inside the input text.

    Encoding gives `<sos> words... <eos>` and never raises on any string: empty or whitespace-only text gives
    `<sos> <eos>`, any character the vocabulary cannot express (emoji, digits, other scripts, control characters, NUL,
    a lone UTF-16 surrogate as JSON can carry) ends up in an `<unk>`, and every id lies inside the vocabulary. Nothing
    is truncated unless asked (`truncation=True, max_length=...`, which keeps `<eos>`).

    Decoding joins words with single spaces and reassembles spelled words. It never raises on any sequence of integer
    ids (a list, tuple, numpy array or tensor, of Python or numpy integers): any id outside the vocabulary (negative,
    -100 included, or too large) decodes as `<unk>`, so a bug that leaks label padding into decoding stays visible
    (replace -100 by `pad_token_id` before decoding labels); a spelled word missing its closing space ends at the next
    token that is not a letter (or at the end), and letters outside a spelled word are read as one-letter words.
    `skip_special_tokens=True` drops `<sos>`, `<eos>` and `<pad>` but keeps `<unk>`: it stands for a real word the
    vocabulary could not express, and silently deleting it would shorten the caption and change its meaning.

    Build a tokenizer from training captions with [`ImgCapTokenizer.from_captions`]; save and load it with
    `save_pretrained` / `from_pretrained` (the vocabulary is a plain `vocab.json`).

    Args:
        vocab_file (`str`, *optional*):
            Path to a `vocab.json` mapping token to id. Give either this or `vocab`.
        vocab (`dict[str, int]`, *optional*):
            The vocabulary itself, token to id (what `from_captions` passes). Give either this or `vocab_file`.
        lang (`str`, *optional*, defaults to `"en"`):
            Language code for `spacy.blank(lang)`, whose rule-based tokenizer splits text into words.
        spelling_alphabet (`str`, *optional*):
            The lower-case letters OOV words may be spelled with. Defaults to a-z, or the Arabic letters for
            `lang="ar"`. Saved in `tokenizer_config.json`.
        unk_token (`str`, *optional*, defaults to `"<unk>"`):
            Stands for an OOV word that cannot be spelled, and for ids outside the vocabulary when decoding.
        pad_token (`str`, *optional*, defaults to `"<pad>"`):
            Pads a batch to one length.
        bos_token (`str`, *optional*, defaults to `"<sos>"`):
            Starts every encoded caption; also the decoder's start token.
        eos_token (`str`, *optional*, defaults to `"<eos>"`):
            Ends every encoded caption.

    Example:

    ```python
    >>> from imgcap_hf import ImgCapTokenizer

    >>> captions = ["A man rides a bike .", "A dog runs on the grass .", "A man walks a dog ."]
    >>> tokenizer = ImgCapTokenizer.from_captions(captions, min_frequency=1)
    >>> ids = tokenizer("A man walks a zebu .")["input_ids"]
    >>> tokenizer.convert_ids_to_tokens(ids)
    ['<sos>', 'a', 'man', 'walks', 'a', ' ', 'z', 'e', 'b', 'u', ' ', '.', '<eos>']
    >>> tokenizer.decode(ids, skip_special_tokens=True)
    'a man walks a zebu .'
    ```
    """

    vocab_files_names = VOCAB_FILES_NAMES
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(
        self,
        vocab_file: str | None = None,
        *,
        vocab: dict[str, int] | None = None,
        lang: str = "en",
        spelling_alphabet: str | None = None,
        unk_token: str = DEFAULT_SPECIAL_TOKENS["unk_token"],
        pad_token: str = DEFAULT_SPECIAL_TOKENS["pad_token"],
        bos_token: str = DEFAULT_SPECIAL_TOKENS["bos_token"],
        eos_token: str = DEFAULT_SPECIAL_TOKENS["eos_token"],
        **kwargs,
    ):
        if vocab_file is None and vocab is None:
            raise ValueError(
                "ImgCapTokenizer has no vocabulary: pass `vocab` or `vocab_file`, or load a folder that has vocab.json"
            )
        if vocab_file is not None and vocab is not None:
            raise ValueError("pass either `vocab` or `vocab_file` to ImgCapTokenizer, not both")
        if vocab is None:
            with open(vocab_file, encoding="utf-8") as handle:
                try:
                    vocab = json.load(handle)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{vocab_file} is not valid JSON: {error}") from error
        source = vocab_file or "the given vocab"
        if spelling_alphabet is None:
            spelling_alphabet = default_spelling_alphabet(lang)
        validate_spelling_alphabet(spelling_alphabet)
        # `from_pretrained` passes the special tokens as `AddedToken`s: compare their text.
        special_tokens = [str(token) for token in (unk_token, pad_token, bos_token, eos_token)]
        self._check_vocab(vocab, [*special_tokens, SPACE_TOKEN, *spelling_alphabet], source)

        # The vocabulary must exist before `super().__init__()`, which looks the special tokens up in it.
        self._token_to_id = dict(vocab)
        self._id_to_token = {index: token for token, index in vocab.items()}
        self.lang = lang
        self.spelling_alphabet = spelling_alphabet
        # A set, not a frozenset: `datasets` pickles sets in sorted order, so fingerprints do not vary between runs.
        self._spelling_letters = set(spelling_alphabet)

        kwargs.setdefault("special_tokens_pattern", "bos_eos")
        super().__init__(
            lang=lang,
            spelling_alphabet=spelling_alphabet,
            unk_token=unk_token,
            pad_token=pad_token,
            bos_token=bos_token,
            eos_token=eos_token,
            **kwargs,
        )

    @staticmethod
    def _check_vocab(vocab: Any, required_tokens: list[str], source: str) -> None:
        """Fail early, naming the file, if the vocabulary cannot encode and decode what this tokenizer produces."""
        if not isinstance(vocab, dict) or not all(
            isinstance(token, str) and isinstance(index, int) for token, index in vocab.items()
        ):
            raise ValueError(f"{source} must map token strings to integer ids")
        if len(set(vocab.values())) != len(vocab):
            raise ValueError(f"{source} gives the same id to several tokens")
        missing = [token for token in required_tokens if token not in vocab]
        if missing:
            raise ValueError(
                f"{source} lacks {missing}: it must hold the special tokens, the space token and every letter of "
                "the spelling alphabet"
            )

    @classmethod
    def from_captions(
        cls,
        captions: Iterable[str],
        vocab_size: int = 4096,
        min_frequency: int = 5,
        lang: str = "en",
        spelling_alphabet: str | None = None,
        **kwargs,
    ) -> "ImgCapTokenizer":
        """
        Build the vocabulary from training captions and return a ready tokenizer.

        Words are counted after spaCy tokenization and lower-casing. The vocabulary holds the special tokens, the
        spelling letters and the space token, then the most frequent words (ties in alphabetical order, so the same
        captions always give the same vocabulary, whatever their order) that occur at least `min_frequency` times,
        until it has `vocab_size` entries or runs out of words.

        Args:
            captions (`Iterable[str]`): The training captions, original case.
            vocab_size (`int`, *optional*, defaults to 4096): Most entries the vocabulary may have (the model's output
                size).
            min_frequency (`int`, *optional*, defaults to 5): Rarer words are left out (spelled or `<unk>`).
            lang (`str`, *optional*, defaults to `"en"`): Language code for `spacy.blank`.
            spelling_alphabet (`str`, *optional*): Letters for spelling OOV words; defaults per `lang`.
            kwargs: Passed to `ImgCapTokenizer.__init__` (special tokens, `model_max_length`, ...).
        """
        if isinstance(captions, str):
            raise TypeError("captions must be an iterable of caption strings, not a single string")
        captions = list(captions)
        for position, caption in enumerate(captions):
            if not isinstance(caption, str):
                raise TypeError(f"captions[{position}] is a {type(caption).__name__}, expected a str")
        if spelling_alphabet is None:
            spelling_alphabet = default_spelling_alphabet(lang)
        validate_spelling_alphabet(spelling_alphabet)
        special_tokens = [str(kwargs.get(name, default)) for name, default in DEFAULT_SPECIAL_TOKENS.items()]
        reserved_tokens = [*special_tokens, *spelling_alphabet, SPACE_TOKEN]
        if len(set(reserved_tokens)) != len(reserved_tokens):
            raise ValueError(f"special tokens {special_tokens} must differ from each other and from the letters")
        if not isinstance(vocab_size, int) or vocab_size < len(reserved_tokens):
            raise ValueError(
                f"vocab_size={vocab_size!r} is too small: it must be at least {len(reserved_tokens)} to hold the "
                f"{len(special_tokens)} special tokens, the {len(spelling_alphabet)} spelling letters and the space"
            )
        if not isinstance(min_frequency, int) or min_frequency < 1:
            raise ValueError(f"min_frequency must be an integer >= 1, got {min_frequency!r}")

        spacy_tokenizer = load_spacy_tokenizer(lang)
        word_counts = Counter(
            token.text.lower()
            for doc in spacy_tokenizer.pipe(clean_text(caption) for caption in captions)
            for token in doc
            if not token.is_space
        )
        vocab = {token: index for index, token in enumerate(reserved_tokens)}
        for word, count in sorted(word_counts.items(), key=lambda item: (-item[1], item[0])):
            if count < min_frequency or len(vocab) >= vocab_size:
                break
            vocab.setdefault(word, len(vocab))

        return cls(vocab=vocab, lang=lang, spelling_alphabet=spelling_alphabet, **kwargs)

    @property
    def vocab_size(self) -> int:
        return len(self._token_to_id)

    def get_vocab(self) -> dict[str, int]:
        return {**self._token_to_id, **self._added_tokens_encoder}

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        """spaCy words of `text`, lower-cased; OOV words spelled between space tokens if they can be, else `<unk>`."""
        tokens = []
        for spacy_token in load_spacy_tokenizer(self.lang)(clean_text(text)):
            if spacy_token.is_space:
                continue
            word = spacy_token.text.lower()
            if word in self._token_to_id:
                tokens.append(word)
            elif all(character in self._spelling_letters for character in word):
                tokens.extend([SPACE_TOKEN, *word, SPACE_TOKEN])
            else:
                tokens.append(self.unk_token)
        return tokens

    def _convert_token_to_id(self, token: str) -> int:
        return self._token_to_id.get(token, self._token_to_id[self.unk_token])

    def _convert_id_to_token(self, index: int) -> str:
        return self._id_to_token.get(index, self.unk_token)

    def convert_ids_to_tokens(self, ids: int | list[int], skip_special_tokens: bool = False) -> str | list[str]:
        """
        Tokens for `ids` (one integer, or a sequence, array or tensor of them); an id outside the vocabulary gives
        `<unk>`. `skip_special_tokens=True` drops every special token except `<unk>`, which
        stands for a word (see the class docstring).
        """
        if hasattr(ids, "tolist"):  # numpy arrays and scalars, torch tensors (0-d ones included)
            ids = ids.tolist()
        if not isinstance(ids, (list, tuple)):
            index = operator.index(ids)  # any integer type; TypeError for floats, strings, ...
            added_token = self._added_tokens_decoder.get(index)
            return added_token.content if added_token is not None else self._convert_id_to_token(index)
        skipped_ids = set(self.all_special_ids) - {self.unk_token_id} if skip_special_tokens else set()
        return [self.convert_ids_to_tokens(int(index)) for index in ids if int(index) not in skipped_ids]

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        """Join words with single spaces, reassembling each run of letters between space tokens into one word."""
        return " ".join(word for word, _ in self.words_with_positions(tokens))

    def words_with_positions(
        self, tokens: list[str], skip_special_tokens: bool = False
    ) -> list[tuple[str, list[int]]]:
        """The words that `tokens` decode to, each with the positions in `tokens` of the tokens that spell it.

        The one place that decides what a word is, so that per-token values (attention weights, log-probabilities)
        can be gathered over exactly the words that decoding prints. A word outside the vocabulary is spelled as
        letters between two space tokens and is one word, both spaces included in its positions; a spelled word
        missing its closing space ends at the next token that is not a letter (or at the end); a space token with no
        letter after it makes no word. Every other token is a word of its own.

        `skip_special_tokens=True` passes over the tokens that `decode(..., skip_special_tokens=True)` drops (every
        special token but `<unk>`) as if they were not there, so the words are those of that decode.
        """
        skipped = set(self.all_special_tokens) - {self.unk_token} if skip_special_tokens else set()
        words = []
        spelled = None  # positions of the word being spelled; None outside a spelled word

        def finish_spelled_word() -> None:
            letters = "".join(tokens[position] for position in spelled if tokens[position] != SPACE_TOKEN)
            if letters:
                words.append((letters, spelled))

        for position, token in enumerate(tokens):
            if token in skipped:
                continue
            if token == SPACE_TOKEN and spelled is None:
                spelled = [position]
            elif spelled is not None and token in self._spelling_letters:
                spelled.append(position)
            else:
                # A closing space, or any other token: either way the spelled word (if any) is complete.
                if spelled is not None:
                    if token == SPACE_TOKEN:
                        spelled.append(position)
                    finish_spelled_word()
                    spelled = None
                if token != SPACE_TOKEN:
                    words.append((token, [position]))
        if spelled is not None:
            finish_spelled_word()
        return words

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str, ...]:
        """Write `vocab.json` (token to id, in id order) and return its path."""
        if not os.path.isdir(save_directory):
            raise ValueError(f"save_directory {save_directory!r} is not a directory")
        prefix = f"{filename_prefix}-" if filename_prefix else ""
        vocab_path = os.path.join(save_directory, prefix + VOCAB_FILES_NAMES["vocab_file"])
        ordered_vocab = dict(sorted(self._token_to_id.items(), key=lambda item: item[1]))
        with open(vocab_path, "w", encoding="utf-8") as handle:
            json.dump(ordered_vocab, handle, ensure_ascii=False, indent=2)
            handle.write("\n")
        return (vocab_path,)
