#!/usr/bin/env python
"""The README's demo on real data: a digits teacher, TwinFlow to 1 step, Glance on one image, side by side.

    python launcher/demo.py            # about 4 minutes on a 2-core CPU; writes output/demo/
    python launcher/demo.py --smoke    # seconds: a few steps and samples (tests)

The work is in bench/quality/demo.py, which shares its data, recipes, samplers and metrics with the method-quality
benchmark (bench/quality/run.py).
"""
import importlib.util
import os
import sys

DEMO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "quality", "demo.py")


def main(argv):
    spec = importlib.util.spec_from_file_location("fewstep_digits_demo", DEMO)
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    return demo.main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
