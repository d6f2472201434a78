"""ZeRO-3 partitioned loading (each rank reads only its slice of each tensor from sharded safetensors) and the
block-by-block sharded full export that stock `from_pretrained` loads back, on 2 ranks."""
from fewstep.engine.distributed import _free_port
from fewstep_testing import run


def test_partitioned_load_and_sharded_export_round_trip(tmp_path):
    proc = run(["torchrun", "--nproc_per_node", "2", "--master_port", str(_free_port()),
                "tests/engine/loading_worker.py", str(tmp_path)], timeout=600)
    for case in ("flux torch.float32", "flux torch.bfloat16", "qwen_image torch.float32", "qwen_image torch.bfloat16"):
        assert f"loading ok: {case}" in proc.stdout, proc.stdout[-2000:]
    assert "hub id ok: downloaded once" in proc.stdout, proc.stdout[-2000:]
