"""Export any run (both model kinds) as plain safetensors weights plus Mini LLM's own config:

    DIR/model.safetensors   the state_dict under Mini LLM's names (lm_head.weight left out when it is
                            embed_tokens.weight: tie_embeddings in the config)
    DIR/config.json         {"format": "minillm", "model": ModelConfig, "tokenizer_type", ...}
    DIR/tokenizer.json, special_tokens.json   the run's tokenizer, as in the run folder
    DIR/README.md           the model card, with the lines that load it back
    DIR/minillm_export.json the marker of an export (export.target)

This is the format for the encoder-decoder, which has no standard Hugging Face or llama.cpp architecture.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from minillm.checkpoint import Run
from minillm.export.base import ExportFormat, require, torch_dtype
from minillm.export.card import model_card
from minillm.files import atomic_write, reporting_full_disk, write_json
from minillm.run_folder import SPECIAL_TOKENS_FILE, TOKENIZER_FILE
from minillm.version import stamp

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
FORMAT_MARK = "minillm"
SAFETENSORS_FILES = (WEIGHTS_FILE, CONFIG_FILE, TOKENIZER_FILE, SPECIAL_TOKENS_FILE, "README.md")

USAGE = """
```python
import json
from safetensors.torch import load_file
from minillm.config import ModelConfig
from minillm.models import build_model
from minillm.tokenizers import load_tokenizer

config = ModelConfig.from_dict(json.load(open("{out}/config.json"))["model"])
model = build_model(config)
model.load_state_dict(load_file("{out}/model.safetensors"), strict=not config.tie_embeddings)
tokenizer = load_tokenizer("{out}/tokenizer.json")
```

With tied embeddings the file has no `lm_head.weight` (it is `embed_tokens.weight`, already tied by
the model), hence `strict=False`.
"""


def write_safetensors(run: Run, out: Path, dtype: str) -> None:
    """Write the folder `out`: weights under Mini LLM's names, its config, the run's tokenizer, a model card."""
    (safetensors_torch,) = require("safetensors.torch")
    out.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().to("cpu", torch_dtype(dtype)).contiguous()
             for name, tensor in run.model.state_dict().items()
             if not (name == "lm_head.weight" and run.config.tie_embeddings)}
    with reporting_full_disk(out / WEIGHTS_FILE):
        safetensors_torch.save_file(state, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    write_json(out / CONFIG_FILE, {
        "format": FORMAT_MARK, **stamp(), "model": run.config.to_dict(), "dtype": dtype,
        "tokenizer_type": run.tokenizer.kind, "tokenizer_fingerprint": run.tokenizer.fingerprint()})
    run.tokenizer.save(out / TOKENIZER_FILE)
    special = Path(run.info["tokenizer_path"]).parent / SPECIAL_TOKENS_FILE
    if special.is_file():
        shutil.copyfile(special, out / SPECIAL_TOKENS_FILE)
    card = model_card(run, USAGE.format(out=out.name), library="safetensors")
    atomic_write(out / "README.md", lambda f: f.write(card), mode="w")


SAFETENSORS_FORMAT = ExportFormat(
    name="safetensors", description="safetensors weights and Mini LLM's config (any model kind)",
    write=write_safetensors, refusal=lambda run: None, folder=True)
