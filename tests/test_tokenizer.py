"""Tests for the SentencePiece tokenizer: reserved ids, exact round trips, determinism, files."""

import pickle

import numpy as np
import pytest

from tfx_jax.data import tokenizer as tok

_COLORS = ["red", "green", "blue", "yellow", "purple", "orange"]
_SHAPES = ["circle", "square", "triangle"]
_PLACES = ["at the top left", "at the bottom right", "in the center", "on the left"]


def _captions(n: int = 400) -> list[str]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        size, color, shape, place = (
            rng.choice(["large", "small"]),
            rng.choice(_COLORS),
            rng.choice(_SHAPES),
            rng.choice(_PLACES),
        )
        out.append(f"a {size} {color} {shape} {place}")
    out += ["Ünïcödé façade — naïve café, 日本語のテキスト, emoji 🎨"] * 3
    return out


@pytest.fixture(scope="module")
def bpe() -> tok.Tokenizer:
    return tok.Tokenizer(tok.train_tokenizer(_captions(), vocab_size=400, model_type="bpe"))


def test_reserved_ids_hold(bpe):
    assert (tok.PAD_ID, tok.BOS_ID, tok.EOS_ID, tok.UNK_ID, tok.BOI_ID, tok.EOI_ID) == tuple(
        range(6)
    )
    assert [bpe.id_to_piece(i) for i in range(6)] == [
        "<pad>",
        "<s>",
        "</s>",
        "<unk>",
        "<boi>",
        "<eoi>",
    ]
    assert (bpe.pad_id, bpe.bos_id, bpe.eos_id, bpe.unk_id, bpe.boi_id, bpe.eoi_id) == (
        0,
        1,
        2,
        3,
        4,
        5,
    )
    assert tok.Tokenizer.BOI_ID == 4 and tok.Tokenizer.EOI_ID == 5


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
@pytest.mark.parametrize(
    "text",
    [
        "a large red circle at the top left and a small blue square in the center",
        "Ünïcödé façade — naïve café, 日本語のテキスト, emoji 🎨",
        # Characters never seen in training only survive through byte fallback.
        "Ωμέγα ∑ ℵ₀ 한국어 \u0301 🦀 zebra-quokka",
        "  leading, double  and trailing spaces  \ttab\nnewline",
        "literal <boi> and <eoi> in a caption",
        "",
    ],
)
def test_encode_decode_round_trip(model_type, text):
    t = tok.Tokenizer(tok.train_tokenizer(_captions(), vocab_size=400, model_type=model_type))
    ids = t.encode(text)
    assert t.decode(ids) == text
    assert all(0 <= i < t.vocab_size for i in ids)
    # Text never yields structural ids, and byte fallback makes UNK impossible.
    assert not {tok.PAD_ID, tok.BOS_ID, tok.EOS_ID, tok.UNK_ID, tok.BOI_ID, tok.EOI_ID} & set(ids)


def test_frequent_caption_words_are_single_pieces(bpe):
    # Byte fallback must not replace real subword learning: a common caption is short.
    caption = "a large red circle at the top left"
    assert len(bpe.encode(caption)) <= len(caption.split())
    unseen = "🦀"  # four UTF-8 bytes, one piece each.
    assert [bpe.id_to_piece(i) for i in bpe.encode(unseen)][-4:] == [
        "<0xF0>",
        "<0x9F>",
        "<0xA6>",
        "<0x80>",
    ]


def test_bos_eos_and_special_ids_in_decode(bpe):
    body = bpe.encode("a red circle")
    assert bpe.encode("a red circle", add_bos=True, add_eos=True) == [1, *body, 2]
    ids = [tok.BOS_ID, *body, tok.BOI_ID, tok.EOI_ID, *bpe.encode("ok"), tok.EOS_ID, 0, 0]
    # Each separately encoded segment starts with SentencePiece's dummy-prefix space.
    assert bpe.decode(ids) == "a red circle ok"
    assert bpe.decode(ids, show_image_markers=True) == "a red circle<boi><eoi> ok"
    assert bpe.decode([tok.BOI_ID, *body], show_image_markers=True) == "<boi> a red circle"
    assert bpe.decode(np.asarray(ids, np.int32)) == "a red circle ok"
    with pytest.raises(ValueError, match="outside"):
        bpe.decode([bpe.vocab_size])


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_training_is_deterministic(model_type):
    a = tok.train_tokenizer(iter(_captions()), vocab_size=350, model_type=model_type)
    b = tok.train_tokenizer((c for c in _captions()), vocab_size=350, model_type=model_type)
    assert a == b
    other = tok.train_tokenizer(_captions()[:100], vocab_size=350, model_type=model_type)
    assert other != a


def test_bpe_and_unigram_differ_and_respect_vocab(bpe):
    uni = tok.Tokenizer(tok.train_tokenizer(_captions(), vocab_size=400, model_type="unigram"))
    assert bpe.vocab_size <= 400 and uni.vocab_size <= 400
    assert bpe.model_proto != uni.model_proto
    # A corpus too small to fill the request gives a smaller vocabulary, not an error.
    small = tok.Tokenizer(tok.train_tokenizer(["tiny corpus"], vocab_size=5000))
    assert tok.min_vocab_size(True) <= small.vocab_size < 5000


def test_without_byte_fallback():
    t = tok.Tokenizer(tok.train_tokenizer(_captions(), vocab_size=120, byte_fallback=False))
    assert t.decode(t.encode("a small green square")) == "a small green square"
    assert tok.UNK_ID in t.encode("🦀")  # no bytes to fall back to
    assert t.id_to_piece(4) == "<boi>"


def test_save_load_round_trip(bpe, tmp_path):
    path = tmp_path / "sub" / "tok.model"
    bpe.save(path)
    loaded = tok.Tokenizer.from_file(path)
    assert loaded.model_proto == bpe.model_proto
    assert loaded.vocab_size == bpe.vocab_size
    text = "a small blue square in the center, café 🎨"
    assert loaded.encode(text) == bpe.encode(text)
    assert tok.Tokenizer.from_file(str(path)).vocab_size == bpe.vocab_size
    clone = pickle.loads(pickle.dumps(bpe))
    assert clone.encode(text) == bpe.encode(text)


def test_clear_errors_on_bad_files(tmp_path):
    missing = tmp_path / "nope.model"
    with pytest.raises(FileNotFoundError, match="nope.model"):
        tok.Tokenizer.from_file(missing)
    corrupt = tmp_path / "corrupt.model"
    corrupt.write_bytes(b"this is not a protobuf \x00\xff\x13")
    with pytest.raises(ValueError, match="corrupt.model.*not a valid SentencePiece model"):
        tok.Tokenizer.from_file(corrupt)


def test_foreign_sentencepiece_model_is_rejected(tmp_path):
    import io

    import sentencepiece as spm

    writer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_captions()), model_writer=writer, vocab_size=50, minloglevel=2
    )
    path = tmp_path / "foreign.model"
    path.write_bytes(writer.getvalue())
    with pytest.raises(ValueError, match="foreign.model is not a tfx_jax tokenizer"):
        tok.Tokenizer.from_file(path)


def test_argument_validation():
    with pytest.raises(ValueError, match="at least 263"):
        tok.train_tokenizer(_captions(), vocab_size=100)
    with pytest.raises(tok.VocabularyTooSmallError, match="need at least") as error:
        # Enough for bytes, but not for the corpus' distinct characters as well.
        tok.train_tokenizer(_captions(), vocab_size=270)
    distinct = len(set("".join(_captions())))
    assert (error.value.vocab_size, error.value.distinct_chars) == (270, distinct)
    assert error.value.required > 270 and f"its {distinct} distinct characters" in str(error.value)
    with pytest.raises(ValueError, match="model_type"):
        tok.train_tokenizer(_captions(), vocab_size=400, model_type="word")
    with pytest.raises(ValueError, match="empty corpus"):
        tok.train_tokenizer(["", ""], vocab_size=400)
    with pytest.raises(TypeError, match="str"):
        tok.train_tokenizer([b"bytes"], vocab_size=400)


def test_character_coverage_leaves_rare_characters_to_bytes():
    """1.0 gives every character a piece; below it the rarest are spelled in bytes, so a
    vocabulary too small for every character can still be trained (and still round-trips)."""
    rare = [chr(0x4E00 + i) for i in range(40)]  # each seen once, among ~10k common characters
    texts = _captions() + rare
    with pytest.raises(tok.VocabularyTooSmallError):
        tok.train_tokenizer(texts, vocab_size=300)
    t = tok.Tokenizer(tok.train_tokenizer(texts, vocab_size=300, character_coverage=0.995))
    assert t.decode(t.encode("".join(rare))) == "".join(rare)
    with pytest.raises(ValueError, match="character_coverage must be in"):
        tok.train_tokenizer(texts, vocab_size=300, character_coverage=0.0)
