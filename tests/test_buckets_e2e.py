"""End to end through `python launcher/train.py`: images of mixed shapes and sizes train in aspect buckets (tiny
FLUX and tiny Qwen-Image, the latter with two entries at different resolutions and probabilities), a crash in the
middle of an epoch resumes bit-exactly, and SimpleTuner's DATALOADER.md example trains as written.

The runs start together (two waves of processes) so that the module takes about as long as three runs in a row.
"""
import glob
import os
import subprocess

import pytest
from safetensors.torch import load_file

from bucket_testing import MIXED, simpletuner_example, write_backend, write_images
from fewstep_testing import PY, REPO, assert_resumed_run_matches, cpu_env, read_metrics, write_config

COMMON = dict(max_train_steps=8, checkpointing_steps=3, train_batch_size=2, caption_dropout_probability=0.3,
              lr_scheduler="cosine", lr_warmup_steps=2)
CRASH = {"FEWSTEP_FAULT_AFTER_STEP": "4"}  # a round of buckets is 4 steps: step 3's checkpoint is mid-epoch


def flux_data(root):
    images = write_images(os.path.join(root, "mixed"))
    return write_backend(os.path.join(root, "flux.json"), [
        {"id": "mixed", "type": "local", "instance_data_dir": images, "crop": False, "resolution": 32,
         "resolution_type": "pixel_area"}])


def qwen_data(root):
    """Two entries: mixed shapes at 32 px area, and a second folder at 48 px short side (filename captions,
    one repeat, half the weight)."""
    images = write_images(os.path.join(root, "mixed"))
    with open(os.path.join(images, "wide_a.txt"), "w") as fh:
        fh.write("a red circle\na blue square\n")  # two captions: one is drawn per use
    other = write_images(os.path.join(root, "other"), [("a_small_house", 80, 48), ("a_white_boat", 48, 64)],
                         seed=1, captions=False)
    return write_backend(os.path.join(root, "qwen.json"), [
        {"id": "mixed", "type": "local", "instance_data_dir": images, "crop_aspect": "preserve", "resolution": 32,
         "resolution_type": "pixel_area", "probability": 1.0},
        {"id": "other", "type": "local", "instance_data_dir": other, "crop": False, "resolution": 48,
         "resolution_type": "pixel", "caption_strategy": "filename", "repeats": 1, "probability": 0.5}])


def example_data(root):
    """The documentation example over images that exercise its limits: one larger than maximum_image_size, one
    smaller than minimum_image_size and one wider than maximum_aspect_ratio (both skipped)."""
    images = write_images(os.path.join(root, "images"), MIXED[:5] + [("tiny", 20, 20), ("banner", 120, 30)])
    return simpletuner_example(root, images)


def start(root, backend, name, family, env=None, **overrides):
    folder = os.path.join(root, name)
    os.makedirs(folder, exist_ok=True)
    cfg = write_config(folder, backend, output_dir=os.path.join(root, "out-" + name.split("+")[0]),
                       model_family=family, pretrained_model_name_or_path=f"tiny:{family}", **overrides)
    proc = subprocess.Popen([PY, "launcher/train.py", "--config", cfg], cwd=REPO, env=cpu_env(**(env or {})),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc


def finish(procs: dict, expect: dict) -> dict:
    """Wait for every run; returns each one's stdout."""
    out = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == expect.get(name, 0), f"{name} exited {proc.returncode}\n{stderr[-4000:]}"
        out[name] = stdout
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("buckets"))
    flux, qwen, example = flux_data(root), qwen_data(root), example_data(os.path.join(root, "example"))
    wave = {"flux": start(root, flux, "flux", "flux", validation_steps=4, **COMMON),
            "flux-crash": start(root, flux, "flux-crash", "flux", env=CRASH, **COMMON),
            "qwen": start(root, qwen, "qwen", "qwen_image", **COMMON),
            "qwen-crash": start(root, qwen, "qwen-crash", "qwen_image", env=CRASH, **COMMON),
            "example": start(root, example, "example", "flux", max_train_steps=3)}
    logs = finish(wave, {"flux-crash": 17, "qwen-crash": 17})
    resumed = {"flux-crash": start(root, flux, "flux-crash+resume", "flux", resume_from_checkpoint="latest",
                                   **COMMON),
               "qwen-crash": start(root, qwen, "qwen-crash+resume", "qwen_image", resume_from_checkpoint="latest",
                                   **COMMON)}
    logs.update({k + "+resume": v for k, v in finish(resumed, {}).items()})
    return root, logs


def out(root, name):
    return os.path.join(root, "out-" + name)


def lora(path):
    return load_file(os.path.join(path, "pytorch_lora_weights.safetensors"))


def latent_shapes(cache_root):
    files = glob.glob(os.path.join(cache_root, "*", "*", "latents", "*", "*"))  # <dir>/<model>/<dtype>/latents/<xx>/
    return {tuple(load_file(f)["latents"].shape) for f in files}


@pytest.mark.parametrize("family", ["flux", "qwen"])
def test_mixed_shapes_train_in_buckets_and_resume_exactly(runs, family):
    root, logs = runs
    straight, crashed = out(root, family), out(root, family + "-crash")
    assert "resumed from" in logs[family + "-crash+resume"] and "step-3" in logs[family + "-crash+resume"]
    assert_resumed_run_matches(straight, crashed, 8, lora)
    shapes = latent_shapes(os.path.join(straight, "cache"))
    if family == "flux":  # tiny FLUX: sides a multiple of 4 px; latents are a VAE factor of 2 smaller
        assert "data 'mixed': 7 images in 3 bucket(s) [40x28 x3, 32x32 x2, 28x40 x2]" in logs["flux"]
        assert shapes == {(4, 14, 20), (4, 20, 14), (4, 16, 16)}
        assert os.listdir(os.path.join(straight, "validation"))  # validation sampled a square at 32 px
    else:  # tiny Qwen-Image: multiples of 8 px, VAE factor 4; the second entry at 48 px short side
        assert "data 'mixed': 7 images in 3 bucket(s) [40x24 x3, 32x32 x2, 24x40 x2]" in logs["qwen"]
        assert "data 'other': 2 images in 2 bucket(s)" in logs["qwen"]
        assert shapes == {(4, 6, 10), (4, 10, 6), (4, 8, 8), (4, 12, 20), (4, 16, 12)}


def test_simpletuner_documentation_example_trains_as_written(runs):
    root, logs = runs
    example = os.path.join(root, "example")
    log = logs["example"]
    assert ("data 'something-special-to-remember-by': 5 images in 1 bucket(s) [32x32 x5], resolution 32 px "
            "(pixel_area), center crop, square" in log)
    assert "skipped 1 aspect ratio above maximum_aspect_ratio, 1 smaller than minimum_image_size" in log
    assert [m["step"] for m in read_metrics(out(root, "example"))] == [1, 2, 3]
    assert os.path.exists(os.path.join(out(root, "example"), "pytorch_lora_weights.safetensors"))
    # cache_dir_vae holds the latents, the text_embeds entry's cache_dir the caption / empty-prompt embeddings
    assert latent_shapes(os.path.join(example, "vaecache")) == {(4, 16, 16)}
    assert len(glob.glob(os.path.join(example, "textcache", "*", "*", "text", "*", "*"))) == 6  # 5 captions + ""
    assert not glob.glob(os.path.join(out(root, "example"), "cache", "*", "*", "latents", "*", "*"))

