"""Classifier models as gradserve graphs: dense layers, activations, softmax
cross-entropy, L2 regularization; logistic regression and MLPs; classifiers
imported from ONNX (OnnxModelSpec, the same interface).

A model's graph takes the data (`X`, `Y` one-hot) and the parameters as inputs
and outputs the scalar training objective `loss` and the `logits`:

    spec = ModelSpec.mlp(num_features=64, num_classes=10, hidden=(64, 64))
    graph = spec.build_graph()                    # a GraphBuilder, float32
    params = spec.init_params(np.random.default_rng(0))
    client.differentiate(graph, {**params, "X": X, "Y": one_hot(y, 10)},
                         wrt=spec.param_names, of=["loss"])

The parameters live with the caller (an SGD worker), not in the graph, so one
registered graph serves every step.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .builder import GraphBuilder, Value
from .onnx import OnnxImportError, import_into, load_model, model_inputs

DTYPE = "float32"
ACTIVATIONS = ("relu", "tanh", "sigmoid")
LOSS, LOGITS = "loss", "logits"


# --- graph helpers ---------------------------------------------------------------

def dense(g: GraphBuilder, x: Value, weight: Value, bias: Value) -> Value:
    """x @ W + b: x is [batch, in], W [in, out], b [out]."""
    return x @ weight + bias


def activation(g: GraphBuilder, x: Value, name: str) -> Value:
    """An elementwise nonlinearity by name: relu, tanh or sigmoid."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose one of {', '.join(ACTIVATIONS)}")
    return getattr(g, name)(x)


def softmax_cross_entropy(g: GraphBuilder, logits: Value, one_hot: Value) -> Value:
    """Mean over the batch of -sum_k Y_k log softmax(logits)_k; log_softmax keeps it stable."""
    log_p = g.log_softmax(logits, axis=-1)
    return -g.mean(g.sum(one_hot * log_p, axes=[-1]))


def l2_penalty(g: GraphBuilder, weights: list[Value], strength: float) -> Value:
    """strength / 2 * sum of the squared weights (the gradient adds strength * W)."""
    total = g.sum(g.square(weights[0]))
    for w in weights[1:]:
        total = total + g.sum(g.square(w))
    return (0.5 * strength) * total


def one_hot(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Integer class labels [n] -> float32 rows [n, num_classes]."""
    out = np.zeros((len(labels), num_classes), dtype=DTYPE)
    out[np.arange(len(labels)), labels] = 1.0
    return out


# --- models --------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelSpec:
    """A dense classifier: num_features -> hidden... -> num_classes.

    No hidden layers is logistic regression (softmax regression for more than
    two classes). Parameters are W1, b1, W2, b2, ... layer by layer.
    """

    num_features: int
    num_classes: int
    hidden: tuple[int, ...] = ()
    activation: str = "relu"
    l2: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
        if self.num_features < 1 or self.num_classes < 2:
            raise ValueError(f"a classifier needs >= 1 feature and >= 2 classes, got "
                             f"{self.num_features} features and {self.num_classes} classes")
        if any(h < 1 for h in self.hidden):
            raise ValueError(f"hidden layer widths must be >= 1, got {list(self.hidden)}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; "
                             f"choose one of {', '.join(ACTIVATIONS)}")
        if self.l2 < 0:
            raise ValueError(f"l2 must be >= 0, got {self.l2}")

    @classmethod
    def logistic_regression(cls, num_features: int, num_classes: int,
                            l2: float = 0.0) -> "ModelSpec":
        return cls(num_features, num_classes, (), l2=l2)

    @classmethod
    def mlp(cls, num_features: int, num_classes: int, hidden=(64,), activation: str = "relu",
            l2: float = 0.0) -> "ModelSpec":
        if not hidden:
            raise ValueError("an MLP needs at least one hidden layer (--hidden WIDTH)")
        return cls(num_features, num_classes, tuple(hidden), activation, l2)

    @property
    def widths(self) -> tuple[int, ...]:
        return (self.num_features, *self.hidden, self.num_classes)

    @property
    def description(self) -> str:
        if not self.hidden:
            return f"logistic regression {self.num_features}-{self.num_classes}"
        return f"MLP {'-'.join(map(str, self.widths))} ({self.activation})"

    @property
    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes = {}
        for layer, (fan_in, fan_out) in enumerate(zip(self.widths, self.widths[1:]), start=1):
            shapes[f"W{layer}"] = (fan_in, fan_out)
            shapes[f"b{layer}"] = (fan_out,)
        return shapes

    @property
    def param_names(self) -> list[str]:
        return list(self.param_shapes)

    @property
    def num_params(self) -> int:
        return sum(math.prod(shape) for shape in self.param_shapes.values())

    def init_params(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Glorot-uniform weights and zero biases, float32, drawn layer by layer from `rng`."""
        params = {}
        for name, shape in self.param_shapes.items():
            if name.startswith("W"):
                limit = np.sqrt(6.0 / (shape[0] + shape[1]))
                params[name] = rng.uniform(-limit, limit, size=shape).astype(DTYPE)
            else:
                params[name] = np.zeros(shape, dtype=DTYPE)
        return params

    def build_graph(self) -> GraphBuilder:
        """Inputs X [-1, features], Y [-1, classes] (one-hot) and the parameters;
        outputs `loss` (cross-entropy plus the L2 penalty) and `logits`."""
        g = GraphBuilder()
        x = g.input("X", DTYPE, [-1, self.num_features])
        y = g.input("Y", DTYPE, [-1, self.num_classes])
        params = {name: g.input(name, DTYPE, shape) for name, shape in self.param_shapes.items()}
        layers = len(self.widths) - 1
        h = x
        for layer in range(1, layers + 1):
            h = dense(g, h, params[f"W{layer}"], params[f"b{layer}"])
            if layer < layers:
                h = activation(g, h, self.activation)
        g.output(LOGITS, h)
        loss = softmax_cross_entropy(g, h, y)
        if self.l2:
            weights = [params[f"W{layer}"] for layer in range(1, layers + 1)]
            loss = loss + l2_penalty(g, weights, self.l2)
        g.output(LOSS, loss)
        return g


# --- imported models -------------------------------------------------------------------

class OnnxModelSpec:
    """A classifier imported from ONNX (gradserve.client.onnx, parameters="inputs").

    The model's first input takes the features, reshaped to that input's shape with a
    free batch dimension; its first output is the logits [batch, classes]; the graph adds
    softmax cross-entropy (and the L2 penalty on weights of rank >= 2). The parameters
    are the model's floating initializers, and training starts from their values.
    """

    widths = None
    activation = None

    def __init__(self, path, num_features: int, num_classes: int, l2: float = 0.0):
        self.path = Path(path)
        self.proto = load_model(self.path)
        self.sha256 = hashlib.sha256(self.proto.SerializeToString(deterministic=True)).hexdigest()
        inputs = model_inputs(self.proto)
        if not inputs or not self.proto.graph.output:
            raise OnnxImportError(f"{self.path}: the model needs a data input and an output")
        self.input_name, dtype, shape = inputs[0]
        if dtype != DTYPE:
            raise OnnxImportError(f"{self.path}: input '{self.input_name}' is {dtype}; "
                                  f"training takes {DTYPE} features")
        sample = shape[1:]
        if not shape or None in sample:
            raise OnnxImportError(f"{self.path}: input '{self.input_name}' has shape "
                                  f"{_dims(shape)}; training needs a batch dimension first and "
                                  "fixed sizes after it")
        self.sample_shape = tuple(sample)
        if math.prod(sample) != num_features:
            raise OnnxImportError(
                f"{self.path}: input '{self.input_name}' takes {_dims(shape)}, "
                f"{math.prod(sample)} features per sample; the data set has {num_features}")
        if l2 < 0:
            raise ValueError(f"l2 must be >= 0, got {l2}")
        self.num_features, self.num_classes, self.l2 = num_features, num_classes, l2
        self._graph, self._imported = self._build()

    def _build(self):
        g = GraphBuilder()
        x = g.input("X", DTYPE, [-1, self.num_features])
        y = g.input("Y", DTYPE, [-1, self.num_classes])
        shaped = g.reshape(x, [-1, *self.sample_shape], name="X/reshape")
        imported = import_into(g, self.proto, {self.input_name: (shaped, (None,) +
                                                                 self.sample_shape)},
                               taken=("X", "Y", "X/reshape", LOSS, LOGITS))
        name = imported.outputs[0]
        shape = [None if d == -1 else d for d in imported.output_shapes[name]]
        if len(shape) != 2 or shape[1] != self.num_classes:
            raise OnnxImportError(
                f"{self.path}: the first output '{name}' is {_dims(shape)}; training needs "
                f"logits [batch, {self.num_classes}] for the data set's classes")
        out = imported.values[name]
        logits = out if out.name == LOGITS else g.cast(out, DTYPE, name=LOGITS)
        g.output(logits)
        loss = softmax_cross_entropy(g, logits, y)
        if self.l2:
            weights = [imported.values[n] for n, a in imported.parameters.items() if a.ndim >= 2]
            if weights:
                loss = loss + l2_penalty(g, weights, self.l2)
        g.output(LOSS, loss)
        return g, imported

    @property
    def description(self) -> str:
        return f"ONNX model {self.path.name} (sha256 {self.sha256[:12]})"

    @property
    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: a.shape for name, a in self._imported.parameters.items()}

    @property
    def param_names(self) -> list[str]:
        return list(self._imported.parameters)

    @property
    def num_params(self) -> int:
        return self._imported.num_parameters

    def init_params(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """The model's own initializer values (the exported weights), float32 copies."""
        return {name: np.array(a, dtype=DTYPE) for name, a in self._imported.parameters.items()}

    def build_graph(self) -> GraphBuilder:
        return self._graph


def _dims(shape) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"
