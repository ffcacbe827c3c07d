"""The package's structure holds: layers import downwards only, kinds are registries, modules stay small."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import import_dev_dependency
from torch import nn

from minillm import models
from minillm.config import IGNORE_INDEX, ModelConfig, preset_configs
from minillm.engine import Engine
from minillm.errors import MiniLLMError
from minillm.models import build_model, count_parameters, is_encoder_decoder, model_class, model_kinds

PACKAGE = Path(__file__).resolve().parents[1] / "minillm"
MAX_MODULE_LINES = 450


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """Every minillm module `path` imports, at module level or inside a function alike."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name in known}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("minillm"):
            # `from minillm.data import prepare` imports the module minillm.data.prepare.
            submodules = {f"{node.module}.{alias.name}" for alias in node.names} & known
            found |= submodules or {node.module}
    return found


def test_the_package_has_no_import_cycle():
    modules = package_modules()
    graph = {name: imported_modules(path, set(modules)) - {name} for name, path in modules.items()}
    state: dict[str, str] = {}

    def visit(name: str, trail: list[str]) -> None:
        state[name] = "open"
        for target in sorted(graph[name]):
            if state.get(target) == "open":
                cycle = trail[trail.index(target):] + [target] if target in trail else [name, target]
                pytest.fail(f"import cycle: {' -> '.join(cycle)}")
            if target not in state:
                visit(target, [*trail, target])
        state[name] = "done"

    for name in graph:
        if name not in state:
            visit(name, [name])


def test_importing_the_tokenizers_imports_neither_torch_nor_the_models():
    code = ("import sys, minillm.tokenizers; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith(('minillm.models', "
            "'minillm.checkpoint', 'minillm.training'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_no_module_is_longer_than_a_few_screens():
    lengths = {name: len(path.read_text(encoding="utf-8").splitlines()) for name, path in package_modules().items()}
    assert {name: n for name, n in lengths.items() if n > MAX_MODULE_LINES} == {}


def test_model_kinds_are_never_compared_as_strings_outside_the_registry():
    kinds = "|".join(map(re.escape, model_kinds()))
    comparison = re.compile(rf"""(==|!=|\bin)\s*\(?\s*["']({kinds})["']|["']({kinds})["']\s*(==|!=)""")
    offenders = [f"{name}:{number}" for name, path in package_modules().items() if name != "minillm.models"
                 for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)
                 if comparison.search(line)]
    assert offenders == []


def third_party_imports(path: Path) -> set[str]:
    """The top-level names of the packages `path` imports (anywhere in it)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


# Outside minillm/export, the one reader of another tool's format: a Hugging Face checkpoint for --init-from
# reads its safetensors weights (never transformers: the format is read by hand, so a run needs no
# transformers to start from one), importing safetensors by name when it reads them.
CHECKPOINT_READER = "minillm.models.hf_checkpoint"


def test_the_export_extra_is_imported_by_the_exporter_only_and_hf_tokenizers_by_the_bpe_module_only():
    export_extra = {"transformers", "safetensors", "gguf"}
    users = {name: third_party_imports(path) for name, path in package_modules().items()}
    assert {name for name, found in users.items() if found & export_extra and not name.startswith(
        "minillm.export")} == set()
    # `require` imports the extra by name (importlib), so importing the exporter needs none of it; nor does
    # importing the checkpoint reader or the training that uses it:
    for module in ("minillm.export", CHECKPOINT_READER, "minillm.training"):
        code = f"import sys, {module}; print(sorted(m for m in {sorted(export_extra)} if m in sys.modules))"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        assert out.strip() == "[]", module
    reader = package_modules()[CHECKPOINT_READER].read_text(encoding="utf-8")
    assert 'importlib.import_module("safetensors")' in reader and "transformers" not in third_party_imports(
        package_modules()[CHECKPOINT_READER])
    assert {name for name, found in users.items() if "tokenizers" in found} == {"minillm.tokenizers.bpe_tokenizer"}


def function_level_imports(path: Path) -> dict[str, set[str]]:
    """The minillm modules each function of `path` imports inside its body, by function name."""
    found: dict[str, set[str]] = {}
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.FunctionDef):
            for inner in ast.walk(node):
                if isinstance(inner, ast.ImportFrom) and inner.module and inner.module.startswith("minillm"):
                    found.setdefault(node.name, set()).add(inner.module)
                elif isinstance(inner, ast.Import):
                    found.setdefault(node.name, set()).update(a.name for a in inner.names)
    return found


def is_ui(name: str) -> bool:
    return name == "minillm.ui" or name.startswith("minillm.ui.")


def test_the_serving_core_is_gradio_free_and_only_the_cli_ui_command_imports_the_ui():
    modules = package_modules()
    graph = {name: imported_modules(path, set(modules)) for name, path in modules.items()}
    serve = [name for name in modules if name.startswith("minillm.serve")]
    assert "minillm.serve.run_cache" in serve and "minillm.serve.training_manager" in serve
    # The serving core (what any server needs) imports nothing of the UI, nor gradio.
    assert {name: sorted(filter(is_ui, graph[name])) for name in serve if any(map(is_ui, graph[name]))} == {}
    assert {name for name in modules if "gradio" in third_party_imports(modules[name]) and not is_ui(name)} == set()
    # The UI may import the core; nothing but the UI itself and the CLI's `ui` command (lazily, in the
    # function) imports the UI.
    importers = {name for name, targets in graph.items() if not is_ui(name) and any(map(is_ui, targets))}
    assert importers == {"minillm.cli"}
    lazily = {function for function, targets in function_level_imports(modules["minillm.cli"]).items()
              if any(map(is_ui, targets))}
    assert lazily == {"cmd_ui"}
    top_level = {node.module for node in ast.parse(modules["minillm.cli"].read_text(encoding="utf-8")).body
                 if isinstance(node, ast.ImportFrom) and node.module}
    assert not any(map(is_ui, top_level))
    # The ground floor imports nothing of ours.
    assert graph["minillm.errors"] == set()


def test_the_http_api_is_the_serve_extras_only_user_and_only_the_cli_serve_command_imports_it():
    """FastAPI and uvicorn (the `serve` extra) are imported by minillm.serve.http alone, which nothing but the
    CLI's `serve` command imports (lazily, in the function), so every other command runs without them."""
    modules = package_modules()
    serve_extra = {"fastapi", "uvicorn", "starlette"}
    assert {name for name, path in modules.items() if third_party_imports(path) & serve_extra} == {
        "minillm.serve.http"}
    graph = {name: imported_modules(path, set(modules)) for name, path in modules.items()}
    assert {name for name, targets in graph.items() if "minillm.serve.http" in targets} == {"minillm.cli_serve"}
    lazily = {function for function, targets in function_level_imports(modules["minillm.cli_serve"]).items()
              if "minillm.serve.http" in targets}
    assert lazily == {"cmd_serve"}


def test_gradio_state_is_never_defeated_by_a_deepcopy_override():
    """A server-wide object (the run cache, the training manager) is closed over by the handlers, not put in
    a per-session gr.State whose deep copy it then has to refuse."""
    offenders = [name for name, path in package_modules().items()
                 if any(isinstance(node, ast.FunctionDef) and node.name == "__deepcopy__"
                        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))))]
    assert offenders == []


def run_without_gradio_variables(code: str) -> str:
    """The stdout of `code` in a fresh Python whose environment has none of gradio's or the HF hub's variables."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("GRADIO_", "HF_HUB_"))}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout


def test_importing_the_cli_imports_no_ui_nor_gradio_nor_the_http_api_and_sets_no_environment_variable():
    code = ("import os, sys, json; before = dict(os.environ); known = set(sys.modules); import minillm.cli; "
            "print(json.dumps({'modules': sorted(m for m in set(sys.modules) - known if m.split('.')[0] in "
            "('gradio', 'fastapi', 'uvicorn', 'starlette') or m == 'minillm.serve.http' "
            "or m == 'minillm.ui' or m.startswith('minillm.ui.')), "
            "'changed': sorted(k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k))}))")
    out = run_without_gradio_variables(code)
    assert json.loads(out) == {"modules": [], "changed": []}


def test_the_ui_sets_gradios_offline_variables_before_gradio_is_imported():
    """What `minillm ui` imports: the variables must be in the environment when gradio reads them, at its import."""
    code = ("import importlib.abc, os, sys, json; seen = {}\n"
            "class Watch(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'gradio' and not seen:\n"
            "            seen.update({k: os.environ.get(k) for k in ('GRADIO_ANALYTICS_ENABLED', "
            "'HF_HUB_DISABLE_TELEMETRY')})\n"
            "sys.meta_path.insert(0, Watch())\n"
            "import minillm.ui.app\n"
            "print(json.dumps(seen))")
    out = run_without_gradio_variables(code)
    assert json.loads(out.strip().splitlines()[-1]) == {"GRADIO_ANALYTICS_ENABLED": "False",
                                                          "HF_HUB_DISABLE_TELEMETRY": "1"}


class BigramModel(nn.Module):
    """A throwaway third kind: each next token from the current one alone (an embedding table)."""

    is_encoder_decoder = False

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.table = nn.Embedding(config.vocab_size, config.vocab_size)

    @staticmethod
    def layers_description(config: ModelConfig) -> str:
        return "no layers (a bigram table)"

    def forward(self, input_ids, attention_mask=None, targets=None):
        logits = self.table(input_ids)
        loss = None
        if targets is not None:
            loss = nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(),
                                               ignore_index=IGNORE_INDEX)
        return logits, loss


@pytest.fixture
def bigram_kind(monkeypatch):
    monkeypatch.setitem(models._MODEL_KINDS, "bigram", BigramModel)
    return "bigram"


def test_a_third_kind_is_one_registry_line_and_trains(bigram_kind, corpus_file, tmp_path):
    from minillm.checkpoint import load_run
    from minillm.training import train

    model = build_model(ModelConfig(model_type=bigram_kind, vocab_size=50))
    assert isinstance(model, BigramModel) and model_class(bigram_kind) is BigramModel
    assert not is_encoder_decoder(model.config) and count_parameters(model) == 50 * 50
    model_config, train_config = preset_configs("tiny", {"model_type": bigram_kind},
                                                {"data": str(corpus_file), "max_steps": 20})
    lines = []
    result = train(model_config, train_config, tmp_path / "run", progress=False, log=lines.append)
    assert result.best_val_loss < result.history[0]["val_loss"] or result.best_step == result.history[0]["step"]
    assert any("no layers (a bigram table)" in line for line in lines)
    assert isinstance(load_run(tmp_path / "run").model, BigramModel)
    # It implements training only, not the decoding contract (minillm.models.decoding.DecodingModel;
    # test_engine.py runs the engine over a kind that implements only that): generating is one clear error.
    with pytest.raises(MiniLLMError, match="a BigramModel cannot generate: it is not a DecodingModel"):
        Engine(model)


def test_an_unknown_kind_is_refused_with_the_known_ones():
    known = r"\['decoder_only', 'transformer'\]"
    with pytest.raises(MiniLLMError, match=rf"unknown model type 'rnn'; choose one of {known}"):
        build_model(ModelConfig(model_type="rnn"))


def test_training_an_unknown_kind_is_refused_before_any_file_is_written(corpus_file, tmp_path):
    from minillm.training import train

    model_config, train_config = preset_configs("tiny", {"model_type": "rnn"}, {"data": str(corpus_file)})
    with pytest.raises(MiniLLMError, match="unknown model type"):
        train(model_config, train_config, tmp_path / "run", progress=False, log=lambda m: None)
    assert not (tmp_path / "run").exists()


def test_a_registered_kind_needs_its_capabilities():
    with pytest.raises(TypeError, match="is_encoder_decoder"):
        models.register_model_kind("broken", nn.Linear)
    assert "broken" not in model_kinds()
    torch.manual_seed(0)  # (nothing else: the registry is unchanged)


def test_a_missing_dev_dependency_skips_with_its_reason_and_fails_under_ci(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # what a missing package looks like to `import`
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="transformers is not installed.*pip install -e '.\\[dev\\]'"):
        import_dev_dependency("transformers")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="under CI: transformers is not installed"):
        import_dev_dependency("transformers")
