"""fewstep.data.record: what a checkpoint records of its data, and the changes a resume names."""
import hashlib

from fewstep.data.backends import ImageEntry
from fewstep.data.buckets import Plan
from fewstep.data.dataset import Sample, build_layout
from fewstep.data.record import SHOWN, changes_warning, data_changes, data_record, resume_warning
from fewstep.data.table import SampleTable


def _sample(name, entry, size=(32, 32), crop=(0, 0), captions=()):
    return Sample(f"/d/{entry}/{name}.png", f"a photo of {name}", list(captions), entry,
                  Plan(size, (size[0] + 8, size[1]), crop, (400, 300)), hashlib.md5(name.encode()).hexdigest())


def _record(tmp_path, name, samples, entries=None, seed=7, global_batch=2):
    entries = entries or [ImageEntry("photos", "/d/0", 32), ImageEntry("art", "/d/1", 32)]
    table = SampleTable.written(str(tmp_path / name), samples)
    return data_record(_Data(table, build_layout(table, entries)), seed, "auto-weighting", global_batch)


class _Data:
    """What `data_record` reads of a CachedDataset: its samples, its layout and its length."""

    def __init__(self, samples, layout):
        self.samples, self.layout = samples, layout

    def __len__(self):
        return len(self.samples)


BASE = [_sample(f"p{i}", 0) for i in range(4)] + [_sample(f"a{i}", 1, size=(48, 32)) for i in range(3)]


def test_the_same_data_has_the_same_record_and_no_changes(tmp_path):
    first, again = _record(tmp_path, "a", BASE), _record(tmp_path, "b", list(BASE))
    assert first == again and data_changes(first, again) == []
    assert set(first["buckets"]) == {"photos|32x32", "art|48x32"}


def test_an_image_added_to_one_entry_is_named_and_the_other_entry_is_unchanged(tmp_path):
    """The added image shifts the other entry's dataset indices: its record does not change with them."""
    before = _record(tmp_path, "a", BASE)
    after = _record(tmp_path, "b", [_sample("p-new", 0)] + BASE)  # first in the table: every index shifts
    assert after["buckets"]["art|48x32"] == before["buckets"]["art|48x32"]
    assert data_changes(before, after) == ["entry 'photos': 4 -> 5 images"]


def test_the_same_count_of_other_images_crops_or_captions_is_named(tmp_path):
    before = _record(tmp_path, "a", BASE)
    for name, changed in (("image", _sample("p-other", 0)), ("crop", _sample("p0", 0, crop=(3, 0))),
                          ("captions", _sample("p0", 0, captions=["one", "two"]))):
        after = _record(tmp_path, name, [changed] + BASE[1:])
        assert data_changes(before, after) == ["entry 'photos': other images, crops or caption counts (as many "
                                               "images)"], name


def test_buckets_entries_and_settings_are_named(tmp_path):
    before = _record(tmp_path, "a", BASE)
    moved = [_sample(f"p{i}", 0, size=(40, 32)) for i in range(4)] + BASE[4:]
    assert data_changes(before, _record(tmp_path, "b", moved)) == [
        "entry 'photos': buckets 32x32 -> 40x32 (resolution or crop settings)"]
    entries = [ImageEntry("photos", "/d/0", 32, repeats=2, probability=0.5), ImageEntry("sketches", "/d/1", 32)]
    changes = data_changes(before, _record(tmp_path, "c", BASE, entries=entries, seed=8, global_batch=4))
    assert changes == ["seed 7 -> 8", "global batch (train_batch_size x ranks) 2 -> 4", "entry 'sketches' is new",
                       "entry 'art' is gone", "entry 'photos': probability 1 -> 0.5", "entry 'photos': repeats 0 -> 2"]


def test_reordered_entries_are_named(tmp_path):
    """A slot's entry is drawn by cumulative weight in the entries' order: another order draws other samples."""
    before = _record(tmp_path, "a", BASE)
    swapped = [ImageEntry("art", "/d/1", 32), ImageEntry("photos", "/d/0", 32)]
    samples = [_sample(s.image_path.rsplit("/", 1)[1][:-4], 1 - s.entry, size=s.plan.target) for s in BASE]
    after = _record(tmp_path, "b", samples, entries=swapped)
    assert after["buckets"] == before["buckets"]
    assert data_changes(before, after) == ["entries reordered: photos, art -> art, photos"]


def test_the_warning_names_a_few_changes_and_counts_the_rest():
    changes = [f"entry 'e{i}' is new" for i in range(SHOWN + 3)]
    line = changes_warning("step-4", changes)
    assert line.startswith("the data differ from step-4's (entry 'e0' is new;") and "; and 3 more)" in line
    assert f"'e{SHOWN}'" not in line


def test_a_checkpoint_without_a_record_says_nothing():
    assert data_changes(None, {"seed": 1}) == [] and data_changes({}, {"seed": 1}) == []
    assert resume_warning({"seed": 1}, {"seed": 1}, [], "/runs/a/checkpoints/step-8/") is None
    assert resume_warning({"seed": 1}, {"seed": 2}, [], "/runs/a/checkpoints/step-8/").startswith(
        "the data differ from step-8's (seed 1 -> 2)")


def test_a_checkpoint_without_a_record_names_the_resolution_fewstep_stopped_overriding(tmp_path):
    """Before 2026-12-07 a config's resolution replaced every entry's own; it is now their default."""
    from fewstep.data.backends import load_data_config
    from fewstep.data.record import unrecorded_changes
    from fewstep_testing import write_dataset

    backend = write_dataset(str(tmp_path), n=1)  # its entry sets resolution 32
    entries = load_data_config(backend, {"resolution": 48}).images
    assert [c.split(":")[1] for c in unrecorded_changes(entries)] == [
        " its own resolution 32, where the config's 48 replaced it before 2026-12-07"]
    assert unrecorded_changes(load_data_config(backend, {"resolution": 32}).images) == []
    assert unrecorded_changes(load_data_config(backend).images) == []
