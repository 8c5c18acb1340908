"""A node's side of secure aggregation (SecAgg+, Bell et al. 2020, over the complete graph of the
round's nodes: at <= 16 nodes a round a sparser neighbour graph saves nothing worth its
weaker threshold). Each stage is one message, handled in a fresh ClientApp process. What a node
keeps between them, its two secret keys, its mask seed and the announced session, is written
once, at setup, into the run's context state, which Flower keeps on the SuperNode
(flwr/supernode/servicer/runtime/runtime_handlers.py: pulled with the task, pushed back when the
task ends) and never sends to the SuperLink. Later stages only read it (unmask then erases its
own session): Flower pushes a ClientApp's context after its reply, so the next stage's process
may start before that write lands; what they need besides (public keys, the encrypted shares)
comes back in the ServerApp's messages. The secrets never leave the node except as Shamir
shares, each encrypted for the one node that holds it (this node's own included, so that it need
not keep them).

Sessions are kept apart, under state keys named by the session id: the ServerApp runs round r+1's
setup and share-keys while round r trains (app/privacy/secagg_server.py), so a node sampled in
both holds two sessions and answers setup(r+1), one message at a time, before unmask(r). Each
stage finds its session by the id its message carries. Setup drops the sessions of rounds before
the previous one (never unmasked: a dropped attempt, a discarded preparation, an erasure whose
write was lost), so the state holds a few sessions at most. Every ClientApp process pushes the
whole state back after its reply: one that started before setup's write landed would push the
state without the new session. The SuperNode starts the next process only after pulling its
message from the SuperLink (a round trip and a process start, against the one local call that
pushes the context right after the reply); if it ever happened, the node would miss that
session and drop out of its round, which the protocol recovers from.

Stages: setup (two fresh key pairs and a mask seed b; the public keys and a hash of b go up),
share-keys (shares of b and of the mask key, encrypted pairwise with Fernet, flwr's AEAD), the
masked update (`masked_update`, called by the train handler) and unmask (this node's shares of
the survivors' b and of the dropped nodes' mask keys, never both for one node; then the session's
state is erased, so a later unmask of the session is refused).
"""
from __future__ import annotations

import base64
import hashlib
import secrets
from collections.abc import Mapping

import numpy as np
from cryptography.fernet import InvalidToken
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
from flwr.common.secure_aggregation.crypto.shamir import create_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt, encrypt, generate_shared_key
from flwr.common.secure_aggregation.secaggplus_utils import share_keys_plaintext_concat, share_keys_plaintext_separate

from app.aggregation.bounds import clip_scale, update_norm
from app.privacy import ring
from app.privacy.dp import node_noise_std
from app.privacy.secagg_records import (
    CURVE, MAX_CIPHERTEXT_BYTES, PUBLIC_KEY_BYTES, RECORD, SHARE_BYTES, Announcement, ProtocolError, byte_strings,
    content_of, encode_public_key, masked_array, node_ids, public_key,
)

ANNOUNCED, SECRETS = "secagg-announced:", "secagg-secrets:"  # state key prefixes, + the session id
KEY_BYTES = 32


def pairwise_seed(private: ec.EllipticCurvePrivateKey, public: ec.EllipticCurvePublicKey) -> bytes:
    """The 32-byte mask seed two nodes share (ECDH + HKDF, flwr's key agreement)."""
    return base64.urlsafe_b64decode(generate_shared_key(private, public))


def private_key(raw: bytes) -> ec.EllipticCurvePrivateKey:
    return ec.derive_private_key(int.from_bytes(raw, "big"), CURVE)


def _raw(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_numbers().private_value.to_bytes(KEY_BYTES, "big")


def _session(context: Context, session: str) -> tuple[Announcement, ConfigRecord]:
    if ANNOUNCED + session not in context.state or SECRETS + session not in context.state:
        raise ProtocolError(f"no secure-aggregation session {session[:64]!r} on this node (its state was lost, or the session ended)")
    return Announcement.parse(context.state[ANNOUNCED + session]), context.state[SECRETS + session]


def setup(content: RecordDict, context: Context) -> RecordDict:
    """Fresh keys and mask seed for the announced session; the public halves go up."""
    announced = Announcement.parse(content.get(RECORD))
    if context.node_id not in announced.nodes:
        raise ProtocolError(f"this node ({context.node_id}) is not among the session's nodes")
    # Sessions of rounds before the previous one are dead; the previous round's may still be unmasked.
    for session in [k.removeprefix(ANNOUNCED) for k in context.state if k.startswith(ANNOUNCED)]:
        if Announcement.parse(context.state[ANNOUNCED + session]).server_round < announced.server_round - 1:
            del context.state[ANNOUNCED + session], context.state[SECRETS + session]
    enc_key, mask_key, seed = ec.generate_private_key(CURVE), ec.generate_private_key(CURVE), secrets.token_bytes(ring.SEED_BYTES)
    context.state[ANNOUNCED + announced.session] = announced.record()
    context.state[SECRETS + announced.session] = ConfigRecord({"enc-key": _raw(enc_key), "mask-key": _raw(mask_key), "seed": seed})
    return RecordDict({RECORD: ConfigRecord({"session": announced.session, "pk_c": encode_public_key(enc_key.public_key()),
                                             "pk_s": encode_public_key(mask_key.public_key()),
                                             "b_hash": hashlib.sha256(seed).digest()})})


def _keys(fields: dict, announced: Announcement, node: int, kinds: tuple[str, ...]) -> dict[int, tuple[bytes, ...]]:
    """The forwarded public keys (`kinds` of them) by node: the session's nodes, this one among them."""
    nodes = node_ids(fields["nodes"], "nodes")
    keys = [byte_strings(fields[kind], kind, size=PUBLIC_KEY_BYTES) for kind in kinds]
    if any(len(k) != len(nodes) for k in keys):
        raise ProtocolError(f"{len(nodes)} nodes with {[len(k) for k in keys]} public keys")
    if not set(nodes) <= set(announced.nodes) or node not in nodes or len(nodes) < announced.threshold:
        raise ProtocolError(f"{len(nodes)} nodes' keys: expected this node's and at least {announced.threshold} of the session's")
    return {n: tuple(k[i] for k in keys) for i, n in enumerate(nodes)}


def share_keys(content: RecordDict, context: Context) -> RecordDict:
    """Shares of this node's mask seed and mask key, one pair per node of the session (this one
    included: it gets its own back at unmask), each encrypted for that node."""
    fields = content_of(content, {"session": str, "nodes": list, "pk_c": list, "pk_s": list})
    announced, held = _session(context, fields["session"])
    keys = _keys(fields, announced, context.node_id, ("pk_c", "pk_s"))
    enc_key, mask_key = private_key(held["enc-key"]), private_key(held["mask-key"])
    if keys[context.node_id] != (encode_public_key(enc_key.public_key()), encode_public_key(mask_key.public_key())):
        raise ProtocolError("the keys forwarded for this node are not its own")
    seed_shares = create_shares(held["seed"], announced.threshold, len(keys))
    key_shares = create_shares(held["mask-key"], announced.threshold, len(keys))
    ciphertexts = []
    for peer, seed_share, key_share in zip(sorted(keys), seed_shares, key_shares, strict=True):
        key = generate_shared_key(enc_key, public_key(keys[peer][0], "pk_c"))
        ciphertexts.append(encrypt(key, share_keys_plaintext_concat(context.node_id, peer, seed_share, key_share)))
    return RecordDict({RECORD: ConfigRecord({"session": announced.session, "dst": [str(n) for n in sorted(keys)], "ciphertexts": ciphertexts})})


def masked_update(update: Mapping[str, np.ndarray], num_examples: float, content: RecordDict, context: Context, noise_multiplier: float) -> ArrayRecord:
    """This node's update clipped, weighted, noised (distributed DP), quantized and masked with its
    own seed and one mask per node whose shares went out (the message's `nodes`)."""
    fields = content_of(content, {"session": str, "nodes": list, "pk_s": list})
    announced, held = _session(context, fields["session"])
    keys = _keys(fields, announced, context.node_id, ("pk_s",))
    count = sum(int(np.size(v)) for v in update.values())
    if count != announced.parameters:
        raise ProtocolError(f"the update has {count} values, the session announced {announced.parameters}")
    norm = update_norm(update)
    if not np.isfinite(norm):  # a failed round: sent masked, nobody could tell it from a good one
        raise ProtocolError("this node's update is not finite: it is not sent")
    weight = min(int(num_examples), announced.max_weight)
    noise_std = node_noise_std(noise_multiplier, announced.norm_bound, announced.max_weight, announced.min_nodes) if noise_multiplier > 0 else 0.0
    rng = np.random.default_rng(secrets.randbits(128))  # never the run's seed: nobody may predict the rounding or the noise
    # Clipped to the norm bound, weighted by its examples (capped), noised, over the max weight: in one pass.
    values = ring.quantize(update.values(), announced.value_range, announced.grid_levels, rng,
                           scale=clip_scale(norm, announced.norm_bound) * weight / announced.max_weight,
                           noise_std=noise_std / announced.max_weight)
    vector = np.concatenate([values, ring.weight_digits(weight)])
    vector += ring.mask(held["seed"], vector.size)
    mask_key = private_key(held["mask-key"])
    for peer, (pk_s,) in keys.items():
        if peer != context.node_id:
            pair_mask = ring.mask(pairwise_seed(mask_key, public_key(pk_s, "pk_s")), vector.size)
            (np.add if context.node_id < peer else np.subtract)(vector, pair_mask, out=vector)
    return masked_array(vector)


def unmask(content: RecordDict, context: Context) -> RecordDict:
    """This node's shares of the survivors' mask seeds and of the dropped nodes' mask keys, from
    the encrypted shares the message brings back; then the session ends on this node."""
    fields = content_of(content, {"session": str, "survivors": list, "dropped": list, "nodes": list, "pk_c": list, "ciphertexts": list})
    announced, held = _session(context, fields["session"])
    survivors, dropped = set(node_ids(fields["survivors"], "survivors")), set(node_ids(fields["dropped"], "dropped"))
    if survivors & dropped or not survivors | dropped <= set(announced.nodes) or context.node_id not in survivors:
        raise ProtocolError("survivors and dropped must be disjoint nodes of the session, this node among the survivors")
    if len(survivors) < announced.min_nodes:
        raise ProtocolError(f"{len(survivors)} survivors, fewer than the session's {announced.min_nodes}: the sum would reveal too little noise or too few nodes")
    keys = _keys(fields, announced, context.node_id, ("pk_c",))
    ciphertexts = byte_strings(fields["ciphertexts"], "ciphertexts", most=MAX_CIPHERTEXT_BYTES)
    if len(ciphertexts) != len(keys):
        raise ProtocolError(f"{len(ciphertexts)} ciphertexts for {len(keys)} nodes")
    enc_key = private_key(held["enc-key"])
    out = []
    for (sender, (pk_c,)), ciphertext in zip(keys.items(), ciphertexts, strict=True):
        if sender not in survivors | dropped:
            continue
        try:
            plain = decrypt(generate_shared_key(enc_key, public_key(pk_c, "pk_c")), ciphertext)
        except InvalidToken:  # tampered on the way: that share is dropped, the threshold decides
            continue
        src, dst, seed_share, key_share = share_keys_plaintext_separate(plain)
        if (src, dst) == (sender, context.node_id) and len(seed_share) == len(key_share) == SHARE_BYTES:
            out.append((sender, seed_share if sender in survivors else key_share))
    # Written back only when this process ends (flwr pushes a ClientApp's context after its reply).
    del context.state[ANNOUNCED + announced.session], context.state[SECRETS + announced.session]
    return RecordDict({RECORD: ConfigRecord({"session": announced.session, "nodes": [str(n) for n, _ in out], "shares": [s for _, s in out]})})
