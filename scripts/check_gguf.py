"""Does llama.cpp run an exported GGUF file as the same model? (`make check-gguf`; needs llama-cpp-python.)

Trains a small byte-level BPE run on the bundled Tiny Shakespeare (or uses RUN_DIR), exports it with
`minillm export --format gguf` (float32), loads the file in llama.cpp through llama-cpp-python, and compares:
the prompt's token ids, the logits of its positions, and the greedy continuation (at least MIN_MATCHING
tokens must agree; a different token after a near-tie of two logits is reported, not hidden).

Run: .venv/bin/python scripts/check_gguf.py [RUN_DIR] [--tokens 40] [--qk-norm] [--gqa]
(--qk-norm trains the run with QK-norm, the cpu preset's architecture, which exports as llama.cpp's qwen3;
--gqa with grouped-query attention, 4 query heads over 2 key/value heads: llama.cpp's head_count_kv.)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from minillm.checkpoint import load_run
from minillm.config import preset_configs
from minillm.engine import Engine
from minillm.export import export_run
from minillm.sampling import SamplingConfig
from minillm.training import train

PROMPT = "ROMEO:\nWhat shall I say"
MIXED_TEXT = "Café naïve — Ærøskøbing, 東京の中文字符 😀👩‍👩‍👧\tTab\r\nCRLF line\n\n  two spaces"
MIN_MATCHING = 30
GQA_KV_HEADS = 2  # --gqa: key/value heads for CHECK_RUN's 4 query heads
CHECK_RUN = dict(model={"d_model": 64, "n_layers": 2, "n_heads": 4, "max_seq_len": 128},
                 train={"tokenizer": "bpe", "bpe_vocab_size": 512, "max_steps": 300, "eval_interval": 100})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", nargs="?", type=Path, help="a decoder-only BPE run (default: train one)")
    parser.add_argument("--tokens", type=int, default=40, help="greedy tokens to compare")
    parser.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="the export's weights")
    parser.add_argument("--qk-norm", action="store_true", help="train the run with QK-norm (llama.cpp's qwen3)")
    parser.add_argument("--gqa", action="store_true",
                        help=f"train the run with grouped-query attention ({GQA_KV_HEADS} key/value heads)")
    args = parser.parse_args()
    try:
        from llama_cpp import GGML_TYPE_F32, Llama
    except ImportError:
        print("llama-cpp-python is not installed: pip install llama-cpp-python (or make check-gguf)")
        return 2
    work = Path(tempfile.mkdtemp(prefix="minillm-check-gguf-"))
    run_dir = args.run_dir
    if run_dir is None:
        run_dir = work / "run"
        grouped = {"n_kv_heads": GQA_KV_HEADS} if args.gqa else {}
        model_config, train_config = preset_configs("tiny", {**CHECK_RUN["model"], "qk_norm": args.qk_norm, **grouped},
                                                    CHECK_RUN["train"])
        print(f"training a small BPE run into {run_dir} ...", flush=True)
        train(model_config, train_config, run_dir, progress=False, log=lambda message: None)
    path = export_run(run_dir, "gguf", work / "model.gguf", dtype=args.dtype)
    run = load_run(run_dir, "cpu")
    c = run.config
    print(f"exported {run_dir} to {path} ({args.dtype}, {path.stat().st_size:,} bytes; {c.n_heads} query heads "
          f"over {c.n_kv_heads} key/value heads{', QK-norm' if c.qk_norm else ''})")

    # A float32 KV cache (llama.cpp's default is float16) so that the logits compare the model itself.
    llm = Llama(model_path=str(path), n_ctx=run.config.max_seq_len, logits_all=True, verbose=False, seed=0,
                n_threads=2, type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32)
    ours_ids = [run.tokenizer.bos_id, *run.tokenizer.encode(PROMPT)]
    their_ids = llm.tokenize(PROMPT.encode("utf-8"), add_bos=True, special=False)
    print(f"prompt {PROMPT!r}: {len(ours_ids)} ids; llama.cpp's tokenizer gives the same ids: {their_ids == ours_ids}")
    mixed = run.tokenizer.encode(MIXED_TEXT)
    same_mixed = llm.tokenize(MIXED_TEXT.encode("utf-8"), add_bos=False, special=False) == mixed
    round_trip = llm.detokenize(mixed).decode("utf-8") == MIXED_TEXT
    print(f"mixed Unicode text ({len(mixed)} ids): same ids {same_mixed}, llama.cpp decodes it back {round_trip}")

    llm.reset()
    llm.eval(ours_ids)
    their_logits = np.asarray(llm.scores[:len(ours_ids)], dtype=np.float64)
    with torch.no_grad():
        our_logits = run.model(torch.tensor([ours_ids]))[0][0].double().numpy()
    print(f"max |logit difference| over the prompt's {len(ours_ids)} positions: "
          f"{np.abs(their_logits - our_logits).max():.2e}")

    n = min(args.tokens, run.config.max_seq_len - len(ours_ids))
    ours = Engine(run.model).generate(torch.tensor([ours_ids]), SamplingConfig(max_new_tokens=n, temperature=0.0))
    ours = ours[0].tolist()
    theirs = []
    for token in llm.generate(ours_ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
        theirs.append(int(token))
        if len(theirs) == n:
            break
    matching = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b), n)
    print(f"greedy continuation, {n} tokens: {matching} identical before the first difference")
    print(f"  Mini LLM : {run.tokenizer.decode(ours)!r}")
    print(f"  llama.cpp: {llm.detokenize(theirs).decode('utf-8', errors='replace')!r}")
    ok = their_ids == ours_ids and same_mixed and round_trip and matching >= min(MIN_MATCHING, n)
    print("check-gguf:", "OK" if ok else f"FAILED (needs at least {MIN_MATCHING} identical tokens and the same ids)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
