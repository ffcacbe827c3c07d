"""--init-from: a new run starts from a Hugging Face checkpoint folder (Llama, Qwen3: made here by transformers
itself, since nothing can be downloaded) or from another run, as the same model; trains on; exports back to
transformers as the same model with the original tokenizer and chat template; and every refusal is one line
that leaves no run folder behind."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from conftest import import_dev_dependency, make_corpus, single_thread, tiny_configs

from minillm.checkpoint import load_run
from minillm.cli import main
from minillm.engine import Engine
from minillm.export import export_run
from minillm.models.hf_checkpoint import weights_fingerprint
from minillm.sampling import SamplingConfig
from minillm.training import resume, train
from minillm.training.start import starting_model

transformers = import_dev_dependency("transformers")
tokenizers = import_dev_dependency("tokenizers")

ARCHITECTURES = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                 "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM)}
# 4 query heads over 2 key/value heads, a head width that is not hidden / heads, untied, unusual eps and theta;
# a larger initialisation than transformers' 0.02, so that a random model's greedy tokens vary.
SHAPE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             head_dim=12, max_position_embeddings=96, rms_norm_eps=3e-6, rope_theta=12345.0,
             tie_word_embeddings=False, initializer_range=0.3)
WINDOW = 96  # the run's window: the checkpoint's whole context (transformers does not slide; a prompt + 30 fit)
CHAT_TEMPLATE = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
GREEDY_TOKENS = 30
TOLERANCE = 1e-4
PROMPT = "the old king waits for"

pytestmark = pytest.mark.usefixtures("one_thread")


def save_tokenizer(folder, specials=("<s>", "</s>", "<pad>"), chat_template=CHAT_TEMPLATE):
    """A byte-level BPE tokenizer saved by transformers (tokenizer.json, tokenizer_config.json, its chat
    template); returns its number of ids."""
    hf = tokenizers.Tokenizer(tokenizers.models.BPE())
    hf.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=list(specials), show_progress=False,
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator([make_corpus()], trainer=trainer)
    roles = dict(zip(("bos_token", "eos_token", "pad_token"), specials, strict=False))
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=hf, **roles)
    tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(folder)
    return hf.get_vocab_size()


def save_checkpoint(folder, architecture="llama", dtype=torch.float32, shard=None, vocab=None, **options):
    """A random checkpoint of `architecture` saved by transformers into `folder` (with save_tokenizer's
    tokenizer); returns the model transformers loads from it, in float32."""
    ids = vocab or save_tokenizer(folder)
    config_class, model_class = ARCHITECTURES[architecture]
    torch.manual_seed(0)
    model = model_class(config_class(vocab_size=ids, bos_token_id=0, eos_token_id=1, pad_token_id=2,
                                     **{**SHAPE, **options})).eval()
    model.to(dtype).save_pretrained(folder, **({"max_shard_size": shard} if shard else {}))
    return model_class.from_pretrained(folder, dtype=torch.float32).eval()


def quiet(message: str) -> None:
    pass


def model_tied(model) -> bool:
    return model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


CASES = {"llama float32": ("llama", torch.float32, None, {}), "llama bfloat16": ("llama", torch.bfloat16, None, {}),
         "llama sharded": ("llama", torch.float32, "20KB", {}), "qwen3 float32": ("qwen3", torch.float32, None, {}),
         "qwen3 bfloat16": ("qwen3", torch.bfloat16, None, {}), "qwen3 sharded": ("qwen3", torch.float32, "20KB", {}),
         "qwen3 float16 tied": ("qwen3", torch.float16, None, {"tie_word_embeddings": True})}


@pytest.mark.parametrize("case", list(CASES))
def test_a_checkpoint_starts_as_the_same_model(case, tmp_path):
    architecture, dtype, shard, options = CASES[case]
    reference = save_checkpoint(tmp_path, architecture, dtype, shard, **options)  # float32 of what is on disk
    assert model_tied(reference) == bool(options)
    if shard:
        assert (tmp_path / "model.safetensors.index.json").is_file() and len(list(tmp_path.glob("*.safetensors"))) > 1
    model, tokenizer = starting_model(str(tmp_path), WINDOW, log=quiet)
    assert model.config.tie_embeddings == bool(options) and (model.lm_head.weight is model.embed_tokens.weight) == \
        bool(options)
    assert (model.config.n_heads, model.config.n_kv_heads, model.config.head_dim) == (4, 2, 12)
    assert (model.config.norm_eps, model.config.rope_theta, model.config.qk_norm) == (3e-6, 12345.0,
                                                                                     architecture == "qwen3")
    ids = torch.tensor([[tokenizer.bos_id, *tokenizer.encode(f"{PROMPT} the river. a dog sees the moon.")]])
    with torch.no_grad():
        ours = model(ids)[0]
        assert (ours - reference(ids).logits).abs().max().item() <= TOLERANCE
        cache = model.new_cache(1)  # cached decoding: a prefill, then one token at a time
        steps = [model(ids[:, :4], cache=cache)[0]] + [model(ids[:, t:t + 1], cache=cache)[0]
                                                        for t in range(4, ids.size(1))]
    # (one position at a time normalises by another float32 formula: within float32 rounding of logits near 1)
    torch.testing.assert_close(torch.cat(steps, dim=1), ours, atol=1e-5, rtol=1e-5)
    prompt = torch.tensor([[tokenizer.bos_id, *tokenizer.encode(PROMPT)]])
    greedy = Engine(model).generate(prompt, SamplingConfig(max_new_tokens=GREEDY_TOKENS, temperature=0.0))
    reference.generation_config.eos_token_id = None
    theirs = reference.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                max_new_tokens=GREEDY_TOKENS)
    assert theirs[0, prompt.size(1):].tolist() == greedy[0].tolist() and len(set(greedy[0].tolist())) > 3


@pytest.mark.parametrize("architecture", ["llama", "qwen3"])
def test_a_run_started_from_a_checkpoint_trains_and_exports_back_to_transformers(architecture, tmp_path,
                                                                                  corpus_file):
    save_checkpoint(tmp_path / "hf", architecture, torch.bfloat16)
    lines = []
    model_config, train_config = tiny_configs(data=corpus_file, max_steps=20, init_from=str(tmp_path / "hf"))
    result = train(model_config, train_config, tmp_path / "run", progress=False, log=lines.append,
                   model_overrides={"max_seq_len": 64})
    assert result.steps == 20 and result.best_val_loss < math.inf
    assert any(line.startswith(f"starting from the {ARCHITECTURES[architecture][1].__name__} checkpoint")
               for line in lines)
    run = load_run(tmp_path / "run", "cpu")
    record = run.info["init_from"]
    assert (record["kind"], record["step"], record["path"]) == ("hugging_face", None, str((tmp_path / "hf").resolve()))
    assert record["fingerprint"] == weights_fingerprint([tmp_path / "hf" / "model.safetensors"])
    assert json.loads((tmp_path / "run" / "train_config.json").read_text())["train"]["init_from"] == str(
        tmp_path / "hf")

    out = export_run(tmp_path / "run", "hf", tmp_path / "export", log=quiet)
    exported = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(exported).__name__ == ARCHITECTURES[architecture][1].__name__
    ids = torch.tensor([run.tokenizer.encode(f"{PROMPT} the river.", add_special_tokens=True)])
    with torch.no_grad():
        assert (exported(ids).logits - run.model(ids)[0]).abs().max().item() <= TOLERANCE
    original = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    text = "Café naïve — the cat sees 東京 😀\n"
    assert tokenizer(text, add_special_tokens=False).input_ids == original(text, add_special_tokens=False).input_ids
    messages = [{"role": "user", "content": "the cat"}, {"role": "assistant", "content": "sees the moon."}]
    assert tokenizer.chat_template == CHAT_TEMPLATE
    assert tokenizer.apply_chat_template(messages) == original.apply_chat_template(messages)
    card = (out / "README.md").read_text(encoding="utf-8")
    assert f"checkpoint `hf` (weights {record['fingerprint']}" in card


def test_a_role_the_tokenizer_lacks_grows_the_embedding_by_its_mean_row_and_unused_rows_are_left_out(tmp_path):
    """A Qwen-style tokenizer (one <|endoftext|> for begin and end, no padding) and an embedding with more rows
    than it has ids: the rows no token has are left out, <|pad|> is added after the last id with the mean row."""
    ids = save_tokenizer(tmp_path, specials=("<|endoftext|>",))
    reference = save_checkpoint(tmp_path, "qwen3", vocab=ids + 4)  # 4 rows no token has
    lines = []
    model, tokenizer = starting_model(str(tmp_path), WINDOW, log=lines.append)
    assert tokenizer.vocab_size == ids + 1 and tokenizer.pad_id == ids  # <|pad|>, after the last id
    assert lines == ["left out 4 rows of its embedding that no token of tokenizer.json has",
                     "the embedding and the head grew by 1 row(s) for <|pad|> (added to the tokenizer), initialised "
                     "to the mean of the others"]
    for ours, theirs in ((model.embed_tokens.weight, reference.model.embed_tokens.weight),
                         (model.lm_head.weight, reference.lm_head.weight)):
        assert torch.equal(ours[:ids], theirs[:ids]) and torch.allclose(ours[ids], theirs[:ids].mean(0))
    text = torch.tensor([[tokenizer.bos_id, *tokenizer.encode(PROMPT)]])
    with torch.no_grad():
        assert (model(text)[0][..., :ids] - reference(text).logits[..., :ids]).abs().max().item() <= TOLERANCE


# ---- from another run ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, corpus_file):
    """A tiny char-level run pretrained on the corpus's text."""
    path = tmp_path_factory.mktemp("pretrained") / "run"
    with single_thread():
        train(*tiny_configs(data=corpus_file, max_steps=40), path, progress=False, log=quiet)
    return path


def test_a_run_started_from_another_starts_at_its_validation_loss_on_the_same_text(pretrained, corpus_file,
                                                                                   tmp_path):
    source = load_run(pretrained, "cpu")
    lines = []
    # --max-steps and --learning-rate are the new run's; the preset's --block-size 32 is the source's anyway
    result = train(*tiny_configs(data=corpus_file, max_steps=10, init_from=str(pretrained), learning_rate=1e-3),
                   tmp_path / "tuned", progress=False, log=lines.append)
    record = load_run(tmp_path / "tuned", "cpu").info["init_from"]
    assert record["val_loss"] == pytest.approx(source.info["training"]["val_loss"], abs=1e-6)
    assert (record["kind"], record["step"], record["fingerprint"]) == (
        "run", source.info["training"]["step"], weights_fingerprint([pretrained / "best_model.pt"]))
    assert f"validation loss before training: {record['val_loss']:.4f}" in "\n".join(lines)
    assert result.best_val_loss <= record["val_loss"]


def test_a_pair_run_starts_from_a_text_run_with_its_weights_and_tokenizer(pretrained, corpus_file, tmp_path):
    """Pretrain on text, tune on pairs (the answer-only loss): the start is the source's model exactly, which
    already predicts the answers far better than chance."""
    sentences = [line for line in corpus_file.read_text().splitlines() if line.strip()]
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("".join(f"{' '.join(s.split()[:2])}\t{' '.join(s.split()[2:])}\n" for s in sentences))
    lines = []
    train(*tiny_configs(data=pairs, max_steps=20, init_from=str(pretrained)), tmp_path / "pairs", progress=False,
          log=lines.append)
    tuned, source = load_run(tmp_path / "pairs", "cpu"), load_run(pretrained, "cpu")
    assert tuned.tokenizer.fingerprint() == source.tokenizer.fingerprint() and tuned.config == source.config
    assert tuned.info["init_from"]["fingerprint"] == weights_fingerprint([pretrained / "best_model.pt"])
    # a random model's loss is about log(vocab): the text run already knows how the answers go on
    assert tuned.info["init_from"]["val_loss"] < math.log(source.config.vocab_size) - 0.5
    assert json.loads((tmp_path / "pairs" / "split.json").read_text())["task"] == "pairs"


def test_a_resumed_run_keeps_the_record_of_where_it_started(pretrained, corpus_file, tmp_path):
    steps = iter(range(100))
    train(*tiny_configs(data=corpus_file, max_steps=30, init_from=str(pretrained)), tmp_path / "run",
          progress=False, log=quiet, should_stop=lambda: next(steps) >= 5)
    before = load_run(tmp_path / "run", "cpu").info["init_from"]
    resume(tmp_path / "run", progress=False, log=quiet)
    after = load_run(tmp_path / "run", "cpu")
    assert after.info["training"]["step"] == 30 and after.info["init_from"] == before


# ---- refusals: one line each, no run folder -----------------------------------------------------------------

def refused(capsys, tmp_path, *args) -> str:
    """`minillm train` with args: exit status 2, one line on stderr (returned), no run folder."""
    out = tmp_path / "run"
    capsys.readouterr()  # (what transformers printed while saving a checkpoint)
    code = main(["train", "--preset", "tiny", "--no-progress", "--out", str(out), *map(str, args)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: "), err
    assert not out.exists()
    return err


def edit_config(folder, **changes):
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize("change, message", [
    ({"model_type": "mistral", "architectures": ["MistralForCausalLM"]}, "it is a model_type 'mistral'"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}}, "it scales RoPE"),
    ({"use_sliding_window": True}, "it has sliding-window attention"),
    ({"attention_bias": True}, r"it has biases \(attention_bias\)"),
])
def test_an_architecture_mini_llm_does_not_compute_is_refused_saying_what_it_reads(change, message, tmp_path,
                                                                                    corpus_file, capsys):
    save_checkpoint(tmp_path / "hf", "qwen3")
    edit_config(tmp_path / "hf", **change)
    err = refused(capsys, tmp_path, corpus_file, "--init-from", tmp_path / "hf")
    assert re.search(message, err) and "Mini LLM reads LlamaForCausalLM and Qwen3ForCausalLM checkpoints" in err


def test_a_folder_without_weights_a_hub_name_and_a_contradicting_option_are_refused(tmp_path, corpus_file, capsys):
    save_checkpoint(tmp_path / "hf")
    (tmp_path / "hf" / "model.safetensors").unlink()
    assert "has no weights (model.safetensors, or model.safetensors.index.json with its shards)" in refused(
        capsys, tmp_path, corpus_file, "--init-from", tmp_path / "hf")
    err = refused(capsys, tmp_path, corpus_file, "--init-from", "Qwen/Qwen3-0.6B")
    assert "Mini LLM does not download" in err and \
        "`huggingface-cli download Qwen/Qwen3-0.6B --local-dir models/Qwen3-0.6B`" in err
    save_checkpoint(tmp_path / "good")
    err = refused(capsys, tmp_path, corpus_file, "--init-from", tmp_path / "good", "--d-model", 64, "--dropout", 0.1)
    assert "--d-model 64 (it has 32) contradicts it" in err and "--dropout" not in err.split("contradicts")[0]
    err = refused(capsys, tmp_path, corpus_file, "--init-from", tmp_path / "good", "--block-size", 200)
    assert "--block-size 200 is longer than the context" in err and "(96 tokens)" in err


def test_a_model_too_big_for_memory_is_refused_with_the_estimate_before_its_weights_are_read(tmp_path, corpus_file,
                                                                                            capsys):
    save_checkpoint(tmp_path / "hf")
    edit_config(tmp_path / "hf", hidden_size=16384, intermediate_size=65536, num_hidden_layers=64,
                num_attention_heads=128, num_key_value_heads=8, head_dim=128)
    (tmp_path / "hf" / "model.safetensors").write_bytes(b"not read")  # (reading it would fail otherwise)
    err = refused(capsys, tmp_path, corpus_file, "--init-from", tmp_path / "hf")
    assert "training this model (64 layers, width 16384) needs about" in err and "GiB free" in err
    assert "--batch-size" in err and "start from a smaller model" in err
