from gradserve.v1 import graph_pb2 as _graph_pb2
from gradserve.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Mode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODE_UNSPECIFIED: _ClassVar[Mode]
    MODE_AUTO: _ClassVar[Mode]
    MODE_FORWARD: _ClassVar[Mode]
    MODE_REVERSE: _ClassVar[Mode]

class Sparsity(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SPARSITY_UNSPECIFIED: _ClassVar[Sparsity]
    SPARSITY_AUTO: _ClassVar[Sparsity]
    SPARSITY_DENSE: _ClassVar[Sparsity]
    SPARSITY_SPARSE: _ClassVar[Sparsity]
MODE_UNSPECIFIED: Mode
MODE_AUTO: Mode
MODE_FORWARD: Mode
MODE_REVERSE: Mode
SPARSITY_UNSPECIFIED: Sparsity
SPARSITY_AUTO: Sparsity
SPARSITY_DENSE: Sparsity
SPARSITY_SPARSE: Sparsity

class PlannerDecision(_message.Message):
    __slots__ = ("mode", "n", "m", "cost_forward", "cost_reverse", "reason", "sparsity", "nnz", "colors_forward", "colors_reverse")
    MODE_FIELD_NUMBER: _ClassVar[int]
    N_FIELD_NUMBER: _ClassVar[int]
    M_FIELD_NUMBER: _ClassVar[int]
    COST_FORWARD_FIELD_NUMBER: _ClassVar[int]
    COST_REVERSE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    SPARSITY_FIELD_NUMBER: _ClassVar[int]
    NNZ_FIELD_NUMBER: _ClassVar[int]
    COLORS_FORWARD_FIELD_NUMBER: _ClassVar[int]
    COLORS_REVERSE_FIELD_NUMBER: _ClassVar[int]
    mode: Mode
    n: int
    m: int
    cost_forward: float
    cost_reverse: float
    reason: str
    sparsity: Sparsity
    nnz: int
    colors_forward: int
    colors_reverse: int
    def __init__(self, mode: _Optional[_Union[Mode, str]] = ..., n: _Optional[int] = ..., m: _Optional[int] = ..., cost_forward: _Optional[float] = ..., cost_reverse: _Optional[float] = ..., reason: _Optional[str] = ..., sparsity: _Optional[_Union[Sparsity, str]] = ..., nnz: _Optional[int] = ..., colors_forward: _Optional[int] = ..., colors_reverse: _Optional[int] = ...) -> None: ...

class SparseIndex(_message.Message):
    __slots__ = ("shape", "rows", "cols")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    COLS_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    rows: _tensor_pb2.Tensor
    cols: _tensor_pb2.Tensor
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., rows: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., cols: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...

class RegisterGraphRequest(_message.Message):
    __slots__ = ("graph",)
    GRAPH_FIELD_NUMBER: _ClassVar[int]
    graph: _graph_pb2.Graph
    def __init__(self, graph: _Optional[_Union[_graph_pb2.Graph, _Mapping]] = ...) -> None: ...

class RegisterGraphResponse(_message.Message):
    __slots__ = ("graph_id",)
    GRAPH_ID_FIELD_NUMBER: _ClassVar[int]
    graph_id: str
    def __init__(self, graph_id: _Optional[str] = ...) -> None: ...

class EvaluateRequest(_message.Message):
    __slots__ = ("graph", "graph_id", "inputs", "keep_residuals", "stored_inputs")
    class InputsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _tensor_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...
    class StoredInputsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: StoredTensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[StoredTensor, _Mapping]] = ...) -> None: ...
    GRAPH_FIELD_NUMBER: _ClassVar[int]
    GRAPH_ID_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    KEEP_RESIDUALS_FIELD_NUMBER: _ClassVar[int]
    STORED_INPUTS_FIELD_NUMBER: _ClassVar[int]
    graph: _graph_pb2.Graph
    graph_id: str
    inputs: _containers.MessageMap[str, _tensor_pb2.Tensor]
    keep_residuals: bool
    stored_inputs: _containers.MessageMap[str, StoredTensor]
    def __init__(self, graph: _Optional[_Union[_graph_pb2.Graph, _Mapping]] = ..., graph_id: _Optional[str] = ..., inputs: _Optional[_Mapping[str, _tensor_pb2.Tensor]] = ..., keep_residuals: _Optional[bool] = ..., stored_inputs: _Optional[_Mapping[str, StoredTensor]] = ...) -> None: ...

class EvaluateResponse(_message.Message):
    __slots__ = ("outputs", "graph_id", "residuals")
    class OutputsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _tensor_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    GRAPH_ID_FIELD_NUMBER: _ClassVar[int]
    RESIDUALS_FIELD_NUMBER: _ClassVar[int]
    outputs: _containers.MessageMap[str, _tensor_pb2.Tensor]
    graph_id: str
    residuals: str
    def __init__(self, outputs: _Optional[_Mapping[str, _tensor_pb2.Tensor]] = ..., graph_id: _Optional[str] = ..., residuals: _Optional[str] = ...) -> None: ...

class DifferentiateRequest(_message.Message):
    __slots__ = ("graph", "graph_id", "inputs", "wrt", "of", "mode", "tangents", "cotangents", "request_id", "trace", "second_order", "residuals", "stored_inputs", "stored_tangents", "stored_cotangents", "store_results", "sparsity")
    class InputsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _tensor_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...
    class TangentsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _tensor_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...
    class CotangentsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _tensor_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...
    class StoredInputsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: StoredTensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[StoredTensor, _Mapping]] = ...) -> None: ...
    class StoredTangentsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: StoredTensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[StoredTensor, _Mapping]] = ...) -> None: ...
    class StoredCotangentsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: StoredTensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[StoredTensor, _Mapping]] = ...) -> None: ...
    GRAPH_FIELD_NUMBER: _ClassVar[int]
    GRAPH_ID_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    WRT_FIELD_NUMBER: _ClassVar[int]
    OF_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    TANGENTS_FIELD_NUMBER: _ClassVar[int]
    COTANGENTS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TRACE_FIELD_NUMBER: _ClassVar[int]
    SECOND_ORDER_FIELD_NUMBER: _ClassVar[int]
    RESIDUALS_FIELD_NUMBER: _ClassVar[int]
    STORED_INPUTS_FIELD_NUMBER: _ClassVar[int]
    STORED_TANGENTS_FIELD_NUMBER: _ClassVar[int]
    STORED_COTANGENTS_FIELD_NUMBER: _ClassVar[int]
    STORE_RESULTS_FIELD_NUMBER: _ClassVar[int]
    SPARSITY_FIELD_NUMBER: _ClassVar[int]
    graph: _graph_pb2.Graph
    graph_id: str
    inputs: _containers.MessageMap[str, _tensor_pb2.Tensor]
    wrt: _containers.RepeatedScalarFieldContainer[str]
    of: _containers.RepeatedScalarFieldContainer[str]
    mode: Mode
    tangents: _containers.MessageMap[str, _tensor_pb2.Tensor]
    cotangents: _containers.MessageMap[str, _tensor_pb2.Tensor]
    request_id: str
    trace: bool
    second_order: SecondOrder
    residuals: str
    stored_inputs: _containers.MessageMap[str, StoredTensor]
    stored_tangents: _containers.MessageMap[str, StoredTensor]
    stored_cotangents: _containers.MessageMap[str, StoredTensor]
    store_results: bool
    sparsity: Sparsity
    def __init__(self, graph: _Optional[_Union[_graph_pb2.Graph, _Mapping]] = ..., graph_id: _Optional[str] = ..., inputs: _Optional[_Mapping[str, _tensor_pb2.Tensor]] = ..., wrt: _Optional[_Iterable[str]] = ..., of: _Optional[_Iterable[str]] = ..., mode: _Optional[_Union[Mode, str]] = ..., tangents: _Optional[_Mapping[str, _tensor_pb2.Tensor]] = ..., cotangents: _Optional[_Mapping[str, _tensor_pb2.Tensor]] = ..., request_id: _Optional[str] = ..., trace: _Optional[bool] = ..., second_order: _Optional[_Union[SecondOrder, _Mapping]] = ..., residuals: _Optional[str] = ..., stored_inputs: _Optional[_Mapping[str, StoredTensor]] = ..., stored_tangents: _Optional[_Mapping[str, StoredTensor]] = ..., stored_cotangents: _Optional[_Mapping[str, StoredTensor]] = ..., store_results: _Optional[bool] = ..., sparsity: _Optional[_Union[Sparsity, str]] = ...) -> None: ...

class SecondOrder(_message.Message):
    __slots__ = ("vectors", "hessian", "stored_vectors")
    class VectorsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _tensor_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...
    class StoredVectorsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: StoredTensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[StoredTensor, _Mapping]] = ...) -> None: ...
    VECTORS_FIELD_NUMBER: _ClassVar[int]
    HESSIAN_FIELD_NUMBER: _ClassVar[int]
    STORED_VECTORS_FIELD_NUMBER: _ClassVar[int]
    vectors: _containers.MessageMap[str, _tensor_pb2.Tensor]
    hessian: bool
    stored_vectors: _containers.MessageMap[str, StoredTensor]
    def __init__(self, vectors: _Optional[_Mapping[str, _tensor_pb2.Tensor]] = ..., hessian: _Optional[bool] = ..., stored_vectors: _Optional[_Mapping[str, StoredTensor]] = ...) -> None: ...

class HessianBlock(_message.Message):
    __slots__ = ("wrt_a", "wrt_b", "value", "sparse")
    WRT_A_FIELD_NUMBER: _ClassVar[int]
    WRT_B_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    SPARSE_FIELD_NUMBER: _ClassVar[int]
    wrt_a: str
    wrt_b: str
    value: _tensor_pb2.Tensor
    sparse: SparseIndex
    def __init__(self, wrt_a: _Optional[str] = ..., wrt_b: _Optional[str] = ..., value: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., sparse: _Optional[_Union[SparseIndex, _Mapping]] = ...) -> None: ...

class JacobianBlock(_message.Message):
    __slots__ = ("of", "wrt", "value", "sparse")
    OF_FIELD_NUMBER: _ClassVar[int]
    WRT_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    SPARSE_FIELD_NUMBER: _ClassVar[int]
    of: str
    wrt: str
    value: _tensor_pb2.Tensor
    sparse: SparseIndex
    def __init__(self, of: _Optional[str] = ..., wrt: _Optional[str] = ..., value: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., sparse: _Optional[_Union[SparseIndex, _Mapping]] = ...) -> None: ...

class DifferentiateResponse(_message.Message):
    __slots__ = ("outputs", "jacobian", "tangents", "cotangents", "mode", "planner", "graph_id", "request_id", "trace", "gradient", "hvp", "hessian", "results_handle")
    class OutputsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _tensor_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...
    class TangentsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _tensor_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...
    class CotangentsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _tensor_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...
    class GradientEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _tensor_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...
    class HvpEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _tensor_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    JACOBIAN_FIELD_NUMBER: _ClassVar[int]
    TANGENTS_FIELD_NUMBER: _ClassVar[int]
    COTANGENTS_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    PLANNER_FIELD_NUMBER: _ClassVar[int]
    GRAPH_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TRACE_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_FIELD_NUMBER: _ClassVar[int]
    HVP_FIELD_NUMBER: _ClassVar[int]
    HESSIAN_FIELD_NUMBER: _ClassVar[int]
    RESULTS_HANDLE_FIELD_NUMBER: _ClassVar[int]
    outputs: _containers.MessageMap[str, _tensor_pb2.Tensor]
    jacobian: _containers.RepeatedCompositeFieldContainer[JacobianBlock]
    tangents: _containers.MessageMap[str, _tensor_pb2.Tensor]
    cotangents: _containers.MessageMap[str, _tensor_pb2.Tensor]
    mode: Mode
    planner: PlannerDecision
    graph_id: str
    request_id: str
    trace: Trace
    gradient: _containers.MessageMap[str, _tensor_pb2.Tensor]
    hvp: _containers.MessageMap[str, _tensor_pb2.Tensor]
    hessian: _containers.RepeatedCompositeFieldContainer[HessianBlock]
    results_handle: str
    def __init__(self, outputs: _Optional[_Mapping[str, _tensor_pb2.Tensor]] = ..., jacobian: _Optional[_Iterable[_Union[JacobianBlock, _Mapping]]] = ..., tangents: _Optional[_Mapping[str, _tensor_pb2.Tensor]] = ..., cotangents: _Optional[_Mapping[str, _tensor_pb2.Tensor]] = ..., mode: _Optional[_Union[Mode, str]] = ..., planner: _Optional[_Union[PlannerDecision, _Mapping]] = ..., graph_id: _Optional[str] = ..., request_id: _Optional[str] = ..., trace: _Optional[_Union[Trace, _Mapping]] = ..., gradient: _Optional[_Mapping[str, _tensor_pb2.Tensor]] = ..., hvp: _Optional[_Mapping[str, _tensor_pb2.Tensor]] = ..., hessian: _Optional[_Iterable[_Union[HessianBlock, _Mapping]]] = ..., results_handle: _Optional[str] = ...) -> None: ...

class Trace(_message.Message):
    __slots__ = ("nodes", "mode")
    NODES_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedCompositeFieldContainer[NodeTrace]
    mode: Mode
    def __init__(self, nodes: _Optional[_Iterable[_Union[NodeTrace, _Mapping]]] = ..., mode: _Optional[_Union[Mode, str]] = ...) -> None: ...

class NodeTrace(_message.Message):
    __slots__ = ("name", "op", "inputs", "value", "tangent", "adjoint", "edges")
    NAME_FIELD_NUMBER: _ClassVar[int]
    OP_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    TANGENT_FIELD_NUMBER: _ClassVar[int]
    ADJOINT_FIELD_NUMBER: _ClassVar[int]
    EDGES_FIELD_NUMBER: _ClassVar[int]
    name: str
    op: str
    inputs: _containers.RepeatedScalarFieldContainer[str]
    value: _tensor_pb2.Tensor
    tangent: _tensor_pb2.Tensor
    adjoint: _tensor_pb2.Tensor
    edges: _containers.RepeatedCompositeFieldContainer[EdgeTrace]
    def __init__(self, name: _Optional[str] = ..., op: _Optional[str] = ..., inputs: _Optional[_Iterable[str]] = ..., value: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., tangent: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., adjoint: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., edges: _Optional[_Iterable[_Union[EdgeTrace, _Mapping]]] = ...) -> None: ...

class EdgeTrace(_message.Message):
    __slots__ = ("input", "partial", "tangent", "cotangent")
    INPUT_FIELD_NUMBER: _ClassVar[int]
    PARTIAL_FIELD_NUMBER: _ClassVar[int]
    TANGENT_FIELD_NUMBER: _ClassVar[int]
    COTANGENT_FIELD_NUMBER: _ClassVar[int]
    input: str
    partial: _tensor_pb2.Tensor
    tangent: _tensor_pb2.Tensor
    cotangent: _tensor_pb2.Tensor
    def __init__(self, input: _Optional[str] = ..., partial: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., tangent: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., cotangent: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...

class TrainStepsRequest(_message.Message):
    __slots__ = ("graph", "graph_id", "loss", "parameters", "velocity", "batches", "learning_rate", "momentum", "stored_batches", "state", "state_version", "data", "rows", "batch_sizes", "evaluate_data", "evaluate_outputs", "return_state")
    class ParametersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _tensor_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...
    class VelocityEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _tensor_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...
    class BatchesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _tensor_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...
    class StoredBatchesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: StoredTensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[StoredTensor, _Mapping]] = ...) -> None: ...
    GRAPH_FIELD_NUMBER: _ClassVar[int]
    GRAPH_ID_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    VELOCITY_FIELD_NUMBER: _ClassVar[int]
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    MOMENTUM_FIELD_NUMBER: _ClassVar[int]
    STORED_BATCHES_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    STATE_VERSION_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZES_FIELD_NUMBER: _ClassVar[int]
    EVALUATE_DATA_FIELD_NUMBER: _ClassVar[int]
    EVALUATE_OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    RETURN_STATE_FIELD_NUMBER: _ClassVar[int]
    graph: _graph_pb2.Graph
    graph_id: str
    loss: str
    parameters: _containers.MessageMap[str, _tensor_pb2.Tensor]
    velocity: _containers.MessageMap[str, _tensor_pb2.Tensor]
    batches: _containers.MessageMap[str, _tensor_pb2.Tensor]
    learning_rate: float
    momentum: float
    stored_batches: _containers.MessageMap[str, StoredTensor]
    state: str
    state_version: int
    data: str
    rows: _containers.RepeatedScalarFieldContainer[int]
    batch_sizes: _containers.RepeatedScalarFieldContainer[int]
    evaluate_data: str
    evaluate_outputs: _containers.RepeatedScalarFieldContainer[str]
    return_state: bool
    def __init__(self, graph: _Optional[_Union[_graph_pb2.Graph, _Mapping]] = ..., graph_id: _Optional[str] = ..., loss: _Optional[str] = ..., parameters: _Optional[_Mapping[str, _tensor_pb2.Tensor]] = ..., velocity: _Optional[_Mapping[str, _tensor_pb2.Tensor]] = ..., batches: _Optional[_Mapping[str, _tensor_pb2.Tensor]] = ..., learning_rate: _Optional[float] = ..., momentum: _Optional[float] = ..., stored_batches: _Optional[_Mapping[str, StoredTensor]] = ..., state: _Optional[str] = ..., state_version: _Optional[int] = ..., data: _Optional[str] = ..., rows: _Optional[_Iterable[int]] = ..., batch_sizes: _Optional[_Iterable[int]] = ..., evaluate_data: _Optional[str] = ..., evaluate_outputs: _Optional[_Iterable[str]] = ..., return_state: _Optional[bool] = ...) -> None: ...

class TrainStepsResponse(_message.Message):
    __slots__ = ("parameters", "velocity", "losses", "graph_id", "state_version", "state_steps", "evaluation")
    class ParametersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _tensor_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...
    class VelocityEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _tensor_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...
    class EvaluationEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _tensor_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    VELOCITY_FIELD_NUMBER: _ClassVar[int]
    LOSSES_FIELD_NUMBER: _ClassVar[int]
    GRAPH_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_STEPS_FIELD_NUMBER: _ClassVar[int]
    EVALUATION_FIELD_NUMBER: _ClassVar[int]
    parameters: _containers.MessageMap[str, _tensor_pb2.Tensor]
    velocity: _containers.MessageMap[str, _tensor_pb2.Tensor]
    losses: _containers.RepeatedScalarFieldContainer[float]
    graph_id: str
    state_version: int
    state_steps: int
    evaluation: _containers.MessageMap[str, _tensor_pb2.Tensor]
    def __init__(self, parameters: _Optional[_Mapping[str, _tensor_pb2.Tensor]] = ..., velocity: _Optional[_Mapping[str, _tensor_pb2.Tensor]] = ..., losses: _Optional[_Iterable[float]] = ..., graph_id: _Optional[str] = ..., state_version: _Optional[int] = ..., state_steps: _Optional[int] = ..., evaluation: _Optional[_Mapping[str, _tensor_pb2.Tensor]] = ...) -> None: ...

class GetServerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AttributeInfo(_message.Message):
    __slots__ = ("name", "type", "required", "default", "description")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    REQUIRED_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    name: str
    type: str
    required: bool
    default: str
    description: str
    def __init__(self, name: _Optional[str] = ..., type: _Optional[str] = ..., required: _Optional[bool] = ..., default: _Optional[str] = ..., description: _Optional[str] = ...) -> None: ...

class OpInfo(_message.Message):
    __slots__ = ("name", "min_inputs", "max_inputs", "attrs", "description")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MIN_INPUTS_FIELD_NUMBER: _ClassVar[int]
    MAX_INPUTS_FIELD_NUMBER: _ClassVar[int]
    ATTRS_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    name: str
    min_inputs: int
    max_inputs: int
    attrs: _containers.RepeatedCompositeFieldContainer[AttributeInfo]
    description: str
    def __init__(self, name: _Optional[str] = ..., min_inputs: _Optional[int] = ..., max_inputs: _Optional[int] = ..., attrs: _Optional[_Iterable[_Union[AttributeInfo, _Mapping]]] = ..., description: _Optional[str] = ...) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_message_bytes", "max_nodes", "max_tensor_elements", "max_intermediate_bytes", "max_cached_graphs", "max_cache_bytes", "max_concurrent_rpcs", "max_trace_elements", "max_inputs", "max_constants", "max_request_flops", "max_residual_sets", "max_residual_bytes", "residual_seconds", "max_steps_per_call", "stream_idle_seconds", "max_streams_per_client", "max_streams", "max_rss_bytes", "max_references", "max_store_bytes", "max_store_bytes_per_client", "max_store_handles", "store_seconds", "store_chunk_bytes")
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_NODES_FIELD_NUMBER: _ClassVar[int]
    MAX_TENSOR_ELEMENTS_FIELD_NUMBER: _ClassVar[int]
    MAX_INTERMEDIATE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_CACHED_GRAPHS_FIELD_NUMBER: _ClassVar[int]
    MAX_CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENT_RPCS_FIELD_NUMBER: _ClassVar[int]
    MAX_TRACE_ELEMENTS_FIELD_NUMBER: _ClassVar[int]
    MAX_INPUTS_FIELD_NUMBER: _ClassVar[int]
    MAX_CONSTANTS_FIELD_NUMBER: _ClassVar[int]
    MAX_REQUEST_FLOPS_FIELD_NUMBER: _ClassVar[int]
    MAX_RESIDUAL_SETS_FIELD_NUMBER: _ClassVar[int]
    MAX_RESIDUAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    RESIDUAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MAX_STEPS_PER_CALL_FIELD_NUMBER: _ClassVar[int]
    STREAM_IDLE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MAX_STREAMS_PER_CLIENT_FIELD_NUMBER: _ClassVar[int]
    MAX_STREAMS_FIELD_NUMBER: _ClassVar[int]
    MAX_RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_REFERENCES_FIELD_NUMBER: _ClassVar[int]
    MAX_STORE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_STORE_BYTES_PER_CLIENT_FIELD_NUMBER: _ClassVar[int]
    MAX_STORE_HANDLES_FIELD_NUMBER: _ClassVar[int]
    STORE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    STORE_CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    max_message_bytes: int
    max_nodes: int
    max_tensor_elements: int
    max_intermediate_bytes: int
    max_cached_graphs: int
    max_cache_bytes: int
    max_concurrent_rpcs: int
    max_trace_elements: int
    max_inputs: int
    max_constants: int
    max_request_flops: int
    max_residual_sets: int
    max_residual_bytes: int
    residual_seconds: int
    max_steps_per_call: int
    stream_idle_seconds: int
    max_streams_per_client: int
    max_streams: int
    max_rss_bytes: int
    max_references: int
    max_store_bytes: int
    max_store_bytes_per_client: int
    max_store_handles: int
    store_seconds: int
    store_chunk_bytes: int
    def __init__(self, max_message_bytes: _Optional[int] = ..., max_nodes: _Optional[int] = ..., max_tensor_elements: _Optional[int] = ..., max_intermediate_bytes: _Optional[int] = ..., max_cached_graphs: _Optional[int] = ..., max_cache_bytes: _Optional[int] = ..., max_concurrent_rpcs: _Optional[int] = ..., max_trace_elements: _Optional[int] = ..., max_inputs: _Optional[int] = ..., max_constants: _Optional[int] = ..., max_request_flops: _Optional[int] = ..., max_residual_sets: _Optional[int] = ..., max_residual_bytes: _Optional[int] = ..., residual_seconds: _Optional[int] = ..., max_steps_per_call: _Optional[int] = ..., stream_idle_seconds: _Optional[int] = ..., max_streams_per_client: _Optional[int] = ..., max_streams: _Optional[int] = ..., max_rss_bytes: _Optional[int] = ..., max_references: _Optional[int] = ..., max_store_bytes: _Optional[int] = ..., max_store_bytes_per_client: _Optional[int] = ..., max_store_handles: _Optional[int] = ..., store_seconds: _Optional[int] = ..., store_chunk_bytes: _Optional[int] = ...) -> None: ...

class GetServerInfoResponse(_message.Message):
    __slots__ = ("version", "ops", "limits", "dtypes", "planner_ratio", "planner_hvp_ratio", "max_connection_age_seconds", "max_connection_age_grace_seconds", "max_pattern_entries", "inline_budget_us", "lean_max_bytes", "blas_threads", "blas_threads_alone", "blas_alone_min_flops", "blas_alone_max_pressure")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    OPS_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    DTYPES_FIELD_NUMBER: _ClassVar[int]
    PLANNER_RATIO_FIELD_NUMBER: _ClassVar[int]
    PLANNER_HVP_RATIO_FIELD_NUMBER: _ClassVar[int]
    MAX_CONNECTION_AGE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MAX_CONNECTION_AGE_GRACE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MAX_PATTERN_ENTRIES_FIELD_NUMBER: _ClassVar[int]
    INLINE_BUDGET_US_FIELD_NUMBER: _ClassVar[int]
    LEAN_MAX_BYTES_FIELD_NUMBER: _ClassVar[int]
    BLAS_THREADS_FIELD_NUMBER: _ClassVar[int]
    BLAS_THREADS_ALONE_FIELD_NUMBER: _ClassVar[int]
    BLAS_ALONE_MIN_FLOPS_FIELD_NUMBER: _ClassVar[int]
    BLAS_ALONE_MAX_PRESSURE_FIELD_NUMBER: _ClassVar[int]
    version: str
    ops: _containers.RepeatedCompositeFieldContainer[OpInfo]
    limits: Limits
    dtypes: _containers.RepeatedScalarFieldContainer[_tensor_pb2.DataType]
    planner_ratio: float
    planner_hvp_ratio: float
    max_connection_age_seconds: float
    max_connection_age_grace_seconds: float
    max_pattern_entries: int
    inline_budget_us: float
    lean_max_bytes: int
    blas_threads: int
    blas_threads_alone: int
    blas_alone_min_flops: int
    blas_alone_max_pressure: float
    def __init__(self, version: _Optional[str] = ..., ops: _Optional[_Iterable[_Union[OpInfo, _Mapping]]] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., dtypes: _Optional[_Iterable[_Union[_tensor_pb2.DataType, str]]] = ..., planner_ratio: _Optional[float] = ..., planner_hvp_ratio: _Optional[float] = ..., max_connection_age_seconds: _Optional[float] = ..., max_connection_age_grace_seconds: _Optional[float] = ..., max_pattern_entries: _Optional[int] = ..., inline_budget_us: _Optional[float] = ..., lean_max_bytes: _Optional[int] = ..., blas_threads: _Optional[int] = ..., blas_threads_alone: _Optional[int] = ..., blas_alone_min_flops: _Optional[int] = ..., blas_alone_max_pressure: _Optional[float] = ...) -> None: ...

class TensorChunk(_message.Message):
    __slots__ = ("name", "dtype", "shape", "offset", "data")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: _tensor_pb2.DataType
    shape: _containers.RepeatedScalarFieldContainer[int]
    offset: int
    data: bytes
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[_Union[_tensor_pb2.DataType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class PutTensorsRequest(_message.Message):
    __slots__ = ("chunks",)
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    chunks: _containers.RepeatedCompositeFieldContainer[TensorChunk]
    def __init__(self, chunks: _Optional[_Iterable[_Union[TensorChunk, _Mapping]]] = ...) -> None: ...

class PutTensorsResponse(_message.Message):
    __slots__ = ("handle", "nbytes")
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    handle: str
    nbytes: int
    def __init__(self, handle: _Optional[str] = ..., nbytes: _Optional[int] = ...) -> None: ...

class GetTensorsRequest(_message.Message):
    __slots__ = ("handle", "names")
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    NAMES_FIELD_NUMBER: _ClassVar[int]
    handle: str
    names: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, handle: _Optional[str] = ..., names: _Optional[_Iterable[str]] = ...) -> None: ...

class GetTensorsResponse(_message.Message):
    __slots__ = ("chunks",)
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    chunks: _containers.RepeatedCompositeFieldContainer[TensorChunk]
    def __init__(self, chunks: _Optional[_Iterable[_Union[TensorChunk, _Mapping]]] = ...) -> None: ...

class DeleteTensorsRequest(_message.Message):
    __slots__ = ("handle",)
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    handle: str
    def __init__(self, handle: _Optional[str] = ...) -> None: ...

class DeleteTensorsResponse(_message.Message):
    __slots__ = ("deleted",)
    DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted: bool
    def __init__(self, deleted: _Optional[bool] = ...) -> None: ...

class StoredTensor(_message.Message):
    __slots__ = ("handle", "name")
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    handle: str
    name: str
    def __init__(self, handle: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...
