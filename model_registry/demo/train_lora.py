"""Train the demo model's LoRA adapter: `llamagen train-lora` (a few minutes on 2 CPU cores).

The same ten shapes, drawn in the "dusk" style (a darker background, `shapes.STYLES`), are
tokenised by the demo model's own VQ encoder; `peft` adds LoRA to the demo GPT's attention and
feed-forward layers (`wqkv`, `wo`, `w1`, `w2`, `w3`, the original's names) and only those are
trained, teacher-forced like the demo model (class dropout kept, so guidance still works). The
result is a PEFT adapter directory, what anyone fine-tuning the original gpt.py with peft
gets; `DEMO_ADAPTER` ships beside the demo model. Seeds are fixed.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from model_registry.demo import DEMO_MODEL
from model_registry.demo.shapes import make_dataset
from model_registry.demo.train import lr_at
from model_registry.lora import ADAPTER_WEIGHTS, TARGETS, file_sha256
from model_registry.model_dir import load_model_dir

DEMO_ADAPTER = Path(__file__).resolve().parent / "adapters" / "dusk"


@dataclass
class LoRASettings:
    seed: int = 0
    style: str = "dusk"
    images: int = 4000
    steps: int = 600
    batch: int = 64
    lr: float = 3e-3
    rank: int = 16
    alpha: float = 32

    @classmethod
    def smoke(cls) -> LoRASettings:
        return cls(images=100, steps=3, batch=8)


def train_lora(out_dir: Path, s: LoRASettings, model_dir: Path = DEMO_MODEL) -> dict:
    from peft import LoraConfig, get_peft_model

    started = time.monotonic()
    torch.manual_seed(s.seed)
    model = load_model_dir(model_dir)
    print(f"rendering {s.images} {s.style} images ...", flush=True)
    images, labels = make_dataset(s.images, seed=s.seed + 2026, size=model.image_size,
                                  style=s.style)
    encoder = model.vq_encoder(device="cpu")
    with torch.inference_mode():
        tokens = torch.cat([encoder.encode_uint8(torch.from_numpy(images[i:i + 250]))
                            .flatten(1) for i in range(0, len(images), 250)])
    labels_t = torch.from_numpy(labels)
    gpt = get_peft_model(model.load_reference(), LoraConfig(
        r=s.rank, lora_alpha=s.alpha, target_modules=list(TARGETS), lora_dropout=0.0))
    gpt.train()
    trainable = [p for p in gpt.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=s.lr, betas=(0.9, 0.95), weight_decay=0.0)
    g = torch.Generator().manual_seed(s.seed + 1)
    vocab = model.gpt.vocab_size
    losses = []
    with tqdm(total=s.steps, desc="LoRA", unit="step", dynamic_ncols=True) as bar:
        for step in range(s.steps):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, s.steps, s.lr, warmup=min(30, s.steps // 10))
            idx = torch.randint(0, len(tokens), (s.batch,), generator=g)
            x, y = tokens[idx], labels_t[idx]
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = gpt(x[:, :-1], y)
            loss = F.cross_entropy(logits.float().reshape(-1, vocab), x.reshape(-1))
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            opt.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{loss.item():.3f}")
            bar.update()
    out_dir.mkdir(parents=True, exist_ok=True)
    gpt.save_pretrained(str(out_dir))
    (out_dir / "README.md").unlink(missing_ok=True)  # peft's blank model-card template
    tail = losses[-20:]
    report = {"seconds": round(time.monotonic() - started, 1), "settings": asdict(s),
              "base_model": model.name, "base_sha256": model.gpt_sha256,
              "trainable_parameters": sum(p.numel() for p in trainable),
              "final_loss": round(sum(tail) / len(tail), 4),
              "adapter_sha256": file_sha256(out_dir / ADAPTER_WEIGHTS)}
    (out_dir / "training.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report), flush=True)
    return report
