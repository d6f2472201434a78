"""multidatabackend.json as SimpleTuner users write it: which keys work, which are refused, and with what message."""
import json
import os

import pytest

from bucket_testing import simpletuner_example, write_backend, write_images
from fewstep.data.backends import load_data_config
from fewstep.data.errors import DataError
from fewstep.data.buckets import Geometry
from fewstep.errors import UserError


@pytest.fixture
def images(tmp_path):
    return write_images(str(tmp_path / "images"))


def entry(images, **keys):
    return {"id": "photos", "type": "local", "instance_data_dir": images, "resolution": 32, **keys}


def load(tmp_path, *entries):
    return load_data_config(write_backend(str(tmp_path / "mdb.json"), list(entries)))


def test_simpletuner_documentation_example_is_accepted(tmp_path, images):
    config = load_data_config(simpletuner_example(str(tmp_path), images))
    (photos,) = config.images
    assert (photos.crop, photos.crop_explicit, photos.crop_style, photos.crop_aspect) == (True, True, "center",
                                                                                          "square")
    assert (photos.resolution, photos.resolution_type, photos.repeats) == (32, "pixel_area", 0)
    assert photos.vae_cache_dir == str(tmp_path / "vaecache")
    assert photos.text_cache_dir == config.default_text_cache_dir == str(tmp_path / "textcache")
    assert photos.instance_prompt == "something to label every image" and photos.caption_strategy == "textfile"


def test_documentation_text_embeds_entry_on_s3_is_refused_with_what_to_do(tmp_path, images):
    aws = {"id": "an example backend for text embeds.", "dataset_type": "text_embeds", "default": True,
           "type": "aws", "aws_bucket_name": "textembeds-something-yummy", "aws_region_name": None,
           "aws_endpoint_url": "https://foo.bar/", "aws_access_key_id": "x", "aws_secret_access_key": "y",
           "aws_data_prefix": "", "cache_dir": ""}
    with pytest.raises(DataError, match=r"mdb.json entry 1 \('an example backend for text embeds.'\): type 'aws' "
                                        r"\(S3\) is not supported: .*type 'local' with .*cache_dir"):
        load(tmp_path, entry(images), aws)


def test_fewstep_spelling_keeps_its_meaning(tmp_path, images):
    (e,) = load(tmp_path, {"backend": "simple", "resolution": 32, "shuffle": False, "image_dir": images,
                           "caption_extension": "txt"}).images
    assert (e.crop, e.crop_explicit, e.crop_style, e.crop_aspect, e.resolution_type) == (True, False, "center",
                                                                                         "square", "pixel")
    assert (e.shuffle, e.caption_extension, e.repeats, e.probability) == (False, ".txt", 0, 1.0)
    assert "fewstep's default" in e.shown_crop


def test_explicit_crop_takes_simpletuner_defaults(tmp_path, images):
    (e,) = load(tmp_path, entry(images, crop=True)).images
    assert (e.crop_style, e.crop_aspect) == ("random", "square")  # SimpleTuner: crop_style defaults to random
    (e,) = load(tmp_path, entry(images, crop=False, crop_style="corner")).images
    assert (e.crop_style, e.crop_aspect) == ("center", "preserve")  # crop false keeps the aspect; no crop style


@pytest.mark.parametrize("keys, message", [
    ({"vae_cache_clear_each_epoch": True}, "'vae_cache_clear_each_epoch': fewstep encodes each image once"),
    ({"crop_style": "face"}, "crop_style 'face' is not supported .*'center', 'random' or 'corner'"),
    ({"crop_aspect": "closest"}, "crop_aspect 'closest' needs 'crop_aspect_buckets'"),
    ({"crop_aspect": "random", "crop_aspect_buckets": [{"aspect": 1.0, "weight": 0.4}]}, "must add up to 1"),
    ({"crop_aspect": "random", "crop_aspect_buckets": [{"aspect": 1.0, "weight": 1.5},
                                                       {"aspect": 1.5, "weight": -0.5}]},
     "the weights of crop_aspect_buckets must be >= 0, got {'aspect': 1.5, 'weight': -0.5}"),
    ({"instance_data_dir": ""}, "needs 'instance_data_dir' \\(or 'image_dir'\\)"),
    ({"caption_strategy": "parquet"}, "caption_strategy 'parquet' is not supported; use one of textfile"),
    ({"parquet": {"path": "x.parquet"}}, "'parquet': parquet metadata is not supported"),
    ({"caption_strategy": "instanceprompt"}, "instanceprompt' needs a non-empty 'instance_prompt'"),
    ({"prepend_instance_prompt": True}, "prepend_instance_prompt needs a non-empty 'instance_prompt'"),
    ({"probability": 0}, "'probability' must be > 0 .*'disabled': true"),
    ({"repeats": -1}, "'repeats' must be >= 0"),
    ({"caption_extension": None}, "'caption_extension' must be a file extension such as \".txt\", got None"),
    ({"caption_extension": 5}, "'caption_extension' must be a file extension"),
    ({"resolution": "32"}, "'resolution' must be an integer >= 8 pixels, got the string '32'"),
    ({"repeats": "2"}, "'repeats' must be an integer, got the string '2'"),
    ({"disabled": "false"}, "'disabled' must be true or false, got 'false'"),  # not a truthy string turning it off
    ({"maximum_image_size": 64}, "'maximum_image_size' needs 'target_downsample_size'"),
    ({"resolution_type": "megapixel"}, "'resolution_type' must be one of pixel, area, pixel_area"),
    ({"resolution_type": "area", "resolution": 1024}, "'resolution' is in megapixels"),
    ({"resolution": 31.5}, "'resolution' must be an integer >= 8 pixels"),
    ({"resolution": float("nan")}, "'resolution' must be an integer >= 8 pixels, got nan"),
    ({"probability": float("inf")}, "'probability' must be a finite number, got inf"),
    ({"max_num_samples": 10}, "'max_num_samples': not supported"),
    ({"start_step": 300}, "'start_step': dataset scheduling is not supported"),
    ({"conditioning_data": "x"}, "conditioning data .* is not supported"),
    ({"caption_filter_list": ["arafed "]}, "'caption_filter_list': not supported"),
    ({"train_batch_size": 4}, "a per-entry batch size is not supported"),
    ({"delete_nsfw_images": True}, "never deletes your files, and runs no NSFW classifier"),
    ({"dataset_name": "org/pics"}, "'dataset_name' belongs to a storage type fewstep does not support"),
    ({"metadata_backend": "parquet"}, "reads each image's size from the file"),
    ({"delete_unwanted_images": True}, "never deletes your files"),
    ({"timestep_sampling_offset": 0.5}, "per-entry timestep offsets are not supported"),
    ({"default": True}, "'default' applies to dataset_type text_embeds entries, not to this image entry"),
    ({"aws_bucket_name": "b"}, "'aws_bucket_name' belongs to a storage type fewstep does not support"),
    ({"instance_data_dirr": "x"}, "unknown key 'instance_data_dirr'; did you mean 'instance_data_dir'"),
    ({"dataset_type": "video"}, "dataset_type 'video' is not supported"),
    ({"text_embeds": "nowhere"}, "text_embeds 'nowhere' names no enabled text_embeds entry"),
    ({"image_embeds": "nowhere"}, "image_embeds 'nowhere' names no enabled image_embeds entry"),
    ({"cache_dir_vae": "$FEWSTEP_UNSET_DIR/vae"}, r"cache_dir_vae '\$FEWSTEP_UNSET_DIR/vae': environment variable "
                                                   "FEWSTEP_UNSET_DIR is not set"),
])
def test_refusals_name_file_entry_and_key(tmp_path, images, keys, message):
    with pytest.raises(DataError, match=r"mdb.json entry 0 \('photos'\): .*" + message) as info:
        load(tmp_path, entry(images, **keys))
    assert isinstance(info.value, UserError)  # printed as one `fewstep: ...` line


@pytest.mark.parametrize("keys", [
    {"vae_cache_clear_each_epoch": False}, {"skip_file_discovery": ""}, {"preserve_data_backend_cache": False},
    # SimpleTuner's start-up speed-ups, its web UI's validation switch: the same data at any value
    {"skip_file_discovery": "vae aspect metadata"}, {"preserve_data_backend_cache": True},
    {"vae_cache_ondemand": True, "text_cache_ondemand": True}, {"disable_validation": True},
    {"metadata_update_interval": 60}, {"delete_nsfw_images": False},
    {"metadata_backend": "discovery"}, {"hash_filenames": True}, {"delete_unwanted_images": False},
    {"start_epoch": 1, "start_step": 0}, {"caption_shuffle": {"enable": False}}, {"disabled": False},
    {"crop": False, "maximum_image_size": 64, "target_downsample_size": 32},  # no effect with crop false, as there
])
def test_keys_that_leave_the_data_as_it_is_are_accepted(tmp_path, images, keys):
    assert len(load(tmp_path, entry(images, **keys)).images) == 1


def test_embed_entries_name_cache_locations(tmp_path, images):
    config = load(tmp_path,
                  entry(images, id="a", cache_dir_vae="~/vae-a"),
                  entry(images, id="b", image_embeds="vae", text_embeds="alt"),
                  entry(images, id="c"),
                  {"id": "vae", "type": "local", "dataset_type": "image_embeds", "cache_dir": str(tmp_path / "v")},
                  {"id": "main", "dataset_type": "text_embeds", "default": True, "cache_dir": str(tmp_path / "t"),
                   "write_batch_size": 128, "text_encoder_batch_size": 4},
                  {"id": "alt", "dataset_type": "text_embeds", "cache_dir": "rel-text"},
                  {"id": "off", "type": "aws", "disabled": True})  # a disabled entry is skipped entirely
    a, b, c = config.images
    assert a.vae_cache_dir == os.path.expanduser("~/vae-a") and a.text_cache_dir == str(tmp_path / "t")
    assert b.vae_cache_dir == str(tmp_path / "v") and b.text_cache_dir == os.path.abspath("rel-text")
    assert c.vae_cache_dir is None  # the run's cache_dir
    assert config.default_text_cache_dir == str(tmp_path / "t")
    assert config.text_batch_sizes == {str(tmp_path / "t"): 4}


def test_cache_folders_that_cannot_be_made_are_named_before_anything_runs(tmp_path, images):
    """A cache folder with a file in its place or above it, or a missing one under a folder that cannot be written,
    is refused with the entry and key when the file is read; an existing read-only folder (a finished cache, read
    in place) is accepted. A folder that still cannot be made (here under a file) ends in a DataError too."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    for key, value in (("cache_dir_vae", str(afile / "x")), ("cache_dir_vae", str(afile))):
        with pytest.raises(DataError, match=f"photos.*{key} '{value}': .*is a file, not a folder"):
            load(tmp_path, entry(images, **{key: value}))
    with pytest.raises(DataError, match=r"entry 1 \('t'\): cache_dir .*is a file, not a folder"):
        load(tmp_path, entry(images, text_embeds="t"),
             {"id": "t", "dataset_type": "text_embeds", "cache_dir": str(afile / "t")})
    frozen = tmp_path / "frozen"
    (frozen / "done").mkdir(parents=True)
    os.chmod(frozen, 0o555)
    try:
        assert load(tmp_path, entry(images, cache_dir_vae=str(frozen / "done"))).images[0].vae_cache_dir
        if not os.access(frozen, os.W_OK):  # root may write anywhere
            with pytest.raises(DataError, match="not writable to create it in"):
                load(tmp_path, entry(images, cache_dir_vae=str(frozen / "new")))
    finally:
        os.chmod(frozen, 0o755)
    from fewstep.data.cache import EmbeddingCache

    with pytest.raises(DataError, match="cache folder .*cannot create"):
        EmbeddingCache(str(afile / "y"), "m")
    # the memory planner reads the file where the training nodes' folders need not be (a login node): not checked
    plan_file = write_backend(str(tmp_path / "plan.json"), [entry(images, cache_dir_vae=str(afile / "x"))])
    planned = load_data_config(plan_file, images_must_exist=False)
    assert planned.images[0].vae_cache_dir == str(afile / "x")


def test_text_embeds_defaults(tmp_path, images):
    one = {"id": "t1", "dataset_type": "text_embeds", "cache_dir": str(tmp_path / "t1")}
    assert load(tmp_path, entry(images), one).default_text_cache_dir == str(tmp_path / "t1")  # the only one
    two = {"id": "t2", "dataset_type": "text_embeds", "cache_dir": ""}
    # none marked default: the first enabled one, as SimpleTuner's factory picks it (it was refused)
    assert load(tmp_path, entry(images), one, two).default_text_cache_dir == str(tmp_path / "t1")
    with pytest.raises(DataError, match=r"more than one text_embeds entry has default: true \(t1, t2\)"):
        load(tmp_path, entry(images), {**one, "default": True}, {**two, "default": True})
    config = load(tmp_path, entry(images), one, {**two, "default": True})
    assert config.default_text_cache_dir is None  # cache_dir "": the run's cache_dir


def test_multiple_entries_with_their_own_resolutions_and_probabilities(tmp_path, images):
    config = load(tmp_path, entry(images, id="small", probability=0.25, repeats=2),
                  entry(images, id="large", resolution=64, resolution_type="pixel_area"))
    assert [(e.id, e.resolution, e.probability, e.repeats) for e in config.images] == [
        ("small", 32, 0.25, 2), ("large", 64, 1.0, 0)]
    with pytest.raises(DataError, match="id 'small' is used by two entries"):
        load(tmp_path, entry(images, id="small"), entry(images, id="small"))


def test_the_configs_caption_and_downsample_options_are_defaults_for_entries_that_set_none(tmp_path, images):
    """SimpleTuner's global caption_strategy, maximum_image_size and target_downsample_size apply to the entries that
    set none (its data-backend config's `_apply_common_defaults`); fewstep refused them as unknown config keys. An
    entry that takes fewstep's default caption strategy (textfile; SimpleTuner's is filename) says so at start-up."""
    from fewstep.config import load_config
    from fewstep.data.backends import entry_defaults

    own = entry(images, id="own", caption_strategy="textfile", maximum_image_size=96, target_downsample_size=64)
    bare = entry(images, id="bare")
    path = write_backend(str(tmp_path / "mdb.json"), [own, bare])
    cfg = load_config(None, {"model_family": "flux", "pretrained_model_name_or_path": "tiny:flux",
                             "--caption_strategy": "filename", "--maximum_image_size": 128,
                             "--target_downsample_size": 48})
    a, b = load_data_config(path, entry_defaults(cfg)).images
    assert (a.caption_strategy, a.maximum_image_size, a.target_downsample_size) == ("textfile", 96, 64)
    assert (b.caption_strategy, b.maximum_image_size, b.target_downsample_size) == ("filename", 128, 48)
    assert a.strategy_explicit and b.strategy_explicit
    plain = load_data_config(path).images[1]
    assert plain.caption_strategy == "textfile" and not plain.strategy_explicit  # (said at start-up: test_trainer)


def test_the_configs_resolution_options_are_defaults_for_entries_that_set_none(tmp_path, images):
    """SimpleTuner's global resolution, resolution_type and minimum_image_size stand for an entry's own only where
    the entry sets none (its data_backend factory: backend.get("resolution", args.resolution)); fewstep once let the
    config's resolution replace every entry's, training a 512 px entry of a multi-resolution config at 1024."""
    own = entry(images, id="own", resolution=64, resolution_type="pixel_area", minimum_image_size=8)
    bare = entry(images, id="bare")
    for k in ("resolution", "resolution_type", "minimum_image_size"):
        bare.pop(k, None)
    path = write_backend(str(tmp_path / "mdb.json"), [own, bare])
    a, b = load_data_config(path, {"resolution": 48, "resolution_type": "pixel", "minimum_image_size": 16}).images
    assert (a.resolution, a.resolution_type, a.minimum_image_size) == (64, "pixel_area", 8)
    assert (b.resolution, b.resolution_type, b.minimum_image_size) == (48, "pixel", 16)
    with pytest.raises(DataError, match="entry 1 .*needs 'resolution'"):
        load_data_config(path)
    # the start-up line says where each entry's resolution comes from
    assert a.shown_resolution == "resolution 64 px (pixel_area, its own: the config's 48 is for entries that set none)"
    assert b.shown_resolution == "resolution 48 px (pixel, the config's)"
    # a value refused names the config's options it came from
    with pytest.raises(DataError, match="megapixels .*got 1024 \\(the config's resolution and resolution_type: this "
                                        "entry sets none\\)"):
        load_data_config(path, {"resolution": 1024, "resolution_type": "area"})
    sized = write_backend(str(tmp_path / "sized.json"), [{**bare, "resolution": 1024}])
    with pytest.raises(DataError, match="megapixels .*got 1024 \\(the config's resolution_type: this entry sets "):
        load_data_config(sized, {"resolution_type": "area"})
    area = load_data_config(path, {"resolution": 1.0, "resolution_type": "area", "minimum_image_size": 512}).images[1]
    with pytest.raises(DataError, match="most likely too large .*\\(the config's minimum_image_size and "
                                        "resolution_type: this entry sets none\\)"):
        Geometry(area, 16)
    # fewstep's default resolution_type differs from SimpleTuner's where it matters (not for a square crop)
    unset = load(tmp_path, entry(images, id="keep", crop=False), entry(images, id="square", crop=True),
                 entry(images, id="sized", crop=True, maximum_image_size=64, target_downsample_size=48)).images
    assert unset[0].shown_resolution == "resolution 32 px (pixel; fewstep's default resolution_type, SimpleTuner's " \
                                        "is pixel_area)"
    assert "fewstep's default resolution_type" in unset[2].shown_resolution  # the sizes' units differ then
    assert unset[1].shown_resolution == "resolution 32 px (pixel)"


def test_single_object_and_errors_name_the_file(tmp_path, images):
    p = tmp_path / "one.json"
    p.write_text(json.dumps(entry(images)))
    assert len(load_data_config(str(p)).images) == 1
    p.write_text("[1, 2]")
    with pytest.raises(DataError, match="one.json: expected a list of backend entries"):
        load_data_config(str(p))
    p.write_text(json.dumps([{"id": "t", "dataset_type": "text_embeds"}]))
    with pytest.raises(DataError, match="one.json: no enabled image entries"):
        load_data_config(str(p))


def test_simpletuners_placeholders_are_filled_as_simpletuner_fills_them(tmp_path, images, monkeypatch):
    """18 of SimpleTuner's 27 example data configs write cache folders as "cache/vae/{model_family}/{id}": fewstep
    kept the braces, making a folder literally named {model_family}."""
    from fewstep.data.placeholders import placeholders
    from fewstep.config import load_config

    monkeypatch.setenv("FEWSTEP_TEST_DATA_ROOT", str(tmp_path))
    text = {"id": "text", "dataset_type": "text_embeds", "default": True, "cache_dir": "{output_dir}/text/{id}"}
    image = entry(images, cache_dir_vae="{env:FEWSTEP_TEST_DATA_ROOT}/vae/{model_family}/{id}",
                  instance_prompt="a photo {of} {id}", ignore_epochs=True)  # unknown tokens stay as written
    path = write_backend(str(tmp_path / "mdb.json"), [image, text])
    cfg = load_config(None, {"model_family": "sd3", "pretrained_model_name_or_path": "tiny:sd3",
                             "output_dir": str(tmp_path / "run"), "data_backend_config": path})
    config = load_data_config(path, variables=placeholders(cfg))
    (photos,) = config.images
    assert photos.vae_cache_dir == str(tmp_path / "vae" / "sd3" / "photos")
    assert config.default_text_cache_dir == str(tmp_path / "run" / "text" / "text")
    assert photos.instance_prompt == "a photo {of} photos"
    monkeypatch.delenv("FEWSTEP_TEST_DATA_ROOT")
    with pytest.raises(DataError, match=r"entry 0 \('photos'\): \{env:FEWSTEP_TEST_DATA_ROOT\} names an environment "
                                        "variable that is not set"):
        load_data_config(path, variables=placeholders(cfg))


def test_a_feature_fewstep_lacks_is_named_before_the_storage_type(tmp_path, images):
    """SimpleTuner's ControlNet examples keep their data on the hub: fewstep said "type 'huggingface' is not
    supported", and only once the data were moved to local folders that conditioning is not supported at all."""
    hub = entry(images, type="huggingface", dataset_name="org/controlnet-pairs", conditioning=[{"type": "canny"}])
    with pytest.raises(DataError, match=r"entry 0 \('photos'\): 'conditioning': conditioning data \(ControlNet"):
        load(tmp_path, hub)
    with pytest.raises(DataError, match=r"type 'huggingface' \(.*\) is not supported"):  # alone: the storage
        load(tmp_path, {k: v for k, v in hub.items() if k != "conditioning"})
