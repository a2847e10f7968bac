"""A SentencePiece tokenizer trained at run time on a synthetic task's own text.

Why train one instead of shipping one: the task alphabet is tiny (digits, ``=``, a task word), so a
tokenizer fitted to it gives a vocabulary of a few dozen pieces and one token per symbol, which is
what lets a model with a few hundred thousand parameters learn the task in minutes on a CPU.

Why the "word" model by default: task text is space-separated symbols, and SentencePiece's word
model makes each of them exactly one piece (``"4 1 3"`` -> ``▁4 ▁1 ▁3``), so answers are as short as
they can be and every text has exactly one encoding. The "char" model is offered for comparison; it
spends a token on every space.

The vocabulary is exactly ``TokenizerConfig.vocab_size``: the pieces the text needs, then unused
``<extra_i>`` pieces up to the configured size, so the model's embedding size is a number chosen by
the user (divisible by the tensor-parallel size, say) rather than whatever the task happens to need.
Fixed special ids: pad 0, unk 1, bos 2, eos 3.

Training is deterministic for a given task config and seed (same model bytes), runs in memory, and
writes ``tokenizer.model`` by temp file + rename, so a failure never leaves a partial file.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

from megatron_rlfp16.rewards.tasks import Task

MODEL_FILE = "tokenizer.model"
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
NUM_SPECIAL = 4
MODEL_TYPES = ("word", "char")


@dataclass(kw_only=True)
class TokenizerConfig:
    """How to fit the task tokenizer."""

    vocab_size: int = 64
    """Total pieces including the 4 specials; must cover what the task text needs (the error says how
    many), the rest is filled with unused ``<extra_i>`` pieces. At most 65536."""

    model_type: str = "word"
    """SentencePiece model: "word" (one piece per space-separated symbol) or "char"."""

    num_samples: int = 2000
    """Task examples (prompt + answer) in the training text. At least 1."""

    seed: int = 0
    """Seed of the task examples; the same seed gives the same model bytes."""

    def validate(self) -> "TokenizerConfig":
        """Checks every field; raises ValueError naming the field, its value and what is valid."""
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"TokenizerConfig.model_type={self.model_type!r} is invalid; valid: {MODEL_TYPES}")
        for field, low, high in (("vocab_size", NUM_SPECIAL + 1, 65536), ("num_samples", 1, 10**7)):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                raise ValueError(f"TokenizerConfig.{field}={value!r} is invalid; valid: an integer in "
                                 f"[{low}, {high}]")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"TokenizerConfig.seed={self.seed!r} is invalid; valid: an integer")
        return self


class TaskTokenizer:
    """Thin wrapper over a SentencePiece model: text <-> ids, fixed special ids, save / load."""

    def __init__(self, model_proto: bytes):
        import sentencepiece as spm

        self._proto = bytes(model_proto)
        self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
        ids = (self._sp.pad_id(), self._sp.unk_id(), self._sp.bos_id(), self._sp.eos_id())
        if ids != (PAD_ID, UNK_ID, BOS_ID, EOS_ID):
            raise ValueError(f"not a task tokenizer: (pad, unk, bos, eos) ids are {ids}, expected "
                             f"{(PAD_ID, UNK_ID, BOS_ID, EOS_ID)}")

    pad_id, unk_id, bos_id, eos_id = PAD_ID, UNK_ID, BOS_ID, EOS_ID

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def model_bytes(self) -> bytes:
        """The serialized SentencePiece model (what ``save`` writes)."""
        return self._proto

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self._sp.encode(text)
        return [BOS_ID] * bos + ids + [EOS_ID] * eos

    def encode_prompt(self, prompt_text: str) -> list[int]:
        """``[bos] + encode(prompt)``: what the rollout engine is given."""
        return self.encode(prompt_text, bos=True)

    def encode_answer(self, answer_text: str) -> list[int]:
        """``encode(answer) + [eos]``: the supervised target after a prompt (``encode_prompt`` ids +
        these ids is the full training sequence)."""
        return self.encode(answer_text, eos=True)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids`` up to the first eos; specials vanish, ids outside the vocabulary (a model
        whose embedding is padded past ``vocab_size`` can sample them) decode as unk (`` ⁇ ``)."""
        kept = []
        for i in ids:
            i = int(i)
            if i == EOS_ID:
                break
            kept.append(i if 0 <= i < self.vocab_size else UNK_ID)
        return self._sp.decode(kept)

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))

    def save(self, directory: str) -> str:
        """Writes ``<directory>/tokenizer.model`` atomically; returns its path."""
        path = os.path.join(directory, MODEL_FILE)
        atomic_write(path, self._proto)
        return path

    @classmethod
    def load(cls, directory: str) -> "TaskTokenizer":
        path = os.path.join(directory, MODEL_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no task tokenizer at {path!r} (expected {MODEL_FILE} written by "
                                    f"TaskTokenizer.save / train_tokenizer)")
        with open(path, "rb") as f:
            return cls(f.read())


def atomic_write(path: str, data: bytes) -> None:
    """Writes ``data`` to ``path`` via a temp file in the same directory and ``os.replace``: readers see
    the old file or the whole new one, and a failure leaves no temp file behind."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def training_text(task: Task, config: TokenizerConfig) -> list[str]:
    """The lines the tokenizer is fitted on: every symbol of the task once (so rare symbols are never
    dropped), then ``num_samples`` examples as ``"<prompt> <answer>"``."""
    lines = [" ".join(task.symbols())]
    lines += [f"{ex.prompt} {ex.answer}" for ex in task.dataset(config.num_samples, config.seed)]
    return lines


def _needed_pieces(lines: Sequence[str], model_type: str) -> set[str]:
    if model_type == "word":
        return {word for line in lines for word in line.split()}
    # The char model writes a space as its own piece "▁".
    return {"▁" if ch == " " else ch for line in lines for ch in line.strip()}


def train_tokenizer(task: Task, config: TokenizerConfig, out_dir: Optional[str] = None) -> TaskTokenizer:
    """Fits a tokenizer on ``task``'s text; also writes it into ``out_dir`` when given.

    Everything happens in memory first, so an invalid option raises before anything is written.
    """
    import io

    import sentencepiece as spm

    config.validate()
    lines = training_text(task, config)
    needed = len(_needed_pieces(lines, config.model_type)) + NUM_SPECIAL
    if config.vocab_size < needed:
        raise ValueError(f"TokenizerConfig.vocab_size={config.vocab_size} is too small for task "
                         f"{task.name!r} with model_type={config.model_type!r}; valid: at least {needed} "
                         f"({NUM_SPECIAL} special + {needed - NUM_SPECIAL} pieces the text needs)")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model,
        model_type=config.model_type, vocab_size=needed, hard_vocab_limit=True,
        character_coverage=1.0, normalization_rule_name="identity",
        pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
        max_sentence_length=1 << 16, num_threads=1, minloglevel=2,
    )
    tokenizer = TaskTokenizer(_pad_vocab(model.getvalue(), config.vocab_size))
    _check_covers(tokenizer, task, config)
    if out_dir is not None:
        tokenizer.save(out_dir)
    return tokenizer


def _pad_vocab(model_proto: bytes, vocab_size: int) -> bytes:
    """Appends unused ``<extra_i>`` pieces up to ``vocab_size``.

    Done on the trained model rather than by passing ``user_defined_symbols`` to the trainer because
    SentencePiece's word-model trainer counts user-defined symbols twice against ``vocab_size`` and
    then fails (sentencepiece 0.2: ``word_model_trainer.cc: vocab_size >= 0``).
    """
    from sentencepiece import sentencepiece_model_pb2

    model = sentencepiece_model_pb2.ModelProto()
    model.ParseFromString(model_proto)
    for i in range(vocab_size - len(model.pieces)):
        model.pieces.add(piece=f"<extra_{i}>", score=0.0, type=sentencepiece_model_pb2.ModelProto.SentencePiece.UNUSED)
    model.trainer_spec.vocab_size = vocab_size
    return model.SerializeToString(deterministic=True)


def _check_covers(tokenizer: TaskTokenizer, task: Task, config: TokenizerConfig) -> None:
    if tokenizer.vocab_size != config.vocab_size:
        raise RuntimeError(f"SentencePiece built {tokenizer.vocab_size} pieces, configured "
                           f"vocab_size={config.vocab_size}")
    for symbol in task.symbols():
        ids = tokenizer.encode(symbol)
        if UNK_ID in ids or (config.model_type == "word" and len(ids) != 1):
            raise RuntimeError(f"task symbol {symbol!r} encodes as {ids}; expected one known piece")
