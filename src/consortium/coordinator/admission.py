"""The coordinator's front door: who may register, heartbeat, run sessions and see what.

- A node registers by challenge-response (transport/auth.py) with the key its NodeInfo names;
  with TLS, its certificate must be bound to that key (the coordinator pins it when dialing).
- A heartbeat must be signed by the key the node id registered with.
- With `--client-keys`, Generate/Resume/GetSession need a client signature by a listed key, and
  GetStatus shows an unlisted caller only counts and coverage (`public_status`).
"""

from __future__ import annotations

from consortium.coordinator.registry import Node, Registry
from consortium.core.config import CoordinatorConfig
from consortium.identity.keys import NodeIdentity
from consortium.identity.tls import TlsIdentity, bind_cert, check_binding
from consortium.transport.auth import CHALLENGE_TTL_S, Challenges, Gate, check_registration
from consortium.transport.proto import consortium_pb2 as pb
from consortium.transport.rpc import PermissionDeniedError, UnauthenticatedError

CLIENT_CALLS = frozenset({"Generate", "Resume", "GetSession"})


class Admission:
    def __init__(
        self,
        identity: NodeIdentity,
        tls: TlsIdentity | None,
        registry: Registry,
        client_keys: frozenset[bytes] | None = None,
    ):
        self.identity, self.tls, self.registry, self.client_keys = identity, tls, registry, client_keys
        self.gate = Gate(identity.public_key)
        self.challenges = Challenges()
        self._binding = bind_cert(identity, tls.cert_der) if tls is not None else b""

    @classmethod
    def load(cls, cfg: CoordinatorConfig, registry: Registry) -> Admission:
        """The coordinator's key and (unless --insecure) TLS pair, from its data directory."""
        tls = None if cfg.insecure else TlsIdentity.load_or_create(cfg.data_dir)
        return cls(NodeIdentity.load_or_create(cfg.data_dir), tls, registry, cfg.client_keys)

    def challenge(self) -> pb.ChallengeResponse:
        return pb.ChallengeResponse(
            nonce=self.challenges.issue(),
            coordinator_key=self.identity.public_key,
            tls_binding=self._binding,
            expires_in_s=CHALLENGE_TTL_S,
        )

    def check_registration(self, req: pb.RegisterRequest, node: Node) -> None:
        """A fresh challenge signed by the node's key; with TLS, a certificate bound to it."""
        self.challenges.redeem(req.nonce)
        check_registration(self.identity.public_key, req)
        if self.tls is None:
            return
        if not node.tls_cert:
            raise UnauthenticatedError(
                f"node {node.node_id} sent no TLS certificate, and this coordinator runs TLS "
                f"(a worker started with --insecure?)"
            )
        if not check_binding(node.public_key, node.tls_cert, node.tls_binding):
            raise UnauthenticatedError(f"node {node.node_id}: its TLS certificate is not bound to its key")

    def authorize(self, name: str, request, key: bytes | None) -> None:
        """Whether `key` (None: an unsigned call) may make call `name` (raises if not)."""
        if name == "Heartbeat":
            if key is None:
                raise UnauthenticatedError("a heartbeat must be signed by the node's key")
            if self.registry.get(request.node_id).public_key != key:  # NotFoundError: register again
                raise PermissionDeniedError(f"heartbeat for node {request.node_id} not signed by its key")
        elif name in CLIENT_CALLS and self.client_keys is not None and not self.is_client(key):
            if key is None:
                raise UnauthenticatedError(
                    "this coordinator serves only the clients of its --client-keys: the call must be "
                    "signed (the consortium CLI signs with the key `consortium identity show` prints)"
                )
            raise PermissionDeniedError(
                f"client key {key.hex()[:16]}… is not in this coordinator's client keys"
            )

    def is_client(self, key: bytes | None) -> bool:
        """An admitted client: anyone without --client-keys, else a listed key."""
        return self.client_keys is None or (key is not None and key in self.client_keys)

    def client_id(self, key: bytes | None, peer: str) -> str:
        """Whom per-client limits count: the client's key where keys admit clients, else its host
        (without --client-keys anyone can sign with a fresh key)."""
        return key.hex() if self.client_keys is not None and key is not None else peer


def public_status(st: pb.ClusterStatus) -> pb.ClusterStatus:
    """What a caller outside --client-keys sees: roles, ranges and counts; no node ids,
    addresses or keys."""
    out = pb.ClusterStatus(
        model_digest=st.model_digest,
        n_layers=st.n_layers,
        active_sessions=st.active_sessions,
        flexible_pending=st.flexible_pending,
        placement_error="no complete pipeline" if st.placement_error else "",
    )
    for ns in st.nodes:
        n = ns.node
        info = pb.NodeInfo(backend=n.backend, dtype=n.dtype, standby=n.standby)
        if n.HasField("layers"):
            info.layers.CopyFrom(n.layers)
        out.nodes.append(pb.NodeStatus(node=info, alive=ns.alive, local=ns.local, role=ns.role))
    for r in st.route:
        out.route.append(pb.StageInfo(index=r.index, layers=r.layers, dtype=r.dtype, local=r.local))
    return out
