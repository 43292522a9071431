"""A small CNN that tells the demo classes apart: the judge of generated images' quality."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from model_registry.demo.shapes import CLASSES, to_tensor_range

CLASSIFIER_DIR = "classifier"


class ShapeClassifier(nn.Module):
    def __init__(self, num_classes: int = len(CLASSES)):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, 2, 1), nn.GELU(),
            nn.Conv2d(32, 64, 3, 2, 1), nn.GELU(),
            nn.Conv2d(64, 128, 3, 2, 1), nn.GELU(),
            nn.Conv2d(128, 128, 3, 1, 1), nn.GELU(),
        )
        self.head = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The penultimate layer: (N, 128) pooled features, the space the demo's Fréchet
        distance is measured in (as FID uses Inception's pool features)."""
        return self.features(x).mean(dim=(2, 3))

    @torch.inference_mode()
    def embeddings(self, images: np.ndarray, batch: int = 256) -> np.ndarray:
        """uint8 (N, H, W, 3) -> float64 (N, 128)."""
        self.eval()
        out = [self.embed(to_tensor_range(images[i: i + batch]))
               for i in range(0, len(images), batch)]
        return torch.cat(out).double().numpy()

    @torch.inference_mode()
    def predict(self, images: np.ndarray, batch: int = 256) -> np.ndarray:
        """uint8 (N, H, W, 3) -> class ids (N,)."""
        self.eval()
        out = [self(to_tensor_range(images[i: i + batch])).argmax(-1)
               for i in range(0, len(images), batch)]
        return torch.cat(out).numpy()


def train_classifier(images: np.ndarray, labels: np.ndarray, steps: int, seed: int,
                     batch: int = 64, progress=None) -> ShapeClassifier:
    torch.manual_seed(seed)
    model = ShapeClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    rng = np.random.default_rng(seed)
    x_all, y_all = to_tensor_range(images), torch.from_numpy(labels)
    model.train()
    for step in range(steps):
        idx = torch.from_numpy(rng.integers(0, len(images), batch))
        loss = F.cross_entropy(model(x_all[idx]), y_all[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if progress is not None:
            progress(step, float(loss))
    return model.eval()


def save_classifier(model: ShapeClassifier, model_dir: Path) -> None:
    (model_dir / CLASSIFIER_DIR).mkdir(parents=True, exist_ok=True)
    save_file(model.state_dict(), model_dir / CLASSIFIER_DIR / "model.safetensors")


def load_classifier(model_dir: Path) -> ShapeClassifier:
    path = model_dir / CLASSIFIER_DIR / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir} ships no classifier ({path})")
    model = ShapeClassifier()
    model.load_state_dict(load_file(path))
    return model.eval()
