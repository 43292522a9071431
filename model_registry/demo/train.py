"""Train the embedded demo model: `llamagen train-demo` (about 21 minutes on 2 CPU cores).

1. Render the shapes dataset (model_registry/demo/shapes.py).
2. Train a small VQ tokenizer with the real VQ code (VQModel, a smaller VQConfig).
3. Tokenise the dataset and train a small class-conditional GPT with the real model code
   (Transformer: 2D RoPE, class dropout 0.1 for CFG), teacher-forced like the original.
4. Save both in the official checkpoint layouts and convert them with `convert`, the path
   real checkpoints take; train the judge classifier and ship it in the model directory.

Seeds are fixed; bf16 autocast on CPU keeps it inside the time budget.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from model_registry.configs import GPTConfig
from model_registry.convert import convert
from model_registry.demo.classifier import save_classifier, train_classifier
from model_registry.demo.shapes import CLASS_NAMES, IMAGE_SIZE, make_dataset, to_tensor_range
from model_registry.gpt import Transformer
from vq_decoder.vq_model import VQConfig, VQModel

DEMO_VQ = VQConfig(codebook_size=512, codebook_embed_dim=8, encoder_ch_mult=(1, 2, 2, 4),
                   decoder_ch_mult=(1, 2, 2, 4), z_channels=64, ch=32, num_res_blocks=1)
# Class dropout stays (it teaches the null class CFG needs); the other dropouts are off: this
# small model is compute-bound, not overfitting, within the time budget.
DEMO_GPT = GPTConfig(dim=192, n_layer=4, n_head=3, vocab_size=512, num_classes=len(CLASS_NAMES),
                     cls_token_num=1, block_size=(IMAGE_SIZE // DEMO_VQ.downsample) ** 2,
                     class_dropout_prob=0.1, model_type="c2i", token_dropout_p=0.0,
                     resid_dropout_p=0.0, ffn_dropout_p=0.0)


@dataclass
class TrainSettings:
    seed: int = 0
    images: int = 20000
    vq_steps: int = 500
    vq_batch: int = 32
    vq_lr: float = 1e-3
    gpt_steps: int = 1100
    gpt_batch: int = 128
    gpt_lr: float = 2e-3
    classifier_steps: int = 400

    @classmethod
    def smoke(cls) -> TrainSettings:
        return cls(images=200, vq_steps=3, vq_batch=8, gpt_steps=3, gpt_batch=16,
                   classifier_steps=3)


def lr_at(step: int, steps: int, peak: float, warmup: int = 50) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def _bar(total: int, desc: str) -> tqdm:
    return tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True, mininterval=2)


def train_vq(images: torch.Tensor, s: TrainSettings) -> VQModel:
    torch.manual_seed(s.seed)
    vq = VQModel(DEMO_VQ).train()
    opt = torch.optim.Adam(vq.parameters(), lr=s.vq_lr, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(s.seed)
    with _bar(s.vq_steps, "VQ tokenizer") as bar:
        for step in range(s.vq_steps):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, s.vq_steps, s.vq_lr)
            x = images[torch.randint(0, len(images), (s.vq_batch,), generator=g)]
            with torch.autocast("cpu", dtype=torch.bfloat16):
                rec, q = vq(x)
            rec = rec.float()
            loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x) + q.vq_loss + q.commit_loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            bar.set_postfix(loss=f"{loss.item():.4f}")
            bar.update()
    return vq.eval()


@torch.inference_mode()
def tokenize(vq: VQModel, images: torch.Tensor, batch: int = 250) -> torch.Tensor:
    out = [vq.encode(images[i: i + batch]).indices.view(min(batch, len(images) - i), -1)
           for i in range(0, len(images), batch)]
    return torch.cat(out)


def train_gpt(tokens: torch.Tensor, labels: torch.Tensor, s: TrainSettings) -> Transformer:
    torch.manual_seed(s.seed)
    gpt = Transformer(DEMO_GPT)
    # The original zero-initialises the head; training moves it.
    gpt.train()
    decay = [p for n, p in gpt.named_parameters() if p.dim() >= 2]
    rest = [p for n, p in gpt.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05},
                             {"params": rest, "weight_decay": 0.0}], lr=s.gpt_lr,
                            betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(s.seed + 1)
    with _bar(s.gpt_steps, "GPT") as bar:
        for step in range(s.gpt_steps):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, s.gpt_steps, s.gpt_lr)
            idx = torch.randint(0, len(tokens), (s.gpt_batch,), generator=g)
            x, y = tokens[idx], labels[idx]
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = gpt(x[:, :-1], y)  # predicts all image tokens from the class token
            loss = F.cross_entropy(logits.float().reshape(-1, DEMO_GPT.vocab_size),
                                   x.reshape(-1))
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(gpt.parameters(), 1.0)
            opt.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
            bar.update()
    return gpt.eval()


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / max(mse, 1e-12)))


def train_demo(out_dir: Path, work_dir: Path, s: TrainSettings) -> dict:
    started = time.monotonic()
    torch.manual_seed(s.seed)
    work_dir.mkdir(parents=True, exist_ok=True)
    print(f"rendering {s.images} training images ...", flush=True)
    images_u8, labels_np = make_dataset(s.images, seed=s.seed)
    images = to_tensor_range(images_u8)
    labels = torch.from_numpy(labels_np)

    vq = train_vq(images, s)
    tokens = tokenize(vq, images)
    usage = len(torch.unique(tokens)) / DEMO_VQ.codebook_size
    gpt = train_gpt(tokens, labels, s)

    # Official layouts: {"model": ...} for both, as the original training scripts save them.
    gpt_ckpt, vq_ckpt = work_dir / "c2i_demo.pt", work_dir / "vq_demo.pt"
    torch.save({"model": gpt.state_dict(), "steps": s.gpt_steps,
                "args": argparse.Namespace(**asdict(s))}, gpt_ckpt)
    # The tokenizer is kept in half precision: the demo model must stay under 20 MB in all.
    torch.save({"model": {k: v.half() if v.is_floating_point() else v
                          for k, v in vq.state_dict().items()}}, vq_ckpt)
    (work_dir / "gpt.json").write_text(json.dumps(DEMO_GPT.to_dict()))
    (work_dir / "vq.json").write_text(json.dumps(DEMO_VQ.to_dict()))
    (work_dir / "classes.txt").write_text("".join(f"{i}, {n}\n"
                                                  for i, n in enumerate(CLASS_NAMES)))
    model = convert(gpt_ckpt, str(work_dir / "gpt.json"), out_dir, vq_checkpoint=vq_ckpt,
                    vq_model=str(work_dir / "vq.json"), class_names=work_dir / "classes.txt",
                    name="llamagen-demo-shapes", overwrite=True)

    bar = _bar(s.classifier_steps, "classifier")
    classifier = train_classifier(images_u8, labels_np, s.classifier_steps, s.seed,
                                  progress=lambda *_: bar.update())
    bar.close()
    save_classifier(classifier, out_dir)

    held_out, held_labels = make_dataset(500 if s.images > 1000 else 50, seed=s.seed + 999)
    with torch.inference_mode():
        recon = vq(to_tensor_range(held_out))[0]
    recon_u8 = ((127.5 * recon + 128).clamp(0, 255).to(torch.uint8)
                .permute(0, 2, 3, 1).numpy())
    report = {
        "seconds": round(time.monotonic() - started, 1),
        "settings": asdict(s),
        "codebook_usage": round(usage, 3),
        "tokenizer_psnr_db": round(psnr(recon_u8, held_out), 2),
        "classifier_accuracy_real": float((classifier.predict(held_out) == held_labels).mean()),
        "classifier_accuracy_reconstructed":
            float((classifier.predict(recon_u8) == held_labels).mean()),
    }
    (out_dir / "training.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report), flush=True)
    return {"model": model, **report}
