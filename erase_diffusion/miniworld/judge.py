"""The independent judge: a small CNN (not CLIP) that labels an image's shape, colour and style.

It never sees CLIP or the diffusion model while it trains, so it measures generations without sharing their
mistakes. Saved and loaded with huggingface_hub's ``PyTorchModelHubMixin`` (``model.safetensors`` + ``config.json``).
"""

from __future__ import annotations

import torch
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from .domain import COLOURS, SHAPES, STYLES

HEADS = {"shape": SHAPES, "colour": tuple(COLOURS), "style": STYLES}


class Judge(nn.Module, PyTorchModelHubMixin):
    def __init__(self, width: int = 16):
        super().__init__()

        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.SiLU(), nn.MaxPool2d(2))

        self.features = nn.Sequential(
            block(3, width), block(width, 2 * width), block(2 * width, 4 * width), block(4 * width, 4 * width),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.heads = nn.ModuleDict({name: nn.Linear(4 * width, len(labels)) for name, labels in HEADS.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """images: (B, 3, 64, 64) in [-1, 1] → logits per head."""
        h = self.features(images)
        return {name: head(h) for name, head in self.heads.items()}

    @torch.no_grad()
    def label(self, images: torch.Tensor, batch_size: int = 256) -> dict[str, torch.Tensor]:
        """Predicted class index per head, for any number of images."""
        self.eval()
        out = {name: [] for name in HEADS}
        for i in range(0, len(images), batch_size):
            for name, logits in self(images[i : i + batch_size].float()).items():
                out[name].append(logits.argmax(-1))
        return {name: torch.cat(v) for name, v in out.items()}

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features: the feature space this project computes FID/KID in (no Inception offline)."""
        return self.features(images.float())
