"""The launchers' argument parser: a mistake on the command line ends like every other user mistake, in one
`fewstep: ...` line and exit status 2 (argparse prints its usage and a second line), and an option must be spelled
out (argparse would take `--lor` for `--lora` and `--smok` for `--smoke`)."""
from __future__ import annotations

import argparse
import sys


class OneLineParser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        print(f"fewstep: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def positive(kind: type):
    """An argparse type: a number of `kind` above 0."""
    def parse(text: str):
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in "invalid float value: 'x'"
    return parse
