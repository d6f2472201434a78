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
    tests = "python -m pytest -q -n auto --dist loadfile tests"
    assert tests in readme and tests in ci
    assert "pip install -r requirements.txt && pip install -e ." in readme
    assert "pip install -r requirements.txt && pip install -e ." in ci


def test_ci_runs_the_readme_demo_command_verbatim():
    """The README's first command (install + demo) is one line, and .ci/run runs that same line."""
    readme = open(os.path.join(REPO, "README.md")).read()
    ci = open(os.path.join(REPO, ".ci", "run")).read().splitlines()
    first = readme.split("```bash\n", 1)[1].split("\n", 1)[0]
    assert first.startswith("pip install -r requirements.txt && pip install -e . && python launcher/demo.py"), first
    assert first in ci, f".ci/run does not run the README's first command {first!r}"
