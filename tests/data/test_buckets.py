"""Bucket sizes, filters, resize and crop plans (SimpleTuner's DATALOADER.md rules, sides rounded to the model's
VAE x patch multiple)."""
import math

import numpy as np
import pytest
from PIL import Image

from fewstep.data.backends import ImageEntry
from fewstep.data.buckets import Geometry, Plan, image_size, load_planned
from fewstep.data.errors import DataError


def geometry(multiple=4, **keys):
    keys.setdefault("resolution", 32.0)
    return Geometry(ImageEntry(id="e", image_dir=".", where="mdb.json entry 0", **keys), multiple)


def test_pixel_area_buckets_match_simpletuner_examples():
    # OPTIONS.md: "Example resulting sizes for 1024: 1024x1024, 1216x832, 832x1216" (SimpleTuner's 64-px alignment)
    g = geometry(64, resolution=1024.0, resolution_type="pixel_area", crop=False, crop_aspect="preserve")
    assert [g.plan(w, h, "k").target for w, h in [(2000, 2000), (1460, 1000), (1000, 1460)]] == [
        (1024, 1024), (1216, 832), (832, 1216)]
    area = geometry(64, resolution=1.0, resolution_type="area", crop=False, crop_aspect="preserve")
    assert area.bucket(1.46) == (1216, 832) and area.square == (1024, 1024)
    assert geometry(64, resolution=0.26, resolution_type="area").square == (512, 512)  # SimpleTuner's 0.25 MP map


@pytest.mark.parametrize("multiple", [4, 8, 16])
@pytest.mark.parametrize("aspect", [0.33, 0.5, 0.67, 0.75, 1.0, 1.33, 1.5, 1.78, 2.0, 3.0])
def test_area_buckets_keep_the_area_with_sides_a_multiple(multiple, aspect):
    g = geometry(multiple, resolution=256.0, resolution_type="pixel_area", crop=False, crop_aspect="preserve")
    w, h = g.bucket(aspect)
    assert w % multiple == 0 and h % multiple == 0
    assert abs(w * h / 256 ** 2 - 1) < 0.12  # about the area of a 256 x 256 square
    assert abs(math.log((w / h) / aspect)) < 0.1  # about the aspect ratio


def test_pixel_buckets_put_the_short_side_at_resolution():
    g = geometry(16, resolution=64.0, resolution_type="pixel", crop=False, crop_aspect="preserve")
    assert g.plan(300, 200, "k").target == (96, 64) and g.plan(200, 300, "k").target == (64, 96)
    with pytest.raises(DataError, match="mdb.json entry 0: resolution 30 must be a multiple of 4 .*try 28"):
        geometry(4, resolution=30.0)  # a square crop at exactly `resolution`
    assert geometry(4, resolution=30.0, crop=False, crop_aspect="preserve").square == (32, 32)  # buckets round


@pytest.mark.parametrize("keys", [dict(), dict(crop=False, crop_aspect="preserve"),
                                  dict(crop=False, crop_aspect="preserve", resolution_type="pixel_area"),
                                  dict(crop=False, crop_aspect="preserve", resolution_type="area", resolution=0.25)])
def test_a_degenerate_shape_is_skipped_under_every_crop_rule(keys):
    """A divider or banner image: below 1:200 its rounded aspect ratio was 0 (a ZeroDivisionError that stopped the
    scan with a traceback), and short of that a square crop first resized a 2 x 500 image to 1024 x 256000 at 1024 px.
    Anything beyond 20:1 is skipped and counted with the reason; 20:1 itself trains."""
    from fewstep.data.buckets import MAX_ASPECT

    g = geometry(**keys)
    for w, h in [(2, 500), (1, 300), (500, 2), (19, 400)]:
        assert g.plan(w, h, "k") == f"aspect ratio beyond {MAX_ASPECT}:1", (w, h)
    assert isinstance(g.plan(20, 400, "k"), Plan) and isinstance(g.plan(400, 20, "k"), Plan)


def test_size_and_aspect_filters():
    g = geometry(resolution=32.0, minimum_image_size=32, minimum_aspect_ratio=0.5, maximum_aspect_ratio=3.0,
                 crop=False, crop_aspect="preserve")
    assert g.plan(30, 50, "k") == "smaller than minimum_image_size"  # pixel: the short side
    assert g.plan(100, 32, "k") == "aspect ratio above maximum_aspect_ratio"
    assert g.plan(32, 70, "k") == "aspect ratio below minimum_aspect_ratio"
    assert isinstance(g.plan(96, 32, "k"), Plan) and isinstance(g.plan(32, 64, "k"), Plan)  # 3.0 and 0.5 are in
    area = geometry(resolution=32.0, resolution_type="pixel_area", minimum_image_size=24, crop=False,
                    crop_aspect="preserve")
    assert area.plan(20, 20, "k") == "smaller than minimum_image_size"  # area 400 < 24 x 24
    assert isinstance(area.plan(40, 16, "k"), Plan)  # area 640 is enough without a square crop
    square = geometry(resolution=32.0, resolution_type="pixel_area", minimum_image_size=24, crop=True,
                      crop_explicit=True)
    assert square.plan(40, 16, "k") == "smaller than minimum_image_size"  # a square crop needs a 24-px short side
    with pytest.raises(DataError, match="minimum_image_size 6 is in megapixels"):
        geometry(resolution=1.0, resolution_type="area", minimum_image_size=6)
    # pixel_area: a small value is an edge too, as SimpleTuner squares every one (1 px: nothing is too small; it was
    # read as 1 MP, which skipped every image here)
    tiny = geometry(resolution=32.0, resolution_type="pixel_area", minimum_image_size=1, crop=False,
                    crop_aspect="preserve")
    assert isinstance(tiny.plan(20, 20, "k"), Plan)


def test_fewstep_default_resizes_to_cover_then_centre_crops():
    plan = geometry(resolution=32.0).plan(40, 48, "k")
    assert plan == Plan((32, 32), (32, 38), (0, 3))
    assert plan.source == (40, 48)  # the image's own size (SDXL's micro-conditioning), not part of equality


def test_explicit_square_crop_resizes_to_cover_first_as_simpletuners_loader():
    """SimpleTuner's loader resizes to cover, then crops (`_downsample_before_crop` since 2025-11); its DATALOADER.md
    (and fewstep before) cut the square from the unresized image: a 4096x4096 image gave the middle 1024 tile."""
    g = geometry(resolution=32.0, resolution_type="pixel_area", crop=True, crop_explicit=True, crop_style="center")
    assert g.plan(64, 48, "k") == Plan((32, 32), (43, 32), (5, 0))  # the whole image's short side, not a tile
    assert g.plan(128, 128, "k") == Plan((32, 32), (32, 32), (0, 0))
    assert g.plan(20, 30, "k") == Plan((32, 32), (32, 48), (0, 8))  # smaller than the crop: upscaled to cover
    big = geometry(resolution=32.0, resolution_type="pixel_area", crop=True, crop_explicit=True, crop_style="center",
                   maximum_image_size=64, target_downsample_size=32)
    assert big.plan(96, 64, "k") == Plan((32, 32), (48, 32), (8, 0))  # > 64x64 area: to ~32x32 area, then cover
    assert big.plan(48, 32, "k") == Plan((32, 32), (48, 32), (8, 0))  # under maximum_image_size: cropped as is
    pixel = geometry(resolution=32.0, crop=True, crop_explicit=True, crop_style="center", maximum_image_size=48,
                     target_downsample_size=40)
    assert pixel.plan(100, 50, "k").resize == (80, 40)  # a side > 48: short side to 40


def test_aspect_buckets_resize_to_cover_and_trim_the_rounding():
    g = geometry(resolution=32.0, resolution_type="pixel_area", crop=False, crop_aspect="preserve")
    assert g.plan(60, 40, "k") == Plan((40, 28), (42, 28), (1, 0))
    assert g.plan(600, 400, "k").target == (40, 28)  # any size of one shape: one bucket


def test_crop_styles():
    corner = geometry(resolution=32.0, crop=True, crop_explicit=True, crop_style="corner")
    assert corner.plan(64, 48, "k").offset == (0, 0)
    rand = geometry(resolution=32.0, crop=True, crop_explicit=True, crop_style="random")
    offsets = {rand.plan(64, 48, f"image{i}").offset for i in range(20)}
    assert len(offsets) > 5 and all(0 <= x <= 32 and 0 <= y <= 16 for x, y in offsets)
    assert rand.plan(64, 48, "image3") == rand.plan(64, 48, "image3")  # drawn once per image: stable


def test_closest_and_random_crop_aspect_buckets():
    closest = geometry(resolution=32.0, resolution_type="pixel_area", crop=True, crop_explicit=True,
                       crop_aspect="closest", crop_aspect_buckets=[0.75, 1.0, 1.5])
    assert closest.plan(52, 40, "k").target == closest.bucket(1.5) == (40, 28)
    assert closest.plan(40, 52, "k").target == closest.bucket(0.75)
    rand = geometry(resolution=32.0, resolution_type="pixel_area", crop=True, crop_explicit=True,
                    crop_aspect="random", crop_aspect_buckets=[0.75, 1.0, 1.5])
    targets = {rand.plan(64, 64, f"img{i}").target for i in range(30)}
    assert targets == {rand.bucket(a) for a in (0.75, 1.0, 1.5)}
    weighted = geometry(resolution=32.0, resolution_type="pixel_area", crop=True, crop_explicit=True,
                        crop_aspect="random", crop_aspect_buckets=[{"aspect": 1.5, "weight": 1.0},
                                                                   {"aspect": 0.75, "weight": 0.0}])
    assert {weighted.plan(64, 64, f"img{i}").target for i in range(10)} == {(40, 28)}
    limited = geometry(resolution=32.0, resolution_type="pixel_area", crop=True, crop_explicit=True,
                       crop_aspect="closest", crop_aspect_buckets=[1.0], max_upscale_threshold=0.2)
    assert limited.plan(16, 16, "k").startswith("needs more upscaling")  # 2x > 20 % more
    assert isinstance(limited.plan(28, 28, "k"), Plan)


def test_load_planned_pixels(tmp_path):
    arr = np.zeros((40, 60, 3), np.uint8)
    arr[:, 28:32] = 255  # a bright band in the middle: a centred crop keeps it
    Image.fromarray(arr).save(tmp_path / "w.png")
    plan = geometry(resolution=32.0, resolution_type="pixel_area", crop=False, crop_aspect="preserve").plan(
        60, 40, "k")
    x = load_planned(str(tmp_path / "w.png"), plan)
    assert x.shape == (3, 28, 40) and x.min() >= -1 and x.max() <= 1
    assert x[:, :, 19:21].mean() > 0.5 and x[:, :, 0].mean() < -0.9


def test_exif_orientation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown rotated 90 degrees: portrait
    Image.new("RGB", (60, 40), (200, 10, 10)).save(tmp_path / "r.jpg", exif=exif)
    assert image_size(str(tmp_path / "r.jpg")) == (40, 60)
    plan = geometry(resolution=32.0, resolution_type="pixel_area", crop=False, crop_aspect="preserve").plan(
        40, 60, "k")
    assert load_planned(str(tmp_path / "r.jpg"), plan).shape == (3, 40, 28)


def _pixels(path, w, h):
    """The training pixels of a w x h image, unresized and uncropped, as [H, W, 3] in [-1, 1]."""
    return load_planned(str(path), Plan((w, h), (w, h))).permute(1, 2, 0).numpy()


def test_16_bit_greyscale_is_scaled_to_8_bits_not_clipped(tmp_path):
    """A 16-bit greyscale PNG (Pillow mode I;16) trains at its grey level, as SimpleTuner's OpenCV decode gives it;
    Pillow's convert("RGB") clipped every value above 255 of 65535 to white."""
    levels = np.array([[0, 1000, 20000, 32768, 50000, 65535]], np.uint16).repeat(2, axis=0)
    Image.fromarray(levels).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    x = _pixels(tmp_path / "g16.png", 6, 2)
    expected = levels.astype(np.float64) / 65535 * 2 - 1  # the grey level, on the training scale
    assert np.abs(x - expected[..., None]).max() <= 2 / 255  # 8 bits: within one step of 1/255


def test_transparent_pixels_are_composited_onto_white(tmp_path):
    """SimpleTuner puts transparent images on white; Pillow's convert("RGB") dropped the alpha channel (a fully
    transparent pixel trained as the colour it stores, mostly black). RGBA, LA and palette + tRNS images."""
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (8, 8, 4), dtype=np.uint8)
    rgba[0, 0, 3], rgba[0, 1, 3] = 0, 255  # one fully transparent pixel, one opaque
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    alpha = rgba[..., 3:] / 255.0
    expected = (rgba[..., :3] * alpha + 255 * (1 - alpha)) / 127.5 - 1  # "over" a white background
    x = _pixels(tmp_path / "rgba.png", 8, 8)
    assert np.abs(x - expected).max() <= 1.01 / 127.5  # 8-bit rounding
    assert (x[0, 0] == 1).all() and np.allclose(x[0, 1], rgba[0, 1, :3] / 127.5 - 1)

    grey_alpha = np.stack([np.full((4, 4), 40, np.uint8), np.tile(np.array([0, 255], np.uint8), (4, 2))], axis=-1)
    Image.fromarray(grey_alpha, "LA").save(tmp_path / "la.png")
    x = _pixels(tmp_path / "la.png", 4, 4)
    assert (x[:, 0::2] == 1).all() and np.allclose(x[:, 1::2], 40 / 127.5 - 1)

    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    palette.putpixel((3, 3), 1)
    palette.save(tmp_path / "pal.png", transparency=0)  # palette entry 0 (black) is transparent
    x = _pixels(tmp_path / "pal.png", 4, 4)
    assert (x[0, 0] == 1).all() and np.allclose(x[3, 3], np.array([10, 200, 30]) / 127.5 - 1)


def test_opaque_images_decode_as_before(tmp_path):
    """RGB, greyscale and opaque RGBA images keep their exact pixels."""
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(rgb[..., 0]).save(tmp_path / "l.png")
    Image.fromarray(np.concatenate([rgb, np.full((6, 6, 1), 255, np.uint8)], axis=-1), "RGBA").save(
        tmp_path / "opaque.png")
    for name, want in (("rgb", rgb), ("l", rgb[..., :1].repeat(3, axis=-1)), ("opaque", rgb)):
        assert np.array_equal(_pixels(tmp_path / f"{name}.png", 6, 6), want.astype(np.float32) / 127.5 - 1), name


def test_random_crop_stays_inside_the_resized_image():
    """A random crop offset is at most the free space (resize - target) on each axis, for landscape and portrait."""
    g = geometry(resolution=32.0, crop=True, crop_explicit=True, crop_style="random")
    for w, h in [(64, 48), (48, 64), (100, 40), (40, 100)]:
        plans = [g.plan(w, h, f"seed{i}") for i in range(40)]
        free = (plans[0].resize[0] - 32, plans[0].resize[1] - 32)
        assert plans[0].target == (32, 32) and max(free) > 0 and min(free) == 0, (w, h)  # one free axis
        assert all(0 <= p.offset[0] <= free[0] and 0 <= p.offset[1] <= free[1] for p in plans), (w, h)
        assert len({p.offset for p in plans}) > 5, (w, h)  # the free axis is drawn over


@pytest.mark.parametrize("resolution, edge", [(0.25, 512), (0.5, 768), (0.47, 768), (0.54, 768), (1.0, 1024),
                                              (2.0, 1536), (4.0, 2048)])
def test_area_resolutions_map_to_simpletuners_squares(resolution, edge):
    """SimpleTuner's megapixel map: within 0.05 MP of 0.25/0.5/1/2/4 trains at 512/768/1024/1536/2048 squared."""
    assert geometry(8, resolution=resolution, resolution_type="area").square == (edge, edge)


def test_pixel_downsample_when_either_side_is_over_maximum():
    """Pixel mode, crop: true: one side over maximum_image_size is enough; the short side goes to the target."""
    g = geometry(resolution=32.0, crop=True, crop_explicit=True, maximum_image_size=48, target_downsample_size=40)
    assert g.plan(120, 45, "k").resize == (107, 40)  # 120 x 40/45 = 106.7
    assert g.plan(45, 120, "k").resize == (40, 107)
    assert g.plan(48, 48, "k").resize == (32, 32)  # not over: resized to cover only


def test_crop_false_is_never_downsampled():
    """target_downsample_size applies with crop: true only; an aspect bucket image is resized just to cover."""
    keys = dict(resolution=32.0, resolution_type="pixel_area", crop_aspect="preserve", maximum_image_size=64,
                target_downsample_size=48)
    assert geometry(crop=False, **keys).plan(96, 64, "k") == Plan((40, 28), (42, 28), (1, 0))  # 28/64 x 96 = 42
    assert geometry(crop=True, crop_explicit=True, **keys).plan(96, 64, "k").resize == (59, 39)  # ~48 x 48 area


def test_max_upscale_threshold_compares_each_side_with_its_own():
    """A bucket is offered when its width <= w x (1 + t) and its height <= h x (1 + t), both."""
    def closest(bucket):
        return geometry(resolution=32.0, resolution_type="pixel_area", crop=True, crop_explicit=True,
                        crop_aspect="closest", crop_aspect_buckets=[bucket], max_upscale_threshold=0.2)
    assert closest(4.0).plan(80, 20, "k").target == (64, 16)  # 64 <= 96 and 16 <= 24
    assert closest(1.0).plan(16, 64, "k").startswith("needs more upscaling")  # width 32 > 19.2, height fits


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_gives_the_shown_size(tmp_path, orientation):
    """Orientations 5-8 transpose the image (width and height swap); 1-4 keep its size."""
    from fewstep.data.buckets import decoded_size

    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.new("RGB", (60, 40), (10, 200, 10)).save(tmp_path / "o.jpg", exif=exif)
    want = (40, 60) if orientation >= 5 else (60, 40)
    assert image_size(str(tmp_path / "o.jpg")) == want
    assert decoded_size(str(tmp_path / "o.jpg"), (tmp_path / "o.jpg").read_bytes()) == want


def test_a_bucket_side_is_at_least_one_multiple():
    """Rounding never gives a side of 0: the least is one multiple (SimpleTuner's `_round_to_nearest_multiple`)."""
    from fewstep.data.buckets import round_to_multiple

    assert round_to_multiple(3, 8) == 8 and round_to_multiple(0, 16) == 16 and round_to_multiple(21, 8) == 24
    g = geometry(16, resolution=32.0, resolution_type="pixel_area", crop=False, crop_aspect="preserve")
    assert min(g.bucket(20.0)) >= 16 and min(g.bucket(0.05)) >= 16


def test_minimum_image_size_is_inclusive():
    """An image at exactly minimum_image_size trains: pixel_area area and square-crop short side."""
    area = geometry(resolution=32.0, resolution_type="pixel_area", minimum_image_size=24, crop=False,
                    crop_aspect="preserve")
    assert isinstance(area.plan(24, 24, "k"), Plan)
    assert area.plan(23, 24, "k") == "smaller than minimum_image_size"
    square = geometry(resolution=32.0, resolution_type="pixel_area", minimum_image_size=24, crop=True,
                      crop_explicit=True)
    assert isinstance(square.plan(24, 40, "k"), Plan)
    assert square.plan(23, 40, "k") == "smaller than minimum_image_size"


def test_minimum_image_size_63_keeps_a_63_px_square():
    """63 x 63 / 1e6 x 1e6 is 3969.0000000000005: the exact 63 x 63 image was skipped as smaller."""
    g = geometry(resolution=64.0, resolution_type="pixel_area", minimum_image_size=63, crop=False,
                 crop_aspect="preserve")
    assert isinstance(g.plan(63, 63, "k"), Plan)
    assert g.plan(62, 63, "k") == "smaller than minimum_image_size"  # area 3906 < 3969


def test_maximum_image_size_89_keeps_an_89_px_square_as_it_is():
    """89 x 89 / 1e6 x 1e6 is 7920.999999999999: the exact 89 x 89 image was downsampled as larger than the maximum."""
    keys = dict(resolution=64.0, resolution_type="pixel_area", crop=True, crop_explicit=True)
    g, unlimited = geometry(maximum_image_size=89, target_downsample_size=80, **keys), geometry(**keys)
    assert g.plan(89, 89, "k").resize == unlimited.plan(89, 89, "k").resize
    assert g.plan(90, 89, "k").resize != unlimited.plan(90, 89, "k").resize  # area 8010 > 7921: downsampled
