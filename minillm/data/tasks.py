"""The tasks a run can train, as a registry (name -> Task class): what the model learns from the data, and
everything about the data that depends on it.

    text   continue text: random windows of the token stream (an encoder-decoder splits each window into a
           source and the continuation it predicts). A pair file read as text gives samples "source\\ntarget".
    pairs  source in, target out, the loss on the target (and its EOS) only: an encoder-decoder reads the
           source and writes the target; a decoder-only model reads the source and a separator ("\\n") and
           learns the target after it (data.batches.PromptAnswerBatches), so it answers the prompt "source\\n".
    chat   conversations (data.conversations), decoder-only: each rendered by the run's chat template (its
           role markers added to the tokenizer), the loss on the assistant's turns only, each with its
           end-of-turn token (data.conversation_batches).

TrainConfig.task chooses ("auto", the default: chat for a conversation file, pairs for a TSV/JSONL pair file,
text otherwise); the data
read says which task it was read for, split.json records it, and code that differs by task asks the run's
Task (`task_for(name, encoder_decoder)`): how to write and open its splits, count its tokens, estimate
them, describe them, and prompt the model from its data. A new task is a Task subclass, one TASKS entry
and its name in config.TASKS (tests/test_config.py holds the two together).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from minillm.config import ModelConfig
from minillm.data.batches import (
    AnswerPairs,
    Batches,
    LMBatches,
    PairBatches,
    PromptAnswerBatches,
    encoder_decoder_kept,
    prompt_answer_kept,
)
from minillm.data.conversation_batches import ConversationBatches
from minillm.data.corpus import AUTO_TASK, CHAT, PAIR_SEPARATOR, PAIRS, TEXT
from minillm.data.split_record import SplitRecord
from minillm.data.streams import (
    read_offsets,
    read_stream,
    write_conversation_streams,
    write_pair_streams,
    write_token_stream,
)
from minillm.errors import MiniLLMError
from minillm.run_folder import INCOMPLETE_FIX, RunFolder
from minillm.tokenizers import ChatTemplate, Tokenizer
from minillm.tokenizers.chat_template import ASSISTANT, CHAT_TOKENS, DEFAULT_TEMPLATE, learned_turns


def split_offsets(folder: str | Path, split: str) -> np.ndarray:
    """The offsets file of a split stored by sample (pairs, conversations): refused when it is missing."""
    path = RunFolder(folder).pair_offsets(split)
    if not path.is_file():
        raise MiniLLMError(f"{path} is missing; the run folder is incomplete: {INCOMPLETE_FIX}")
    return read_offsets(path)


class Task(ABC):
    """What a run learns from its data; made for one model kind (`encoder_decoder`)."""

    name: ClassVar[str]
    # How `minillm evaluate --data FILE` reads another file for a run of this task (a TrainConfig.task).
    scores_files_as: ClassVar[str]

    def __init__(self, encoder_decoder: bool) -> None:
        self.encoder_decoder = encoder_decoder

    def __repr__(self) -> str:
        return f"{type(self).__name__}(encoder_decoder={self.encoder_decoder})"

    # -- preparing the data ------------------------------------------------------------------------------

    @abstractmethod
    def sample_texts(self, sample: Any) -> tuple[str, ...]:
        """The texts of one sample (a text, or both sides of a pair)."""

    def training_texts(self, samples: Iterable[Any]) -> Iterator[str]:
        """What the run's tokenizer learns from: the texts of the (training) samples."""
        for sample in samples:
            yield from self.sample_texts(sample)

    def separator_ids(self, tokenizer: Tokenizer) -> list[int]:
        """The token ids a sample puts between a prompt and its answer (none by default)."""
        return []

    def prepare_tokenizer(self, tokenizer: Tokenizer, keep_template: bool = False) -> tuple[Tokenizer, list[str]]:
        """The run's tokenizer made from the trained or imported one, and the special tokens added to it. By
        default as it is, without a chat template: an imported one's is kept by the chat task, and with
        `keep_template` (the tokenizer of a model the run starts from) by every task."""
        if not keep_template:
            tokenizer.chat_template = None
        return tokenizer, []

    def prompt_for(self, prompt: str) -> str:
        """The text a user's prompt becomes before the model continues it (for a decoder-only pairs run: the
        source with the separator after it, so that the answer follows)."""
        return prompt

    def check_training_split(self, samples: list, path: Path) -> None:
        """Refuse training samples that leave nothing to learn (before anything is written)."""
        return None  # (by default there is always something: a text sample is never empty)

    @abstractmethod
    def write_split(self, folder: str | Path, split: str, samples: list, tokenizer: Tokenizer, dtype: np.dtype,
                    contiguous: bool, progress: Any = None) -> int:
        """Tokenize one split's samples into `folder`; returns its tokens (for pairs: its target tokens)."""

    # -- training on it ----------------------------------------------------------------------------------

    @abstractmethod
    def open_batches(self, folder: str | Path, split: str, record: SplitRecord, model_config: ModelConfig,
                     source_fraction: float) -> Batches:
        """Batches of one split prepared in `folder`, checked against the record's token counts."""

    answer_unit = "pairs"  # what answer_pairs' pairs are, in words (the scores' line)

    def answer_pairs(self, batches: Batches) -> AnswerPairs | None:
        """A split's (prompt, answer) pairs, which a model's greedy answers are scored against (exact match,
        character error rate, chrF); None for a task without answers (plain text)."""
        return None

    @abstractmethod
    def epoch_tokens(self, train: Batches, record: SplitRecord) -> int:
        """The tokens one pass over the training split trains on (what the loss counts)."""

    def step_tokens(self, rows: int, epoch_tokens: int, n_samples: int, context: int) -> float:
        """The tokens an optimizer step of `rows` rows trains on (on average), given the epoch's tokens and
        training samples: the training's and the preview's figure alike. By default a row is one sample (a
        pair, a conversation)."""
        return rows * epoch_tokens / max(1, n_samples)

    def timed_length(self, context: int, epoch_tokens: int) -> int:
        """The length of the rows a step runs at most (what the preview times): by default the context."""
        return context

    @abstractmethod
    def estimated_tokens(self, samples: list, per_char: float, context: int, contiguous: bool,
                         n_separator: int) -> int:
        """The tokens of a split as `epoch_tokens` would count them, estimated at `per_char` tokens per
        character before any tokenizer is trained on the whole file."""

    def data_notes(self, record: SplitRecord, train: Batches, test: Batches, test_tokens: int | None) -> list[str]:
        """What a training says about its data before it starts: the tokens of each split (for pairs, those
        that fit the context, and what is cut), and whether the final test scores a sample (over test_tokens)."""
        notes = self._split_notes(record, train, test)
        if test_tokens is not None and test.sequential_tokens > test_tokens:
            notes.append(f"note: the final test scores a random sample of about {test_tokens:,} of the "
                         f"{test.sequential_tokens:,} test tokens, with its 95% confidence (--test-tokens none: all)")
        return [note for note in notes if note]

    @abstractmethod
    def _split_notes(self, record: SplitRecord, train: Batches, test: Batches) -> list[str]: ...

    # -- prompting the model from the data ---------------------------------------------------------------

    @abstractmethod
    def test_prompt(self, folder: str | Path, record: SplitRecord, tokenizer: Tokenizer, max_tokens: int) -> str:
        """A prompt in the style of the data, from the start of the test split, of at most `max_tokens`."""

    def test_prompt_ids(self, folder: str | Path, record: SplitRecord) -> list[int] | None:
        """The prompt as token ids, for a task whose prompts hold special tokens (chat); None: `test_prompt`."""
        return None


class TextTask(Task):
    """Continue text (see the module docstring)."""

    name = TEXT
    scores_files_as = TEXT

    def sample_texts(self, sample: str) -> tuple[str, ...]:
        return (sample,)

    def write_split(self, folder: str | Path, split: str, samples: list, tokenizer: Tokenizer, dtype: np.dtype,
                    contiguous: bool, progress: Any = None) -> int:
        # Whole samples as BOS ... EOS; stretches of a contiguous split as they are.
        return write_token_stream(RunFolder(folder).tokens(split), tokenizer, samples, dtype,
                                  mark_samples=not contiguous, progress=progress)

    def open_batches(self, folder: str | Path, split: str, record: SplitRecord, model_config: ModelConfig,
                     source_fraction: float) -> Batches:
        tokens = read_stream(RunFolder(folder).tokens(split), record.dtype, record.tokens.get(split))
        return LMBatches(tokens, model_config.max_seq_len, self.encoder_decoder, source_fraction,
                         model_config.bos_id)

    def epoch_tokens(self, train: Batches, record: SplitRecord) -> int:
        return record.tokens["train"]

    def step_tokens(self, rows: int, epoch_tokens: int, n_samples: int, context: int) -> float:
        return rows * self.timed_length(context, epoch_tokens)

    def timed_length(self, context: int, epoch_tokens: int) -> int:
        return max(1, min(context, epoch_tokens - 1))  # (LMBatches.seq_len: a short split, shorter windows)

    def estimated_tokens(self, samples: list, per_char: float, context: int, contiguous: bool,
                         n_separator: int) -> int:
        marks = 0 if contiguous else 2 * len(samples)  # BOS and EOS around each whole sample
        return round(sum(len(text) for text in samples) * per_char) + marks

    def _split_notes(self, record: SplitRecord, train: Batches, test: Batches) -> list[str]:
        tokens = record.tokens
        return [f"data: task text: {tokens['train']:,} training tokens, every one learned ({tokens['val']:,} "
                f"validation, {tokens['test']:,} test)"]

    def test_prompt(self, folder: str | Path, record: SplitRecord, tokenizer: Tokenizer, max_tokens: int) -> str:
        """The start of the test split, up to its first line end."""
        ids = read_stream(RunFolder(folder).tokens("test"), record.dtype)[:max_tokens].tolist()
        return _fitted(ids, tokenizer, max_tokens, first_line=True)


class PairsTask(Task):
    """Source in, target out, the loss on the target only (see the module docstring)."""

    name = PAIRS
    scores_files_as = AUTO_TASK  # a pair file as pairs, plain text as text

    def sample_texts(self, sample: tuple[str, str]) -> tuple[str, ...]:
        return sample

    def training_texts(self, samples: Iterable[Any]) -> Iterator[str]:
        yield from super().training_texts(samples)
        if not self.encoder_decoder:
            yield PAIR_SEPARATOR  # (a character tokenizer must know it even when no text has it)

    def separator_ids(self, tokenizer: Tokenizer) -> list[int]:
        return tokenizer.encode(PAIR_SEPARATOR)

    def prompt_for(self, prompt: str) -> str:
        if self.encoder_decoder or prompt.endswith(PAIR_SEPARATOR):
            return prompt
        return prompt + PAIR_SEPARATOR

    def check_training_split(self, samples: list, path: Path) -> None:
        if not any(target.strip() for _, target in samples):
            raise MiniLLMError(f"every target of the {len(samples):,} training pairs of {path} is empty (0 training "
                               "tokens): there is nothing to learn; add pairs with targets, or check --target-column")

    def write_split(self, folder: str | Path, split: str, samples: list, tokenizer: Tokenizer, dtype: np.dtype,
                    contiguous: bool, progress: Any = None) -> int:
        return write_pair_streams(folder, split, tokenizer, samples, dtype, progress)

    def open_batches(self, folder: str | Path, split: str, record: SplitRecord, model_config: ModelConfig,
                     source_fraction: float) -> Batches:
        files, offsets = RunFolder(folder), split_offsets(folder, split)
        src = read_stream(files.pair_tokens(split, "src"), record.dtype, int(offsets[0, -1]))
        tgt = read_stream(files.pair_tokens(split, "tgt"), record.dtype, int(offsets[1, -1]))
        c = model_config
        if self.encoder_decoder:
            return PairBatches(src, tgt, offsets, c.max_seq_len, c.pad_id, c.bos_id, c.eos_id)
        if not record.separator:  # (prepared for an encoder-decoder: no separator was recorded)
            raise MiniLLMError(f"the pairs in {folder} were prepared without a separator, for an encoder-decoder; "
                               "a decoder-only model needs them prepared for it: train a new run")
        return PromptAnswerBatches(src, tgt, offsets, c.max_seq_len, c.pad_id, c.eos_id, record.separator)

    def answer_pairs(self, batches: PairBatches) -> AnswerPairs:
        return batches

    def epoch_tokens(self, train: Batches, record: SplitRecord) -> int:
        # Target + EOS within the context: what a cut pair loses beyond it is never seen.
        return train.fit().kept_target_tokens

    def estimated_tokens(self, samples: list, per_char: float, context: int, contiguous: bool,
                         n_separator: int) -> int:
        src = np.array([round(len(source) * per_char) for source, _ in samples], dtype=np.int64)
        tgt = np.array([round(len(target) * per_char) for _, target in samples], dtype=np.int64)
        if self.encoder_decoder:
            return int(encoder_decoder_kept(src, tgt, context)[1].sum())
        return int(prompt_answer_kept(src, tgt, context, n_separator)[1].sum())

    def _split_notes(self, record: SplitRecord, train: Batches, test: Batches) -> list[str]:
        samples, fit = record.samples, train.fit()
        prompt = "sources" if self.encoder_decoder else "sources and separators"
        return [f"data: task pairs: {samples['train']:,} training pairs, {fit.kept_target_tokens:,} answer tokens "
                f"(targets with their EOS, within the context: the loss is on these only) and "
                f"{fit.kept_prompt_tokens:,} prompt tokens ({prompt}: read, not learned); {samples['val']:,} "
                f"validation, {samples['test']:,} test pairs",
                fit.warning("training", train.max_seq_len), test.fit().warning("test", test.max_seq_len)]

    def test_prompt(self, folder: str | Path, record: SplitRecord, tokenizer: Tokenizer, max_tokens: int) -> str:
        """The first test source (for a decoder-only model: with the separator after it, so the answer
        follows)."""
        files = RunFolder(folder)
        offsets = read_offsets(files.pair_offsets("test"))
        source = read_stream(files.pair_tokens("test", "src"), record.dtype)[offsets[0, 0]:offsets[0, 1]]
        if self.encoder_decoder:
            return _fitted(source[:max_tokens].tolist(), tokenizer, max_tokens)
        room = max_tokens - len(record.separator)
        return _fitted(source[:max(0, room)].tolist(), tokenizer, room) + PAIR_SEPARATOR


class ChatTask(Task):
    """Conversations, the loss on the assistant's turns only (see the module docstring)."""

    name = CHAT
    scores_files_as = CHAT

    def __init__(self, encoder_decoder: bool) -> None:
        if encoder_decoder:
            raise MiniLLMError("conversations train a decoder-only model, which reads a conversation and writes the "
                               "next turn; leave out --model transformer (the encoder-decoder has no chat template)")
        super().__init__(encoder_decoder)

    def sample_texts(self, sample: list[dict]) -> tuple[str, ...]:
        return tuple(message["content"] for message in sample)

    answer_unit = "conversations (their last answer)"

    def answer_pairs(self, batches: ConversationBatches) -> AnswerPairs:
        return batches  # each conversation's last assistant turn, after the rest of it

    def prepare_tokenizer(self, tokenizer: Tokenizer, keep_template: bool = False) -> tuple[Tokenizer, list[str]]:
        """An imported tokenizer's own chat template when it has one (checked to render a conversation and to
        end a turn), else Mini LLM's, whose role markers are added to the tokenizer as special tokens."""
        if tokenizer.chat_template is not None:
            tokenizer.chat_training_ids([{"role": "user", "content": "1"}, {"role": ASSISTANT, "content": "2"}])
            return tokenizer, []
        added = [token for token in CHAT_TOKENS if token not in tokenizer.special_tokens()]
        tokenizer = tokenizer.with_special_tokens(CHAT_TOKENS)
        tokenizer.chat_template = ChatTemplate(DEFAULT_TEMPLATE, "Mini LLM's chat template")
        return tokenizer, added

    def write_split(self, folder: str | Path, split: str, samples: list, tokenizer: Tokenizer, dtype: np.dtype,
                    contiguous: bool, progress: Any = None) -> int:
        return write_conversation_streams(folder, split, tokenizer, samples, dtype, progress)

    def open_batches(self, folder: str | Path, split: str, record: SplitRecord, model_config: ModelConfig,
                     source_fraction: float) -> Batches:
        files, offsets = RunFolder(folder), split_offsets(folder, split)
        tokens = read_stream(files.tokens(split), record.dtype, int(offsets[0, -1]))
        learned = read_stream(files.loss_mask(split), np.uint8, int(offsets[0, -1]))
        batches = ConversationBatches(tokens, learned, offsets, model_config.max_seq_len, model_config.pad_id)
        batches.check_trainable("training" if split == "train" else split)
        return batches

    def epoch_tokens(self, train: Batches, record: SplitRecord) -> int:
        return train.fit().kept_learned

    def estimated_tokens(self, samples: list, per_char: float, context: int, contiguous: bool,
                         n_separator: int) -> int:
        # The assistant's texts and an end-of-turn token each (what is cut by the context is not estimated).
        return sum(round(sum(len(m["content"]) for m in conversation if m["role"] == ASSISTANT
                             and m.get("weight", 1)) * per_char) + learned_turns(conversation)
                   for conversation in samples)

    def _split_notes(self, record: SplitRecord, train: Batches, test: Batches) -> list[str]:
        samples, fit = record.samples, train.fit()
        return [f"data: task chat: {samples['train']:,} training conversations, {fit.kept_learned:,} answer tokens "
                f"(the assistant's turns with their end-of-turn, within the context: the loss is on these only) "
                f"and {fit.kept_prompt:,} prompt tokens (system and user turns, role markers: read, not learned); "
                f"{samples['val']:,} validation, {samples['test']:,} test conversations",
                fit.warning("training", train.max_seq_len), test.fit().warning("test", test.max_seq_len)]

    def test_prompt(self, folder: str | Path, record: SplitRecord, tokenizer: Tokenizer, max_tokens: int) -> str:
        """The first test conversation up to its first answer, special tokens spelled out."""
        return tokenizer.decode(self.test_prompt_ids(folder, record), skip_special_tokens=False)

    def test_prompt_ids(self, folder: str | Path, record: SplitRecord) -> list[int]:
        """The ids of the first test conversation up to its first learned token: its messages before the first
        answer, with the generation prompt (what the model answers)."""
        files = RunFolder(folder)
        offsets = read_offsets(files.pair_offsets("test"))
        start, end = int(offsets[0, 0]), int(offsets[0, 1])
        tokens = read_stream(files.tokens("test"), record.dtype)[start:end]
        learned = np.asarray(read_stream(files.loss_mask("test"), np.uint8)[start:end]) > 0
        return tokens[:int(np.argmax(learned)) if learned.any() else len(tokens)].tolist()


def _fitted(ids: list[int], tokenizer: Tokenizer, max_tokens: int, first_line: bool = False) -> str:
    """The text of `ids` (up to its first line end, with `first_line`) that encodes to at most `max_tokens`
    tokens: BPE may split decoded text differently, so the ids are shortened until it does."""
    while ids:
        text = tokenizer.decode(ids)
        if first_line:
            text = text.lstrip("\n")
            line_end = text.find("\n")
            text = text[:line_end + 1] if line_end > 0 else text
        if len(tokenizer.encode(text)) <= max_tokens:
            return text
        ids = ids[:-1]
    return ""


# The tasks by name (TrainConfig.task, SplitRecord.task).
TASKS: dict[str, type[Task]] = {cls.name: cls for cls in (TextTask, PairsTask, ChatTask)}


def task_for(name: str, encoder_decoder: bool) -> Task:
    """The task called `name`, for a model with (or without) an encoder."""
    if name not in TASKS:
        raise MiniLLMError(f"unknown task {name!r}; choose one of {sorted(TASKS)}")
    return TASKS[name](encoder_decoder)
