"""`llamagen eval-demo`: does the demo model draw what it is asked for? (In `bench/`: it runs
the engine, so it sits above the engine layer; the demo's training stays with the models.)

Images are generated through the real vLLM engine (fp32, seeded, the default sampling:
temperature 1, no top-k at this codebook size), decoded by the VQ decoder and classified by
the classifier shipped with the model, with guidance and without. The tokenizer's
reconstruction PSNR is measured on freshly rendered images it never saw.

Accuracy is coarse: an approximation (bf16, an fp8 KV cache, the compiled model) that
changes the images' quality a little leaves it where it is. The Fréchet distance between the
generated images and freshly rendered real ones, in the classifier's penultimate feature space
(FID's formula, with this classifier for Inception), sees the distribution move; its noise
floor, reported beside it (two independent real sets; the same model with another seed),
says how large a difference has to be to mean anything.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from engine.adapters import offline_adapter
from engine.conditions import Condition
from engine.offline import OfflineGenerator
from engine.sampling import SamplingOptions
from engine.settings import EngineSettings
from engine.vllm_api import build_llm
from model_registry.demo.classifier import load_classifier
from model_registry.demo.shapes import (
    STYLES,
    background_brightness,
    make_dataset,
    to_tensor_range,
)
from model_registry.demo.train import psnr
from model_registry.model_dir import ModelDir, load_model_dir

# Real images the generated ones are compared with (fresh renders, never trained on).
REAL_SEED, REAL_SEED_2 = 424242, 434343


def decode_all(model: ModelDir, tokens: list[list[int]], batch: int = 64) -> np.ndarray:
    decoder = model.vq_decoder(device="cpu", dtype=torch.float32)
    grid = model.grid_size
    codes = torch.tensor(tokens).view(-1, grid, grid)
    return np.concatenate([decoder.decode_uint8(codes[i: i + batch]).numpy()
                           for i in range(0, len(codes), batch)])


def sample_grid(model: ModelDir, pixels: np.ndarray, labels: list[int], per_row: int,
                path: Path, scale: int = 2) -> None:
    """One row per class, its name on the left."""
    size = model.image_size * scale
    names = model.class_names
    label_w = 120
    sheet = Image.new("RGB", (label_w + per_row * size, len(names) * size), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for c, name in enumerate(names):
        draw.text((6, c * size + size // 2 - 6), name, fill=(0, 0, 0))
        row = [p for p, label in zip(pixels, labels, strict=True) if label == c][:per_row]
        for k, image in enumerate(row):
            tile = Image.fromarray(image).resize((size, size), Image.Resampling.NEAREST)
            sheet.paste(tile, (label_w + k * size, c * size))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


def tokenizer_psnr(model: ModelDir, n: int = 200, seed: int = 12345) -> float:
    images, _ = make_dataset(n, seed=seed)
    vq = model.load_vq()
    with torch.inference_mode():
        recon = vq(to_tensor_range(images))[0]
    recon_u8 = (127.5 * recon + 128).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return psnr(recon_u8, images)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """FID's formula between two feature sets (N, D): |mu_a - mu_b|^2 + Tr(S_a + S_b -
    2 (S_a S_b)^1/2); the trace of the root is the sum of the square roots of the
    eigenvalues of S_a^1/2 S_b S_a^1/2 (symmetric, so no general matrix root is needed)."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(s_a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    middle = np.linalg.eigvalsh(root_a @ s_b @ root_a)
    cross = np.sqrt(np.clip(middle, 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * cross)


def evaluate_demo(model_dir: Path, *, per_class: int = 20, seed: int = 0,
                  cfg_scale: float | None = None, grid_out: Path | None = None,
                  llm: object | None = None, settings: EngineSettings | None = None,
                  noise_floor: bool = True,
                  negatives: list[tuple[str, str]] | None = None,
                  adapter: Path | None = None) -> dict:
    """Accuracy and the Fréchet distance to real images, with guidance (cfg_scale, default:
    the model's) and without (cfg 1.0), at the model's default sampling otherwise.
    `settings`: the engine's (default fp32, eager); `noise_floor`: also the distance
    between two real sets, and between this guided run and one with other seeds;
    `negatives`: (class, negative class) pairs, each drawn `per_class` x 10 times with and
    without the negative (`negative_effect`); `adapter`: a LoRA adapter's accuracy and style
    (`adapter_effect`)."""
    model = load_model_dir(model_dir)
    guided = SamplingOptions.resolve(model.gpt.model_type, cfg_scale=cfg_scale, seed=seed)
    classifier = load_classifier(model.path)
    labels = [c for c in range(model.gpt.num_classes) for _ in range(per_class)]
    settings = (settings or EngineSettings(dtype="float32")).model_copy(
        update={"max_num_seqs": min(256, len(labels)),
                **({"enable_lora": True} if adapter is not None else {})})
    if llm is None:
        llm = build_llm(model, settings)
    engine = OfflineGenerator(model, llm)
    report: dict = {"model": model.name, "images_per_setting": len(labels), "seed": seed,
                    "cfg_scale": guided.cfg_scale, "dtype": settings.dtype,
                    "kv_cache_dtype": settings.kv_cache_dtype,
                    "compiled": settings.enforce_eager is False}
    real = classifier.embeddings(make_dataset(len(labels), seed=REAL_SEED)[0])
    conditions = [Condition(label=label) for label in labels]
    guided_features = None
    for key, options in (("cfg", guided), ("no_cfg", guided.model_copy(update={"cfg_scale": 1.0}))):
        tokens, _ = engine.generate(conditions, options)
        pixels = decode_all(model, tokens)
        predicted = classifier.predict(pixels)
        correct = predicted == np.array(labels)
        report[f"accuracy_{key}"] = round(float(correct.mean()), 4)
        report[f"per_class_accuracy_{key}"] = {
            name: round(float(correct[np.array(labels) == c].mean()), 3)
            for c, name in enumerate(model.class_names)}
        features = classifier.embeddings(pixels)
        report[f"frechet_{key}"] = round(frechet_distance(features, real), 3)
        if key == "cfg":
            guided_features = features
            if grid_out is not None:
                sample_grid(model, pixels, labels, min(per_class, 8), grid_out)
    if noise_floor:
        other_real = classifier.embeddings(make_dataset(len(labels), seed=REAL_SEED_2)[0])
        # Image i draws with seed + i: the other run starts past this run's seeds.
        reseeded = guided.model_copy(update={"seed": seed + len(labels)})
        tokens, _ = engine.generate(conditions, reseeded)
        other_run = classifier.embeddings(decode_all(model, tokens))
        report["frechet_noise_floor"] = {
            "real_vs_real": round(frechet_distance(other_real, real), 3),
            "cfg_seed_vs_seed": round(frechet_distance(other_run, guided_features), 3),
            "cfg_other_seed_vs_real": round(frechet_distance(other_run, real), 3)}
    if adapter is not None:
        report["lora"] = adapter_effect(engine, classifier, guided, labels, adapter,
                                        settings.max_lora_rank)
    if negatives:
        report["negative"] = [negative_effect(engine, classifier, guided, name, negative,
                                              per_class * 10) for name, negative in negatives]
    report["tokenizer_psnr_db"] = round(tokenizer_psnr(model), 2)
    return report


def adapter_effect(engine: OfflineGenerator, classifier: object, options: SamplingOptions,
                   labels: list[int], path: Path, max_rank: int) -> dict:
    """A LoRA adapter on the demo model: the classifier's accuracy with and without guidance,
    and the style measure (`shapes.background_brightness`, the frame's mean value) of the
    images drawn with and without the adapter (the same seeds), beside real images of the
    day and the night style."""
    model = engine.model
    adapter = offline_adapter(model, path, max_rank)
    conditions = [Condition(label=label) for label in labels]
    result: dict = {"adapter": str(path), "sha256": adapter.info.sha256,
                    "images_per_setting": len(labels)}
    for key, opts in (("cfg", options), ("no_cfg", options.model_copy(update={"cfg_scale": 1.0}))):
        tokens, _ = engine.generate(conditions, opts, adapters=adapter)
        pixels = decode_all(model, tokens)
        predicted = classifier.predict(pixels)  # type: ignore[attr-defined]
        result[f"accuracy_{key}"] = round(float((predicted == np.array(labels)).mean()), 4)
        if key == "cfg":
            result["brightness_adapter"] = round(float(background_brightness(pixels).mean()), 1)
    base, _ = engine.generate(conditions, options)
    result["brightness_base"] = round(float(background_brightness(
        decode_all(model, base)).mean()), 1)
    for style in STYLES:
        real = make_dataset(len(labels), seed=REAL_SEED, style=style)[0]
        result[f"brightness_real_{style}"] = round(float(background_brightness(real).mean()), 1)
    return result


def negative_effect(engine: OfflineGenerator, classifier: object, options: SamplingOptions,
                    name: str, negative: str, n: int) -> dict:
    """How the classifier labels n images of class `name`, drawn with the negative class in
    the unguided stream and without it (the same seeds): the share taken for the class, for
    the negative, and for anything else."""
    model = engine.model
    label, away = model.resolve_label(name), model.resolve_label(negative)
    plain = Condition(label=label)
    result: dict = {"class": model.class_names[label], "negative": model.class_names[away],
                    "images": n, "cfg_scale": options.cfg_scale}
    for key, condition in (("without", plain),
                           ("with", plain.with_negative(Condition(label=away)))):
        tokens, _ = engine.generate([condition] * n, options)
        predicted = classifier.predict(decode_all(model, tokens))  # type: ignore[attr-defined]
        result[key] = {"as_class": round(float((predicted == label).mean()), 4),
                       "as_negative": round(float((predicted == away).mean()), 4),
                       "as_other": round(float(((predicted != label) &
                                                (predicted != away)).mean()), 4)}
    return result
