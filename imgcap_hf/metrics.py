"""Captioning metrics computed exactly as coco-caption (pycocoevalcap 1.2) computes them.

Published captioning results (BLEU-1..4, METEOR, ROUGE-L, CIDEr-D) come from the coco-caption toolkit. Its numbers
depend on details that other toolkits change: captions are tokenized by the Stanford PTB tokenizer (Java) and stripped
of punctuation tokens, BLEU uses the reference length closest to each candidate and is computed over the whole corpus,
and CIDEr-D takes its document frequencies from the references being evaluated (so a single image always scores 0,
and averaging CIDEr over batches is wrong). Score a whole split in one call, with all of its references.

Tokenization here is a pure-Python port of what pycocoevalcap's ``PTBTokenizer`` produces (Stanford CoreNLP 3.4.1,
``-preserveLines -lowerCase``, then coco's removal of punctuation tokens), so BLEU, ROUGE-L and CIDEr need no Java and
give the same numbers on every machine. The port reproduces the Java tokenizer on all 15,892 captions of our Flickr30k
sample and on fuzzed captions; the few known differences are listed in ``coco_tokenize``. The scoring itself is done
by pycocoevalcap's own ``Bleu``, ``Cider`` and ``Rouge`` classes. METEOR runs pycocoevalcap's METEOR 1.5 jar and is
only computed when ``java`` is on the PATH.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
import unicodedata
import warnings
from collections.abc import Callable, Sequence
from functools import cache, lru_cache
from pathlib import Path
from typing import NamedTuple

import pycocoevalcap.meteor.meteor as pycocoevalcap_meteor
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS

__all__ = ["coco_tokenize", "compute_caption_metrics", "java_available"]

# -----------------------------------------------------------------------------------------------------------------
# Stanford PTBTokenizer 3.4.1 (the jar pycocoevalcap ships), ported rule by rule.
#
# The Java tokenizer is a JFlex scanner: at each position every rule is tried, the longest match wins (a rule's
# trailing context, written r1/r2 in JFlex, counts towards the length but is not part of the token) and ties go to
# the rule listed first. We reproduce that with one regex holding one lookahead per rule, and pick the longest.
# Two JFlex details matter: the scanner is case-insensitive for literal text but not inside character classes, and
# it reads UTF-16 code units (a character outside the Basic Multilingual Plane, such as an emoji, is two units that
# no word rule accepts, so it is dropped).
# The macro and rule definitions follow PTBLexer.flex of that release, checked against the jar's output.
# -----------------------------------------------------------------------------------------------------------------

_ACRONYM_FOLLOWERS = (
    "[A]bout|[A]ccording|[A]dditionally|[A]fter|[A]n|[A]s|[A]t|[A]|[B]ut|[E]arlier|[H]ere|[H]er|[H]owever|[H]e"
    r"|[I]f|[I]n|[I]t|[L]ast|[M]any|[M]ore|[M]r\.|[M]s\.|[N]ow|[O]nce|[O]ne|[O]ther|[O]ur|[S]he|[S]ince|[S]ome"
    "|[S]uch|[S]o|[T]hat|[T]hen|[T]here|[T]hese|[T]hey|[T]his|[T]he|[W]e|[W]hen|[W]hile|[W]hat|[Y]et|[Y]ou"
)

# Macros in definition order; {NAME} refers to an earlier one. Python's regex alternation takes the first
# alternative that matches rather than the longest, so alternatives that can be prefixes of others come last.
_MACROS: tuple[tuple[str, str], ...] = (
    (
        "SGML",
        r"<(?:[!?][A-Za-z-][^>\r\n]*|[A-Za-z][A-Za-z0-9_:.-]*(?:[ ]+(?:[A-Za-z][A-Za-z0-9_:.-]*[ ]*=[ ]*"
        r"(?:'[^']*'|\"[^\"]*\")|[A-Za-z][A-Za-z0-9_:.-]*))*[ ]*\/?|\/[A-Za-z][A-Za-z0-9_:.-]*)[ ]*>",
    ),
    ("SPMDASH", r"&(?:MD|mdash|ndash);|[\u0096\u0097\u2013\u2014\u2015]"),
    ("SPAMP", r"&amp;"),
    ("SPPUNC", r"&(?:HT|TL|UR|LR|QC|QL|QR|odq|cdq|#[0-9]+);"),
    ("SPLET", r"&[aeiouAEIOU](?:acute|grave|uml);"),
    ("SPACE", r"[ \t\u00A0\u2000-\u200A\u3000]"),
    ("SPACES", r"{SPACE}+"),
    ("NEWLINE", r"\r?\n|\r|[\u2028\u2029\u000B\u000C\u0085]"),
    ("SPACENL", r"{SPACE}|{NEWLINE}"),
    ("SENTEND", r"{SPACENL}(?:{SPACENL}|[A-Z]|{SGML})"),
    ("DIGIT", r"{UNICODE_DIGIT}|[\u07C0-\u07C9]"),
    ("LETTER_OR_DIGIT", r"{UNICODE_LETTER}|{DIGIT}"),
    ("DATE", r"{DIGIT}{1,2}[\-\/]{DIGIT}{1,2}[\-\/]{DIGIT}{2,4}"),
    ("NUM", r"{DIGIT}*(?:[.:,\u00AD\u066B\u066C]{DIGIT}+)+|{DIGIT}+"),
    ("NUMBER", r"[\-+]?{NUM}"),
    ("SUBSUPNUM", r"[\u207A\u207B\u208A\u208B]?(?:[\u2070\u00B9\u00B2\u00B3\u2074-\u2079]+|[\u2080-\u2089]+)"),
    ("FRAC", r"(?:{DIGIT}{1,4}[- \u00A0])?{DIGIT}{1,4}(?:\\?\/|\u2044){DIGIT}{1,4}"),
    ("FRAC2", r"[\u00BC\u00BD\u00BE\u2153-\u215E]"),
    ("DOLSIGN", r"[A-Z]*\$|#"),
    ("DOLSIGN2", r"[\u00A2\u00A3\u00A4\u00A5\u0080\u20A0\u20AC\u060B\u0E3F\u20A4\uFFE0\uFFE1\uFFE5\uFFE6]"),
    (
        "LETTER",
        r"{UNICODE_LETTER}|{SPLET}|[\u00AD\u0237-\u024F\u02C2-\u02C5\u02D2-\u02DF\u02E5-\u02FF\u0300-\u036F"
        r"\u0370-\u037D\u0384\u0385\u03CF\u03F6\u03FC-\u03FF\u0483-\u0487\u04CF\u04F6-\u04FF\u0510-\u0525"
        r"\u055A-\u055F\u0591-\u05BD\u05BF\u05C1\u05C2\u05C4\u05C5\u05C7\u0615-\u061A\u063B-\u063F\u064B-\u065E"
        r"\u0670\u06D6-\u06EF\u06FA-\u06FF\u070F\u0711\u0730-\u074F\u0750-\u077F\u07A6-\u07B1\u07CA-\u07F5\u07FA"
        r"\u0900-\u0903\u093C\u093E-\u094E\u0951-\u0955\u0962-\u0963\u0981-\u0983\u09BC-\u09C4\u09C7\u09C8"
        r"\u09CB-\u09CD\u09D7\u09E2\u09E3\u0A01-\u0A03\u0A3C\u0A3E-\u0A4F\u0A81-\u0A83\u0ABC-\u0ACF\u0B82"
        r"\u0BBE-\u0BC2\u0BC6-\u0BC8\u0BCA-\u0BCD\u0C01-\u0C03\u0C3E-\u0C56\u0D3E-\u0D44\u0D46-\u0D48"
        r"\u0E30-\u0E3A\u0E47-\u0E4E\u0EB1-\u0EBC\u0EC8-\u0ECD]",
    ),
    ("WORD", r"{LETTER}(?:{LETTER}|{DIGIT})*(?:[.!?]{LETTER}(?:{LETTER}|{DIGIT})*)*"),
    ("APOS", r"['\u0092\u2019]|&apos;"),
    ("APOSETCETERA", r"{APOS}|[`\u0091\u2018\u201B]"),
    ("HYPHEN", r"[-_\u058A\u2010\u2011]"),
    (
        "THING",
        r"(?:[dDoOlL]{APOSETCETERA}(?:{LETTER_OR_DIGIT}))?(?:{LETTER_OR_DIGIT})+"
        r"(?:{HYPHEN}(?:[dDoOlL]{APOSETCETERA}(?:{LETTER_OR_DIGIT}))?(?:{LETTER_OR_DIGIT})+)*",
    ),
    ("THINGA", r"[A-Z]+(?:(?:[+&]|{SPAMP})[A-Z]+)+"),
    ("THING3", r"[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}(?:\\?\/[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}){1,2}"),
    # ACRO accepts single letters ("I." before "The" is "I" + "."); ACRO2, used inside hyphenated words, does not.
    ("ACRO", r"U\.S\.-(?:U\.S\.S\.R|U\.K)|(?:Canada|Sino|Korean|EU|Japan|non)-U\.S|[A-Za-z](?:\.[A-Za-z])*"),
    ("ACRO2", r"U\.S\.-(?:U\.S\.S\.R|U\.K)|(?:Canada|Sino|Korean|EU|Japan|non)-U\.S|[A-Za-z](?:\.[A-Za-z])+"),
    ("HTHING", r"[A-Za-z0-9][A-Za-z0-9.,\u00AD]*(?:-(?:{ACRO2}\.|[A-Za-z0-9\u00AD]+))+"),
    ("REDAUX", r"{APOS}(?:[msdMSD]|re|ve|ll)"),
    ("SWORD", r"[A-Za-z\u00AD]*[A-MO-Za-mo-z]\u00AD*"),
    ("SREDAUX", r"n{APOSETCETERA}t"),
    (
        "APOWORD",
        r"[A-HJ-XZn]{APOSETCETERA}{UNICODE_LETTER}{UNICODE_LETTER}{UNICODE_LETTER}*"
        r"|{UNICODE_LETTER}{UNICODE_LETTER}*[aeiouyAEIOUY]{APOSETCETERA}[aeiouA-Z]{UNICODE_LETTER}*"
        r"|{APOS}n{APOS}?|[lLdDjJ]{APOS}|Dunkin{APOS}|somethin{APOS}|ol{APOS}|{APOS}em|{APOS}[2-9]0s|{APOS}till?"
        r"|{APOS}cause|cont'd\.?|'twas|nor'easter|c'mon|e'er|s'mores|ev'ry|li'l|nat'l",
    ),
    ("APOWORD2", r"y{APOS}"),
    ("FULLURL", r"https?:\/\/[^ \t\n\f\r\"<>|(){}]+[^ \t\n\f\r\"<>|.!?(){},-]"),
    (
        "LIKELYURL",
        r"(?:www\.(?:[^ \t\n\f\r\"<>|.!?(){},]+\.)+[a-zA-Z]{2,4}|(?:[^ \t\n\f\r\"`'<>|.!?(){},-_$]+\.)+"
        r"(?:com|net|org|edu))(?:\/[^ \t\n\f\r\"<>|()]+[^ \t\n\f\r\"<>|.!?(){},-])?",
    ),
    (
        "EMAIL",
        r"(?:&lt;|<)?[a-zA-Z0-9][^ \t\n\f\r\"<>|(){}\u00A0]*@(?:[^ \t\n\f\r\"<>|(){}.\u00A0]+\.)*"
        r"[^ \t\n\f\r\"<>|(){}.\u00A0]+(?:&gt;|>)?",
    ),
    ("TWITTER", r"@[a-zA-Z_][a-zA-Z_0-9]*|#(?:{LETTER})+"),
    ("ABMONTH", r"Jan|Feb|Mar|Apr|Jun|Jul|Aug|Sept?|Oct|Nov|Dec"),
    ("ABDAYS", r"Mon|Tues?|Wed|Thu(?:rs)?|Fri"),
    (
        "ABSTATE",
        r"Ala|Ariz|[A]z|[A]rk|Calif|Colo|Conn|Ct|Dak|[D]el|Fla|Ga|[I]ll|Ind|Kans?|Ky|[L][a]|[M]ass|Md|Mich|Minn"
        r"|[M]iss|Mo|Mont|Neb|Nev|Okla|[O]re|[P]a|Penn|Tenn|[T]ex|Va|Vt|[W]ash|Wisc?|Wyo",
    ),
    (
        "ABTITLE",
        r"Mr|Mrs|Ms|[M]iss|Drs?|Profs?|Sens?|Reps?|Attys?|Lt|Col|Gen|Messrs|Govs?|Adm|Rev|Maj|Sgt|Cpl|Pvt|Capt|Ste?"
        r"|Ave|Pres|Lieut|Hon|Brig|Co?mdr|Pfc|Spc|Supts?|Det|Mt|Ft|Adj|Adv|Asst|Assoc|Ens|Insp|Mlle|Mme|Msgr|Sfc",
    ),
    ("ABPTIT", r"Jr|Sr|Bros|(?:Ed|Ph)\.D|Blvd|Rd|Esq"),
    ("ABCOMP", r"Inc|Cos?|Corp|Pp?t[ye]s?|Ltd|Plc|Rt|Bancorp|Bhd|Assn|Univ|Intl|Sys"),
    ("ABCOMP2", r"Invt|Elec|Natl|M[ft]g|Dept|Ph"),
    ("ABNUM", r"tel|est|ext|sq"),
    # ABBREV1 is usually followed by a lower-case word, ABBREV2 by an upper-case one, ABBREV3 only by a number.
    ("ABBREV1", r"(?:{ABPTIT}|{ABMONTH}|{ABDAYS}|{ABSTATE}|{ABCOMP}|{ABNUM}|etc|al|seq|Bldg)\."),
    ("ABBREV4", r"{ACRO}|{ABTITLE}|vs|Alex|Wm|Jos|Cie|cf|TREAS|{ABCOMP2}|[A-Za-z]"),
    ("ABBREV2", r"(?:{ABBREV4})\."),
    ("ABBREV3", r"(?:ca|figs?|prop|nos?|art|bldg|pp|op)\."),
    ("ACRONYM", r"(?:{ACRO})\."),
    (
        "PHONE",
        r"(?:\([0-9]{2,3}\)[ \u00A0]?|(?:\+\+?)?(?:[0-9]{2,4}[\- \u00A0])?[0-9]{2,4}[\- \u00A0])[0-9]{3,4}"
        r"[\- \u00A0]?[0-9]{3,5}|(?:(?:\+\+?)?[0-9]{2,4}\.)?[0-9]{2,4}\.[0-9]{3,4}\.[0-9]{3,5}",
    ),
    ("LDOTS", r"\.{3,5}|(?:\.[ \u00A0]){2,4}\.|[\u0085\u2026]"),
    ("INSENTP", r"[,;:\u3001]"),
    (
        "QUOTES",
        r"''|[`\u2018\u2019\u201A\u201B\u201C\u201D\u0091\u0092\u0093\u0094\u201E\u201F\u2039\u203A\u00AB\u00BB]"
        r"{1,2}|{APOS}",
    ),
    ("DBLQUOT", r"\"|&quot;"),
    (
        "TBSPEC",
        r"-(?:RRB|LRB|RCB|LCB|RSB|LSB)-|C\.D\.s|pro-|anti-|S(?:&|&amp;)P-500|S(?:&|&amp;)Ls|Cap{APOS}n|c{APOS}est",
    ),
    ("TBSPEC2", r"{APOS}[0-9][0-9]"),
    ("SMILEY", r"[<>]?[:;=][\-o\*']?[\(\)DPdpO\\{@\|\[\]]"),
    (
        "ASIANSMILEY",
        r"[\^x=~<>]\.\[\^x=~<>]|[\-\^x=~<>']_[\-\^x=~<>']|\([\-\^x=~<>'][_.]?[\-\^x=~<>']\)"
        r"|\([\^x=~<>']-[\^x=~<>'`]\)",
    ),
    (
        "MISCSYMBOL",
        r"[+%&~\^|\\\u00A6\u00A7\u00A8\u00A9\u00AC\u00AE\u00AF\u00B0-\u00B3\u00B4-\u00BA\u00D7\u00F7\u0387\u05BE"
        r"\u05C0\u05C3\u05C6\u05F3\u05F4\u0600-\u0603\u0606-\u060A\u060C\u0614\u061B\u061E\u066A\u066D\u0703-\u070D"
        r"\u07F6\u07F7\u07F8\u0964\u0965\u0E4F\u1FBD\u2016\u2017\u2020-\u2023\u2030-\u2038\u203B\u203E-\u2042"
        r"\u2044\u207A-\u207F\u208A-\u208E\u2100-\u214F\u2190-\u21FF\u2200-\u2BFF\u3012\u30FB\uFF01-\uFF0F"
        r"\uFF1A-\uFF20\uFF3B-\uFF40\uFF5B-\uFF65]",
    ),
)

# An action receives the matched token (trailing context excluded) and returns the token text to emit (None emits
# nothing) and how many characters it consumed; the rest is scanned again, as JFlex's yypushback does.
_Emitted = tuple[str | None, int]
_Action = Callable[[str], _Emitted]


def _keep(token: str) -> _Emitted:
    return token, len(token)


def _drop(token: str) -> _Emitted:
    return None, len(token)


def _remove_soft_hyphens(token: str) -> _Emitted:
    return token.replace("\u00ad", "") or "-", len(token)


def _replace_with(text: str) -> _Action:
    return lambda token: (text, len(token))


def _split_off_last(count: int) -> _Action:
    """Assimilations: "cannot" gives "can" and "not" is scanned again."""
    return lambda token: (token[:-count], len(token) - count)


def _repeat_final_period(token: str) -> _Emitted:
    """Sentence-final abbreviation: "etc." is a token and its period is scanned again as a full stop."""
    return token, len(token) - 1


def _acronym_before_sentence(token: str) -> _Emitted:
    """Like _repeat_final_period, but a single letter ("I.") loses its period."""
    return (token[:1] if len(token) == 2 else token), len(token) - 1


def _normalize_ampersand(token: str) -> _Emitted:
    return re.sub("&amp;", "&", token, flags=re.IGNORECASE), len(token)


def _normalize_parentheses(token: str) -> _Emitted:
    return token.replace("(", "-LRB-").replace(")", "-RRB-"), len(token)


def _non_breaking_spaces(token: str) -> _Emitted:
    return token.replace(" ", "\u00a0"), len(token)


def _phone_number(token: str) -> _Emitted:
    return token.replace(" ", "\u00a0").replace("(", "-LRB-").replace(")", "-RRB-"), len(token)


def _hyphens(token: str) -> _Emitted:
    return ("--" if 3 <= len(token) <= 4 else token), len(token)


_FRACTION_CHARACTERS = {"\u00bc": "1/4", "\u00bd": "1/2", "\u00be": "3/4", "\u2153": "1/3", "\u2154": "2/3"}


def _fraction_character(token: str) -> _Emitted:
    return _FRACTION_CHARACTERS.get(token, token), len(token)


def _currency(token: str) -> _Emitted:
    normalized = token.replace("\u00a2", "cents").replace("\u00a3", "#")
    return re.sub("[\u0080\u00a4\u20a0\u20ac]", "$", normalized), len(token)


def _latex_quotes(probably_left: bool) -> _Action:
    """Quotes become `` and '' (double) or ` and ' (single), as in the Penn Treebank."""
    straight_single, straight_double = ("`", "``") if probably_left else ("'", "''")

    def convert(token: str) -> _Emitted:
        text = re.sub("&apos;|'", straight_single, token)
        text = re.sub('"|&quot;', straight_double, text)
        text = re.sub("[\u0091\u2018\u201b\u2039]", "`", text)
        text = re.sub("[\u0092\u2019\u203a]", "'", text)
        text = re.sub("[\u0093\u201c\u00ab]", "``", text)
        return re.sub("[\u0094\u201d\u00bb]", "''", text), len(token)

    return convert


class _LexRule(NamedTuple):
    name: str
    pattern: str
    trailing_context: str
    action: _Action


# In PTBLexer.flex order: on equal lengths the earlier rule wins.
_RULES: tuple[_LexRule, ...] = (
    _LexRule("programming language", r"c\+\+|(?:c|f)#", "", _keep),
    _LexRule("assimilation, 3 characters split off", r"cannot|'twas", "", _split_off_last(3)),
    _LexRule(
        "assimilation, 2 characters split off", r"{APOS}tis|gonna|gotta|lemme|gimme|wanna", "", _split_off_last(2)
    ),
    _LexRule("SGML tag", "{SGML}", "", _non_breaking_spaces),
    _LexRule("dash entity", "{SPMDASH}", "", _replace_with("--")),
    _LexRule("ampersand entity", "{SPAMP}", "", _normalize_ampersand),
    _LexRule("punctuation entity", "{SPPUNC}", "", _keep),
    _LexRule("word before 's, 're, ...", "{WORD}", "{REDAUX}", _remove_soft_hyphens),
    _LexRule("word before n't", "{SWORD}", "{SREDAUX}", _remove_soft_hyphens),
    _LexRule("word", "{WORD}", "", _remove_soft_hyphens),
    _LexRule("word with apostrophe", "{APOWORD}", "", _keep),
    _LexRule("y'", "{APOWORD2}", "{UNICODE_LETTER}", _keep),
    _LexRule("URL", "{FULLURL}", "", _keep),
    _LexRule("likely URL", "{LIKELYURL}", "", _keep),
    _LexRule("e-mail", "{EMAIL}", "", _keep),
    _LexRule("twitter", "{TWITTER}", "", _keep),
    _LexRule("'s, 're, ... before a non-letter", "{REDAUX}", "[^A-Za-z]", _latex_quotes(probably_left=False)),
    _LexRule("n't", "{SREDAUX}", "", _latex_quotes(probably_left=False)),
    _LexRule("date", "{DATE}", "", _keep),
    _LexRule("number", "{NUMBER}", "", _remove_soft_hyphens),
    _LexRule("superscript or subscript number", "{SUBSUPNUM}", "", _keep),
    _LexRule("fraction", "{FRAC}", "", _non_breaking_spaces),
    _LexRule("fraction character", "{FRAC2}", "", _fraction_character),
    _LexRule("treebank special", "{TBSPEC}", "", _normalize_ampersand),
    _LexRule("slashed words", "{THING3}", "", _keep),
    _LexRule("dollar sign", "{DOLSIGN}", "", _keep),
    _LexRule("currency sign", "{DOLSIGN2}", "", _currency),
    _LexRule(
        "acronym ending a sentence",
        "{ACRONYM}",
        f"{{SPACENL}}+(?:{_ACRONYM_FOLLOWERS}|{{SGML}}){{SPACENL}}",
        _acronym_before_sentence,
    ),
    _LexRule("abbreviation before a number", "{ABBREV3}", "{SPACENL}?{DIGIT}", _keep),
    _LexRule("abbreviation ending a sentence", "{ABBREV1}", "{SENTEND}", _repeat_final_period),
    _LexRule("abbreviation, followed by two characters", "{ABBREV1}", r"[\s\S][\s\S]", _keep),
    _LexRule("abbreviation", "{ABBREV1}", "", _keep),
    _LexRule("title or acronym", "{ABBREV2}", "", _keep),
    _LexRule("title or acronym before a space", "{ABBREV4}", "{SPACE}", _keep),
    _LexRule("acronym before a space", "{ACRO}", "{SPACENL}", _keep),
    _LexRule("'90", "{TBSPEC2}", "{SPACENL}", _keep),
    _LexRule("word with period before a comma", r"{WORD}\.", "{INSENTP}", _remove_soft_hyphens),
    _LexRule("phone number", "{PHONE}", "", _phone_number),
    _LexRule("opening double quote", "{DBLQUOT}", "[A-Za-z0-9$]", _latex_quotes(probably_left=True)),
    _LexRule("double quote", "{DBLQUOT}", "", _latex_quotes(probably_left=False)),
    _LexRule("smiley", "{SMILEY}", r"(?!{LETTER_OR_DIGIT})[\s\S]", _normalize_parentheses),
    _LexRule("asian smiley", "{ASIANSMILEY}", "", _normalize_parentheses),
    _LexRule("fake duck feet", "<<|>>", "", _keep),
    _LexRule("opening square bracket", r"\[", "", _replace_with("-LSB-")),
    _LexRule("closing square bracket", r"\]", "", _replace_with("-RSB-")),
    _LexRule("less than", "<|&lt;", "", _replace_with("<")),
    _LexRule("greater than", ">|&gt;", "", _replace_with(">")),
    _LexRule("opening brace", r"\{", "", _replace_with("-LCB-")),
    _LexRule("closing brace", r"\}", "", _replace_with("-RCB-")),
    _LexRule("opening parenthesis", r"\(", "", _replace_with("-LRB-")),
    _LexRule("closing parenthesis", r"\)", "", _replace_with("-RRB-")),
    _LexRule("hyphens", "-+", "", _hyphens),
    _LexRule("ellipsis", "{LDOTS}", "", _replace_with("...")),
    _LexRule("footnote marks", "@+|#+|_+", "", _keep),
    _LexRule("asterisks", r"\*+|(?:\\\*){1,3}", "", _keep),
    _LexRule("comma, semicolon, colon", "{INSENTP}", "", _keep),
    _LexRule("question and exclamation marks", "[?!]+", "", _keep),
    _LexRule("full stop", "[.\u00a1\u00bf\u037e\u0589\u061f\u06d4\u0700-\u0702\u07fa\u3002]", "", _keep),
    _LexRule("equals", "=", "", _keep),
    _LexRule("slash", r"\/", "", _keep),
    _LexRule("hyphenated word with period before a comma", r"{HTHING}\.", "{INSENTP}", _remove_soft_hyphens),
    _LexRule("hyphenated word", "{HTHING}", "", _remove_soft_hyphens),
    _LexRule("alphanumeric with period before a comma", r"{THING}\.", "{INSENTP}", _keep),
    _LexRule("alphanumeric", "{THING}", "", _keep),
    _LexRule("AT&T with period before a comma", r"{THINGA}\.", "{INSENTP}", _normalize_ampersand),
    _LexRule("AT&T", "{THINGA}", "", _normalize_ampersand),
    _LexRule("opening single quote", "'", r"[A-Za-z][^ \t\n\r\u00A0]", _latex_quotes(probably_left=True)),
    _LexRule("'s, 're, ...", "{REDAUX}", "", _latex_quotes(probably_left=False)),
    _LexRule("quotes", "{QUOTES}", "", _latex_quotes(probably_left=False)),
    _LexRule("symbol", "{MISCSYMBOL}", "", _keep),
    _LexRule("space", r"\x00|{SPACES}|[\u200B\u200E-\u200F\uFEFF]", "", _drop),
    _LexRule("newline", "{NEWLINE}", "", _drop),
    _LexRule("non-breaking space entity", "&nbsp;", "", _drop),
    _LexRule("untokenizable character", r"(?s:.)", "", _drop),
)


def _bmp_character_class(categories: frozenset[str]) -> str:
    """A regex character class of the BMP characters in these Unicode categories (Java's `char` model)."""
    ranges: list[tuple[int, int]] = []
    for code in range(0x10000):
        if unicodedata.category(chr(code)) not in categories:
            continue
        if ranges and ranges[-1][1] == code - 1:
            ranges[-1] = (ranges[-1][0], code)
        else:
            ranges.append((code, code))
    body = "".join(re.escape(chr(low)) + ("" if low == high else "-" + re.escape(chr(high))) for low, high in ranges)
    return f"[{body}]"


def _case_sensitive_classes(pattern: str) -> str:
    """Wrap every character class in (?-i:...): JFlex's %caseless does not reach inside classes, Python's does."""
    pieces = []
    position = 0
    while position < len(pattern):
        character = pattern[position]
        if character == "\\":
            pieces.append(pattern[position : position + 2])
            position += 2
        elif character == "[":
            end = position + 1
            end += pattern[end] == "^"
            end += pattern[end] == "]"
            while pattern[end] != "]":
                end += 2 if pattern[end] == "\\" else 1
            pieces.append(f"(?-i:{pattern[position : end + 1]})")
            position = end + 1
        else:
            pieces.append(character)
            position += 1
    return "".join(pieces)


@cache
def _ptb_lexer() -> tuple[re.Pattern[str], list[int], list[int]]:
    """Compile all rules into one regex of optional lookaheads, built once (about 0.1 s).

    Returns the regex and, for each rule, the group spanning its whole match (trailing context included) and the
    group spanning its token.
    """
    macros = {
        "UNICODE_LETTER": _bmp_character_class(frozenset({"Lu", "Ll", "Lt", "Lm", "Lo"})),
        "UNICODE_DIGIT": _bmp_character_class(frozenset({"Nd"})),
    }

    def expand(pattern: str) -> str:
        return re.sub(r"\{([A-Z0-9_]+)\}", lambda match: f"(?:{macros[match.group(1)]})", pattern)

    for name, pattern in _MACROS:
        macros[name] = expand(pattern)
    lookaheads = [
        f"(?:(?=(?P<match{index}>(?P<token{index}>{expand(rule.pattern)}){expand(rule.trailing_context)}))|)"
        for index, rule in enumerate(_RULES)
    ]
    lexer = re.compile(_case_sensitive_classes("".join(lookaheads)), re.IGNORECASE)
    match_groups = [lexer.groupindex[f"match{index}"] for index in range(len(_RULES))]
    token_groups = [lexer.groupindex[f"token{index}"] for index in range(len(_RULES))]
    return lexer, match_groups, token_groups


# Most tokens are plain words followed by a space. For a run of ASCII letters followed by white space, every rule
# that could match at least as long yields the same text (abbreviation and acronym rules need a period, apostrophe,
# hyphen, slash, @ or $), except the assimilations, which are left to the full lexer. This makes tokenizing 10x faster.
_PLAIN_WORD_OR_SPACES = re.compile(r"([A-Za-z]+)(?=[ \t\n])|[ \t]+")
_ASSIMILATIONS = frozenset({"cannot", "gonna", "gotta", "lemme", "gimme", "wanna"})
_SURROGATE_PAIR = re.compile("[\ud800-\udbff][\udc00-\udfff]")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _to_utf16_code_units(text: str) -> str:
    """Split characters outside the BMP into surrogate pairs, so that rules see the code units Java sees."""
    if all(character <= "\uffff" for character in text):
        return text
    units = text.encode("utf-16-le", "surrogatepass")
    return "".join(chr(int.from_bytes(units[i : i + 2], "little")) for i in range(0, len(units), 2))


def _from_utf16_code_units(token: str) -> str:
    """Join surrogate pairs back; a lone surrogate becomes '?', as Java's UTF-8 writer prints it."""
    joined = _SURROGATE_PAIR.sub(
        lambda pair: chr(0x10000 + ((ord(pair[0][0]) - 0xD800) << 10) + ord(pair[0][1]) - 0xDC00), token
    )
    return _LONE_SURROGATE.sub("?", joined)


def _ptb_tokens(caption: str) -> list[str]:
    """Tokens of one caption as Stanford PTBTokenizer 3.4.1 writes them, before lower-casing."""
    lexer, match_groups, token_groups = _ptb_lexer()
    # In pycocoevalcap's file every caption but the last is followed by a newline; some rules look at it.
    text = _to_utf16_code_units(caption) + "\n"
    end_of_caption = len(text) - 1
    tokens = []
    position = 0
    while position < end_of_caption:
        plain = _PLAIN_WORD_OR_SPACES.match(text, position)
        if plain and (plain.group(1) is None or plain.group(1).lower() not in _ASSIMILATIONS):
            if plain.group(1):
                tokens.append(plain.group(1))
            position = plain.end()
            continue
        spans = lexer.match(text, position).regs
        match_ends = [spans[group][1] for group in match_groups]
        rule = match_ends.index(max(match_ends))  # longest match; the first rule wins ties
        token_start, token_end = spans[token_groups[rule]]
        emitted, consumed = _RULES[rule].action(text[token_start:token_end])
        if emitted is not None:
            tokens.append(_from_utf16_code_units(emitted))
        position += consumed
    return tokens


@lru_cache(maxsize=1 << 16)
def coco_tokenize(caption: str) -> str:
    """Tokenize a caption exactly as pycocoevalcap's ``PTBTokenizer`` does, without Java.

    That is Stanford PTBTokenizer 3.4.1 with ``-preserveLines -lowerCase``, then removal of coco's punctuation
    tokens. Its quirks are kept on purpose, because published scores include them: "isn't" gives "is n't",
    "(" gives "-lrb-" (lower-cased, so coco's punctuation filter, which looks for "-LRB-", keeps it), "U.S." and
    "1,000" stay whole, "cannot" gives "can not". Results are cached, since references are scored again and again.

    Known differences from pycocoevalcap, all outside normal captions: pycocoevalcap tokenizes all captions as one
    file, so a few rules see the next caption (a caption ending in a single letter plus period, such as "plan B.",
    gives "b" before a caption starting with "A", "The", ... and "b." otherwise; this port behaves as if nothing
    followed); a caption holding "\\r", "\\x0b", "\\x0c", "\\u2028" or "\\u2029" makes Java emit extra lines and
    shifts every later caption in pycocoevalcap, while here those characters are spaces; and digits glued to a web
    address ("10www.x.com") split differently.

    Args:
        caption: One caption, in any case.

    Returns:
        The lower-cased tokens joined by single spaces ("" when nothing is left).

    Example:
        >>> coco_tokenize('A man (in red) isn\\'t "happy".')
        "a man -lrb- in red -rrb- is n't happy"
    """
    line = " ".join(_ptb_tokens(caption.replace("\n", " "))).lower()
    return " ".join(token for token in line.rstrip().split(" ") if token not in PUNCTUATIONS)


# -----------------------------------------------------------------------------------------------------------------
# Metrics
# -----------------------------------------------------------------------------------------------------------------

_METEOR_JAR = Path(pycocoevalcap_meteor.__file__).with_name(pycocoevalcap_meteor.METEOR_JAR)
_METEOR_TIMEOUT_S = 600.0


def java_available() -> bool:
    """Whether a ``java`` executable is on the PATH (METEOR needs it)."""
    return shutil.which("java") is not None


def _validate(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if isinstance(predictions, str) or isinstance(references, str):
        raise TypeError("predictions and references must be sequences (one entry per image), not a single string")
    if len(predictions) != len(references):
        raise ValueError(
            f"predictions and references must have one entry per image: got {len(predictions)} predictions "
            f"and {len(references)} reference lists"
        )
    if len(predictions) == 0:
        raise ValueError("no images to score: predictions and references are empty")
    for index, (prediction, image_references) in enumerate(zip(predictions, references)):
        if not isinstance(prediction, str):
            raise TypeError(f"predictions[{index}] must be a string, got {type(prediction).__name__}")
        if isinstance(image_references, str):
            raise TypeError(f"references[{index}] must be a list of reference strings, got a single string")
        if len(image_references) == 0:
            raise ValueError(f"references[{index}] is empty: every image needs at least one reference caption")
        for reference_index, reference in enumerate(image_references):
            if not isinstance(reference, str):
                raise TypeError(
                    f"references[{index}][{reference_index}] must be a string, got {type(reference).__name__}"
                )
            if not reference.strip():
                raise ValueError(f"references[{index}][{reference_index}] is blank")


def _meteor_score(gts: dict[int, list[str]], res: dict[int, list[str]]) -> float:
    """Corpus METEOR 1.5 exactly as pycocoevalcap's ``Meteor`` computes it, with the same jar and protocol.

    pycocoevalcap's class can hang (it never reads the process's stderr) and deadlocks at garbage collection after a
    failure (it keeps a lock it never releases), so we drive the jar ourselves and kill it after a timeout.
    """
    command = ["java", "-jar", "-Xmx2G", _METEOR_JAR.name, "-", "-", "-stdio", "-l", "en", "-norm"]
    with subprocess.Popen(
        command, cwd=_METEOR_JAR.parent, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    ) as process:
        watchdog = threading.Timer(_METEOR_TIMEOUT_S, process.kill)  # a killed process ends any blocked read
        watchdog.start()
        try:
            return _meteor_exchange(process, gts, res)
        finally:
            watchdog.cancel()
            process.kill()


def _meteor_exchange(process: subprocess.Popen[bytes], gts: dict[int, list[str]], res: dict[int, list[str]]) -> float:
    """pycocoevalcap's dialogue with the jar: a SCORE line per image gives its statistics, then one EVAL line of all
    the statistics gives a score per image followed by the corpus score."""

    def send(line: str) -> None:
        process.stdin.write(f"{line}\n".encode())
        process.stdin.flush()

    def receive() -> str:
        line = process.stdout.readline()
        if not line:
            raise RuntimeError(f"METEOR (java -jar {_METEOR_JAR.name}) stopped before returning a score")
        return line.decode().strip()

    statistics = []
    for image, references in gts.items():
        hypothesis = res[image][0].replace("|||", "").replace("  ", " ")
        send(" ||| ".join(("SCORE", *references, hypothesis)))
        statistics.append(receive())
    send(" ||| ".join(("EVAL", *statistics)))
    for _ in statistics:
        receive()
    return float(receive())


def compute_caption_metrics(
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    *,
    include_meteor: bool | None = None,
) -> dict[str, float]:
    """Score generated captions against their references exactly as coco-caption does.

    Pass a whole split at once: BLEU is a corpus statistic and CIDEr-D's document frequencies come from all the
    references given, so scores of batches cannot be averaged (one image alone always has CIDEr 0).

    Args:
        predictions: One generated caption per image, raw text (it is tokenized here). An empty string is allowed
            and scores 0 for its image.
        references: For each image, its reference captions (at least one, none blank).
        include_meteor: Compute METEOR (needs Java). ``None`` computes it when ``java`` is on the PATH and leaves
            it out, with a warning, if the jar fails; ``True`` requires it; ``False`` skips it.

    Returns:
        ``bleu_1``..``bleu_4``, ``cider`` (CIDEr-D), ``rouge_l``, ``meteor`` when computed, and ``num_images``.

    Raises:
        TypeError, ValueError: Inputs of the wrong shape; the message names the offending index.
        RuntimeError: ``include_meteor=True`` and Java is missing or METEOR fails.

    Example:
        >>> scores = compute_caption_metrics(
        ...     ["a dog runs on the grass", "two men ride bikes"],
        ...     [["A dog is running on the grass .", "A brown dog runs ."], ["Two men riding bicycles ."]],
        ...     include_meteor=False,
        ... )
        >>> round(scores["bleu_1"], 4), scores["num_images"]
        (0.7239, 2)
    """
    _validate(predictions, references)
    if include_meteor and not java_available():
        raise RuntimeError("include_meteor=True but no `java` on the PATH: METEOR runs a Java jar")
    gts = {
        image: [coco_tokenize(reference) for reference in image_references]
        for image, image_references in enumerate(references)
    }
    res = {image: [coco_tokenize(prediction)] for image, prediction in enumerate(predictions)}

    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    rouge_l, _ = Rouge().compute_score(gts, res)
    scores: dict[str, float] = {f"bleu_{n}": float(bleu[n - 1]) for n in range(1, 5)}
    scores["cider"] = float(cider)
    scores["rouge_l"] = float(rouge_l)
    if include_meteor or (include_meteor is None and java_available()):
        try:
            scores["meteor"] = _meteor_score(gts, res)
        except (OSError, RuntimeError, ValueError) as error:
            if include_meteor:
                raise RuntimeError(f"METEOR failed: {error}") from error
            warnings.warn(f"METEOR left out: {error}", RuntimeWarning, stacklevel=2)
    scores["num_images"] = len(predictions)
    return scores
