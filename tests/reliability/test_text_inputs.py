"""Caption text: the tokenizer never raises on user text and keeps every id in the vocabulary, the processor truncates
at its documented maximum keeping `<eos>`, and decoding any id sequence never raises. Seeded fuzzing, no mocks."""

import random

import numpy as np
import pytest
import torch
from conftest import TINY_CAPTIONS

from imgcap_hf import ImgCapImageProcessor, ImgCapProcessor, ImgCapTokenizer
from imgcap_hf.models.imgcap.processing_imgcap import DEFAULT_MAX_CAPTION_LENGTH

# Character pools a user can type or paste: emoji (with skin tones and joiners), Arabic, CJK, combining marks, control
# characters with NUL, odd whitespace, digits and punctuation, lone surrogates (JSON can carry them).
POOLS = [
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ",
    "😀👍🏽👨‍👩‍👧🇫🇷❤️",
    "مرحبا بالعالم كلب يجري ـ ً ٌ",
    "你好世界猫狗日本語한국어",
    "e\u0301a\u0308\u0327\u20dd",
    "\x00\x01\x07\x1b\x7f\u200b\u200d\ufeff",
    " \t\n\r\x0b\x0c\u00a0\u2028\u3000",
    "0123456789.,;:!?'\"()[]{}-_/\\@#$%^&*+=<>|~`",
    "\ud800\udbff\udc00\udfff",
]


def random_text(generator: random.Random) -> str:
    length = generator.choice([0, 1, 3, 10, 40, 200])
    return "".join(generator.choice(generator.choice(POOLS)) for _ in range(length))


@pytest.fixture(scope="module", params=["en", "ar"])
def tokenizer(request) -> ImgCapTokenizer:
    captions = TINY_CAPTIONS if request.param == "en" else ["كلب يجري في الحديقة .", "رجل يركب دراجة ."]
    return ImgCapTokenizer.from_captions(captions, min_frequency=1, lang=request.param)


def edge_texts() -> list[str]:
    return [
        "",
        "   ",
        "\n\t ",
        "x" * 10_000,
        " ".join(["a dog"] * 2_000),
        "123 456 789",
        "!!! ??? ...",
        "😀😀😀",
        "كلب يجري",
        "\x00",
        "A\u0301 caf\u00e9 na\u00efve",
        "\ud83d",  # half of an emoji's surrogate pair
    ]


def test_encoding_never_raises_and_every_id_is_in_the_vocabulary(tokenizer):
    generator = random.Random(0)
    texts = edge_texts() + [random_text(generator) for _ in range(300)]
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id, repr(text)
        assert all(0 <= index < len(tokenizer) for index in ids), repr(text)
        assert isinstance(tokenizer.decode(ids, skip_special_tokens=True), str)
    batch = tokenizer(texts, padding=True, truncation=True, max_length=12)["input_ids"]
    assert all(len(ids) == len(batch[0]) <= 12 for ids in batch)


def test_empty_and_whitespace_captions_encode_as_sos_eos(tokenizer):
    for text in ("", "   ", "\n\t\u3000"):
        assert tokenizer(text)["input_ids"] == [tokenizer.bos_token_id, tokenizer.eos_token_id]


def test_a_vocabulary_can_be_built_from_hostile_captions():
    generator = random.Random(1)
    captions = edge_texts() + [random_text(generator) for _ in range(50)]
    tokenizer = ImgCapTokenizer.from_captions(captions, min_frequency=1)
    assert tokenizer("a dog")["input_ids"][0] == tokenizer.bos_token_id


def test_the_processor_truncates_at_its_documented_maximum_and_keeps_eos(tokenizer):
    processor = ImgCapProcessor(ImgCapImageProcessor(crop_size=32), tokenizer)
    labels = processor(text=["x " * 10_000, "a dog ."], return_tensors="pt")["labels"]
    # The labels drop <sos>: one position fewer than the caption's tokens.
    assert labels.shape == (2, DEFAULT_MAX_CAPTION_LENGTH - 1)
    assert labels[0, -1].item() == tokenizer.eos_token_id
    assert (labels[1] == -100).any()  # the short caption is padded, not stretched

    explicit = processor(text="x " * 10_000, max_length=6, return_tensors="pt")["labels"]
    assert explicit.shape == (1, 5) and explicit[0, -1].item() == tokenizer.eos_token_id
    tokenizer_limit = ImgCapProcessor(ImgCapImageProcessor(crop_size=32), tokenizer)
    tokenizer_limit.tokenizer = ImgCapTokenizer(vocab=tokenizer.get_vocab(), lang=tokenizer.lang, model_max_length=8)
    assert tokenizer_limit(text="x " * 100, return_tensors="pt")["labels"].shape == (1, 7)
    whole = processor(text="x " * 100, truncation=False, return_tensors="pt")["labels"]
    assert whole.shape[1] > DEFAULT_MAX_CAPTION_LENGTH  # truncation=False keeps every token


def id_sequences(vocab_size: int) -> list:
    generator = random.Random(2)
    sequences = [
        [],
        [-1],
        [-100],
        [-100, -100],
        [vocab_size],
        [10**9],
        [2**63 - 1],
        [-(2**63)],
        [2**80],
        [0, 1, 2, 3],
        [2, 3, 1, 1, 1],
        [3, 2],
        np.array([5, -100, 10**9]),
        np.array([], dtype=np.int64),
        np.array([4, 5], dtype=np.int32),
        torch.tensor([5, 3, -100]),
        torch.tensor([], dtype=torch.long),
        (4, 5, 6),
        [np.int64(4), np.int16(5)],
        [True, False],
    ]
    for _ in range(200):
        sequences.append([generator.randint(-200, vocab_size + 200) for _ in range(generator.randint(0, 30))])
    return sequences


def test_decoding_any_id_sequence_never_raises(tokenizer):
    for ids in id_sequences(len(tokenizer)):
        for skip_special_tokens in (False, True):
            assert isinstance(tokenizer.decode(ids, skip_special_tokens=skip_special_tokens), str), ids
            assert len(tokenizer.batch_decode([ids, ids], skip_special_tokens=skip_special_tokens)) == 2
            assert isinstance(tokenizer.convert_ids_to_tokens(ids), list)


def test_out_of_range_ids_decode_as_unk_and_scalars_decode_as_one_token(tokenizer):
    unk = tokenizer.unk_token
    assert tokenizer.decode([-100, len(tokenizer), 10**12, -5]) == " ".join([unk] * 4)
    assert tokenizer.decode([-100], skip_special_tokens=True) == unk  # <unk> stands for a word: never dropped
    for scalar in (torch.tensor(3), np.int64(3), 3):
        assert tokenizer.convert_ids_to_tokens(scalar) == tokenizer.eos_token
        assert tokenizer.decode(scalar) == tokenizer.eos_token
    assert tokenizer.batch_decode(torch.tensor([[2, 3], [-1, 10**6]])) == [
        f"{tokenizer.bos_token} {tokenizer.eos_token}",
        f"{unk} {unk}",
    ]
