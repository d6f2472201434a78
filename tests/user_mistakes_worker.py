"""launcher/train.py's main over several mistaken configs in one interpreter (each would otherwise pay a new
interpreter's imports, seconds): per config its exit status, stdout and stderr, as a user's command line gets them.

Usage: python user_mistakes_worker.py CASES_JSON RESULT_JSON
CASES_JSON: {name: config path}; RESULT_JSON gets {name: {"status", "stdout", "stderr"}}. Environment variables are
the process's, for every config (huggingface_hub reads HF_HUB_OFFLINE once, at its import).
The process's own exit after a mistake (one line, status 2, no traceback) is tests/test_reliability.py's
test_no_config_at_all_says_so.
"""
import contextlib
import io
import json
import sys

from fewstep_testing import load_launcher

cases, result_path = json.loads(sys.argv[1]), sys.argv[2]
train_cli = load_launcher("train")
results = {}
for name, config in cases.items():
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = train_cli.main(["--config", config])
    results[name] = {"status": status, "stdout": out.getvalue(), "stderr": err.getvalue()}
with open(result_path, "w") as fh:
    json.dump(results, fh)
