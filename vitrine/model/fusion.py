"""The product side's fusion of its image and text vectors (open_clip has no such part; the
query side never uses it): a config asks for it with a top-level `fusion_cfg`."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class GatedFusion(torch.nn.Module):
    """The product vector from its image vector and its text vector, either of which may be absent.

    A per-dimension gate (from both vectors and their product) mixes the two, plus a residual
    correction. The last layers start at zero, so an untrained module is the plain average of
    the normalised vectors. A product with one input gets that input's vector unchanged: an
    image-only product is its image vector, the one "more like this" image queries use.
    """

    def __init__(self, dim: int, hidden: int = 512) -> None:
        super().__init__()
        self.hidden = torch.nn.Sequential(torch.nn.Linear(3 * dim, hidden), torch.nn.GELU())
        self.gate = torch.nn.Linear(hidden, dim)
        self.residual = torch.nn.Linear(hidden, dim)
        for layer in (self.gate, self.residual):
            torch.nn.init.zeros_(layer.weight)
            torch.nn.init.zeros_(layer.bias)

    def forward(self, image: torch.Tensor, text: torch.Tensor, has_text: torch.Tensor,
                has_image: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised (n, dim) vectors; absent inputs are rows flagged False (values unused)."""
        has_image = torch.ones_like(has_text) if has_image is None else has_image
        image = image * has_image[:, None]
        text = text * has_text[:, None]
        features = self.hidden(torch.cat([image, text, image * text], dim=-1))
        gate = torch.sigmoid(self.gate(features))
        fused = gate * image + (1 - gate) * text + self.residual(features)
        both = (has_image & has_text)[:, None]
        return F.normalize(torch.where(both, fused, image + text), dim=-1)


def create_fusion(fusion_cfg: dict) -> GatedFusion:
    return GatedFusion(int(fusion_cfg["dim"]), int(fusion_cfg.get("hidden", 512)))
