"""fewstep.data.prepare.build_dataset on a real tiny model: what the cache fill stores."""
import torch

from fewstep.config import load_config
from fewstep.data.prepare import build_dataset
from fewstep.engine.distributed import DistInfo
from fewstep.models import get_adapter
from fewstep_testing import write_dataset

SHORT, LONG = "a cat", "a large black cat asleep on a red sofa beside an open window on a sunny afternoon"


def test_each_caption_is_stored_at_its_own_length_whatever_it_was_encoded_with(tmp_path):
    """Qwen-Image's encoder pads a batch to its longest prompt: the stored embedding of the short caption (encoded
    with the long one and the empty prompt) has its own length, all valid, and equals it encoded alone."""
    backend = write_dataset(str(tmp_path), n=2, captions=[SHORT, LONG])
    cfg = load_config(None, {"model_family": "qwen_image", "pretrained_model_name_or_path": "tiny:qwenimage",
                             "data_backend_config": backend, "output_dir": str(tmp_path / "out"),
                             "mixed_precision": "fp32", "resolution": 32})
    adapter = get_adapter("qwen_image")
    dataset, _, _ = build_dataset(cfg, adapter, DistInfo(0, 1, 0, torch.device("cpu")))
    comps = adapter.load("tiny:qwenimage", with_denoiser=False, with_vae=False)
    lengths = {}
    for prompt in (SHORT, LONG, ""):
        stored = dataset.text[prompt]
        alone = adapter.split_cond(adapter.encode_prompts(comps, [prompt]))[0]
        mask = stored["prompt_embeds_mask"]
        assert stored["prompt_embeds"].shape[0] == mask.shape[0] == int(mask.sum()), prompt
        torch.testing.assert_close(stored["prompt_embeds"], alone["prompt_embeds"], rtol=1e-4, atol=1e-5)
        lengths[prompt] = mask.shape[0]
    assert lengths[SHORT] < lengths[LONG]


def test_validation_negative_prompt_is_cached_and_chosen_as_the_negative(tmp_path):
    """SimpleTuner's `validation_negative_prompt`: encoded with the data set, kept in memory like the validation
    prompt, and what validation's classifier-free guidance steers away from; without it, the empty prompt."""
    from fewstep.validation_settings import validation_prompts

    backend = write_dataset(str(tmp_path), n=2, captions=[SHORT, LONG])
    base = {"model_family": "flux", "pretrained_model_name_or_path": "tiny:flux", "data_backend_config": backend,
            "output_dir": str(tmp_path / "out"), "mixed_precision": "fp32", "resolution": 32}
    cfg = load_config(None, {**base, "--validation_negative_prompt": "blurry, cropped, ugly"})
    adapter = get_adapter("flux")
    dataset, _, _ = build_dataset(cfg, adapter, DistInfo(0, 1, 0, torch.device("cpu")))
    assert validation_prompts(cfg, dataset, adapter) == (dataset.samples[0].caption, "blurry, cropped, ugly")
    assert "blurry, cropped, ugly" in dataset.text.resident
    comps = adapter.load("tiny:flux", with_denoiser=False, with_vae=False)
    alone = adapter.split_cond(adapter.encode_prompts(comps, ["blurry, cropped, ugly"]))[0]
    stored = dataset.text["blurry, cropped, ugly"]
    assert stored.keys() == alone.keys()
    for k in stored:
        torch.testing.assert_close(stored[k], alone[k], rtol=1e-4, atol=1e-5)
    assert not torch.equal(stored["prompt_embeds"], dataset.uncond["prompt_embeds"])
    # without one: where validation guides, the family's default, as launcher/sample.py's (" " for a flow model,
    # "" for SDXL); without guidance (FLUX's default) the empty prompt, which is cached anyway
    cfg = load_config(None, base)
    dataset, _, _ = build_dataset(cfg, adapter, DistInfo(0, 1, 0, torch.device("cpu")))
    assert validation_prompts(cfg, dataset, adapter)[1] == "" and " " not in dataset.text.resident
    cfg = load_config(None, {**base, "validation_guidance_real": 3.0})
    dataset, _, _ = build_dataset(cfg, adapter, DistInfo(0, 1, 0, torch.device("cpu")))
    assert validation_prompts(cfg, dataset, adapter)[1] == " " and " " in dataset.text.resident
    cfg = load_config(None, {**base, "validation_guidance_real": 3.0, "validation_negative_prompt": ""})
    assert validation_prompts(cfg, dataset, adapter)[1] == ""  # given empty: the empty prompt, as sample.py's
    assert get_adapter("sdxl").default_negative_prompt == ""


def test_the_encoders_come_from_the_resolved_source_not_the_hub_name(tmp_path, monkeypatch):
    """The trainer resolves a hub id once (`local_model`: the snapshot of one commit for every rank) and the data
    preparation reads the VAE and text encoders from that folder: the name is not resolved again (offline here, so
    a second lookup fails), and the cache is keyed by the folder's content (a snapshot of the same files as a local
    copy shares its cache)."""
    import shutil

    from fewstep.data.cache import model_key

    backend = write_dataset(str(tmp_path), n=2, captions=[SHORT, LONG])
    snapshot = tmp_path / "hf" / "models--org--tiny-flux" / "snapshots" / ("c0ffee" * 6 + "abcd")
    shutil.copytree(get_adapter("flux").resolve("tiny:flux"), snapshot)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    cfg = load_config(None, {"model_family": "flux", "pretrained_model_name_or_path": "org/tiny-flux",
                             "data_backend_config": backend, "output_dir": str(tmp_path / "out"),
                             "mixed_precision": "fp32", "resolution": 32})
    dataset, _, _ = build_dataset(cfg, get_adapter("flux"), DistInfo(0, 1, 0, torch.device("cpu")), str(snapshot))
    assert len(dataset) == 2 and dataset.text[SHORT]["prompt_embeds"].shape[0] > 0
    key = model_key("flux", str(snapshot))
    assert key == model_key("flux", str(get_adapter("flux").resolve("tiny:flux")))  # by content, not by name
    assert all(key in dataset.latent_path(i) for i in range(len(dataset)))


def test_a_folder_in_several_entries_is_read_once(tmp_path, monkeypatch):
    """SimpleTuner's multi-resolution setup lists one folder in several entries: the first scan read (hashed and
    decoded) each image once per entry."""
    import json
    import os

    import fewstep.data.dataset as dataset_mod
    from fewstep.data.backends import load_data_config
    from fewstep.data.prepare import scan_images

    backend = write_dataset(str(tmp_path), n=3)
    images = load_data_config(backend).images[0].image_dir
    with open(backend, "w") as fh:
        json.dump([{"id": f"r{r}", "instance_data_dir": images, "resolution": r, "crop": False} for r in (16, 24, 32)],
                  fh)
    reads, probe = [], dataset_mod.probe_image
    monkeypatch.setattr(dataset_mod, "probe_image", lambda path: reads.append(path) or probe(path))
    table, _, probed = scan_images(load_data_config(backend), 8, str(tmp_path / "out" / "data_digests.json"))
    assert len(table) == 9 and probed == 3
    assert sorted(reads) == sorted(os.path.join(images, f"img{i}.png") for i in range(3))


def test_images_probed_on_another_node_are_not_read_again_at_the_next_start(tmp_path, monkeypatch):
    """With the data copied to each node's disk (same path), a record probed on another node carries that copy's
    ctime and inode; rank 0 stamps it with its own stat, so a restart does not read those images again."""
    from fewstep.data.backends import load_data_config
    from fewstep.data.dataset import ProbeMemo
    from fewstep.data.prepare import scan_images

    backend = write_dataset(str(tmp_path), n=3)
    memo = str(tmp_path / "out" / "data_digests.json")
    record = ProbeMemo.record

    def on_another_node(path):  # the same bytes and mtime, another file: its own ctime and inode
        key, entry = record(path)
        return key, [entry[0], entry[1], entry[2] + 1, entry[3] + 1, *entry[4:]]

    monkeypatch.setattr(ProbeMemo, "record", staticmethod(on_another_node))
    assert scan_images(load_data_config(backend), 8, memo)[2] == 3
    monkeypatch.setattr(ProbeMemo, "record", staticmethod(record))
    assert scan_images(load_data_config(backend), 8, memo)[2] == 0


def test_the_cache_fill_encodes_in_the_configured_batches(tmp_path, monkeypatch):
    """`vae_batch_size` images and `text_encoder_batch_size` prompts per encoder call (the knobs for a fill that
    runs out of GPU memory); a text_embeds entry's own text_encoder_batch_size wins over the config's."""
    import json

    adapter = get_adapter("flux")
    calls = {"images": [], "prompts": []}
    encode_images, encode_prompts = adapter.encode_images, adapter.encode_prompts
    monkeypatch.setattr(adapter, "encode_images", lambda vae, px: calls["images"].append(len(px)) or
                        encode_images(vae, px))
    monkeypatch.setattr(adapter, "encode_prompts", lambda comps, p: calls["prompts"].append(len(p)) or
                        encode_prompts(comps, p))
    backend = write_dataset(str(tmp_path), n=5, captions=["a", "b", "c", "d", "e"])
    base = {"model_family": "flux", "pretrained_model_name_or_path": "tiny:flux", "data_backend_config": backend,
            "mixed_precision": "fp32", "resolution": 32}
    info = DistInfo(0, 1, 0, torch.device("cpu"))
    cfg = load_config(None, {**base, "output_dir": str(tmp_path / "small"), "vae_batch_size": 2,
                             "text_encoder_batch_size": 3})
    build_dataset(cfg, adapter, info)
    assert calls == {"images": [2, 2, 1], "prompts": [3, 3]}  # five captions and the empty prompt
    calls["images"].clear(), calls["prompts"].clear()
    build_dataset(load_config(None, {**base, "output_dir": str(tmp_path / "default")}), adapter, info)
    assert calls == {"images": [5], "prompts": [6]}  # the defaults, 8 and 8
    entries = json.load(open(backend)) + [{"id": "text", "dataset_type": "text_embeds", "default": True,
                                           "cache_dir": str(tmp_path / "text"), "text_encoder_batch_size": 4}]
    with open(backend, "w") as fh:
        json.dump(entries, fh)
    calls["images"].clear(), calls["prompts"].clear()
    cfg = load_config(None, {**base, "output_dir": str(tmp_path / "entry"), "text_encoder_batch_size": 1})
    build_dataset(cfg, adapter, info)
    assert calls["prompts"] == [4, 2]  # the entry's 4, not the config's 1
