# Two commands on a fresh clone: `make demo` (train the default model and print a sample), `make test`.
PY := .venv/bin/python
# `make ui PORT=8080` serves the web UI on another port
PORT ?= 7860

.PHONY: setup demo test lint bench ui screenshot check-gguf clean

setup:
	bash scripts/setup.sh

demo: setup
	$(PY) -m minillm train --out runs/demo --overwrite

test: setup
	bash scripts/install_browser.sh
	.venv/bin/ruff check minillm tests bench main.py
	$(PY) -m pytest

lint: setup
	.venv/bin/ruff check minillm tests bench main.py

bench: setup
	$(PY) bench/tokenizer_speed.py
	$(PY) bench/train_step.py
	$(PY) bench/generation.py
	$(PY) bench/train_shakespeare.py
	$(PY) bench/distributed.py

screenshot: setup  # refresh the README's pictures of the web UI (docs/ui.png, docs/ui_train.png) from the browser tests
	bash scripts/install_browser.sh
	MINILLM_SCREENSHOT=docs/ui.png $(PY) -m pytest -q tests/test_ui_browser.py -k screenshot
	MINILLM_TRAIN_SCREENSHOT=docs/ui_train.png $(PY) -m pytest -q tests/test_ui_train_browser.py -k stop

check-gguf: setup  # llama.cpp runs an exported GGUF (float32, and q8_0 against it) as the same model (builds llama-cpp-python: many minutes)
	$(PY) -m pip install --quiet "llama-cpp-python>=0.3"
	$(PY) scripts/check_gguf.py --dtype q8_0
	$(PY) scripts/check_gguf.py --qk-norm --dtype q8_0
	$(PY) scripts/check_gguf.py --gqa

ui: setup
	$(PY) -m minillm ui runs/demo --port $(PORT)

clean:
	rm -rf .venv runs .pytest_cache .hypothesis
