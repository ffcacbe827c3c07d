"""Conversations: the role markers as special tokens (both kinds), the chat template (Mini LLM's and an
imported one), conversation files and their bad lines, the loss on the assistant's turns only, answers that
stop at the end of a turn, a history cut to the context, and what `minillm generate` does with a pairs run."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import CHAT_CONTEXT, save_gpt2_style_tokenizer, single_thread, tiny_configs
from hypothesis import given, settings
from hypothesis import strategies as st
from test_generation import ScriptedEngine

from minillm.checkpoint import load_run
from minillm.cli import main
from minillm.config import IGNORE_INDEX, ModelConfig
from minillm.data.conversation_batches import ConversationBatches
from minillm.data.conversations import parse_conversations
from minillm.data.streams import read_offsets, read_stream, write_conversation_streams
from minillm.engine import Engine
from minillm.errors import MiniLLMError
from minillm.generation import GenerationStop, fit_history, showcase, stream_reply
from minillm.models import build_model
from minillm.models.layers import lm_loss
from minillm.run_folder import RunFolder
from minillm.sampling import SamplingConfig
from minillm.tokenizers import ChatTemplate, import_tokenizer, load_tokenizer, train_tokenizer
from minillm.tokenizers.chat_template import CHAT_TOKENS, DEFAULT_TEMPLATE, END_OF_TURN, ROLE_TOKENS, check_messages

CPU = torch.device("cpu")
TEXT = "You add numbers. What is 2 + 3? 2 + 3 = 5 <|> and ünïcode 猫 0123456789\n"
THREE_TURNS = [{"role": "system", "content": "You add numbers."},
               {"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "2 + 3 = 5"},
               {"role": "user", "content": "And 4 + 4?"}, {"role": "assistant", "content": "4 + 4 = 8"},
               {"role": "user", "content": "And 1 + 2?"}]
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

pytestmark = pytest.mark.usefixtures("one_thread")


def chat_tokenizer(kind: str):
    tokenizer = train_tokenizer(kind, [TEXT * 20], 300).with_special_tokens(CHAT_TOKENS)
    tokenizer.chat_template = ChatTemplate(DEFAULT_TEMPLATE)
    return tokenizer


# ---- the role markers and the template ------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_role_markers_are_special_tokens_after_the_last_id_never_split_never_made_from_text(kind, tmp_path):
    base = train_tokenizer(kind, [TEXT * 20], 300)
    tok = base.with_special_tokens(CHAT_TOKENS)
    ids = [tok.special_tokens()[token] for token in CHAT_TOKENS]
    assert ids == list(range(base.vocab_size, base.vocab_size + len(CHAT_TOKENS)))
    assert tok.vocab_size == base.vocab_size + len(CHAT_TOKENS)
    assert tok.encode(TEXT) == base.encode(TEXT)  # no existing id moved
    for token, token_id in zip(CHAT_TOKENS, ids, strict=True):
        assert tok.encode(token, allow_special=True) == [token_id]  # never split
        assert not set(tok.encode(f"a{token}b")) & set(ids)  # ordinary text never makes one
        assert tok.decode([token_id]) == "" and tok.decode([token_id], skip_special_tokens=False) == token
        assert tok.token_bytes()[token_id] == b"" and tok.token_text(token_id) == token
    assert tok.with_special_tokens(CHAT_TOKENS).vocab_size == tok.vocab_size  # (added once)
    tok.save(tmp_path / "tokenizer.json")
    loaded = load_tokenizer(tmp_path)
    assert loaded.special_tokens() == tok.special_tokens() and loaded.fingerprint() == tok.fingerprint()
    assert loaded.fingerprint() != base.fingerprint()
    assert loaded.encode(f"x{END_OF_TURN}", allow_special=True)[-1] == ids[-1]


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_the_default_template_renders_turns_between_role_markers(kind):
    tok = chat_tokenizer(kind)
    assert tok.chat_template.render(THREE_TURNS[:3], False, tok) == (
        "<|bos|><|system|>You add numbers.<|end|><|user|>What is 2 + 3?<|end|><|assistant|>2 + 3 = 5<|end|>")
    special = tok.special_tokens()
    ids = tok.apply_chat_template(THREE_TURNS[:2], add_generation_prompt=True)
    assert ids == [tok.bos_id, special["<|system|>"], *tok.encode("You add numbers."), special[END_OF_TURN],
                   special["<|user|>"], *tok.encode("What is 2 + 3?"), special[END_OF_TURN], special["<|assistant|>"]]
    assert tok.apply_chat_template(THREE_TURNS[:2]) == ids[:-1]
    assert tok.chat_stop_ids() == sorted([tok.eos_id, special[END_OF_TURN]])


@settings(max_examples=60, deadline=None)
@given(content=st.lists(st.sampled_from([*CHAT_TOKENS, "<|bos|>", "<|eos|>", "<|", "|>", "\ufdd0", "\ufdd1", "0",
                                         "a", " ", "猫", "\n"]), max_size=12).map("".join),
       kind=st.sampled_from(["char", "bpe"]))
def test_a_message_is_always_ordinary_text_even_when_it_spells_a_special_token(content, kind):
    tok = chat_tokenizer(kind)
    special = tok.special_tokens()
    ids = tok.apply_chat_template([{"role": "user", "content": content}])
    assert ids == [tok.bos_id, special["<|user|>"], *tok.encode(content), special[END_OF_TURN]]


def test_the_learned_tokens_are_each_assistant_turn_and_its_end_of_turn():
    tok = chat_tokenizer("char")
    messages = [*THREE_TURNS[:5], {"role": "user", "content": "?"}, {"role": "assistant", "content": "no", "weight": 0}]
    ids, learned = tok.chat_training_ids(check_messages(messages))
    assert ids == tok.apply_chat_template(messages)
    end = tok.special_tokens()[END_OF_TURN]
    learned_ids = [i for i, keep in zip(ids, learned, strict=True) if keep]
    assert learned_ids == [*tok.encode("2 + 3 = 5"), end, *tok.encode("4 + 4 = 8"), end]  # (weight 0: not learned)


@pytest.mark.parametrize("messages, error", [
    ("no list", "non-empty \"messages\" list"),
    ([], "non-empty \"messages\" list"),
    (["hi"], "message 1 is not a JSON object"),
    ([{"content": "hi"}], "message 1 has no \"role\""),
    ([{"role": "user"}], "message 1 has no \"content\""),
    ([{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}], "message 2 has the unknown role 'tool'"),
    ([{"role": "user", "content": ["a"]}], "\"content\" must be text"),
    ([{"role": "assistant", "content": "a", "weight": 2}], "\"weight\" is 0 or 1"),
])
def test_bad_messages_are_one_clear_error_naming_the_message(messages, error):
    with pytest.raises(MiniLLMError, match=error):
        check_messages(messages, "the request")


def test_a_template_that_is_not_valid_jinja_or_not_incremental_is_refused():
    with pytest.raises(MiniLLMError, match="chat_template.jinja is not a valid Jinja template"):
        ChatTemplate("{% for m in messages %}", "chat_template.jinja")
    tok = chat_tokenizer("char")
    tok.chat_template = ChatTemplate("{% for m in messages | reverse %}{{ m['content'] }}<|end|>{% endfor %}")
    with pytest.raises(MiniLLMError, match="cannot tell which tokens are the assistant's"):
        tok.chat_training_ids(THREE_TURNS[:3])
    tok = chat_tokenizer("char")
    with pytest.raises(MiniLLMError, match="message 1 has the unknown role 'tool'"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])
    with pytest.raises(MiniLLMError, match="could not render the conversation.*unknown role tool"):  # (its own)
        tok.chat_template.render_ids([{"role": "tool", "content": "x"}], False, tok)


def chatml_tokenizer_file(folder, texts) -> object:
    """A GPT-2-style tokenizer.json with ChatML's markers, its tokenizer_config.json holding ChatML's template."""
    from tokenizers import Tokenizer as HFTokenizer

    path = save_gpt2_style_tokenizer(folder / "tokenizer.json", texts)
    hf = HFTokenizer.from_file(str(path))
    hf.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    hf.save(str(path))
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML}), encoding="utf-8")
    return path


def test_an_imported_tokenizer_brings_its_own_template_and_its_end_of_turn(tmp_path):
    path = chatml_tokenizer_file(tmp_path, [TEXT * 20])
    tok, _ = import_tokenizer(path)
    assert tok.chat_template.source == CHATML
    im_end = tok.special_tokens()["<|im_end|>"]
    assert tok.chat_stop_ids() == sorted([tok.eos_id, im_end])
    ids, learned = tok.chat_training_ids(THREE_TURNS[:3])
    assert tok.decode([i for i, keep in zip(ids, learned, strict=True) if keep], skip_special_tokens=False) == (
        "2 + 3 = 5<|im_end|>\n")


# ---- conversation files ---------------------------------------------------------------------------------

GOOD_LINE = json.dumps({"messages": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"}]})
BAD_LINES = {
    "not JSON": ("{\"messages\": [", "line 3 is not JSON"),
    "no messages": (json.dumps({"input": "a", "output": "b"}), "line 3 has no \"messages\" list"),
    "no role": (json.dumps({"messages": [{"content": "a"}]}), "line 3, message 1 has no \"role\""),
    "no content": (json.dumps({"messages": [{"role": "user"}]}), "line 3, message 1 has no \"content\""),
    "unknown role": (json.dumps({"messages": [{"role": "robot", "content": "a"}]}), "line 3, message 1 has the "
                                                                                    "unknown role 'robot'"),
    "no assistant": (json.dumps({"messages": [{"role": "user", "content": "a"}]}), "line 3 has no assistant message"),
}


@pytest.mark.parametrize("kind", list(BAD_LINES))
def test_a_bad_conversation_line_is_one_error_with_its_line_number_and_nothing_is_written(kind, tmp_path, capsys):
    bad, error = BAD_LINES[kind]
    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join([GOOD_LINE, GOOD_LINE, bad, GOOD_LINE, GOOD_LINE]) + "\n", encoding="utf-8")
    assert main(["train", str(data), "--preset", "tiny", "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and error in err and "--skip-bad-lines" in err
    assert not (tmp_path / "run").exists()
    notes = []
    kept = parse_conversations(data, data.read_text(encoding="utf-8"), skip_bad_lines=True, notes=notes)
    assert len(kept) == 4 and notes == [f"warning: left out 1 bad line(s) of {data} (--skip-bad-lines): "
                                        f"{error}" + notes[0].split(error, 1)[1]]


def test_a_conversation_file_trains_the_chat_task_and_other_tasks_refuse_it(tmp_path, dialogues_file):
    from minillm.data.sources import load_samples

    loaded = load_samples(dialogues_file, "auto", "paragraph", "")
    assert loaded.task == "chat" and loaded.samples[0][0]["role"] == "system"
    with pytest.raises(MiniLLMError, match="they train --task chat"):
        load_samples(dialogues_file, "pairs", "paragraph", "")
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("a\tb\nc\td\ne\tf\n", encoding="utf-8")
    with pytest.raises(MiniLLMError, match="--task chat needs a JSONL file of conversations"):
        load_samples(pairs, "chat", "paragraph", "")
    from minillm.data.tasks import task_for

    with pytest.raises(MiniLLMError, match="conversations train a decoder-only model"):
        task_for("chat", encoder_decoder=True)


# ---- the loss is on the assistant's turns only ----------------------------------------------------------

def conversation_batches(folder, tokenizer, conversations, max_seq_len) -> ConversationBatches:
    folder.mkdir(parents=True, exist_ok=True)
    write_conversation_streams(folder, "train", tokenizer, conversations, np.dtype(np.uint16))
    offsets = read_offsets(RunFolder(folder).pair_offsets("train"))
    return ConversationBatches(read_stream(RunFolder(folder).tokens("train"), "uint16"),
                               read_stream(RunFolder(folder).loss_mask("train"), np.uint8), offsets, max_seq_len,
                               tokenizer.pad_id)


CONVERSATIONS = [THREE_TURNS[:3], THREE_TURNS[:5], [{"role": "user", "content": "hi"},
                                                    {"role": "assistant", "content": "a 2"}]]


def test_the_loss_of_a_conversation_batch_is_on_the_assistant_turns_only(tmp_path):
    """Changing any system or user token never changes the loss of a batch, changing an assistant token does
    (under a model whose prediction at a position reads that position's token alone, so that only what the
    loss scores can move it); and a real model's loss is the mean cross-entropy of the assistant's tokens and
    their end-of-turn tokens alone, by hand."""
    tok = chat_tokenizer("char")
    torch.manual_seed(0)
    bigram = torch.nn.Embedding(tok.vocab_size, tok.vocab_size)  # next-token logits from the current token

    def batch_of(conversations):
        folder = tmp_path / f"c{len(list(tmp_path.iterdir()))}"
        return conversation_batches(folder, tok, conversations, 96).batch_of([0, 1, 2], CPU)

    def loss_of(conversations) -> torch.Tensor:
        batch = batch_of(conversations)
        with torch.no_grad():
            return lm_loss(bigram(batch["input_ids"]), batch["targets"])

    def changed(i: int, m: int, j: int) -> list:
        conversations = [[dict(message) for message in c] for c in CONVERSATIONS]
        text = conversations[i][m]["content"]
        conversations[i][m]["content"] = text[:j] + ("7" if text[j] != "7" else "a") + text[j + 1:]
        return conversations

    base = loss_of(CONVERSATIONS)
    for i, conversation in enumerate(CONVERSATIONS):
        for m, message in enumerate(conversation):
            for j in range(len(message["content"])):
                same = torch.equal(loss_of(changed(i, m, j)), base)
                assert same == (message["role"] != "assistant"), (i, m, j)

    model = build_model(ModelConfig(vocab_size=tok.vocab_size, d_model=16, n_layers=1, n_heads=2,
                                    max_seq_len=96)).eval()
    with torch.no_grad():
        _, loss = model(**batch_of(CONVERSATIONS))
    nats = []
    for conversation in CONVERSATIONS:  # by hand: each assistant token's -log p given everything before it
        for i, message in enumerate(conversation):
            if message["role"] != "assistant":
                continue
            before = tok.apply_chat_template(conversation[:i], add_generation_prompt=True)
            answer = [*tok.encode(message["content"]), tok.special_tokens()[END_OF_TURN]]
            sequence = before + answer
            with torch.no_grad():
                logits, _ = model(torch.tensor([sequence[:-1]]))
            log_probs = F.log_softmax(logits[0].float(), dim=-1)
            nats += [-log_probs[p - 1, sequence[p]].item() for p in range(len(before), len(sequence))]
    assert loss.item() == pytest.approx(sum(nats) / len(nats), rel=1e-5)


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_a_conversations_answer_pair_is_its_last_assistant_turn_after_the_rest(kind, tmp_path):
    """What a chat run's answers are scored against: each conversation's last assistant message (its text,
    without the end of turn), after everything before it rendered with the generation prompt; a
    conversation whose last answer lies beyond the context has none."""
    tok = chat_tokenizer(kind)
    batches = conversation_batches(tmp_path / "whole", tok, CONVERSATIONS, 96)
    assert batches.n_pairs == len(CONVERSATIONS)
    for pair, conversation in enumerate(CONVERSATIONS):
        assert tok.decode(batches.answer_ids(pair)) == conversation[-1]["content"]
        prompt = tok.apply_chat_template(conversation[:-1], add_generation_prompt=True)
        assert batches.prompt_ids(pair)[-len(prompt):] == prompt
    short = conversation_batches(tmp_path / "short", tok, CONVERSATIONS, 12)
    assert short.n_pairs < len(CONVERSATIONS)


def test_evaluate_scores_a_chat_runs_last_answers(chat_run):
    from minillm.training import evaluate_run
    from minillm.training.answers import describe_answers

    metrics = evaluate_run(chat_run)
    assert metrics["answers"] == 15 and metrics["answers_to"] == "conversations (their last answer)"  # 5% of 300
    assert 0 <= metrics["exact_match"] <= 1 and metrics["cer"] >= 0
    assert describe_answers(metrics).startswith("greedy answers to 15 conversations (their last answer): ")


def test_conversation_batches_equal_a_row_by_row_construction_and_cut_long_ones(tmp_path):
    tok = chat_tokenizer("char")
    context = 40
    batches = conversation_batches(tmp_path / "c", tok, [check_messages(c) for c in CONVERSATIONS], context)
    batch = batches.batch_of([0, 1, 2], CPU)
    width = batch["input_ids"].shape[1]
    scored = 0
    for row, conversation in enumerate(CONVERSATIONS):
        ids, learned = tok.chat_training_ids(conversation)
        ids, learned = ids[:context + 1], learned[:context + 1]
        targets = [t if keep else IGNORE_INDEX for t, keep in zip(ids[1:], learned[1:], strict=True)]
        assert batch["input_ids"][row].tolist() == ids[:-1] + [tok.pad_id] * (width - len(ids) + 1)
        assert batch["targets"][row].tolist() == targets + [IGNORE_INDEX] * (width - len(targets))
        scored += sum(t != IGNORE_INDEX for t in targets)
    fit = batches.fit()
    assert width == context and fit.cut == 2 and fit.kept_learned == scored == batches.sequential_tokens
    assert "2 of 3 training conversations are longer than the context of 40 tokens" in fit.warning("training", 40)
    assert sum(n for _, n in batches.sequential(2, CPU)) == scored
    with pytest.raises(MiniLLMError, match="no training conversation has an assistant token within the context"):
        conversation_batches(tmp_path / "d", tok, CONVERSATIONS[:2], 12).check_trainable("training")


# ---- a chat run -----------------------------------------------------------------------------------------

def test_a_chat_run_keeps_its_template_and_says_its_task_and_tokens(chat_run, dialogues_file, tmp_path):
    run = load_run(chat_run)
    assert run.tokenizer.chat_template.source == DEFAULT_TEMPLATE
    assert RunFolder(chat_run).chat_template.read_text(encoding="utf-8") == DEFAULT_TEMPLATE
    assert set(ROLE_TOKENS.values()) <= set(run.tokenizer.special_tokens())
    record = json.loads(RunFolder(chat_run).special_tokens.read_text())
    assert record["added"] == list(CHAT_TOKENS)
    sample = showcase(run, 5, 24)
    assert sample.prompt.startswith("<|bos|><|system|>You are a calculator.") and sample.prompt.endswith(
        "<|assistant|>")
    lines = []
    model_config, train_config = tiny_configs(data=dialogues_file, max_steps=1, eval_interval=1)
    from minillm.training import train

    train(model_config.replace(max_seq_len=CHAT_CONTEXT), train_config, tmp_path / "run", progress=False,
          log=lines.append)
    assert any(line.startswith("data: task chat: 270 training conversations, ") and " answer tokens (" in line
               and " prompt tokens (" in line for line in lines), lines


def test_the_plan_of_a_pairs_run_says_its_task_answer_and_prompt_tokens(tmp_path):
    from minillm.training import train

    data = tmp_path / "pairs.tsv"
    data.write_text("".join(f"{w}\t{w[::-1]}\n" for w in ["abc", "de", "fgh", "ij", "klm"] * 6), encoding="utf-8")
    lines = []
    model_config, train_config = tiny_configs(data=data, max_steps=1, eval_interval=1)
    train(model_config, train_config, tmp_path / "run", progress=False, log=lines.append)
    # 26 training pairs (2 validation, 2 test): answers of 2-3 letters and their EOS; prompts of the same
    # letters and a newline.
    [line] = [line for line in lines if line.startswith("data: task pairs: 26 training pairs, ")]
    answers, prompts = (int(line.split(word)[0].rsplit(" ", 1)[1].replace(",", ""))
                        for word in (" answer tokens", " prompt tokens"))
    assert answers == prompts  # each pair: its source and a newline read, its target and EOS learned


def test_an_answer_stops_at_the_end_of_its_turn():
    tok = chat_tokenizer("char")
    end = tok.special_tokens()[END_OF_TURN]
    engine = ScriptedEngine([*tok.encode("2 + 3 = 5"), end, *tok.encode("more")], vocab_size=tok.vocab_size)
    tokens = stream_reply(engine.model, tok, THREE_TURNS[:2], SamplingConfig(max_new_tokens=30), engine)
    assert "".join(text for _, text in tokens) == "2 + 3 = 5"
    assert tokens.stop_reason == GenerationStop.END_OF_TURN and tokens.end_note() == (
        "stopped at end of turn after 9 tokens")
    call = engine.calls[-1]
    assert call["prompt_ids"] == [tok.apply_chat_template(THREE_TURNS[:2], add_generation_prompt=True)]
    assert call["eos_id"] == tok.chat_stop_ids() and engine.pulled == 10


def test_the_engine_stops_each_row_at_any_of_its_stop_ids():
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=40, d_model=16, n_layers=1, n_heads=2, max_seq_len=32)).eval()
    prompt = torch.randint(3, 40, (2, 3))
    greedy = SamplingConfig(temperature=0, max_new_tokens=12)
    free = Engine(model).generate(prompt, greedy)
    stops = [int(free[0, 1]), int(free[1, 3])]  # row 0 ends at its 2nd token at the latest, row 1 at its 4th
    out = Engine(model).generate(prompt, greedy, eos_id=stops)
    for row in range(2):
        hit = next(n for n, t in enumerate(free[row].tolist()) if t in stops)
        assert out[row, :hit + 1].tolist() == free[row, :hit + 1].tolist()
        assert (out[row, hit + 1:] == model.config.pad_id).all()
    assert out.size(1) <= 4


def test_a_history_longer_than_the_context_loses_its_oldest_turns():
    tok = chat_tokenizer("char")
    history = [THREE_TURNS[0], *THREE_TURNS[1:5] * 3, THREE_TURNS[5]]
    full = len(tok.apply_chat_template(history, add_generation_prompt=True))
    kept, dropped = fit_history(tok, history, context=full, max_new_tokens=0)
    assert (kept, dropped) == (history, 0)
    kept, dropped = fit_history(tok, history, context=full - 1, max_new_tokens=0)
    assert dropped == 2 and kept == [history[0], *history[3:]]  # the system message stays; a user's first
    kept, dropped = fit_history(tok, history, context=80, max_new_tokens=16)
    assert kept[0] == history[0] and kept[1]["role"] == "user" and kept[-1] == history[-1]
    assert len(tok.apply_chat_template(kept, add_generation_prompt=True)) <= 80 - 16
    with pytest.raises(MiniLLMError, match=r"last message \(with the system message\) is 32 tokens, more than the 30"):
        fit_history(tok, history, context=40, max_new_tokens=10)


def test_generate_on_a_chat_run_answers_the_prompt_as_a_user_message(chat_run, capsys):
    assert main(["generate", str(chat_run), "--prompt", "What is 2 + 3?", "--temperature", "0",
                 "--max-new-tokens", "20"]) == 0
    out, err = capsys.readouterr()
    run = load_run(chat_run)
    expected = "".join(text for _, text in stream_reply(
        run.model, run.tokenizer, [{"role": "user", "content": "What is 2 + 3?"}],
        SamplingConfig(temperature=0, max_new_tokens=20)))
    assert out == expected + "\n" and "is a chat run" in err


def test_generate_on_a_pairs_run_puts_the_separator_after_the_prompt(tmp_path, capsys):
    from minillm.training import train

    data = tmp_path / "pairs.tsv"
    data.write_text("".join(f"{w}\t{w[::-1]}\n" for w in ["abc", "de", "fgh", "ij", "klm"] * 6), encoding="utf-8")
    model_config, train_config = tiny_configs(data=data, max_steps=2, eval_interval=1)
    train(model_config, train_config, tmp_path / "run", progress=False, log=lambda m: None)
    for prompt in ("abc", "abc\n"):  # (a prompt that already ends with the separator is kept)
        assert main(["generate", str(tmp_path / "run"), "--prompt", prompt, "--temperature", "0",
                     "--max-new-tokens", "5"]) == 0
        out = capsys.readouterr().out
        run = load_run(tmp_path / "run")
        from minillm.generation import generate_text

        continuation = generate_text(run.model, run.tokenizer, "abc\n", SamplingConfig(temperature=0,
                                                                                        max_new_tokens=5))
        assert out == "abc\n" + continuation + "\n"


# ---- export: transformers and llama.cpp read the same template ----------------------------------------

@pytest.fixture(scope="module")
def bpe_chat_run(tmp_path_factory, dialogues_file):
    from minillm.training import train

    run_dir = tmp_path_factory.mktemp("runs") / "tiny-chat-bpe"
    model_config, train_config = tiny_configs(tokenizer="bpe", data=dialogues_file, max_steps=2, eval_interval=1)
    with single_thread():
        train(model_config.replace(max_seq_len=96), train_config, run_dir, progress=False, log=lambda m: None)
    return run_dir


@pytest.mark.parametrize("which", ["char", "bpe"])
def test_transformers_apply_chat_template_gives_mini_llms_ids(which, chat_run, bpe_chat_run, tmp_path):
    from conftest import import_dev_dependency

    transformers = import_dev_dependency("transformers")
    from minillm.export import export_run

    run_dir = chat_run if which == "char" else bpe_chat_run
    out = export_run(run_dir, "hf", tmp_path / "hf", log=lambda m: None)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))
    run = load_run(run_dir)
    for prompt in (False, True):
        ours = run.tokenizer.apply_chat_template(THREE_TURNS, add_generation_prompt=prompt)
        theirs = tokenizer.apply_chat_template(THREE_TURNS, add_generation_prompt=prompt, return_dict=False)
        assert theirs == ours and ours.count(run.tokenizer.special_tokens()["<|user|>"]) == 3
    config = json.loads((out / "generation_config.json").read_text())
    assert config["eos_token_id"] == run.tokenizer.chat_stop_ids()
    assert "apply_chat_template" in (out / "README.md").read_text(encoding="utf-8")


def test_gguf_export_writes_the_template_and_the_end_of_turn(bpe_chat_run, tmp_path):
    from conftest import import_dev_dependency

    gguf = import_dev_dependency("gguf")
    from minillm.export import export_run

    out = export_run(bpe_chat_run, "gguf", tmp_path / "chat.gguf", log=lambda m: None)
    fields = gguf.GGUFReader(out).fields
    template = fields["tokenizer.chat_template"]
    assert bytes(template.parts[template.data[0]]).decode() == DEFAULT_TEMPLATE
    eot = fields["tokenizer.ggml.eot_token_id"]
    assert int(eot.parts[eot.data[0]][0]) == load_run(bpe_chat_run).tokenizer.special_tokens()[END_OF_TURN]


def test_a_run_trained_with_an_imported_chat_tokenizer_keeps_its_template(tmp_path, dialogues_file):
    from minillm.training import train

    texts = [json.dumps(line) for line in dialogues_file.read_text().splitlines()[:50]]
    path = chatml_tokenizer_file(tmp_path / "chatml", texts)
    model_config, train_config = tiny_configs(data=dialogues_file, max_steps=1, eval_interval=1,
                                              tokenizer_file=str(path))
    train(model_config.replace(max_seq_len=128), train_config, tmp_path / "run", progress=False, log=lambda m: None)
    run = load_run(tmp_path / "run")
    assert run.tokenizer.chat_template.source == CHATML and "<|user|>" not in run.tokenizer.special_tokens()
    assert run.tokenizer.special_tokens()["<|im_end|>"] in run.tokenizer.chat_stop_ids()
    shutil.rmtree(tmp_path / "run")
