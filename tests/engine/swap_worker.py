"""2-rank check of `weights_swapped_in`: inside it every trained parameter (gathered) holds the replacement values,
after it the original values exactly; for ZeRO stages 0-3, fp32 and bf16, LoRA and full. Run under torchrun."""
import deepspeed
import torch

from fewstep.config import load_config
from fewstep.engine.deepspeed_engine import build_engine, master_partitions, weights_swapped_in
from fewstep.engine.distributed import setup_distributed
from fewstep.lora import prepare_trainable
from fewstep.models import get_adapter

info = setup_distributed()
adapter = get_adapter("flux")
for stage, precision, model_type in [(0, "fp32", "lora"), (0, "bf16", "full"), (1, "bf16", "lora"),
                                     (2, "fp32", "full"), (2, "bf16", "lora"), (3, "fp32", "lora"),
                                     (3, "bf16", "full")]:
    cfg = load_config(None, {"model_family": "flux", "pretrained_model_name_or_path": "tiny:flux",
                             "zero_stage": stage, "mixed_precision": precision, "model_type": model_type,
                             "use_ema": True, "lora_rank": 4})
    torch.manual_seed(0)
    t = adapter.load("tiny:flux", with_text=False, with_vae=False).transformer
    trainable = prepare_trainable(cfg, adapter, t, anystep_embeddings=True)
    with torch.no_grad():  # non-trivial values everywhere (LoRA B starts at zero)
        for p in trainable:
            p.add_(torch.randn_like(p) * 0.1)
    names = [n for n, p in t.named_parameters() if p.requires_grad]
    engine, _, _ = build_engine(cfg, t, trainable)
    params = dict(engine.module.named_parameters())

    def snapshot():
        with deepspeed.zero.GatheredParameters([params[n] for n in names], enabled=stage == 3):
            return {n: params[n].detach().float().clone() for n in names}

    before = snapshot()
    replacement = [m.detach() * 2.0 + 0.5 for m in master_partitions(engine)]
    with weights_swapped_in(engine, replacement):
        inside = snapshot()
    after = snapshot()
    tol = 0.0 if precision == "fp32" else 2e-2
    for n in names:
        expect = before[n] * 2.0 + 0.5
        err = (inside[n] - expect).abs().max().item()
        assert err <= tol * max(1.0, expect.abs().max().item()), (stage, precision, model_type, n, err)
        assert torch.equal(after[n], before[n]), (stage, precision, model_type, n)
    if info.rank == 0:
        print(f"swap ok: stage {stage} {precision} {model_type} ({len(names)} tensors)", flush=True)
print("ALL SWAPS OK", flush=True)
