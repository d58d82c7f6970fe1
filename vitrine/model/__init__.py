"""The model: open_clip dual encoders, loaded from a spec and used to encode.

A model is data (`ModelSpec`: an open_clip architecture, weights and a seed); every part goes
through open_clip's own factory. One module per concern:

- `spec`: the spec, the model id it names and the product text;
- `fusion`: the product side's gated fusion of image and text vectors;
- `encoder`: `DualEncoder`, encoding on one device in its serving precision;
- `loading`: `load_dual_encoder`, what open_clip cannot resolve on its own;
- `checkpoints`: the delta checkpoints `vitrine train` writes (vitrine/training/).
"""

from vitrine.model.checkpoints import DELTA_FORMAT, save_delta
from vitrine.model.encoder import MAX_BATCH, DualEncoder
from vitrine.model.fusion import GatedFusion
from vitrine.model.loading import load_dual_encoder
from vitrine.model.spec import (
    MODEL_CONFIG_DIR,
    OFFLINE,
    WEIGHTS_DIR,
    ModelSpec,
    checkpoint_path,
    product_text,
)

__all__ = [
    "DELTA_FORMAT", "MAX_BATCH", "MODEL_CONFIG_DIR", "OFFLINE", "WEIGHTS_DIR", "DualEncoder",
    "GatedFusion", "ModelSpec", "checkpoint_path", "load_dual_encoder", "product_text",
    "save_delta",
]
