"""The text tower on ONNX Runtime: the same network, exported once from the loaded torch model,
answering a query without PyTorch's per-operator dispatch, which is most of a short query's
time on a CPU.

`onnx` is exact (the embedding of every text equals torch's to float rounding: cosine >=
0.9999, tests/vitrine/test_model.py); `onnx-int8` adds ONNX Runtime's dynamic int8
quantisation of the weights, lossy, so it changes the model id (a different vector space for
the product texts an encoder writes with it). Exports are cached per model id and ONNX Runtime
version in the temp directory, written atomically, so processes share them. CPU only: "auto"
is onnx for an fp32 model on the CPU, torch elsewhere (CUDA kernels beat it there).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

TextRuntime = Literal["auto", "torch", "onnx", "onnx-int8"]
OPSET = 17
SPINNING = "session.intra_op.allow_spinning"


class OnnxTextTower:
    def __init__(self, path: Path, threads: int | None) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or (os.cpu_count() or 1)
        options.inter_op_num_threads = 1
        # Idle workers sleep instead of spin-waiting for the next operator: beside the shards
        # on the same cores, two spinning threads doubled the router's CPU per query and slowed
        # the fan-out by ~0.9 ms at 1M vectors (README, "The query path").
        options.add_session_config_entry(SPINNING, "0")
        self._session = onnxruntime.InferenceSession(
            str(path), options, providers=["CPUExecutionProvider"]
        )

    @classmethod
    def of(
        cls, text: torch.nn.Module, runtime: TextRuntime, model_id: str, pad_id: int,
        threads: int | None,
    ) -> OnnxTextTower:
        return cls(exported(text, runtime, model_id, pad_id), threads)

    @property
    def spins(self) -> bool:
        """Whether idle intra-op threads spin-wait (ONNX Runtime's default) or sleep."""
        try:
            return self._session.get_session_options().get_session_config_entry(SPINNING) != "0"
        except RuntimeError:  # never set: ONNX Runtime's default
            return True

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """Unnormalised embeddings (n, dim) of token ids (n, length)."""
        ids = np.ascontiguousarray(tokens.numpy(), dtype=np.int64)
        (embeddings,) = self._session.run(None, {"ids": ids})
        return torch.from_numpy(embeddings)


def exported(
    text: torch.nn.Module, runtime: TextRuntime, model_id: str, pad_id: int
) -> Path:
    """The tower's ONNX file for this runtime, exported (and quantised) once."""
    import onnxruntime

    key = hashlib.sha256(f"{model_id}|{runtime}|{onnxruntime.__version__}".encode()).hexdigest()
    directory = Path(tempfile.gettempdir()) / f"vitrine-onnx-{os.getuid()}"
    directory.mkdir(mode=0o700, exist_ok=True)
    path = directory / f"{key[:24]}.onnx"
    if path.is_file():
        return path
    with tempfile.TemporaryDirectory(dir=directory) as work:
        fp32 = Path(work) / "text.onnx"
        _export(text, fp32, pad_id)
        if runtime == "onnx-int8":
            from onnxruntime.quantization import QuantType, quantize_dynamic

            int8 = Path(work) / "text-int8.onnx"
            quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8)
            fp32 = int8
        os.replace(fp32, path)  # atomic: a concurrent loader sees no file or the whole one
    return path


def _export(text: torch.nn.Module, path: Path, pad_id: int) -> None:
    class Tower(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, ids: torch.Tensor) -> Any:
            return self.inner(ids)

    # one row padded, one not: a trace of unpadded rows alone could leave the mask out
    sample = torch.tensor([[101, 2000, 2001, 102, 0, 0, 0, 0],
                           [101, 2000, 2001, 2002, 2003, 2004, 2005, 102]], dtype=torch.int64)
    sample[0, 4:] = pad_id
    # the tracer warns about shape-dependent branches; the exported graph is checked against
    # torch for every length and padding by tests/vitrine/test_model.py
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Tower(text).eval(), (sample,), str(path), input_names=["ids"],
            output_names=["embedding"], opset_version=OPSET, dynamo=False,
            dynamic_axes={"ids": {0: "batch", 1: "length"}, "embedding": {0: "batch"}},
        )
