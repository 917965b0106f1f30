"""SentencePiece text tokenizer with the project's fixed reserved ids.

Every model in the project relies on these ids, so they are module constants and the tokenizer
checks them whenever a model is trained or loaded:

    PAD_ID = 0   padding (packing fills unused slots with it)
    BOS_ID = 1   begin of sequence
    EOS_ID = 2   end of sequence
    UNK_ID = 3   unknown piece (unused with byte fallback, which spells any character in bytes)
    BOI_ID = 4   begin of image: the data pipeline inserts it before an image's latent patches
    EOI_ID = 5   end of image

BOI/EOI are SentencePiece *control* symbols: like BOS/EOS they are never produced by `encode`
(a caption that literally contains "<boi>" is spelled out as ordinary pieces and cannot open an
image block by accident) and `decode` drops them unless asked to show them. Only the data pipeline
and the sampler place them, by id.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import sentencepiece as spm
from etils import epath

from tfx_jax.data.embedded import text_corpus

PAD_ID = 0
BOS_ID = 1
EOS_ID = 2
UNK_ID = 3
BOI_ID = 4
EOI_ID = 5

BOI_PIECE = "<boi>"
EOI_PIECE = "<eoi>"
NUM_RESERVED = 6
NUM_BYTE_PIECES = 256
MODEL_TYPES = ("bpe", "unigram")

# The piece each reserved id must hold; checked after training and on every load.
_RESERVED_PIECES = {
    PAD_ID: "<pad>",
    BOS_ID: "<s>",
    EOS_ID: "</s>",
    UNK_ID: "<unk>",
    BOI_ID: BOI_PIECE,
    EOI_ID: EOI_PIECE,
}
# Ids that `decode` drops: they mark structure, not text.
_STRUCTURAL_IDS = frozenset({PAD_ID, BOS_ID, EOS_ID, BOI_ID, EOI_ID})


class VocabularyTooSmallError(ValueError):
    """`vocab_size` cannot hold the pieces the corpus needs.

    Attributes:
      vocab_size: what was asked for.
      required: the pieces needed at least (reserved + byte pieces + covered characters).
      distinct_chars: the corpus' distinct characters (None when it was not read).
      character_coverage: the coverage used.
    """

    def __init__(
        self,
        message: str,
        *,
        vocab_size: int,
        required: int,
        distinct_chars: int | None,
        character_coverage: float,
    ):
        super().__init__(message)
        self.vocab_size, self.required = vocab_size, required
        self.distinct_chars, self.character_coverage = distinct_chars, character_coverage


def min_vocab_size(byte_fallback: bool) -> int:
    """The smallest `vocab_size` `train_tokenizer` accepts before looking at the corpus.

    Args:
      byte_fallback: whether the 256 byte pieces <0x00>..<0xFF> are part of the vocabulary.

    Returns:
      6 reserved ids, plus 256 byte pieces with byte fallback, plus one piece so that there is
      room for at least one character. The corpus may need more: every distinct character is a
      piece too (character_coverage=1.0), and `train_tokenizer` then says how many are needed.
    """
    return NUM_RESERVED + (NUM_BYTE_PIECES if byte_fallback else 0) + 1


def general_texts() -> tuple[str, ...]:
    """English prose every tokenizer learns besides its source's text: the train slice of the
    embedded corpus (`data.embedded.text_corpus`, the Python standard library's docstrings), so
    the vocabulary spells ordinary words whatever the source's text is."""
    return text_corpus.documents("train")


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    model_type: str = "bpe",
    byte_fallback: bool = True,
    *,
    character_coverage: float = 1.0,
    max_sentence_length: int = 4192,
    num_threads: int = 1,
    seed: int = 0,
) -> bytes:
    """Trains a SentencePiece model in-process and returns its serialized proto.

    Training is deterministic: the same texts and arguments give byte-identical model bytes
    (one thread, no input shuffling or sampling, a fixed random seed).

    Args:
      texts: the training corpus, one sentence (e.g. one caption) per item. It is read once,
        so a generator works. Empty strings are skipped.
      vocab_size: the target vocabulary size, reserved ids and byte pieces included. It is a soft
        limit (`hard_vocab_limit=False`), so a corpus too small to fill it gives a smaller
        vocabulary instead of failing: size model embeddings from `Tokenizer.vocab_size`.
      model_type: "bpe" or "unigram".
      byte_fallback: spell characters missing from the vocabulary as UTF-8 byte pieces, so that
        any text round-trips exactly and UNK_ID never appears. Needs 256 extra pieces.
      character_coverage: fraction of the corpus' characters that get their own piece. With
        byte fallback, values below 1.0 (e.g. 0.9995 for corpora with many rare characters)
        leave the rare ones to bytes.
      max_sentence_length: sentences longer than this many bytes are skipped by the trainer.
      num_threads: trainer threads. More are faster on large corpora, but the model bytes then
        record the thread count and bit-identical output is only checked with 1.
      seed: SentencePiece's random seed (process-global in SentencePiece).

    Returns:
      The serialized `ModelProto`; pass it to `Tokenizer(...)` or write it with `Tokenizer.save`.

    Raises:
      VocabularyTooSmallError: vocab_size is below what the corpus needs (it says how much).
      ValueError: on another bad argument or an empty corpus.
    """
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type must be one of {MODEL_TYPES}, got {model_type!r}")
    minimum = min_vocab_size(byte_fallback)
    if vocab_size < minimum:
        detail = f"{NUM_BYTE_PIECES} byte pieces + " if byte_fallback else ""
        raise VocabularyTooSmallError(
            f"vocab_size={vocab_size} is too small: with byte_fallback={byte_fallback} it must be "
            f"at least {minimum} ({detail}{NUM_RESERVED} reserved ids + 1)",
            vocab_size=vocab_size,
            required=minimum,
            distinct_chars=None,
            character_coverage=character_coverage,
        )
    if not 0.0 < character_coverage <= 1.0:
        raise ValueError(f"character_coverage must be in (0, 1], got {character_coverage}")
    if num_threads < 1:
        raise ValueError(f"num_threads must be >= 1, got {num_threads}")

    counter = _CountingIterator(texts)
    model_bytes = io.BytesIO()
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=counter,
            model_writer=model_bytes,
            vocab_size=vocab_size,
            model_type=model_type,
            pad_id=PAD_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            unk_id=UNK_ID,
            control_symbols=[BOI_PIECE, EOI_PIECE],
            byte_fallback=byte_fallback,
            character_coverage=character_coverage,
            hard_vocab_limit=False,
            # Captions must round-trip exactly: no NFKC, no collapsing of whitespace.
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            # Determinism: read every sentence in order, single-threaded.
            input_sentence_size=0,
            shuffle_input_sentence=False,
            num_threads=num_threads,
            max_sentence_length=max_sentence_length,
            minloglevel=2,
        )
    except RuntimeError as e:
        raise _training_error(e, counter, vocab_size, character_coverage) from e
    if counter.num_sentences == 0:
        raise ValueError("train_tokenizer got an empty corpus (no non-empty strings)")
    proto = model_bytes.getvalue()
    _check_reserved_ids(spm.SentencePieceProcessor(model_proto=proto), "the trained model")
    return proto


class _CountingIterator(Iterator[str]):
    """Passes texts through to the trainer, skipping empty ones and checking their type."""

    def __init__(self, texts: Iterable[str]):
        self._texts = iter(texts)
        self.num_sentences = 0
        self.chars: set[str] = set()  # distinct characters, for a vocabulary that is too small

    def __next__(self) -> str:
        while True:
            text = next(self._texts)
            if not isinstance(text, str):
                raise TypeError(f"train_tokenizer expects str texts, got {type(text).__name__}")
            if text:
                self.num_sentences += 1
                self.chars.update(text)
                return text


def _training_error(
    e: RuntimeError, counter: _CountingIterator, vocab_size: int, coverage: float
) -> Exception:
    """Turns SentencePiece's internal errors into ones that say what to change."""
    if counter.num_sentences == 0:
        return ValueError("train_tokenizer got an empty corpus (no non-empty strings)")
    match = re.search(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)", str(e))
    if match:
        required = int(match.group(2))
        return VocabularyTooSmallError(
            f"vocab_size={vocab_size} is too small for this corpus: its {len(counter.chars)} "
            f"distinct characters (at character_coverage={coverage}) plus the reserved and byte "
            f"pieces need at least {required} (or lower character_coverage so that rare "
            "characters fall back to bytes)",
            vocab_size=vocab_size,
            required=required,
            distinct_chars=len(counter.chars),
            character_coverage=coverage,
        )
    return e


def _check_reserved_ids(sp: spm.SentencePieceProcessor, what: str) -> None:
    """Raises ValueError unless ids 0..5 hold the project's reserved pieces."""
    if sp.get_piece_size() <= NUM_RESERVED:
        raise ValueError(f"{what} has only {sp.get_piece_size()} pieces")
    for piece_id, piece in _RESERVED_PIECES.items():
        if sp.id_to_piece(piece_id) != piece:
            raise ValueError(
                f"{what} is not a tfx_jax tokenizer: id {piece_id} is "
                f"{sp.id_to_piece(piece_id)!r}, expected {piece!r}"
            )


class Tokenizer:
    """A SentencePiece model with the project's reserved ids (see the module docstring).

    Picklable (it pickles the model bytes), so it can travel into Grain worker processes.
    """

    PAD_ID = PAD_ID
    BOS_ID = BOS_ID
    EOS_ID = EOS_ID
    UNK_ID = UNK_ID
    BOI_ID = BOI_ID
    EOI_ID = EOI_ID

    def __init__(self, model_proto: bytes, *, source: str = "model bytes"):
        """Wraps a serialized SentencePiece model.

        Args:
          model_proto: the bytes `train_tokenizer` returns (or a .model file's contents).
          source: what to call the model in error messages (e.g. its file name).

        Raises:
          ValueError: if the bytes are not a SentencePiece model or lack the reserved ids.
        """
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=bytes(model_proto))
        except RuntimeError as e:
            raise ValueError(f"{source} is not a valid SentencePiece model") from e
        _check_reserved_ids(self._sp, source)
        self._proto = bytes(model_proto)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Tokenizer:
        """Loads a model file from a local path or a remote one such as gs://bucket/tok.model.

        Raises:
          FileNotFoundError: if there is no file at `path`.
          ValueError: if the file is not a SentencePiece model with the reserved ids.
        """
        file = epath.Path(path)
        if not file.is_file():
            raise FileNotFoundError(f"tokenizer model file not found: {os.fspath(path)}")
        return cls(file.read_bytes(), source=f"tokenizer model file {os.fspath(path)}")

    def save(self, path: str | os.PathLike) -> None:
        """Writes the serialized model to `path` (local or remote), creating parent folders."""
        file = epath.Path(path)
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_bytes(self._proto)

    @property
    def model_proto(self) -> bytes:
        """The serialized SentencePiece model."""
        return self._proto

    @property
    def vocab_size(self) -> int:
        """Number of pieces, reserved ids included; ids are in [0, vocab_size)."""
        return self._sp.get_piece_size()

    @property
    def pad_id(self) -> int:
        return PAD_ID

    @property
    def bos_id(self) -> int:
        return BOS_ID

    @property
    def eos_id(self) -> int:
        return EOS_ID

    @property
    def unk_id(self) -> int:
        return UNK_ID

    @property
    def boi_id(self) -> int:
        return BOI_ID

    @property
    def eoi_id(self) -> int:
        return EOI_ID

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Encodes text to ids. Never emits PAD, BOI or EOI.

        Args:
          text: any string; with byte fallback every character round-trips through `decode`.
          add_bos: prepend BOS_ID.
          add_eos: append EOS_ID.

        Returns:
          The ids, as a list of Python ints.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        return self._sp.encode(text, add_bos=add_bos, add_eos=add_eos)

    def decode(self, ids: Sequence[int] | np.ndarray, *, show_image_markers: bool = False) -> str:
        """Decodes ids to text.

        PAD, BOS and EOS are dropped. BOI and EOI are dropped too, or rendered as the literal
        markers "<boi>" / "<eoi>" with `show_image_markers=True` (handy when printing a sample
        that contains images). UNK_ID, which byte-fallback models never produce, decodes to " ⁇ ".

        Args:
          ids: a sequence or 1-D array of ids in [0, vocab_size).
          show_image_markers: render BOI/EOI as "<boi>"/"<eoi>" instead of dropping them.

        Returns:
          The text.

        Raises:
          ValueError: if an id is outside [0, vocab_size) (e.g. from a padded embedding table).
        """
        ids = [int(i) for i in np.asarray(ids, dtype=np.int64).reshape(-1)]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"ids outside [0, {self.vocab_size}): {bad[:8]}")
        if not show_image_markers:
            return self._sp.decode([i for i in ids if i not in _STRUCTURAL_IDS])
        # Decode the text between markers separately so that the markers land where they were.
        parts, run = [], []
        for i in ids + [None]:
            if i is None or i in (BOI_ID, EOI_ID):
                parts.append(self._decode_run(run, at_start=not parts))
                if i is not None:
                    parts.append(_RESERVED_PIECES[i])
                run = []
            elif i not in _STRUCTURAL_IDS:
                run.append(i)
        return "".join(parts)

    def _decode_run(self, ids: list[int], at_start: bool) -> str:
        """Decodes ids that follow other text: SentencePiece strips a leading "▁" (the dummy
        prefix) at the start of every decode, which is only right at the start of the text."""
        text = self._sp.decode(ids)
        if ids and not at_start and self._sp.id_to_piece(ids[0]).startswith("▁"):
            text = " " + text
        return text

    def id_to_piece(self, piece_id: int) -> str:
        """The vocabulary entry of one id (e.g. "▁circle", "<0xC3>", "<boi>")."""
        return self._sp.id_to_piece(int(piece_id))

    def __getstate__(self) -> dict:
        return {"model_proto": self._proto}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["model_proto"])

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size})"
