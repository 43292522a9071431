"""The embedded demo model: it ships, loads, generates through vLLM and draws what is asked."""

from __future__ import annotations

import json

import pytest

from model_registry.demo import DEMO_MODEL
from model_registry.model_dir import load_model_dir

from .helpers import run_cli


def test_demo_model_is_committed_and_small():
    model = load_model_dir(DEMO_MODEL)
    size = sum(p.stat().st_size for p in DEMO_MODEL.rglob("*") if p.is_file())
    assert size < 20 * 2**20, size
    assert model.gpt.head_dim >= 32 and model.grid_size >= 8
    assert model.vq is not None and len(model.class_names) == model.gpt.num_classes >= 10
    assert model.resolve_label("Red Circle") == 0


@pytest.fixture(scope="module")
def demo_report(engine_factory):
    from bench.demo_eval import evaluate_demo

    model = load_model_dir(DEMO_MODEL)
    llm = engine_factory(model, max_num_seqs=200)
    return evaluate_demo(DEMO_MODEL, per_class=20, seed=0, llm=llm)  # = docs/demo_eval.json


def test_generated_images_are_recognised(demo_report):
    """The target: >= 90% at the default cfg scale (4.0) on 200 seeded images, and guidance
    better than none (docs/demo_eval.json has the shipped model's numbers)."""
    assert demo_report["accuracy_cfg"] >= 0.9, demo_report
    assert demo_report["accuracy_cfg"] > demo_report["accuracy_no_cfg"], demo_report


def test_frechet_distance_sees_the_distribution_and_has_a_floor(demo_report):
    """The demo's Fréchet distance (classifier features): the formula on known cases, then
    guided images nearer the real ones than unguided, and both above the noise floor."""
    import numpy as np

    from bench.demo_eval import frechet_distance

    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 8))
    assert abs(frechet_distance(a, a)) < 1e-6
    # Same covariance, mean moved by 1 in each of 8 dims: distance 8 (up to sampling).
    assert abs(frechet_distance(a, a + 1.0) - 8.0) < 1e-6
    # Covariance scaled by 4 (std 2): Tr(S + 4S - 2 * 2S) = Tr(S) = 8.
    assert abs(frechet_distance(a, 2 * a) - 8.0) < 0.5
    floor = demo_report["frechet_noise_floor"]
    assert floor["real_vs_real"] < demo_report["frechet_cfg"] < demo_report["frechet_no_cfg"]
    assert floor["cfg_seed_vs_seed"] < demo_report["frechet_no_cfg"], demo_report


def test_tokenizer_reconstructs(demo_report):
    assert demo_report["tokenizer_psnr_db"] > 20, demo_report


def test_generate_defaults_to_the_demo_model(tmp_path):
    out = tmp_path / "tokens.json"
    result = run_cli("generate", "--labels", "yellow star", "9", "--seed", "1", "--dtype",
                     "float32", "--tokens-out", str(out))
    assert result.returncode == 0, result.stderr
    tokens = json.loads(out.read_text())
    assert len(tokens) == 2 and all(len(t) == 64 for t in tokens)


def test_training_script_smoke_mode(tmp_path):
    from model_registry.demo.train import TrainSettings, train_demo

    report = train_demo(tmp_path / "model", tmp_path / "work", TrainSettings.smoke())
    model = load_model_dir(tmp_path / "model")
    assert model.metadata["gpt"]["layout"] == "model"  # went through the official format
    assert (tmp_path / "work" / "c2i_demo.pt").is_file()
    assert (tmp_path / "model" / "classifier" / "model.safetensors").is_file()
    assert report["seconds"] < 60


def test_previews_show_the_final_images_colours():
    """A preview decodes its rows inside a whole grid (the rest mirrored): its rows then look
    like the final image's same rows. Bounds from measurement (20 demo images, 3 seeds,
    previews at 2, 4, 6 of 8 rows; mean absolute difference in levels): mirrored 16.5-20.3,
    9.2-10.4, 4.3-4.7; the top rows decoded alone 20.5-23.4, 13.7-15.4, 7.0-7.6. Previews
    decode as the server's do, by the preview decoder (bf16 on CPUs with native bf16)."""
    import numpy as np
    import torch

    from engine.service import preview_grid, preview_rows
    from engine.settings import preview_dtype
    from model_registry.generate import generate

    model = load_model_dir(DEMO_MODEL)
    grid, ds = model.grid_size, model.image_size // model.grid_size
    tokens = generate(model.load_reference(), torch.arange(20) % 10, cfg_scale=4.0,
                      top_k=2000, generator=torch.Generator().manual_seed(0))
    decoder = model.vq_decoder(device="cpu", dtype=torch.float32)
    final = decoder.decode_uint8(tokens.view(-1, grid, grid)).numpy().astype(int)
    previews = model.vq_decoder(device="cpu", dtype=preview_dtype("auto", torch.float32))
    bounds = {2: 21.0, 4: 12.0, 6: 6.0}
    assert preview_rows(grid, 3) == list(bounds)
    for rows, bound in bounds.items():
        grids = torch.tensor([preview_grid(t, rows, grid) for t in tokens.tolist()])
        shown = previews.decode_uint8(grids.view(-1, grid, grid)).numpy()[:, : rows * ds]
        difference = np.abs(shown.astype(int) - final[:, : rows * ds]).mean()
        assert difference <= bound, (rows, difference)
