"""The converter registry: ONNX op type -> converter, and the hints for ops without one."""

from __future__ import annotations

from typing import Callable

HINTS = {
    "Upsample": "it was replaced by Resize in opset 10: re-export with opset >= 13",
    "Resize": "only nearest-neighbour resizing by integer factors is supported",
    "ConvTranspose": "express the upsampling another way (e.g. Resize nearest + Conv)",
    "If": "control flow is not imported: export with fixed shapes so that the exporter "
          "resolves the branch",
    "Loop": "control flow is not imported: unroll the loop before exporting",
    "Scan": "control flow is not imported: unroll the loop before exporting",
    "LSTM": "recurrent layers are not imported",
    "GRU": "recurrent layers are not imported",
    "RNN": "recurrent layers are not imported",
}
EVAL_MODE_HINT = "export the model in eval mode (model.eval() in PyTorch)"

Converter = Callable  # (Importer, node, inputs, attrs) -> result or list of results
CONVERTERS: dict[str, Converter] = {}


def converts(*op_types):
    def register(f):
        for op in op_types:
            CONVERTERS[op] = f
        return f
    return register


def supported_ops() -> list[str]:
    """The ONNX op types (ai.onnx domain) the importer converts."""
    return sorted(CONVERTERS)


def _out(node, i=0):
    return node.output[i] if len(node.output) > i and node.output[i] else None

