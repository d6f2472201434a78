"""fewstep: few-step generators from large flow-matching models (Glance, TwinFlow) on DeepSpeed."""
from setuptools import setup

setup(
    name="fewstep",
    version="0.1.0",
    description="Distributed DeepSpeed trainer with Triton kernels for Glance and TwinFlow few-step distillation",
    python_requires=">=3.10",
    # `fewstep` lives in src/fewstep; the top-level kernels/ folder installs as `fewstep.kernels`.
    # Nothing is installed as a bare top-level `kernels` package (diffusers probes for one).
    package_dir={"fewstep": "src/fewstep", "fewstep.kernels": "kernels"},
    packages=[
        "fewstep",
        "fewstep.data",
        "fewstep.engine",
        "fewstep.methods",
        "fewstep.models",
        "fewstep.planning",
        "fewstep.schedulers",
        "fewstep.kernels",
    ],
    install_requires=[
        "torch", "deepspeed", "diffusers", "peft", "triton", "transformers", "safetensors",
        "tensorboard", "pillow", "numpy", "tqdm", "filelock",
    ],
    extras_require={"wandb": ["wandb"]},  # report_to: wandb (requirements.txt pins it)
)
