"""Node identity: Ed25519 keys, node ids derived from public keys, signing."""

from consortium.identity.keys import IdentityError, NodeIdentity, node_id_for, verify_signature

__all__ = ["IdentityError", "NodeIdentity", "node_id_for", "verify_signature"]
