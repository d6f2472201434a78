"""Shared test fixtures: a tiny dataset and config builder that exercise the same paths users hit."""
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.join(REPO, "tests"))


@pytest.fixture
def repo():
    return REPO
