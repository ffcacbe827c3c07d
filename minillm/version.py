"""The package version, on the ground floor so that modules that record it import nothing above them."""

from __future__ import annotations

__version__ = "0.1.0"
# The project's license (SPDX), as pyproject.toml and LICENSE say (tests/test_dependencies.py holds them
# together); exports carry it (the model card's front matter, GGUF's general.license).
LICENSE = "MIT"
# The key under which every JSON and checkpoint file Mini LLM writes records the version that wrote it (in a
# run folder's train_config.json it also marks the folder as a Mini LLM run: run_folder.RunFolder).
VERSION_KEY = "minillm_version"


def stamp() -> dict[str, str]:
    """{VERSION_KEY: __version__}: what a file Mini LLM writes says about who wrote it."""
    return {VERSION_KEY: __version__}
