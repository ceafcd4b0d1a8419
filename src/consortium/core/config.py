"""One config dataclass per component, filled by the CLI (or tests) and validated here."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from consortium.coordinator.batching import BatchPolicy
from consortium.errors import ConsortiumError, InvalidRequestError
from consortium.model.sampling import SamplingParams
from consortium.transport.tensors import DEFAULT_MAX_MESSAGE_BYTES
from consortium.verification.tolerance import admitted_classes, class_of

LOCALHOST = "127.0.0.1"
MAX_BATCH = 64  # work orders in one ExecuteBatch call (sessions a stage computes at once)
# what the audit probability p covers (DESIGN.md §4, docs/architecture.md "Audit coverage"):
# full: p is how often a checkpoint falls; every audited stage's rows are all recomputed, up to
#   the session's end (each answer fully checked; costs one recompute of the audited stages).
# sampled: each audited stage of a session is drawn with probability p when the session ends,
#   and a drawn one is recomputed in full in one prefill (a share p checked; costs about p of it).
AUDIT_COVERAGES = ("full", "sampled")
DEFAULT_PORT = 50051
INSECURE_WARNING = (
    "WARNING: --insecure: plain-text gRPC, no TLS. Anyone on the network path can read and alter "
    "this traffic; use it only on a trusted network or for local tests."
)


@dataclass(frozen=True, order=True)
class LayerRange:
    """Half-open layer range [start, end): `10-20` means layers 10 .. 19."""

    start: int
    end: int

    @classmethod
    def parse(cls, text: str) -> LayerRange:
        a, sep, b = text.strip().partition("-")
        if not sep or not a.strip().isdigit() or not b.strip().isdigit():
            raise ConsortiumError(f"bad layer range {text!r}: expected START-END, half-open (e.g. 0-10)")
        r = cls(int(a), int(b))
        if r.start >= r.end:
            raise ConsortiumError(f"empty layer range {text!r}: START must be below END (half-open)")
        return r

    def check(self, n_layers: int) -> LayerRange:
        if not 0 <= self.start < self.end <= n_layers:
            raise ConsortiumError(
                f"layer range {self} is beyond the model's {n_layers} layers (half-open: 0 <= start < end <= {n_layers})"
            )
        return self

    def __len__(self) -> int:
        return self.end - self.start

    def __str__(self) -> str:
        return f"{self.start}-{self.end}"


def default_log_dir() -> Path:
    env = os.environ.get("CONSORTIUM_LOG_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "consortium" / "logs"


def _runs_on_cpu(device: str) -> bool:
    if device == "auto":
        from consortium.model.model import resolve_device  # torch: only when asked to pick

        return resolve_device(device) == "cpu"
    return device == "cpu"


def _kernel_buildable() -> bool:
    from consortium.model.cpu_kernel import buildable  # torch: only when a default is derived

    return buildable()


@dataclass(frozen=True)
class EngineConfig:
    """How a node runs its stage (the options of `consortium generate`)."""

    device: str = "cpu"
    # None: fp32 on a CPU that can build the strict kernel (a C++ compiler; else fp16), where fp32
    # with packed weights is the fastest mode of the strict
    # verification class (docs/performance.md: the quantized blocks stay in memory, 0.75 bytes a
    # 4-bit weight, and the strict kernel multiplies their exact fp32 values: model/cpu_kernel.py);
    # fp16 on GPUs (cuda, mps), also strict
    dtype: str | None = None
    # None: packed where the strict kernel runs (cpu, fp32), dense elsewhere; bf16 + packed is
    # PyTorch's int4 kernel, the loose class
    packed: bool | None = None
    threads: int = 0  # torch intra-op threads; 0 = torch's default (thread count does not change results)
    cpus: tuple[int, ...] = ()  # the CPUs this process runs on (Linux, core/cpus.py); () = any
    # packed int4 forms kept on disk (model/pack_cache.py): the next load maps them instead of
    # repacking (an 8B: ~20 s of CPU); identical weights either way
    pack_cache: bool = True

    def __post_init__(self) -> None:
        # (a replace() that changes the device or dtype passes dtype/packed=None to re-derive them)
        strict_kernel = _runs_on_cpu(self.device) and _kernel_buildable()
        if self.dtype is None:
            object.__setattr__(self, "dtype", "fp32" if strict_kernel else "fp16")
        if self.packed is None:
            object.__setattr__(self, "packed", self.dtype == "fp32" and strict_kernel)


@dataclass(frozen=True)
class CoordinatorConfig:
    model: Path
    host: str = LOCALHOST
    port: int = DEFAULT_PORT
    # the stage the coordinator hosts itself (seed topology: the last layers)
    layers: LayerRange | None = None
    engine: EngineConfig = field(default_factory=EngineConfig)
    node_id: str = "coordinator"
    heartbeat_interval_s: float = 1.0
    node_timeout_s: float = 8.0  # no heartbeat for this long: the node is dead (no new work)
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    kv_cache_bytes: int = 2 * 2**30  # budget of the coordinator's own stage
    session_idle_timeout_s: float = 600.0
    max_sessions: int = 16  # concurrent sessions
    max_batch: int = 16  # sessions' orders one call to a stage carries (continuous batching; 1: none)
    # the sessions at a stage split into this many batches, so that stages overlap instead of
    # passing one batch of everyone along in lock step (2 measured best on the 2-core demo)
    batches_in_flight: int = 2
    max_sessions_per_client: int = 8  # concurrent sessions of one client (key or address)
    sessions_per_minute_per_client: float = 120.0  # session starts of one client (a token bucket)
    max_request_bytes: int = 4 * 2**20  # largest message the coordinator accepts (a Generate request)
    keep_finished: int = 64  # finished sessions kept for status
    keep_history: int = 8  # finished sessions whose committed history stays in memory
    step_timeout_s: float = 60.0  # deadline of a decode call to a worker
    prefill_timeout_s: float = 300.0
    # failover (DESIGN.md §5): a decode call's deadline is max(floor, factor x the stage's median
    # recent round trip), at most step_timeout_s; a node that misses it is replaced
    failover_floor_s: float = 2.0
    failover_rtt_factor: float = 20.0
    # a call longer than the adaptive deadline (prefill, replay) fails over when the node's
    # heartbeats stop for this long (a hung process: SIGSTOP, a frozen machine)
    hang_after_s: float = 3.0
    backup: bool = True  # the coordinator takes over a failed stage when no spare or standby can
    assign_timeout_s: float = 600.0  # a worker loading the layers placement gave it
    log_file: Path | None = None
    # verification (DESIGN.md §4)
    audit_probability: float = 0.2  # share of work units audited, when a session does not say
    audit_seed: int | None = None  # None: a CSPRNG chooses the audited units
    audit_coverage: str = "full"  # AUDIT_COVERAGES, when a session does not say
    ledger: Path | None = None  # SQLite ledger; None = a fresh one in a temporary directory
    # disk beside the ledger for a remote last stage's logits (core/spill.py); None: the disk's
    # free space at start, less a margin
    spill_bytes: int | None = None
    allow_keys: frozenset[bytes] | None = None  # admit only these Ed25519 public keys
    # trust (DESIGN.md §7): TLS with pinned certificates unless insecure; clients listed here
    # (Ed25519 keys) are the only ones that may run sessions and see node details
    client_keys: frozenset[bytes] | None = None
    data_dir: Path | None = None  # node.key and tls.pem (default: as a worker's)
    insecure: bool = False  # plain-text gRPC (warned loudly); node messages stay signed
    audit_device: str = "cpu"  # where the coordinator recomputes audited work
    # what its audit stages may hold (weights and KV caches, in the audited stages' own dtype and
    # packing); None: the audit device's free memory less 1 GiB. An audit over it is unverifiable.
    audit_memory_bytes: int | None = None
    # share of a remote auditor's passes the coordinator re-checks itself (against collusion)
    audit_recheck_probability: float = 0.1
    audit_wait_timeout_s: float = 600.0  # a session's result waits this long for its audits
    audit_workers: int = 4  # sessions audited at once (each session's audits run one at a time)
    # numeric classes admitted (verification/tolerance.py): strict (fp32, fp16), loose (bf16, packed)
    tolerance_classes: str = "strict"
    # this model's `consortium calibrate` report; None: the committed one (SmolLM2's per-range
    # table; other models get its class-wide bounds)
    calibration: Path | None = None

    @property
    def batch_policy(self) -> BatchPolicy:
        return BatchPolicy(self.max_batch, self.batches_in_flight)

    def __post_init__(self) -> None:
        _check_port(self.port)
        if self.max_sessions < 1:
            raise ConsortiumError("max-sessions must be at least 1")
        if not 1 <= self.max_batch <= MAX_BATCH:
            raise ConsortiumError(f"max-batch must be 1 to {MAX_BATCH} (the orders a node takes in one call)")
        if not 1 <= self.batches_in_flight <= MAX_BATCH:
            raise ConsortiumError(f"batches-in-flight must be 1 to {MAX_BATCH}")
        if self.audit_workers < 1:
            raise ConsortiumError("audit-workers must be at least 1")
        if self.audit_memory_bytes is not None and self.audit_memory_bytes <= 0:
            raise ConsortiumError("audit-memory-mb must be positive")
        if self.spill_bytes is not None and self.spill_bytes <= 0:
            raise ConsortiumError("spill-gb must be positive")
        own = class_of(self.engine.dtype, self.engine.packed) if self.layers is not None else "strict"
        if own not in admitted_classes(self.tolerance_classes):
            raise ConsortiumError(
                f"the coordinator's own stage computes in the {own} class ({self.engine.dtype}), which "
                f"--tolerance-classes {self.tolerance_classes} does not admit"
            )
        if self.hang_after_s <= self.heartbeat_interval_s:
            raise ConsortiumError(
                f"hang-after ({self.hang_after_s:g} s) must exceed the heartbeat interval ({self.heartbeat_interval_s:g} s)"
            )
        check_probability(self.audit_probability)
        check_probability(self.audit_recheck_probability)
        check_coverage(self.audit_coverage)


@dataclass(frozen=True)
class WorkerConfig:
    coordinator: str
    model: Path
    host: str = LOCALHOST
    port: int = 0  # 0 = any free port
    advertise: str | None = None  # address the coordinator dials; default host:port
    layers: LayerRange | None = None  # None: the coordinator assigns a range by capacity
    engine: EngineConfig = field(default_factory=EngineConfig)
    node_id: str | None = None
    max_memory_bytes: int | None = None  # cap on the memory reported for placement
    kv_cache_bytes: int = 2 * 2**30
    session_idle_timeout_s: float = 600.0
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    register_timeout_s: float = 60.0  # keep trying to reach the coordinator this long at start
    max_concurrency: int = 16
    log_file: Path | None = None
    data_dir: Path | None = None  # node.key, tls.pem, known_coordinators (default $CONSORTIUM_DATA_DIR
    # or ~/.local/share/consortium)
    misbehave: str | None = None  # tests only: a cheat of verification/misbehave.py
    standby: bool = False  # hold no layers until the coordinator needs a backup (failover)
    insecure: bool = False  # plain-text gRPC (warned loudly); node messages stay signed
    coordinator_cert: str | None = None  # its tls.crt or SHA-256; None: pinned on first use in data_dir

    def __post_init__(self) -> None:
        _check_port(self.port)
        if self.standby and self.layers is not None:
            raise ConsortiumError(
                "a standby worker holds no layers until a failover assigns them: drop --layers"
            )


@dataclass(frozen=True)
class SessionRequest:
    """What a client asks the coordinator for (the `consortium generate` options)."""

    prompt: str
    max_tokens: int = 64
    sampling: SamplingParams = field(default_factory=SamplingParams)
    chat: bool = True
    audit_probability: float | None = None  # None: the coordinator's default
    audit_seed: int | None = None
    audit_coverage: str | None = None  # None: the coordinator's default
    wait_audits: bool = True  # the final result waits for the session's pending audits

    def check(self) -> SessionRequest:
        """The one validation of a request (CLI and coordinator): raises InvalidRequestError."""
        if not self.prompt.strip():
            raise InvalidRequestError("empty prompt")
        if self.max_tokens <= 0:
            raise InvalidRequestError(f"max-tokens must be positive, got {self.max_tokens}")
        if self.audit_probability is not None:
            check_probability(self.audit_probability)
        if self.audit_coverage is not None:
            check_coverage(self.audit_coverage, InvalidRequestError)
        return self


@dataclass(frozen=True)
class ClientConfig:
    coordinator: str = f"{LOCALHOST}:{DEFAULT_PORT}"
    connect_timeout_s: float = 10.0
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    insecure: bool = False  # plain-text gRPC
    coordinator_cert: str | None = None  # its tls.crt or SHA-256; None: pinned on first use in data_dir
    data_dir: Path | None = None  # the client's key (signs its calls) and pins (default as nodes')


def check_probability(p: float) -> float:
    if not 0.0 <= p <= 1.0:
        raise ConsortiumError(f"audit probability {p} outside [0, 1]")
    return p


def check_coverage(coverage: str, error: type[ConsortiumError] = ConsortiumError) -> str:
    if coverage not in AUDIT_COVERAGES:
        raise error(f"unknown audit coverage {coverage!r} (use {' or '.join(AUDIT_COVERAGES)})")
    return coverage


def read_allowed_keys(path: str | Path) -> frozenset[bytes]:
    """One hex Ed25519 public key per line (as `consortium identity show` prints); # comments."""
    keys = set()
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise ConsortiumError(f"cannot read allowed keys {path}: {e.strerror}") from e
    for n, line in enumerate(lines, 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        try:
            key = bytes.fromhex(text)
        except ValueError:
            key = b""
        if len(key) != 32:
            raise ConsortiumError(f"{path}:{n}: not a 64-hex-digit Ed25519 public key")
        keys.add(key)
    return frozenset(keys)


def _check_port(port: int) -> None:
    if not 0 <= port < 65536:
        raise ConsortiumError(f"port {port} outside 0..65535")
