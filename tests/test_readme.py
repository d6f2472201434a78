"""The README documents every option, and its two commands are the ones CI runs."""
import os

from fewstep.config import FIELDS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_option_is_documented():
    text = open(os.path.join(REPO, "README.md")).read()
    missing = [k for k in FIELDS if f"`{k}`" not in text]
    assert not missing, f"options without a README line: {missing}"


def test_ci_runs_the_readme_commands():
    readme = open(os.path.join(REPO, "README.md")).read()
    ci = open(os.path.join(REPO, ".ci", "run")).read()
    assert "python -m pytest -q tests" in readme and "python -m pytest -q tests" in ci
    assert "pip install -r requirements.txt && pip install -e ." in readme
    assert "pip install -r requirements.txt && pip install -e ." in ci
