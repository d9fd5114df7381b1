"""A caption tokenizer for scoring when Java is not available: the Penn Treebank conventions coco-caption applies.

coco-caption lower-cases captions, splits them into tokens by the Penn Treebank (PTB) conventions, then drops the
tokens in its punctuation list (``pycocoevalcap.tokenizer.ptbtokenizer.PUNCTUATIONS``). The conventions are the
published ones: punctuation comes off words (``dog.`` -> ``dog .``) but stays inside numbers (``1,000``, ``3:30``,
``12.99``) and abbreviations (``u.s.``, ``mr.``); clitics are separate tokens (``man 's``, ``ca n't``, ``they 're``);
hyphenated words stay whole; brackets become ``-lrb-``/``-rrb-``-style names, which survive coco's punctuation
filter because it compares them in upper case after lower-casing; quotes and dashes are normalised and then dropped.

This module implements those conventions and was tuned only against outputs of coco-caption's own Java tokenizer
(``tests/test_scoring.py`` measures the agreement; the README lists the figures and the kinds of text that differ).
"""

from __future__ import annotations

import re

from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS

_DROPPED = frozenset(PUNCTUATIONS)

# Abbreviations whose final period belongs to the word (observed in the Java tokenizer's output); single letters
# and letter-period runs such as "u.s." or "a.m." are handled by the pattern itself.
_ABBREVIATIONS = "mr|mrs|ms|dr|st|jr|sr|co|inc|ltd|vs|mt|ave|rd|etc|no|fig"

# Words that PTB writes as two tokens, with the length of their first part.
_FUSED_WORDS = {"cannot": 3, "gonna": 3, "wanna": 3, "gotta": 3, "lemme": 3, "gimme": 3}

_CLITIC = re.compile(r"(?i)(n['’]t|['’](?:s|re|ve|ll|d|m))$")
_ENTITIES = {"&amp;": "&", "&lt;": "<", "&gt;": ">", "&quot;": '"', "&apos;": "'"}
_ENTITY = re.compile("|".join(_ENTITIES))
_SEPARATORS = re.compile(r"[\s\x00\u200b-\u200d\ufe0e\ufe0f\ufeff]+")  # spaces, zero-width joiners, BOM
_OUTSIDE_BMP = re.compile("[\U00010000-\U0010ffff]")  # emoji and other astral characters are not tokenized

_WORD_CHARACTER = r"[\w@\u0300-\u036f]"  # combining accents belong to their letter
_START, _END = r"(?<![\w@])", rf"(?!{_WORD_CHARACTER})"  # no word character before / after
# One token per match, alternatives tried in order; each group's name is the kind of token.
_TOKEN = re.compile(
    rf"""
    (?P<url> (?:https?://|www\.) \S+? (?=[.,;:!?)\]"']*$) )             # trailing punctuation is not the URL's
    | (?P<abbreviation> (?: (?:[^\W\d_]\.)+ | (?i:{_ABBREVIATIONS})\. ) {_END} )  # u.s. a.m. x. mr.
    | (?P<clitic> (?i: ['’](?:s|re|ve|ll|d|m) | n['’]t ) {_END} )            # already apart: "it 's", "ca n't"
    | (?P<elision> {_START} (?i: ['’]\d+s? | ['’]em | ['’]n['’] ) {_END}    # '90s 'em 'n'
        | {_START} (?i: ['’]t (?=(?:is|was){_END}) ) )                     # 'tis -> 't is
    | (?P<tag> </?\w+> )                                                  # <unk>, </b>
    | (?P<time> \d+:\d+ (?=(?i:[ap]\.?m\b)) )                              # 10:30pm -> 10:30 pm
    | (?P<word> (?:{_START}-(?=\d))? {_WORD_CHARACTER}+                    # -5 keeps its sign
        (?: (?: [-‐./]                                                    # well-known, 3.5, a/b, www.x.com
              | (?<=[^\W\d_])['’](?=[^\W\d_])                             # o'clock, man's (split later)
              | (?<=\d)[,:](?=\d)                                          # 1,000 3:30
              | (?<=[A-Z])&(?=[A-Z]) )                                    # AT&T
            {_WORD_CHARACTER}+ )* )
    | (?P<ellipsis> \.\.\.+ | … )
    | (?P<dash> --+ | [—–] )
    | (?P<repeated> [!?]+ )                                               # ?! and !!! stay one token
    | (?P<symbol> \S )
    """,
    re.VERBOSE,
)
_SYMBOL_NAMES = {"‐": "-", "(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_QUOTES = frozenset("\"'`‘’“”«»")


def _split_word(word: str) -> list[str]:
    """``can't`` -> ``ca n't``, ``I'd've`` -> ``I 'd 've``, ``cannot`` -> ``can not``; other words stay whole."""
    first_part = _FUSED_WORDS.get(word.lower())
    if first_part:
        return [word[:first_part], word[first_part:]]
    clitics = []
    while (match := _CLITIC.search(word)) and match.start() > 0:
        clitics.insert(0, match.group().replace("’", "'"))
        word = word[: match.start()]
    return [word, *clitics]


def _tokens(chunk: str) -> list[str]:
    """The PTB tokens of one whitespace-free piece of text, before lower-casing."""
    tokens = []
    for match in _TOKEN.finditer(chunk):
        kind, text = match.lastgroup, match.group()
        if kind == "word":
            tokens.extend(_split_word(text))
        elif kind == "clitic":
            tokens.append(text.replace("’", "'"))
        elif kind == "ellipsis":
            tokens.append("...")
        elif kind == "dash":
            tokens.append("--")
        elif kind == "symbol" and text in _QUOTES:
            continue  # opening and closing quotes are all in coco's punctuation list
        else:
            tokens.append(_SYMBOL_NAMES.get(text, text))
    return tokens


def python_tokenize(caption: str) -> str:
    """One caption as coco-caption's scoring sees it: lower-cased PTB tokens without punctuation, space-separated.

    >>> python_tokenize('A man (in red) isn\\'t "happy".')
    "a man -lrb- in red -rrb- is n't happy"
    """
    text = _ENTITY.sub(lambda match: _ENTITIES[match.group()], caption).replace("\u00ad", "")  # soft hyphens go
    text = _OUTSIDE_BMP.sub(" ", text)
    tokens = (token.lower() for chunk in _SEPARATORS.split(text) if chunk for token in _tokens(chunk))
    return " ".join(token for token in tokens if token not in _DROPPED)
