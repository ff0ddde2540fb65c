from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data", "encoding", "scales", "block_size")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    SCALES_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    encoding: str
    scales: bytes
    block_size: int
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ..., encoding: _Optional[str] = ..., scales: _Optional[bytes] = ..., block_size: _Optional[int] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("model", "start", "end", "dtype", "version", "hidden_size", "max_batch_tokens", "throughput", "cache_tokens", "cache_tokens_free", "state")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_TOKENS_FIELD_NUMBER: _ClassVar[int]
    THROUGHPUT_FIELD_NUMBER: _ClassVar[int]
    CACHE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHE_TOKENS_FREE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    model: str
    start: int
    end: int
    dtype: str
    version: str
    hidden_size: int
    max_batch_tokens: int
    throughput: float
    cache_tokens: int
    cache_tokens_free: int
    state: str
    def __init__(self, model: _Optional[str] = ..., start: _Optional[int] = ..., end: _Optional[int] = ..., dtype: _Optional[str] = ..., version: _Optional[str] = ..., hidden_size: _Optional[int] = ..., max_batch_tokens: _Optional[int] = ..., throughput: _Optional[float] = ..., cache_tokens: _Optional[int] = ..., cache_tokens_free: _Optional[int] = ..., state: _Optional[str] = ...) -> None: ...

class LoraModule(_message.Message):
    __slots__ = ("block", "module", "a", "b", "magnitude", "ia3", "ia3_input")
    BLOCK_FIELD_NUMBER: _ClassVar[int]
    MODULE_FIELD_NUMBER: _ClassVar[int]
    A_FIELD_NUMBER: _ClassVar[int]
    B_FIELD_NUMBER: _ClassVar[int]
    MAGNITUDE_FIELD_NUMBER: _ClassVar[int]
    IA3_FIELD_NUMBER: _ClassVar[int]
    IA3_INPUT_FIELD_NUMBER: _ClassVar[int]
    block: int
    module: str
    a: Tensor
    b: Tensor
    magnitude: Tensor
    ia3: Tensor
    ia3_input: bool
    def __init__(self, block: _Optional[int] = ..., module: _Optional[str] = ..., a: _Optional[_Union[Tensor, _Mapping]] = ..., b: _Optional[_Union[Tensor, _Mapping]] = ..., magnitude: _Optional[_Union[Tensor, _Mapping]] = ..., ia3: _Optional[_Union[Tensor, _Mapping]] = ..., ia3_input: _Optional[bool] = ...) -> None: ...

class LoraAdapter(_message.Message):
    __slots__ = ("id", "version", "scaling", "dropout", "dropout_seed", "modules", "digest", "method")
    ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SCALING_FIELD_NUMBER: _ClassVar[int]
    DROPOUT_FIELD_NUMBER: _ClassVar[int]
    DROPOUT_SEED_FIELD_NUMBER: _ClassVar[int]
    MODULES_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    id: str
    version: int
    scaling: float
    dropout: float
    dropout_seed: int
    modules: _containers.RepeatedCompositeFieldContainer[LoraModule]
    digest: str
    method: str
    def __init__(self, id: _Optional[str] = ..., version: _Optional[int] = ..., scaling: _Optional[float] = ..., dropout: _Optional[float] = ..., dropout_seed: _Optional[int] = ..., modules: _Optional[_Iterable[_Union[LoraModule, _Mapping]]] = ..., digest: _Optional[str] = ..., method: _Optional[str] = ...) -> None: ...

class ForwardRequest(_message.Message):
    __slots__ = ("model", "start", "end", "hidden_states", "attention_mask", "position_ids", "lora", "adapter_name", "prefix", "keep_for_backward")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_STATES_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_MASK_FIELD_NUMBER: _ClassVar[int]
    POSITION_IDS_FIELD_NUMBER: _ClassVar[int]
    LORA_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_NAME_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    KEEP_FOR_BACKWARD_FIELD_NUMBER: _ClassVar[int]
    model: str
    start: int
    end: int
    hidden_states: Tensor
    attention_mask: Tensor
    position_ids: Tensor
    lora: LoraAdapter
    adapter_name: str
    prefix: Tensor
    keep_for_backward: bool
    def __init__(self, model: _Optional[str] = ..., start: _Optional[int] = ..., end: _Optional[int] = ..., hidden_states: _Optional[_Union[Tensor, _Mapping]] = ..., attention_mask: _Optional[_Union[Tensor, _Mapping]] = ..., position_ids: _Optional[_Union[Tensor, _Mapping]] = ..., lora: _Optional[_Union[LoraAdapter, _Mapping]] = ..., adapter_name: _Optional[str] = ..., prefix: _Optional[_Union[Tensor, _Mapping]] = ..., keep_for_backward: _Optional[bool] = ...) -> None: ...

class ForwardResponse(_message.Message):
    __slots__ = ("hidden_states", "backward_token", "backward_by_token")
    HIDDEN_STATES_FIELD_NUMBER: _ClassVar[int]
    BACKWARD_TOKEN_FIELD_NUMBER: _ClassVar[int]
    BACKWARD_BY_TOKEN_FIELD_NUMBER: _ClassVar[int]
    hidden_states: Tensor
    backward_token: str
    backward_by_token: bool
    def __init__(self, hidden_states: _Optional[_Union[Tensor, _Mapping]] = ..., backward_token: _Optional[str] = ..., backward_by_token: _Optional[bool] = ...) -> None: ...

class BackwardRequest(_message.Message):
    __slots__ = ("inputs", "grad_outputs", "backward_token")
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    GRAD_OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    BACKWARD_TOKEN_FIELD_NUMBER: _ClassVar[int]
    inputs: ForwardRequest
    grad_outputs: Tensor
    backward_token: str
    def __init__(self, inputs: _Optional[_Union[ForwardRequest, _Mapping]] = ..., grad_outputs: _Optional[_Union[Tensor, _Mapping]] = ..., backward_token: _Optional[str] = ...) -> None: ...

class BackwardResponse(_message.Message):
    __slots__ = ("grad_inputs", "lora_grads", "grad_prefix", "inputs_needed")
    GRAD_INPUTS_FIELD_NUMBER: _ClassVar[int]
    LORA_GRADS_FIELD_NUMBER: _ClassVar[int]
    GRAD_PREFIX_FIELD_NUMBER: _ClassVar[int]
    INPUTS_NEEDED_FIELD_NUMBER: _ClassVar[int]
    grad_inputs: Tensor
    lora_grads: _containers.RepeatedCompositeFieldContainer[LoraModule]
    grad_prefix: Tensor
    inputs_needed: bool
    def __init__(self, grad_inputs: _Optional[_Union[Tensor, _Mapping]] = ..., lora_grads: _Optional[_Iterable[_Union[LoraModule, _Mapping]]] = ..., grad_prefix: _Optional[_Union[Tensor, _Mapping]] = ..., inputs_needed: _Optional[bool] = ...) -> None: ...

class SessionOptions(_message.Message):
    __slots__ = ("model", "start", "end", "batch_size", "max_length", "lora", "adapter_name", "prefix", "chain_token")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    LORA_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_NAME_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    CHAIN_TOKEN_FIELD_NUMBER: _ClassVar[int]
    model: str
    start: int
    end: int
    batch_size: int
    max_length: int
    lora: LoraAdapter
    adapter_name: str
    prefix: Tensor
    chain_token: bytes
    def __init__(self, model: _Optional[str] = ..., start: _Optional[int] = ..., end: _Optional[int] = ..., batch_size: _Optional[int] = ..., max_length: _Optional[int] = ..., lora: _Optional[_Union[LoraAdapter, _Mapping]] = ..., adapter_name: _Optional[str] = ..., prefix: _Optional[_Union[Tensor, _Mapping]] = ..., chain_token: _Optional[bytes] = ...) -> None: ...

class InferenceRequest(_message.Message):
    __slots__ = ("open", "hidden_states", "attention_mask", "position_ids", "reorder", "drop", "chain_step", "chain_await", "chain_push")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_STATES_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_MASK_FIELD_NUMBER: _ClassVar[int]
    POSITION_IDS_FIELD_NUMBER: _ClassVar[int]
    REORDER_FIELD_NUMBER: _ClassVar[int]
    DROP_FIELD_NUMBER: _ClassVar[int]
    CHAIN_STEP_FIELD_NUMBER: _ClassVar[int]
    CHAIN_AWAIT_FIELD_NUMBER: _ClassVar[int]
    CHAIN_PUSH_FIELD_NUMBER: _ClassVar[int]
    open: SessionOptions
    hidden_states: Tensor
    attention_mask: Tensor
    position_ids: Tensor
    reorder: _containers.RepeatedScalarFieldContainer[int]
    drop: int
    chain_step: int
    chain_await: bool
    chain_push: ChainTarget
    def __init__(self, open: _Optional[_Union[SessionOptions, _Mapping]] = ..., hidden_states: _Optional[_Union[Tensor, _Mapping]] = ..., attention_mask: _Optional[_Union[Tensor, _Mapping]] = ..., position_ids: _Optional[_Union[Tensor, _Mapping]] = ..., reorder: _Optional[_Iterable[int]] = ..., drop: _Optional[int] = ..., chain_step: _Optional[int] = ..., chain_await: _Optional[bool] = ..., chain_push: _Optional[_Union[ChainTarget, _Mapping]] = ...) -> None: ...

class ChainTarget(_message.Message):
    __slots__ = ("address", "token", "dtype", "wire")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    WIRE_FIELD_NUMBER: _ClassVar[int]
    address: str
    token: bytes
    dtype: str
    wire: str
    def __init__(self, address: _Optional[str] = ..., token: _Optional[bytes] = ..., dtype: _Optional[str] = ..., wire: _Optional[str] = ...) -> None: ...

class ChainPush(_message.Message):
    __slots__ = ("token", "step", "hidden_states")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_STATES_FIELD_NUMBER: _ClassVar[int]
    token: bytes
    step: int
    hidden_states: Tensor
    def __init__(self, token: _Optional[bytes] = ..., step: _Optional[int] = ..., hidden_states: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class ChainAck(_message.Message):
    __slots__ = ("step",)
    STEP_FIELD_NUMBER: _ClassVar[int]
    step: int
    def __init__(self, step: _Optional[int] = ...) -> None: ...

class InferenceResponse(_message.Message):
    __slots__ = ("hidden_states", "cache_length", "chain_step", "chain_error")
    HIDDEN_STATES_FIELD_NUMBER: _ClassVar[int]
    CACHE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    CHAIN_STEP_FIELD_NUMBER: _ClassVar[int]
    CHAIN_ERROR_FIELD_NUMBER: _ClassVar[int]
    hidden_states: Tensor
    cache_length: int
    chain_step: int
    chain_error: str
    def __init__(self, hidden_states: _Optional[_Union[Tensor, _Mapping]] = ..., cache_length: _Optional[int] = ..., chain_step: _Optional[int] = ..., chain_error: _Optional[str] = ...) -> None: ...
