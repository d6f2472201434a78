"""fewstep.data.cache.model_key: which encoders made a cache, by their files' content."""
import os
import shutil

from fewstep.data.cache import model_key
from fewstep.models.tiny import ensure_tiny_pipeline


def _copy(src, dst):
    """As `cp -r` to a node's local disk: new paths, new modification times."""
    shutil.copytree(src, dst, copy_function=shutil.copy)
    return str(dst)


def test_a_copy_of_the_model_on_another_disk_keeps_the_key_and_other_encoders_change_it(tmp_path):
    src = str(ensure_tiny_pipeline("flux"))
    a, b = _copy(src, tmp_path / "node0" / "flux"), _copy(src, tmp_path / "node1" / "model")
    os.utime(os.path.join(b, "vae", "config.json"), ns=(1, 1))
    assert model_key("flux", a) == model_key("flux", b) == model_key("flux", src)
    assert model_key("sd3", a) != model_key("flux", a)
    weights = os.path.join(b, "text_encoder", "model.safetensors")
    with open(weights, "r+b") as fh:  # other text-encoder weights, same size
        fh.seek(-4, os.SEEK_END)
        last = fh.read(4)
        fh.seek(-4, os.SEEK_END)
        fh.write(bytes(x ^ 0xFF for x in last))
    assert model_key("flux", b) != model_key("flux", a)
    assert model_key("flux", "org/name") != model_key("flux", "org/other")


def test_folders_the_pipeline_does_not_load_do_not_change_the_key(tmp_path):
    """A hub snapshot downloaded with every folder (SDXL base ships vae_1_0/ beside vae/) and one with only the
    pipeline's components (model_index.json) hold the same encoders: one key, so nodes whose caches differ that way
    are not refused as holding different models."""
    src = str(ensure_tiny_pipeline("flux"))
    full = tmp_path / "full"
    shutil.copytree(src, full)
    shutil.copytree(os.path.join(src, "vae"), full / "vae_1_0")
    with open(full / "vae_1_0" / "config.json", "a") as fh:
        fh.write(" ")  # not the same files as vae/
    assert model_key("flux", str(full)) == model_key("flux", src)
    with open(full / "vae" / "config.json", "a") as fh:
        fh.write(" ")
    assert model_key("flux", str(full)) != model_key("flux", src)  # a component's files still count


def test_an_encoded_empty_prompt_is_another_cache(tmp_path):
    """`force_zeros_for_empty_prompt: false` in model_index.json makes SDXL encode "" instead of zeros: the cached
    "" embedding made with the default is not that one, so the key differs; saying the default keeps the key."""
    import json

    src = str(ensure_tiny_pipeline("sdxl"))
    folder = _copy(src, tmp_path / "sdxl")
    index = os.path.join(folder, "model_index.json")
    with open(index) as fh:
        meta = json.load(fh)
    for value, same in ((True, True), (False, False)):
        with open(index, "w") as fh:
            json.dump({**meta, "force_zeros_for_empty_prompt": value}, fh)
        assert (model_key("sdxl", folder) == model_key("sdxl", src)) is same, value
