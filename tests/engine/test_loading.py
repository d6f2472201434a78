"""ZeRO-3 partitioned loading (each rank reads only its slice of each tensor from sharded safetensors) and the
block-by-block sharded full export that stock `from_pretrained` loads back, on 2 ranks."""
import json

from fewstep_testing import run


def test_partitioned_load_and_sharded_export_round_trip(tmp_path):
    proc = run(["torchrun", "--nproc_per_node", "2", "--standalone", "tests/engine/loading_worker.py", str(tmp_path)],
               timeout=600)
    for case in ("flux torch.float32", "flux torch.bfloat16", "qwen_image torch.float32", "qwen_image torch.bfloat16"):
        assert f"loading ok: {case}" in proc.stdout, proc.stdout[-2000:]
    assert "hub id ok: downloaded once" in proc.stdout, proc.stdout[-2000:]


def test_hub_download_takes_only_the_files_diffusers_loads():
    """FLUX.1-dev ships 24 GB of single-file checkpoints at the top level; SDXL base adds fp16 variants, ONNX,
    OpenVINO and Flax copies and .bin duplicates of its safetensors. None of them is downloaded."""
    from fewstep.engine.loading import pipeline_files

    flux = ["model_index.json", "flux1-dev.safetensors", "ae.safetensors", "dev_grid.jpg", "README.md",
            "transformer/config.json", "transformer/diffusion_pytorch_model-00001-of-00003.safetensors",
            "transformer/diffusion_pytorch_model.safetensors.index.json", "tokenizer_2/spiece.model",
            "text_encoder_2/model-00001-of-00002.safetensors", "vae/diffusion_pytorch_model.safetensors"]
    assert pipeline_files(flux) == ["model_index.json"] + [f for f in flux if "/" in f]
    sdxl = ["model_index.json", "sd_xl_base_1.0.safetensors", "unet/diffusion_pytorch_model.safetensors",
            "unet/diffusion_pytorch_model.fp16.safetensors", "unet/model.onnx", "unet/diffusion_flax_model.msgpack",
            "unet/diffusion_pytorch_model.safetensors.index.fp16.json", "text_encoder/model.safetensors",
            "text_encoder/pytorch_model.bin", "text_encoder/openvino_model.bin", "text_encoder/openvino_model.xml",
            "tokenizer/vocab.json", "scheduler/scheduler_config.json", "legacy/pytorch_model.bin"]
    assert pipeline_files(sdxl) == ["model_index.json", "unet/diffusion_pytorch_model.safetensors",
                                    "text_encoder/model.safetensors", "tokenizer/vocab.json",
                                    "scheduler/scheduler_config.json", "legacy/pytorch_model.bin"]
    # with model_index.json's components, only their folders (SDXL base: not vae_1_0/, vae_decoder/, ...)
    components = {"unet", "text_encoder", "tokenizer", "scheduler", "vae"}
    extra = ["vae_1_0/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors"]
    assert pipeline_files(sdxl + extra, components) == ["model_index.json", "unet/diffusion_pytorch_model.safetensors",
                                                        "text_encoder/model.safetensors", "tokenizer/vocab.json",
                                                        "scheduler/scheduler_config.json",
                                                        "vae/diffusion_pytorch_model.safetensors"]


def test_pipeline_components_are_model_index_folders(tmp_path):
    from fewstep.models.source import folder_components

    index = tmp_path / "model_index.json"
    index.write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline", "_diffusers_version": "0.19.0",
                                 "force_zeros_for_empty_prompt": True, "feature_extractor": [None, None],
                                 "image_encoder": [None, None], "scheduler": ["diffusers", "EulerDiscreteScheduler"],
                                 "text_encoder": ["transformers", "CLIPTextModel"], "unet": ["diffusers", "UNet"],
                                 "vae": ["diffusers", "AutoencoderKL"]}))
    assert folder_components(str(tmp_path)) == {"scheduler", "text_encoder", "unet", "vae"}
