"""Process defaults of the bench/quality scripts, set before torch or diffusers are imported (import this first).

One thread per process (a shared 2-core machine: the scripts run their trainings side by side), DeepSpeed on the CPU,
quiet tokenizers and libraries."""
import os

for _key, _value in (("OMP_NUM_THREADS", "1"), ("DS_ACCELERATOR", "cpu"), ("TOKENIZERS_PARALLELISM", "false"),
                     ("PYTHONWARNINGS", "ignore"), ("TRANSFORMERS_VERBOSITY", "error"),
                     ("DIFFUSERS_VERBOSITY", "error")):
    os.environ.setdefault(_key, _value)
