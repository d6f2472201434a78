"""Helpers for the bucket tests: images of mixed shapes and sizes, and multidatabackend.json files."""
import json
import os

import numpy as np
from PIL import Image

# (file stem, width, height): three shapes at several sizes -> landscape, portrait and square buckets
MIXED = [("wide_a", 48, 32), ("wide_b", 60, 40), ("wide_c", 96, 64), ("tall_a", 32, 48), ("tall_b", 40, 60),
         ("square_a", 40, 40), ("square_b", 36, 36)]
WORDS = ["a red circle", "a blue square", "a green grass field", "a yellow sun", "a cat on a table",
         "a white boat", "a small house"]


def write_images(folder, specs=MIXED, seed=0, captions=True, ext=".png"):
    """Random RGB images (smooth enough to survive resizing) with a caption file each; returns the folder."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    for i, (stem, w, h) in enumerate(specs):
        base = rng.random((max(2, h // 8), max(2, w // 8), 3))
        img = Image.fromarray((base * 255).astype(np.uint8)).resize((w, h), Image.Resampling.BILINEAR)
        img.save(os.path.join(folder, stem + ext))
        if captions:
            with open(os.path.join(folder, stem + ".txt"), "w") as fh:
                fh.write(WORDS[i % len(WORDS)])
    return folder


def write_backend(path, entries):
    with open(path, "w") as fh:
        json.dump(entries, fh, indent=1)
    return path


def simpletuner_example(root, images, resolution=32):
    """SimpleTuner's DATALOADER.md example with paths and sizes adapted (1024 -> `resolution`, the others scaled
    alike: minimum 768 -> 3/4, maximum 2048 -> 2x, target_downsample 1024 -> 1x); its text_embeds entry local."""
    return write_backend(os.path.join(root, "multidatabackend.json"), [
        {"id": "something-special-to-remember-by", "type": "local", "instance_data_dir": images, "crop": True,
         "crop_style": "center", "crop_aspect": "square", "resolution": resolution,
         "minimum_image_size": resolution * 3 // 4, "maximum_image_size": resolution * 2, "minimum_aspect_ratio": 0.50,
         "maximum_aspect_ratio": 3.00, "target_downsample_size": resolution, "resolution_type": "pixel_area",
         "prepend_instance_prompt": False, "instance_prompt": "something to label every image",
         "only_instance_prompt": False, "caption_strategy": "textfile",
         "cache_dir_vae": os.path.join(root, "vaecache"), "repeats": 0},
        {"id": "an example backend for text embeds.", "dataset_type": "text_embeds", "default": True,
         "type": "local", "cache_dir": os.path.join(root, "textcache")}])
