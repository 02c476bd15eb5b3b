// Peer authentication (docs/replication.md, "Connection set-up"): HMAC-SHA256 challenge-response
// over the cluster secret, as two small pure state machines (no sockets, no timers). Each side
// feeds received messages to `receive` and sends what it returns, or closes the connection
// with the refusal it returns.
//
//   dialer                                   listener
//   HELLO {version, cluster, dialerId, Nd} ─►  checks version, cluster id, known node id
//                                          ◄─ HELLO {version, cluster, listenerId, Nl}
//   checks version, cluster id, listenerId
//   AUTH {HMAC(.., role "dialer")}         ─►  verifies
//                                          ◄─ AUTH {HMAC(.., role "listener")}
//   verifies: authenticated                    authenticated
//
// Why the dialer proves first: whoever can open a TCP connection to the peer port is the
// least trusted party, so the listener never computes an HMAC for a dialer that has not
// proven itself (no free HMAC samples for offline guessing of a weak secret). Both nonces are
// in both HMACs, so neither proof can be replayed on another connection, and the role is in
// them, so a listener's proof cannot be reflected back as a dialer's.
import { createHmac, randomBytes, timingSafeEqual } from 'node:crypto';
import type { ErrorCode } from '../errors.js';
import { assert } from '../errors.js';
import { HMAC_BYTES, NAME_BYTES_MAX, NONCE_BYTES, PROTOCOL_VERSION } from './codec.js';
import type { AuthMessage, HelloMessage, ReplicationMessage } from './codec.js';

export const AUTH_CONTEXT = 'mirrorsan-peer-v1';

export type PeerRole = 'dialer' | 'listener';

export interface PeerIdentity {
  clusterId: string;
  nodeId: string;
  /** The cluster secret every node shares. */
  clusterSecret: string | Buffer;
}

export interface PeerHmacInput {
  clusterId: string;
  dialerId: string;
  listenerId: string;
  dialerNonce: Buffer;
  listenerNonce: Buffer;
  /** Whose proof this is. */
  role: PeerRole;
}

/**
 * HMAC-SHA256(secret, "mirrorsan-peer-v1" | clusterId | dialerId | listenerId | dialerNonce |
 * listenerNonce | role). Each string is prefixed with its byte length so that no two inputs
 * concatenate to the same bytes ("ab"+"c" vs "a"+"bc").
 */
export function computePeerHmac(secret: string | Buffer, input: PeerHmacInput): Buffer {
  assert(input.dialerNonce.length === NONCE_BYTES && input.listenerNonce.length === NONCE_BYTES, 'nonces must be NONCE_BYTES long');
  const hmac = createHmac('sha256', secret);
  for (const text of [AUTH_CONTEXT, input.clusterId, input.dialerId, input.listenerId]) {
    const bytes = Buffer.from(text, 'utf8');
    assert(bytes.length <= 0xff, 'authenticated name longer than 255 bytes');
    hmac.update(Buffer.of(bytes.length));
    hmac.update(bytes);
  }
  hmac.update(input.dialerNonce);
  hmac.update(input.listenerNonce);
  hmac.update(Buffer.of(input.role === 'dialer' ? 1 : 2));
  return hmac.digest();
}

export type HandshakeStep =
  /** Send these (possibly nothing) and wait for the next message. */
  | { kind: 'continue'; send: ReplicationMessage[] }
  /** Send these; from now on the connection carries data frames from `peerId`. */
  | { kind: 'authenticated'; send: ReplicationMessage[]; peerId: string }
  /** Close the connection without answering, and log `reason`. */
  | { kind: 'refused'; code: ErrorCode; reason: string };

type HandshakeState = 'initial' | 'awaitHello' | 'awaitAuth' | 'authenticated' | 'refused';

function checkIdentity(identity: PeerIdentity): Buffer {
  const secret = typeof identity.clusterSecret === 'string' ? Buffer.from(identity.clusterSecret, 'utf8') : identity.clusterSecret;
  assert(secret.length > 0, 'the cluster secret must not be empty');
  for (const name of [identity.clusterId, identity.nodeId]) {
    const length = Buffer.byteLength(name, 'utf8');
    assert(length >= 1 && length <= NAME_BYTES_MAX, `identity name ${JSON.stringify(name)} must be 1..${NAME_BYTES_MAX} bytes`);
  }
  return secret;
}

function freshNonce(nonce: Buffer | undefined): Buffer {
  if (nonce === undefined) return randomBytes(NONCE_BYTES);
  assert(nonce.length === NONCE_BYTES, `nonce must be ${NONCE_BYTES} bytes`);
  return nonce;
}

function hmacMatches(received: Buffer, expected: Buffer): boolean {
  // Constant time: an attacker must not learn how many leading bytes were right.
  return received.length === expected.length && timingSafeEqual(received, expected);
}

/** What both sides check in the other's HELLO, or the refusal. */
function helloProblem(hello: HelloMessage, identity: PeerIdentity, ownNonce: Buffer): HandshakeStep | undefined {
  if (hello.protocolVersion !== PROTOCOL_VERSION) {
    return { kind: 'refused', code: 'REPL_VERSION_MISMATCH', reason: `peer speaks protocol version ${hello.protocolVersion}, this node ${PROTOCOL_VERSION}` };
  }
  if (hello.clusterId !== identity.clusterId) {
    return { kind: 'refused', code: 'REPL_CLUSTER_MISMATCH', reason: `peer ${JSON.stringify(hello.nodeId)} belongs to cluster ${JSON.stringify(hello.clusterId)}, not ${JSON.stringify(identity.clusterId)}` };
  }
  if (hello.nodeId === identity.nodeId) {
    return { kind: 'refused', code: 'REPL_AUTH', reason: `peer claims this node's own id ${JSON.stringify(identity.nodeId)}` };
  }
  if (hello.nonce.equals(ownNonce)) {
    return { kind: 'refused', code: 'REPL_AUTH', reason: 'peer echoed our nonce (a reflection attempt)' };
  }
  return undefined;
}

function outOfOrder(expected: string, message: ReplicationMessage): HandshakeStep {
  return { kind: 'refused', code: 'REPL_AUTH', reason: `expected ${expected} during the handshake, got ${message.type}` };
}

/** The side that opens the connection (the source of a replication stream). */
export class DialerHandshake {
  private readonly identity: PeerIdentity;
  private readonly secret: Buffer;
  private readonly listenerId: string;
  private readonly nonce: Buffer;
  private listenerNonce: Buffer | undefined = undefined;
  private stateValue: HandshakeState = 'initial';
  private refusal: HandshakeStep | undefined = undefined;

  constructor(options: { identity: PeerIdentity; listenerId: string; nonce?: Buffer }) {
    this.identity = options.identity;
    this.secret = checkIdentity(options.identity);
    this.listenerId = options.listenerId;
    this.nonce = freshNonce(options.nonce);
    assert(this.listenerId !== this.identity.nodeId, 'a node does not dial itself');
  }

  get state(): HandshakeState {
    return this.stateValue;
  }

  /** The first message on a new connection. */
  start(): HelloMessage {
    assert(this.stateValue === 'initial', 'DialerHandshake.start called twice');
    this.stateValue = 'awaitHello';
    return { type: 'HELLO', protocolVersion: PROTOCOL_VERSION, clusterId: this.identity.clusterId, nodeId: this.identity.nodeId, nonce: this.nonce };
  }

  receive(message: ReplicationMessage): HandshakeStep {
    switch (this.stateValue) {
      case 'awaitHello': {
        if (message.type !== 'HELLO') return this.refuse(outOfOrder('HELLO', message));
        const problem = helloProblem(message, this.identity, this.nonce);
        if (problem !== undefined) return this.refuse(problem);
        if (message.nodeId !== this.listenerId) {
          return this.refuse({ kind: 'refused', code: 'REPL_AUTH', reason: `dialled node ${JSON.stringify(this.listenerId)} but reached ${JSON.stringify(message.nodeId)}` });
        }
        this.listenerNonce = message.nonce;
        this.stateValue = 'awaitAuth';
        const auth: AuthMessage = { type: 'AUTH', hmac: this.hmac('dialer') };
        return { kind: 'continue', send: [auth] };
      }
      case 'awaitAuth': {
        if (message.type !== 'AUTH') return this.refuse(outOfOrder('AUTH', message));
        if (!hmacMatches(message.hmac, this.hmac('listener'))) {
          return this.refuse({ kind: 'refused', code: 'REPL_AUTH', reason: `node ${JSON.stringify(this.listenerId)} sent a wrong HMAC (another cluster secret)` });
        }
        this.stateValue = 'authenticated';
        return { kind: 'authenticated', send: [], peerId: this.listenerId };
      }
      case 'refused':
        return this.refusal!;
      case 'initial':
      case 'authenticated':
        throw new Error(`assertion failed: DialerHandshake.receive in state ${this.stateValue}`);
    }
  }

  private hmac(role: PeerRole): Buffer {
    assert(this.listenerNonce !== undefined, 'HMAC before the listener nonce is known');
    const hmac = computePeerHmac(this.secret, {
      clusterId: this.identity.clusterId,
      dialerId: this.identity.nodeId,
      listenerId: this.listenerId,
      dialerNonce: this.nonce,
      listenerNonce: this.listenerNonce,
      role,
    });
    assert(hmac.length === HMAC_BYTES, 'HMAC-SHA256 is 32 bytes');
    return hmac;
  }

  private refuse(step: HandshakeStep): HandshakeStep {
    this.stateValue = 'refused';
    this.refusal = step;
    return step;
  }
}

/** The side that accepted the connection. */
export class ListenerHandshake {
  private readonly identity: PeerIdentity;
  private readonly secret: Buffer;
  private readonly isKnownPeer: (nodeId: string) => boolean;
  private readonly nonce: Buffer;
  private dialer: HelloMessage | undefined = undefined;
  private stateValue: HandshakeState = 'awaitHello';
  private refusal: HandshakeStep | undefined = undefined;

  constructor(options: { identity: PeerIdentity; isKnownPeer: (nodeId: string) => boolean; nonce?: Buffer }) {
    this.identity = options.identity;
    this.secret = checkIdentity(options.identity);
    this.isKnownPeer = options.isKnownPeer;
    this.nonce = freshNonce(options.nonce);
  }

  get state(): HandshakeState {
    return this.stateValue;
  }

  /** The node id the dialer claims (not yet proven before `authenticated`). */
  get claimedPeerId(): string | undefined {
    return this.dialer?.nodeId;
  }

  receive(message: ReplicationMessage): HandshakeStep {
    switch (this.stateValue) {
      case 'awaitHello': {
        if (message.type !== 'HELLO') return this.refuse(outOfOrder('HELLO', message));
        const problem = helloProblem(message, this.identity, this.nonce);
        if (problem !== undefined) return this.refuse(problem);
        if (!this.isKnownPeer(message.nodeId)) {
          return this.refuse({ kind: 'refused', code: 'REPL_AUTH', reason: `unknown node id ${JSON.stringify(message.nodeId)}` });
        }
        this.dialer = message;
        this.stateValue = 'awaitAuth';
        const hello: HelloMessage = { type: 'HELLO', protocolVersion: PROTOCOL_VERSION, clusterId: this.identity.clusterId, nodeId: this.identity.nodeId, nonce: this.nonce };
        return { kind: 'continue', send: [hello] };
      }
      case 'awaitAuth': {
        if (message.type !== 'AUTH') return this.refuse(outOfOrder('AUTH', message));
        const dialerId = this.dialer!.nodeId;
        if (!hmacMatches(message.hmac, this.hmac('dialer'))) {
          return this.refuse({ kind: 'refused', code: 'REPL_AUTH', reason: `node ${JSON.stringify(dialerId)} sent a wrong HMAC (another cluster secret)` });
        }
        this.stateValue = 'authenticated';
        const auth: AuthMessage = { type: 'AUTH', hmac: this.hmac('listener') };
        return { kind: 'authenticated', send: [auth], peerId: dialerId };
      }
      case 'refused':
        return this.refusal!;
      case 'initial':
      case 'authenticated':
        throw new Error(`assertion failed: ListenerHandshake.receive in state ${this.stateValue}`);
    }
  }

  private hmac(role: PeerRole): Buffer {
    assert(this.dialer !== undefined, 'HMAC before the dialer HELLO');
    return computePeerHmac(this.secret, {
      clusterId: this.identity.clusterId,
      dialerId: this.dialer.nodeId,
      listenerId: this.identity.nodeId,
      dialerNonce: this.dialer.nonce,
      listenerNonce: this.nonce,
      role,
    });
  }

  private refuse(step: HandshakeStep): HandshakeStep {
    this.stateValue = 'refused';
    this.refusal = step;
    return step;
  }
}
