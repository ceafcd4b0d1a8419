from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_FP32: _ClassVar[DType]
    DTYPE_FP16: _ClassVar[DType]
    DTYPE_BF16: _ClassVar[DType]
    DTYPE_INT64: _ClassVar[DType]
DTYPE_UNSPECIFIED: DType
DTYPE_FP32: DType
DTYPE_FP16: DType
DTYPE_BF16: DType
DTYPE_INT64: DType

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class LayerRange(_message.Message):
    __slots__ = ("start", "end")
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    start: int
    end: int
    def __init__(self, start: _Optional[int] = ..., end: _Optional[int] = ...) -> None: ...

class NodeInfo(_message.Message):
    __slots__ = ("node_id", "address", "backend", "device", "dtype", "packed", "memory_bytes", "speed_gflops", "layers", "model_digest", "layers_digest", "version", "threads", "public_key", "standby", "tls_cert", "tls_binding")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    PACKED_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    SPEED_GFLOPS_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    MODEL_DIGEST_FIELD_NUMBER: _ClassVar[int]
    LAYERS_DIGEST_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    THREADS_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    STANDBY_FIELD_NUMBER: _ClassVar[int]
    TLS_CERT_FIELD_NUMBER: _ClassVar[int]
    TLS_BINDING_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    address: str
    backend: str
    device: str
    dtype: str
    packed: bool
    memory_bytes: int
    speed_gflops: float
    layers: LayerRange
    model_digest: str
    layers_digest: str
    version: str
    threads: int
    public_key: bytes
    standby: bool
    tls_cert: bytes
    tls_binding: bytes
    def __init__(self, node_id: _Optional[str] = ..., address: _Optional[str] = ..., backend: _Optional[str] = ..., device: _Optional[str] = ..., dtype: _Optional[str] = ..., packed: _Optional[bool] = ..., memory_bytes: _Optional[int] = ..., speed_gflops: _Optional[float] = ..., layers: _Optional[_Union[LayerRange, _Mapping]] = ..., model_digest: _Optional[str] = ..., layers_digest: _Optional[str] = ..., version: _Optional[str] = ..., threads: _Optional[int] = ..., public_key: _Optional[bytes] = ..., standby: _Optional[bool] = ..., tls_cert: _Optional[bytes] = ..., tls_binding: _Optional[bytes] = ...) -> None: ...

class ChallengeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ChallengeResponse(_message.Message):
    __slots__ = ("nonce", "coordinator_key", "tls_binding", "expires_in_s")
    NONCE_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_KEY_FIELD_NUMBER: _ClassVar[int]
    TLS_BINDING_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_IN_S_FIELD_NUMBER: _ClassVar[int]
    nonce: bytes
    coordinator_key: bytes
    tls_binding: bytes
    expires_in_s: float
    def __init__(self, nonce: _Optional[bytes] = ..., coordinator_key: _Optional[bytes] = ..., tls_binding: _Optional[bytes] = ..., expires_in_s: _Optional[float] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("node", "nonce", "signature")
    NODE_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    node: NodeInfo
    nonce: bytes
    signature: bytes
    def __init__(self, node: _Optional[_Union[NodeInfo, _Mapping]] = ..., nonce: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class RegisterResponse(_message.Message):
    __slots__ = ("node_id", "heartbeat_interval_s", "n_layers")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    N_LAYERS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    heartbeat_interval_s: float
    n_layers: int
    def __init__(self, node_id: _Optional[str] = ..., heartbeat_interval_s: _Optional[float] = ..., n_layers: _Optional[int] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("node_id", "active_sessions", "cache_bytes", "session_ids")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SESSION_IDS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    active_sessions: int
    cache_bytes: int
    session_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, node_id: _Optional[str] = ..., active_sessions: _Optional[int] = ..., cache_bytes: _Optional[int] = ..., session_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("drop_sessions",)
    DROP_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    drop_sessions: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, drop_sessions: _Optional[_Iterable[str]] = ...) -> None: ...

class AssignLayersRequest(_message.Message):
    __slots__ = ("layers", "model_digest")
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    MODEL_DIGEST_FIELD_NUMBER: _ClassVar[int]
    layers: LayerRange
    model_digest: str
    def __init__(self, layers: _Optional[_Union[LayerRange, _Mapping]] = ..., model_digest: _Optional[str] = ...) -> None: ...

class AssignLayersResponse(_message.Message):
    __slots__ = ("node",)
    NODE_FIELD_NUMBER: _ClassVar[int]
    node: NodeInfo
    def __init__(self, node: _Optional[_Union[NodeInfo, _Mapping]] = ...) -> None: ...

class OpenSessionRequest(_message.Message):
    __slots__ = ("session_id", "capacity", "layers")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    capacity: int
    layers: LayerRange
    def __init__(self, session_id: _Optional[str] = ..., capacity: _Optional[int] = ..., layers: _Optional[_Union[LayerRange, _Mapping]] = ...) -> None: ...

class OpenSessionResponse(_message.Message):
    __slots__ = ("cache_bytes",)
    CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    cache_bytes: int
    def __init__(self, cache_bytes: _Optional[int] = ...) -> None: ...

class CloseSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class CloseSessionResponse(_message.Message):
    __slots__ = ("existed",)
    EXISTED_FIELD_NUMBER: _ClassVar[int]
    existed: bool
    def __init__(self, existed: _Optional[bool] = ...) -> None: ...

class WorkOrder(_message.Message):
    __slots__ = ("session_id", "step", "stage_index", "layers", "start_position", "input", "all_logits")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    STAGE_INDEX_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    START_POSITION_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    ALL_LOGITS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    step: int
    stage_index: int
    layers: LayerRange
    start_position: int
    input: Tensor
    all_logits: bool
    def __init__(self, session_id: _Optional[str] = ..., step: _Optional[int] = ..., stage_index: _Optional[int] = ..., layers: _Optional[_Union[LayerRange, _Mapping]] = ..., start_position: _Optional[int] = ..., input: _Optional[_Union[Tensor, _Mapping]] = ..., all_logits: _Optional[bool] = ...) -> None: ...

class Receipt(_message.Message):
    __slots__ = ("session_id", "step", "start_position", "n_positions", "stage_index", "layers", "layers_digest", "input_digest", "output_digest", "node_id", "time_unix_ms", "signature")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    START_POSITION_FIELD_NUMBER: _ClassVar[int]
    N_POSITIONS_FIELD_NUMBER: _ClassVar[int]
    STAGE_INDEX_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    LAYERS_DIGEST_FIELD_NUMBER: _ClassVar[int]
    INPUT_DIGEST_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_DIGEST_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    TIME_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    step: int
    start_position: int
    n_positions: int
    stage_index: int
    layers: LayerRange
    layers_digest: str
    input_digest: bytes
    output_digest: bytes
    node_id: str
    time_unix_ms: int
    signature: bytes
    def __init__(self, session_id: _Optional[str] = ..., step: _Optional[int] = ..., start_position: _Optional[int] = ..., n_positions: _Optional[int] = ..., stage_index: _Optional[int] = ..., layers: _Optional[_Union[LayerRange, _Mapping]] = ..., layers_digest: _Optional[str] = ..., input_digest: _Optional[bytes] = ..., output_digest: _Optional[bytes] = ..., node_id: _Optional[str] = ..., time_unix_ms: _Optional[int] = ..., signature: _Optional[bytes] = ...) -> None: ...

class WorkResult(_message.Message):
    __slots__ = ("session_id", "step", "start_position", "output", "compute_ms", "receipt", "batch_size")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    START_POSITION_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_MS_FIELD_NUMBER: _ClassVar[int]
    RECEIPT_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    step: int
    start_position: int
    output: Tensor
    compute_ms: float
    receipt: Receipt
    batch_size: int
    def __init__(self, session_id: _Optional[str] = ..., step: _Optional[int] = ..., start_position: _Optional[int] = ..., output: _Optional[_Union[Tensor, _Mapping]] = ..., compute_ms: _Optional[float] = ..., receipt: _Optional[_Union[Receipt, _Mapping]] = ..., batch_size: _Optional[int] = ...) -> None: ...

class WorkBatch(_message.Message):
    __slots__ = ("orders",)
    ORDERS_FIELD_NUMBER: _ClassVar[int]
    orders: _containers.RepeatedCompositeFieldContainer[WorkOrder]
    def __init__(self, orders: _Optional[_Iterable[_Union[WorkOrder, _Mapping]]] = ...) -> None: ...

class BatchItem(_message.Message):
    __slots__ = ("result", "code", "error")
    RESULT_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    result: WorkResult
    code: int
    error: str
    def __init__(self, result: _Optional[_Union[WorkResult, _Mapping]] = ..., code: _Optional[int] = ..., error: _Optional[str] = ...) -> None: ...

class BatchResult(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[BatchItem]
    def __init__(self, items: _Optional[_Iterable[_Union[BatchItem, _Mapping]]] = ...) -> None: ...

class RollbackRequest(_message.Message):
    __slots__ = ("session_id", "position")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    position: int
    def __init__(self, session_id: _Optional[str] = ..., position: _Optional[int] = ...) -> None: ...

class RollbackResponse(_message.Message):
    __slots__ = ("length",)
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    length: int
    def __init__(self, length: _Optional[int] = ...) -> None: ...

class WorkerStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class OpenChannelRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class OpenChannelResponse(_message.Message):
    __slots__ = ("key_id", "secret")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    SECRET_FIELD_NUMBER: _ClassVar[int]
    key_id: bytes
    secret: bytes
    def __init__(self, key_id: _Optional[bytes] = ..., secret: _Optional[bytes] = ...) -> None: ...

class WorkerStatus(_message.Message):
    __slots__ = ("node", "active_sessions", "cache_bytes", "cache_budget_bytes")
    NODE_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    CACHE_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    node: NodeInfo
    active_sessions: int
    cache_bytes: int
    cache_budget_bytes: int
    def __init__(self, node: _Optional[_Union[NodeInfo, _Mapping]] = ..., active_sessions: _Optional[int] = ..., cache_bytes: _Optional[int] = ..., cache_budget_bytes: _Optional[int] = ...) -> None: ...

class Sampling(_message.Message):
    __slots__ = ("temperature", "top_k", "top_p", "seed")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_k: int
    top_p: float
    seed: int
    def __init__(self, temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("prompt", "max_tokens", "sampling", "no_chat", "audit_probability", "audit_seed", "no_wait_audits", "audit_coverage")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    NO_CHAT_FIELD_NUMBER: _ClassVar[int]
    AUDIT_PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    AUDIT_SEED_FIELD_NUMBER: _ClassVar[int]
    NO_WAIT_AUDITS_FIELD_NUMBER: _ClassVar[int]
    AUDIT_COVERAGE_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    max_tokens: int
    sampling: Sampling
    no_chat: bool
    audit_probability: float
    audit_seed: int
    no_wait_audits: bool
    audit_coverage: str
    def __init__(self, prompt: _Optional[str] = ..., max_tokens: _Optional[int] = ..., sampling: _Optional[_Union[Sampling, _Mapping]] = ..., no_chat: _Optional[bool] = ..., audit_probability: _Optional[float] = ..., audit_seed: _Optional[int] = ..., no_wait_audits: _Optional[bool] = ..., audit_coverage: _Optional[str] = ...) -> None: ...

class StageInfo(_message.Message):
    __slots__ = ("index", "node_id", "address", "layers", "device", "dtype", "local")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    LOCAL_FIELD_NUMBER: _ClassVar[int]
    index: int
    node_id: str
    address: str
    layers: LayerRange
    device: str
    dtype: str
    local: bool
    def __init__(self, index: _Optional[int] = ..., node_id: _Optional[str] = ..., address: _Optional[str] = ..., layers: _Optional[_Union[LayerRange, _Mapping]] = ..., device: _Optional[str] = ..., dtype: _Optional[str] = ..., local: _Optional[bool] = ...) -> None: ...

class StageStats(_message.Message):
    __slots__ = ("stage", "prefill_ms", "mean_step_ms", "mean_compute_ms", "steps", "bytes_sent", "bytes_received", "mean_batch")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    PREFILL_MS_FIELD_NUMBER: _ClassVar[int]
    MEAN_STEP_MS_FIELD_NUMBER: _ClassVar[int]
    MEAN_COMPUTE_MS_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    MEAN_BATCH_FIELD_NUMBER: _ClassVar[int]
    stage: StageInfo
    prefill_ms: float
    mean_step_ms: float
    mean_compute_ms: float
    steps: int
    bytes_sent: int
    bytes_received: int
    mean_batch: float
    def __init__(self, stage: _Optional[_Union[StageInfo, _Mapping]] = ..., prefill_ms: _Optional[float] = ..., mean_step_ms: _Optional[float] = ..., mean_compute_ms: _Optional[float] = ..., steps: _Optional[int] = ..., bytes_sent: _Optional[int] = ..., bytes_received: _Optional[int] = ..., mean_batch: _Optional[float] = ...) -> None: ...

class SessionStarted(_message.Message):
    __slots__ = ("session_id", "prompt_tokens", "max_tokens", "stages", "resumed_tokens", "resumed_text")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    RESUMED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    RESUMED_TEXT_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    prompt_tokens: int
    max_tokens: int
    stages: _containers.RepeatedCompositeFieldContainer[StageInfo]
    resumed_tokens: _containers.RepeatedScalarFieldContainer[int]
    resumed_text: str
    def __init__(self, session_id: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., max_tokens: _Optional[int] = ..., stages: _Optional[_Iterable[_Union[StageInfo, _Mapping]]] = ..., resumed_tokens: _Optional[_Iterable[int]] = ..., resumed_text: _Optional[str] = ...) -> None: ...

class TokenEvent(_message.Message):
    __slots__ = ("token", "text")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    token: int
    text: str
    def __init__(self, token: _Optional[int] = ..., text: _Optional[str] = ...) -> None: ...

class SessionSummary(_message.Message):
    __slots__ = ("session_id", "tokens", "text", "prompt_tokens", "tokens_per_second", "time_to_first_token_s", "stages", "stop_reason", "audits", "rollbacks", "banned_nodes", "failovers", "verification", "verification_note")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    TIME_TO_FIRST_TOKEN_S_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    STOP_REASON_FIELD_NUMBER: _ClassVar[int]
    AUDITS_FIELD_NUMBER: _ClassVar[int]
    ROLLBACKS_FIELD_NUMBER: _ClassVar[int]
    BANNED_NODES_FIELD_NUMBER: _ClassVar[int]
    FAILOVERS_FIELD_NUMBER: _ClassVar[int]
    VERIFICATION_FIELD_NUMBER: _ClassVar[int]
    VERIFICATION_NOTE_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    tokens: _containers.RepeatedScalarFieldContainer[int]
    text: str
    prompt_tokens: int
    tokens_per_second: float
    time_to_first_token_s: float
    stages: _containers.RepeatedCompositeFieldContainer[StageStats]
    stop_reason: str
    audits: AuditSummary
    rollbacks: _containers.RepeatedCompositeFieldContainer[RollbackEvent]
    banned_nodes: _containers.RepeatedScalarFieldContainer[str]
    failovers: _containers.RepeatedCompositeFieldContainer[FailoverEvent]
    verification: str
    verification_note: str
    def __init__(self, session_id: _Optional[str] = ..., tokens: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., tokens_per_second: _Optional[float] = ..., time_to_first_token_s: _Optional[float] = ..., stages: _Optional[_Iterable[_Union[StageStats, _Mapping]]] = ..., stop_reason: _Optional[str] = ..., audits: _Optional[_Union[AuditSummary, _Mapping]] = ..., rollbacks: _Optional[_Iterable[_Union[RollbackEvent, _Mapping]]] = ..., banned_nodes: _Optional[_Iterable[str]] = ..., failovers: _Optional[_Iterable[_Union[FailoverEvent, _Mapping]]] = ..., verification: _Optional[str] = ..., verification_note: _Optional[str] = ...) -> None: ...

class FailoverEvent(_message.Message):
    __slots__ = ("stage", "token_index", "failed_node", "backup_node", "latency_ms", "replay_ms", "replayed_positions", "load_ms", "error", "position", "replay_check")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    TOKEN_INDEX_FIELD_NUMBER: _ClassVar[int]
    FAILED_NODE_FIELD_NUMBER: _ClassVar[int]
    BACKUP_NODE_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    REPLAY_MS_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_POSITIONS_FIELD_NUMBER: _ClassVar[int]
    LOAD_MS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    REPLAY_CHECK_FIELD_NUMBER: _ClassVar[int]
    stage: int
    token_index: int
    failed_node: str
    backup_node: str
    latency_ms: float
    replay_ms: float
    replayed_positions: int
    load_ms: float
    error: str
    position: int
    replay_check: ReplayCheck
    def __init__(self, stage: _Optional[int] = ..., token_index: _Optional[int] = ..., failed_node: _Optional[str] = ..., backup_node: _Optional[str] = ..., latency_ms: _Optional[float] = ..., replay_ms: _Optional[float] = ..., replayed_positions: _Optional[int] = ..., load_ms: _Optional[float] = ..., error: _Optional[str] = ..., position: _Optional[int] = ..., replay_check: _Optional[_Union[ReplayCheck, _Mapping]] = ...) -> None: ...

class ReplayCheck(_message.Message):
    __slots__ = ("passed", "worst_rel_l2", "tolerance", "first_bad_position")
    PASSED_FIELD_NUMBER: _ClassVar[int]
    WORST_REL_L2_FIELD_NUMBER: _ClassVar[int]
    TOLERANCE_FIELD_NUMBER: _ClassVar[int]
    FIRST_BAD_POSITION_FIELD_NUMBER: _ClassVar[int]
    passed: bool
    worst_rel_l2: float
    tolerance: str
    first_bad_position: int
    def __init__(self, passed: _Optional[bool] = ..., worst_rel_l2: _Optional[float] = ..., tolerance: _Optional[str] = ..., first_bad_position: _Optional[int] = ...) -> None: ...

class RollbackEvent(_message.Message):
    __slots__ = ("stage", "position", "node_id", "reason", "kept_tokens", "new_node_id")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    KEPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NEW_NODE_ID_FIELD_NUMBER: _ClassVar[int]
    stage: int
    position: int
    node_id: str
    reason: str
    kept_tokens: int
    new_node_id: str
    def __init__(self, stage: _Optional[int] = ..., position: _Optional[int] = ..., node_id: _Optional[str] = ..., reason: _Optional[str] = ..., kept_tokens: _Optional[int] = ..., new_node_id: _Optional[str] = ...) -> None: ...

class AuditSummary(_message.Message):
    __slots__ = ("total", "passed", "failed", "pending")
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    PASSED_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    PENDING_FIELD_NUMBER: _ClassVar[int]
    total: int
    passed: int
    failed: int
    pending: int
    def __init__(self, total: _Optional[int] = ..., passed: _Optional[int] = ..., failed: _Optional[int] = ..., pending: _Optional[int] = ...) -> None: ...

class GenerateEvent(_message.Message):
    __slots__ = ("started", "token", "done", "rollback", "failover")
    STARTED_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    ROLLBACK_FIELD_NUMBER: _ClassVar[int]
    FAILOVER_FIELD_NUMBER: _ClassVar[int]
    started: SessionStarted
    token: TokenEvent
    done: SessionSummary
    rollback: RollbackEvent
    failover: FailoverEvent
    def __init__(self, started: _Optional[_Union[SessionStarted, _Mapping]] = ..., token: _Optional[_Union[TokenEvent, _Mapping]] = ..., done: _Optional[_Union[SessionSummary, _Mapping]] = ..., rollback: _Optional[_Union[RollbackEvent, _Mapping]] = ..., failover: _Optional[_Union[FailoverEvent, _Mapping]] = ...) -> None: ...

class SessionStatusRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class SessionStatus(_message.Message):
    __slots__ = ("session_id", "state", "prompt_tokens", "generated_tokens", "max_tokens", "position", "stages", "error", "age_s", "tokens_per_second", "tokens", "text", "failovers", "resumable")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    AGE_S_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FAILOVERS_FIELD_NUMBER: _ClassVar[int]
    RESUMABLE_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    state: str
    prompt_tokens: int
    generated_tokens: int
    max_tokens: int
    position: int
    stages: _containers.RepeatedCompositeFieldContainer[StageStats]
    error: str
    age_s: float
    tokens_per_second: float
    tokens: _containers.RepeatedScalarFieldContainer[int]
    text: str
    failovers: _containers.RepeatedCompositeFieldContainer[FailoverEvent]
    resumable: bool
    def __init__(self, session_id: _Optional[str] = ..., state: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., generated_tokens: _Optional[int] = ..., max_tokens: _Optional[int] = ..., position: _Optional[int] = ..., stages: _Optional[_Iterable[_Union[StageStats, _Mapping]]] = ..., error: _Optional[str] = ..., age_s: _Optional[float] = ..., tokens_per_second: _Optional[float] = ..., tokens: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ..., failovers: _Optional[_Iterable[_Union[FailoverEvent, _Mapping]]] = ..., resumable: _Optional[bool] = ...) -> None: ...

class ResumeRequest(_message.Message):
    __slots__ = ("session_id", "no_wait_audits")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    NO_WAIT_AUDITS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    no_wait_audits: bool
    def __init__(self, session_id: _Optional[str] = ..., no_wait_audits: _Optional[bool] = ...) -> None: ...

class ClusterStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class NodeStatus(_message.Message):
    __slots__ = ("node", "alive", "heartbeat_age_s", "local", "role")
    NODE_FIELD_NUMBER: _ClassVar[int]
    ALIVE_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_AGE_S_FIELD_NUMBER: _ClassVar[int]
    LOCAL_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    node: NodeInfo
    alive: bool
    heartbeat_age_s: float
    local: bool
    role: str
    def __init__(self, node: _Optional[_Union[NodeInfo, _Mapping]] = ..., alive: _Optional[bool] = ..., heartbeat_age_s: _Optional[float] = ..., local: _Optional[bool] = ..., role: _Optional[str] = ...) -> None: ...

class ClusterStatus(_message.Message):
    __slots__ = ("model_digest", "n_layers", "nodes", "route", "placement_error", "active_sessions", "flexible_pending", "spill_held_bytes", "spill_limit_bytes")
    MODEL_DIGEST_FIELD_NUMBER: _ClassVar[int]
    N_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_ERROR_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    FLEXIBLE_PENDING_FIELD_NUMBER: _ClassVar[int]
    SPILL_HELD_BYTES_FIELD_NUMBER: _ClassVar[int]
    SPILL_LIMIT_BYTES_FIELD_NUMBER: _ClassVar[int]
    model_digest: str
    n_layers: int
    nodes: _containers.RepeatedCompositeFieldContainer[NodeStatus]
    route: _containers.RepeatedCompositeFieldContainer[StageInfo]
    placement_error: str
    active_sessions: int
    flexible_pending: bool
    spill_held_bytes: int
    spill_limit_bytes: int
    def __init__(self, model_digest: _Optional[str] = ..., n_layers: _Optional[int] = ..., nodes: _Optional[_Iterable[_Union[NodeStatus, _Mapping]]] = ..., route: _Optional[_Iterable[_Union[StageInfo, _Mapping]]] = ..., placement_error: _Optional[str] = ..., active_sessions: _Optional[int] = ..., flexible_pending: _Optional[bool] = ..., spill_held_bytes: _Optional[int] = ..., spill_limit_bytes: _Optional[int] = ...) -> None: ...
