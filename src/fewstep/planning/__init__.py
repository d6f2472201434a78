"""Memory planner: will a fewstep config fit, and on which ZeRO layout? Answered before a GPU is touched.

    plan = plan_memory("my_config.json", gpus=8)                     # or a Config / dict
    print(format_table(plan)); plan.recommended.name                 # e.g. "ZeRO-2"

The denoiser (a transformer, or SDXL's UNet) is built on the meta device (`model`), its activations are traced there
(`activations`), and each ZeRO layout's per-GPU memory follows DeepSpeed's own bookkeeping (`layouts`) at the
resolution the trainer would train at (`resolution`: the data backend's, read by the trainer's own code). The CLI is
`launcher/plan.py`.
"""
from fewstep.planning.activations import Activations, model_activations, trace_activations  # noqa: F401
from fewstep.planning.layouts import (  # noqa: F401
    GiB,
    LAYOUTS,
    Layout,
    Plan,
    ZeroKnobs,
    format_table,
    knobs_for,
    layout_memory,
    plan_memory,
)
from fewstep.planning.model import (  # noqa: F401
    MODEL_CONFIG_DIR,
    AnyStep,
    ParamCounts,
    anystep_dim,
    anystep_param_count,
    build_meta_transformer,
    count_params,
    load_model_config,
    lora_param_count,
    model_config_source,
    resolve_model_config,
)
from fewstep.planning.resolution import Resolution, training_resolution  # noqa: F401
