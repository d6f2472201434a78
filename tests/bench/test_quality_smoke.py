"""The method-quality benchmark (bench/quality): its measuring instruments, and a smoke run end to end.

The smoke run trains every model for a few steps at tiny sizes and asserts that every artefact exists and every metric
is finite; it asserts nothing about quality.
"""
import importlib.util
import itertools
import json
import math
import os

import numpy as np
import pytest
import torch

from fewstep_testing import PY, REPO, run

QUALITY = os.path.join(REPO, "bench", "quality")


def _load(name):
    """Import bench/quality/<name>.py under a unique module name (the folder is scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_quality_{name}", os.path.join(QUALITY, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ---------------------------------------------------------------------------------------------------------------------
# instruments


def test_frechet_distance_matches_closed_form_for_commuting_covariances():
    feats = _load("features")
    rng = np.random.default_rng(0)
    d = 12
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    a, b = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    mu_a, mu_b = rng.standard_normal(d), rng.standard_normal(d)
    cov_a, cov_b = (q * a) @ q.T, (q * b) @ q.T  # same eigenvectors: FD = |dmu|^2 + sum (sqrt a - sqrt b)^2
    expected = ((mu_a - mu_b) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert feats.frechet_distance(mu_a, cov_a, mu_b, cov_b) == pytest.approx(expected, rel=1e-9)
    assert feats.frechet_distance(mu_a, cov_a, mu_a, cov_a) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="shape mismatch"):
        feats.frechet_distance(mu_a, cov_a, mu_b[:3], cov_b)


def test_diversity_is_mean_pairwise_distance_ratio():
    feats = _load("features")
    rng = np.random.default_rng(1)
    x = rng.standard_normal((7, 5))
    brute = np.mean([np.linalg.norm(x[i] - x[j]) for i, j in itertools.combinations(range(7), 2)])
    assert feats.mean_pairwise_distance(x) == pytest.approx(brute, rel=1e-12)
    labels = np.array([0, 0, 0, 1, 1, 1, 1])
    # scaling every generated feature by 0.5 halves every pairwise distance: ratio 0.5 in each class
    assert feats.diversity_ratio(0.5 * x, labels, x, labels) == pytest.approx(0.5, rel=1e-12)
    # a collapsed class (all rows equal) has diversity 0
    collapsed = np.repeat(x[:1], 7, axis=0)
    assert feats.diversity_ratio(collapsed, labels, x, labels) == pytest.approx(0.0, abs=1e-12)


def test_pixel_vae_is_identity_through_from_pretrained(tmp_path):
    """The benchmark's latent path: the saved-and-reloaded AutoencoderKL maps 2x-nearest-upsampled grey images to
    their 8x8 originals (2x2 average) and back, through fewstep's adapter (with shift/scale normalisation)."""
    from diffusers import AutoencoderKL

    from fewstep.models import get_adapter

    pp = _load("pixel_pipeline")
    pp.pixel_vae(shift_factor=-0.4, scaling_factor=1.3).save_pretrained(str(tmp_path / "vae"))
    vae = AutoencoderKL.from_pretrained(str(tmp_path / "vae"))
    small = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    pixels = small.repeat_interleave(2, 2).repeat_interleave(2, 3).expand(3, 3, 16, 16)
    adapter = get_adapter("flux")
    lat = adapter.encode_images(vae, pixels)
    expected = (small - (-0.4)) * 1.3
    assert lat.shape == (3, 1, 8, 8)
    assert ((lat - expected).norm() / expected.norm()).item() < 1e-4
    back = adapter.decode_latents(vae, lat)
    assert ((back - pixels).norm() / pixels.norm()).item() < 1e-4


def test_glance_lists_are_the_teachers_50_step_grid():
    """Steps 1,3,5,7,9 / 11,21,31,41,50 of linspace(1, 1/50, 50): sigma_i = 1 - (i - 1) / 50."""
    run_mod = _load_run()
    slow, fast = run_mod.glance_lists()
    assert slow == pytest.approx([1 - (i - 1) / 50 for i in (1, 3, 5, 7, 9)], abs=1e-12)
    assert fast == pytest.approx([1 - (i - 1) / 50 for i in (11, 21, 31, 41, 50)], abs=1e-12)


def test_variant_spec_parses_into_base_and_overrides():
    run_mod = _load_run()
    name, (base, over, label) = run_mod.parse_variant(
        "twinflow_lora_x=twinflow_lora:max_train_steps=10,twinflow_enhanced_ratio=0,twinflow_adversarial_enabled=false")
    assert (name, base) == ("twinflow_lora_x", "twinflow_lora")
    assert over == {"max_train_steps": 10, "twinflow_enhanced_ratio": 0, "twinflow_adversarial_enabled": False}
    assert "max_train_steps 10" in label
    for bad in ("no_equals_sign", "glance_x=teacher:learning_rate=1", "twinflow_x=glance:learning_rate=1"):
        with pytest.raises(SystemExit, match="--variant"):
            run_mod.parse_variant(bad)


def test_digit_captions_are_distinct_known_tokens():
    digits = _load("digits")
    from fewstep.models.tiny import word_tokenizer

    for tok in (word_tokenizer("clip", 16), word_tokenizer("t5", 8)):
        digits.check_captions(tok)


def _load_run():
    import sys

    sys.path.insert(0, QUALITY)
    try:
        return _load("run")
    finally:
        sys.path.remove(QUALITY)


# ---------------------------------------------------------------------------------------------------------------------
# end to end


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("quality")
    # one ablation per method (each is its base run's training with other options: test_every_ablation_config...)
    run([PY, os.path.join("bench", "quality", "run.py"), "--smoke", "--out", str(out),
         "--ablations", *SMOKE_ABLATIONS], timeout=300)
    return str(out)


SMOKE_ABLATIONS = ("twinflow_full_frozen", "glance_10img")
ROWS = ["teacher-1", "teacher-2", "teacher-4", "teacher-10", "teacher-50", "teacher-cfg1.5-50",
        "teacher-10-shift0.6", "teacher-10-shift3.0", "teacher-glance-schedule-10", "twinflow-lora-1",
        "twinflow-lora-2", "twinflow-lora-4", "twinflow-full-1", "twinflow-full-2", "twinflow-full-4", "glance-10",
        "twinflow-full-frozen-1", "glance-10img-10"]
RUNS = {"teacher", "twinflow_lora", "twinflow_full", "glance", *SMOKE_ABLATIONS}


def test_every_ablation_config_differs_from_its_base_run_in_the_option_it_names(tmp_path):
    run_mod = _load_run()
    base, ablations = run_mod.distil_configs(run_mod.SMOKE, str(tmp_path)), run_mod.ablation_configs(
        run_mod.SMOKE, str(tmp_path))
    expected = {"twinflow_full_cfg": ("twinflow_full", {"twinflow_enhanced_ratio"}),
                "twinflow_full_noadv": ("twinflow_full", {"twinflow_adversarial_enabled"}),
                "twinflow_full_frozen": ("twinflow_full", {"ema_decay", "twinflow_enhanced_ratio"}),
                "glance_10img": ("glance", {"data_backend_config"}),
                "glance_lr1e4": ("glance", {"learning_rate"}),
                "glance_uniform": ("glance", {"glance_slow_timesteps", "glance_fast_timesteps", "learning_rate"})}
    assert set(ablations) == set(expected)
    for name, (src, keys) in expected.items():
        a, b = ablations[name], base[src]
        assert {k for k in a if a[k] != b.get(k)} == keys | {"output_dir"}, name
        assert a["output_dir"] == str(tmp_path / name)
    uniform = ablations["glance_uniform"]  # the teacher's plain 10 steps
    assert uniform["glance_slow_timesteps"] + uniform["glance_fast_timesteps"] == pytest.approx(
        [1 - i / 10 for i in range(10)], abs=1e-12)
    assert ablations["glance_10img"]["data_backend_config"] == str(tmp_path / "data" / "ten.json")
    assert set(run_mod.ablation_configs(run_mod.SMOKE, str(tmp_path), ["glance_10img"])) == {"glance_10img"}


def test_smoke_trains_every_model_with_the_real_exports(smoke):
    assert os.path.isfile(os.path.join(smoke, "teacher", "transformer", "diffusion_pytorch_model.safetensors"))
    assert os.path.isfile(os.path.join(smoke, "teacher_pipeline", "transformer", "config.json"))
    lora = os.path.join(smoke, "twinflow_lora")
    assert os.path.isfile(os.path.join(lora, "pytorch_lora_weights.safetensors"))
    assert os.path.isfile(os.path.join(lora, "anystep_embeddings.safetensors"))
    assert os.path.isfile(os.path.join(smoke, "twinflow_full", "transformer", "anystep_embeddings.safetensors"))
    for phase in ("glance-slow", "glance-fast"):
        assert os.path.isfile(os.path.join(smoke, "glance", phase, "pytorch_lora_weights.safetensors"))
    cfg = json.load(open(os.path.join(smoke, "twinflow_lora.config.json")))
    assert cfg["twinflow_adversarial_enabled"] is True and cfg["use_ema"] is True
    assert cfg["pretrained_model_name_or_path"].endswith("teacher_pipeline")
    times = json.load(open(os.path.join(smoke, "times.json")))
    assert set(times) == RUNS
    assert all(t["wall_s"] > 0 and t["cpu_s"] > 0 for t in times.values())
    # the ablations trained are written as the configs checked above
    for name, base, keys in (("twinflow_full_frozen", "twinflow_full", {"ema_decay", "twinflow_enhanced_ratio"}),
                             ("glance_10img", "glance", {"data_backend_config"})):
        a, b = (json.load(open(os.path.join(smoke, f"{n}.config.json"))) for n in (name, base))
        assert {k for k in a if a[k] != b.get(k)} == keys | {"output_dir"}, name
    ten = [f for f in os.listdir(os.path.join(smoke, "data", "ten")) if f.endswith(".txt")]
    assert sorted(open(os.path.join(smoke, "data", "ten", f)).read() for f in ten) == sorted(
        f"a drawing of {w}" for w in ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"))
    assert len([f for f in os.listdir(os.path.join(smoke, "data", "one")) if f.endswith(".png")]) == 1


def test_smoke_metrics_are_finite_and_reported(smoke):
    results = os.path.join(smoke, "results")
    text = open(os.path.join(results, "RESULTS.md")).read()
    assert "SMOKE RUN" in text
    for row in ROWS + ["real-train"]:
        r = json.load(open(os.path.join(smoke, "eval", f"{row}.json")))
        for key in ("fd", "accuracy", "diversity"):
            assert math.isfinite(r[key]), (row, key, r[key])
        assert 0.0 <= r["accuracy"] <= 1.0 and r["fd"] >= -1e-6 and r["n"] > 0
        assert os.path.getsize(os.path.join(results, f"{row}.png" if row != "real-train" else "real.png")) > 0
    for method in ("TwinFlow lora", "TwinFlow full", "Glance", "teacher (Euler)", "ablation: TwinFlow full",
                   "ablation: Glance"):
        assert method in text


def test_sampler_modes_and_glance_few_steps_smoke(smoke, tmp_path):
    """bench/quality/sampler_modes.py and glance_few_steps.py --smoke, on the smoke run's teacher and TwinFlow full
    fine-tune: every sampler row at 1 and 2 NFE plus the many-step preset, the any-step ablation at 1 NFE, and one
    Glance pair at 4 NFE trained through launcher/train.py on the teacher's plain 4-step grid split 2 + 2; every
    metric finite."""
    teacher = os.path.join(smoke, "teacher_pipeline")
    modes = tmp_path / "modes"
    run([PY, os.path.join("bench", "quality", "sampler_modes.py"), "--smoke", "--run",
         os.path.join(smoke, "twinflow_full"), "--full", "--teacher", teacher, "--nfe", "1", "2", "--noises", "1",
         "--out", str(modes)], timeout=300)
    report = json.load(open(modes / "sampler_modes.json"))
    got = {(r["mode"].split(",")[0], r["sampler"].get("stochastic_ratio"), r["nfe"]) for r in report["rows"]}
    expected = {("few", 1.0, 1), ("mul", 1.0, 1)} | {(tt, st, 2) for tt in ("few", "any", "mul") for st in (1.0, 0.0)}
    assert got == expected | {("many-step preset: any", 0.0, 30)}
    assert all(math.isfinite(r["fd_mean"]) and 0.0 <= r["accuracy"] <= 1.0 for r in report["rows"])
    assert report["smoke"] and "SMOKE RUN" in (modes / "sampler_modes.md").read_text()
    run([PY, os.path.join("bench", "quality", "sampler_modes.py"), "--smoke", "--run",  # the README's ablation
         os.path.join(smoke, "twinflow_full"), "--full", "--teacher", teacher, "--nfe", "1", "--noises", "1",
         "--out", str(modes), "--without-anystep"], timeout=300)
    report = json.load(open(modes / "anystep_ablation.json"))
    assert [(r["mode"], r["sampler"]) for r in report["rows"]] == [
        ("default sampler, with the any-step embeddings", {}),
        ("default sampler, without them (the weights alone)", {"anystep_embeddings": False})]
    assert all(math.isfinite(r["fd_mean"]) for r in report["rows"])

    few = tmp_path / "few"
    run([PY, os.path.join("bench", "quality", "glance_few_steps.py"), "--smoke", "--teacher", teacher, "--nfe", "4",
         "--noises", "1", "--out", str(few)], timeout=300)
    report = json.load(open(few / "glance_few_steps.json"))
    assert [(r["row"].split(",")[0], r["nfe"]) for r in report["rows"]] == [
        ("teacher", 4), ("Glance 2 Slow + 2 Fast", 4)]
    assert all(math.isfinite(r["fd_mean"]) for r in report["rows"])
    cfg = json.load(open(few / "glance-4-one-lr0.0005.config.json"))
    assert cfg["glance_slow_timesteps"] == pytest.approx([1.0, 0.75])
    assert cfg["glance_fast_timesteps"] == pytest.approx([0.5, 0.25])
    for phase in ("glance-slow", "glance-fast"):
        assert (few / "glance-4-one-lr0.0005" / phase / "pytorch_lora_weights.safetensors").is_file()


def test_diff2flow_smoke_runs_end_to_end_with_finite_metrics(tmp_path):
    """bench/quality/diff2flow.py --smoke: SDXL-layout epsilon and v teachers (DDPM loop), TwinFlow diff2flow students
    through launcher/train.py, every row sampled through a stock StableDiffusionXLPipeline; results stay in --out."""
    out = tmp_path / "d2f"
    results_md = os.path.join(QUALITY, "RESULTS.md")
    before = open(results_md).read()
    run([PY, os.path.join("bench", "quality", "diff2flow.py"), "--smoke", "--out", str(out)], timeout=240)
    assert open(results_md).read() == before  # smoke results go to <out>/results, never into bench/quality
    rows = ["real-train"] + [f"teacher-{k}-{n}" for k in ("eps", "v") for n in (1, 2, 4, 10, 50)] + [
        f"twinflow-{k}-{n}" for k in ("eps", "v") for n in (1, 2, 4)]
    for row in rows:
        r = json.load(open(out / "eval" / f"{row}.json"))
        assert len(r["fd"]) == 3 and all(math.isfinite(x) and x >= -1e-6 for x in r["fd"]), row
        assert math.isfinite(r["fd_mean"]) and 0.0 <= r["accuracy"] <= 1.0, row
        assert r["diversity"] is None or math.isfinite(r["diversity"]), row
        png = out / "results" / ("d2f-real.png" if row == "real-train" else f"d2f-{row}.png")
        assert png.stat().st_size > 0
    for k, pred in (("eps", "epsilon"), ("v", "v_prediction")):
        sched = json.load(open(out / f"teacher_{k}" / "scheduler" / "scheduler_config.json"))
        assert sched["prediction_type"] == pred
        cfg = json.load(open(out / f"student-{k}.config.json"))
        assert cfg["model_family"] == "sdxl" and cfg["diff2flow_enabled"] and cfg["prediction_type"] == pred
        assert (out / f"student_{k}" / "unet" / "anystep_embeddings.safetensors").is_file()
    vae = json.load(open(out / "teacher_eps" / "vae" / "config.json"))
    assert vae["shift_factor"] is None  # the pixel mean lives inside the VAE: stock pipeline and adapter agree
    text = (out / "results" / "RESULTS.md").read_text()
    assert "<!-- diff2flow:begin -->" in text and "<!-- diff2flow:end -->" in text and "SMOKE" in text


def test_twinflow_training_report_means_over_training_seeds(tmp_path):
    """bench/quality/twinflow_training.py: finished runs are found per training seed (`<variant>.seed<k>`), each gets
    its row, and a variant with several seeds gets the seeds' mean; the ordering flag is FD(4) <= FD(2) <= FD(1)."""
    import sys

    sys.path.insert(0, QUALITY)
    try:
        tt = _load("twinflow_training")
    finally:
        sys.path.remove(QUALITY)
    for d in ("full-4x", "full-4x.seed1", "full-4x.seed2", "lora-4x", "lora-4x.seedx"):
        os.makedirs(tmp_path / d / "transformer")
    for d in ("full-4x", "full-4x.seed2", "lora-4x"):  # full-4x.seed1 has no export: unfinished
        (tmp_path / d / "transformer" / "fewstep_run.json").write_text("{}")
    assert tt.finished_runs(str(tmp_path)) == [("full-4x", 0), ("full-4x", 2), ("lora-4x", 0)]
    assert tt.run_name("full-4x", 0) == "full-4x" and tt.run_name("full-4x", 3) == "full-4x.seed3"

    fds = {(0, 1): 30.0, (0, 2): 26.0, (0, 4): 25.0, (2, 1): 28.0, (2, 2): 27.5, (2, 4): 27.9}
    results = [{"variant": "full-4x", "seed": s, "label": "4x", "full": True, "nfe": n, "fd_mean": fd, "fd_std": 0.5,
                "cpu_s": 60.0} for (s, n), fd in fds.items()]
    teacher = {"fd_mean": 20.0, "fd_std": 1.0}
    tt.write_report(str(tmp_path), 3, teacher, results)
    lines = (tmp_path / "twinflow_training.md").read_text().splitlines()
    rows = [line for line in lines if line.startswith("| 4x") or line.startswith("| **4x")]
    assert len(rows) == 3
    assert rows[0].split(" | ")[5] == "yes" and rows[1].split(" | ")[5] == "no"  # 25 <= 26 <= 30; 27.9 > 27.5
    mean_cells = rows[2].split(" | ")
    assert mean_cells[1] == "2 seeds"
    assert mean_cells[2] == f"{np.mean([30.0, 28.0]):.2f} +- {np.std([30.0, 28.0]):.2f}"
    assert mean_cells[6] == f"{np.mean([30.0, 28.0]) / 20.0:.2f}x"
    assert json.load(open(tmp_path / "twinflow_training.json"))["rows"] == results
