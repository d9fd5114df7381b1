"""coco-caption's own tokenizer: the Stanford PTB tokenizer jar that pycocoevalcap ships, run as a separate process.

This is exactly the command pycocoevalcap's ``PTBTokenizer`` runs (``-preserveLines -lowerCase``, one caption per
line, coco's punctuation list removed afterwards), so scores computed on its output are coco-caption's by
construction. Two details differ, both where pycocoevalcap itself would go wrong:

- the captions are written to a private temporary folder, not next to the jar (a read-only ``site-packages``
  breaks pycocoevalcap), and the JVM is told to read and write UTF-8 whatever the machine's locale;
- every character the jar treats as a line break (``\\r``, ``\\v``, ``\\f``, U+2028, U+2029, not only ``\\n``) is
  replaced by a space, because one caption that spans two lines would shift every later caption onto the wrong
  image; the number of lines that come back is checked.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from pycocoevalcap.tokenizer import ptbtokenizer

JAR = Path(ptbtokenizer.__file__).with_name(ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR)
TIMEOUT_S = 600.0

_LINE_BREAKS = re.compile("[\n\r\v\f\u2028\u2029]")
_DROPPED = frozenset(ptbtokenizer.PUNCTUATIONS)


def java_available() -> bool:
    """Whether a ``java`` executable is on the PATH."""
    return shutil.which("java") is not None


def java_tokenize(captions: Sequence[str]) -> list[str]:
    """Tokenize many captions with one run of coco-caption's Java PTB tokenizer (one JVM for the whole list).

    Returns one space-separated, lower-cased string of tokens per caption, punctuation tokens removed.

    Raises:
        RuntimeError: ``java`` is missing, the jar fails or times out, or it returns the wrong number of lines.
    """
    if not captions:
        return []
    if not java_available():
        raise RuntimeError("the ptb-java caption tokenizer needs `java` on the PATH")
    # Lone surrogates cannot be written as UTF-8; "?" is what the jar would make of them and is then dropped.
    lines = [_LINE_BREAKS.sub(" ", caption).encode("utf-8", errors="replace").decode("utf-8") for caption in captions]
    with tempfile.TemporaryDirectory(prefix="imgcap-ptb-") as folder:
        source = Path(folder) / "captions.txt"
        source.write_text("\n".join(lines), encoding="utf-8")
        command = ["java", "-Dfile.encoding=UTF-8", "-Dstdout.encoding=UTF-8", "-cp", str(JAR)]
        command += ["edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase", str(source)]
        try:
            result = subprocess.run(command, capture_output=True, timeout=TIMEOUT_S, check=False)
        except (OSError, subprocess.TimeoutExpired) as error:
            raise RuntimeError(f"the Java PTB tokenizer could not run: {error}") from error
    if result.returncode != 0:
        message = result.stderr.decode("utf-8", errors="replace").strip().splitlines()
        raise RuntimeError(
            f"the Java PTB tokenizer ({JAR.name}) exited with status {result.returncode}"
            + (f": {message[-1]}" if message else "")
        )
    tokenized = result.stdout.decode("utf-8", errors="replace").split("\n")
    if tokenized and tokenized[-1] == "" and len(tokenized) == len(lines) + 1:
        tokenized.pop()  # the jar ends its output with a newline
    if len(tokenized) != len(lines):
        raise RuntimeError(
            f"the Java PTB tokenizer returned {len(tokenized)} lines for {len(lines)} captions; refusing to guess "
            "which caption is which"
        )
    return [" ".join(token for token in line.rstrip().split(" ") if token not in _DROPPED) for line in tokenized]
