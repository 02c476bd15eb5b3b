// Proves the peer handshake state machines authenticate two nodes sharing the cluster secret, and refuse (with the right code and reason) a wrong secret, another cluster, an unknown or unexpected node id, another protocol version, out-of-order frames, reflection and replay.
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { DialerHandshake, ListenerHandshake, computePeerHmac } from './auth.js';
import type { HandshakeStep, PeerIdentity } from './auth.js';
import { FrameDecoder, NONCE_BYTES, PROTOCOL_VERSION, encodeFrame } from './codec.js';
import type { ReplicationMessage } from './codec.js';

const SECRET = 'correct horse battery staple';
const n1: PeerIdentity = { clusterId: 'prod', nodeId: 'n1', clusterSecret: SECRET };
const n2: PeerIdentity = { clusterId: 'prod', nodeId: 'n2', clusterSecret: SECRET };
const known = (id: string): boolean => ['n1', 'n2', 'n3'].includes(id);

/** Sends through the real codec, so what is tested is what crosses the wire. */
function wire(message: ReplicationMessage): ReplicationMessage {
  const decoder = new FrameDecoder();
  decoder.push(Buffer.concat(encodeFrame(message)));
  const decoded = decoder.next();
  assert.ok(decoded !== undefined);
  return decoded;
}

function sent(step: HandshakeStep): ReplicationMessage[] {
  assert.notEqual(step.kind, 'refused', step.kind === 'refused' ? step.reason : '');
  return step.kind === 'refused' ? [] : step.send;
}

/** Runs a full handshake; returns both sides' final steps. */
function run(dialer: DialerHandshake, listener: ListenerHandshake): { dialer: HandshakeStep; listener: HandshakeStep } {
  const atListener1 = listener.receive(wire(dialer.start()));
  if (atListener1.kind === 'refused') return { dialer: { kind: 'continue', send: [] }, listener: atListener1 };
  const [listenerHello] = sent(atListener1);
  const atDialer1 = dialer.receive(wire(listenerHello!));
  if (atDialer1.kind === 'refused') return { dialer: atDialer1, listener: atListener1 };
  const [dialerAuth] = sent(atDialer1);
  const atListener2 = listener.receive(wire(dialerAuth!));
  if (atListener2.kind === 'refused') return { dialer: atDialer1, listener: atListener2 };
  const [listenerAuth] = sent(atListener2);
  return { dialer: dialer.receive(wire(listenerAuth!)), listener: atListener2 };
}

describe('peer authentication', () => {
  it('authenticates two nodes of one cluster sharing the secret, both ways', () => {
    const result = run(new DialerHandshake({ identity: n1, listenerId: 'n2' }), new ListenerHandshake({ identity: n2, isKnownPeer: known }));
    assert.equal(result.dialer.kind, 'authenticated');
    assert.equal(result.listener.kind, 'authenticated');
    assert.equal(result.dialer.kind === 'authenticated' && result.dialer.peerId, 'n2');
    assert.equal(result.listener.kind === 'authenticated' && result.listener.peerId, 'n1');
  });

  it('refuses a dialer with another secret at the listener, before the listener proves anything', () => {
    const dialer = new DialerHandshake({ identity: { ...n1, clusterSecret: 'wrong' }, listenerId: 'n2' });
    const result = run(dialer, new ListenerHandshake({ identity: n2, isKnownPeer: known }));
    assert.deepEqual(result.listener, { kind: 'refused', code: 'REPL_AUTH', reason: 'node "n1" sent a wrong HMAC (another cluster secret)' });
  });

  it('refuses a listener with another secret at the dialer', () => {
    const listener = new ListenerHandshake({ identity: n2, isKnownPeer: known });
    const dialer = new DialerHandshake({ identity: n1, listenerId: 'n2' });
    const [hello] = sent(listener.receive(wire(dialer.start())));
    const [auth] = sent(dialer.receive(wire(hello!)));
    assert.equal(listener.receive(wire(auth!)).kind, 'authenticated');
    // A listener answering with an HMAC from another secret:
    const forged = new ListenerHandshake({ identity: { ...n2, clusterSecret: 'other' }, isKnownPeer: known });
    const dialer2 = new DialerHandshake({ identity: n1, listenerId: 'n2' });
    const [hello2] = sent(forged.receive(wire(dialer2.start())));
    const [auth2] = sent(dialer2.receive(wire(hello2!)));
    const step = forged.receive(wire(auth2!));
    assert.equal(step.kind, 'refused'); // the forged listener also sees the dialer's proof fail
    const fake = computePeerHmac('other', { clusterId: 'prod', dialerId: 'n1', listenerId: 'n2', dialerNonce: Buffer.alloc(NONCE_BYTES), listenerNonce: Buffer.alloc(NONCE_BYTES), role: 'listener' });
    const refused = dialer2.receive({ type: 'AUTH', hmac: fake });
    assert.equal(refused.kind, 'refused');
    assert.equal(refused.kind === 'refused' && refused.code, 'REPL_AUTH');
  });

  it('refuses another cluster id, an unknown node id, and another protocol version', () => {
    const other = run(new DialerHandshake({ identity: { ...n1, clusterId: 'staging' }, listenerId: 'n2' }), new ListenerHandshake({ identity: n2, isKnownPeer: known }));
    assert.equal(other.listener.kind === 'refused' && other.listener.code, 'REPL_CLUSTER_MISMATCH');
    assert.match(other.listener.kind === 'refused' ? other.listener.reason : '', /cluster "staging", not "prod"/);

    const stranger = run(new DialerHandshake({ identity: { ...n1, nodeId: 'n9' }, listenerId: 'n2' }), new ListenerHandshake({ identity: n2, isKnownPeer: known }));
    assert.deepEqual(stranger.listener, { kind: 'refused', code: 'REPL_AUTH', reason: 'unknown node id "n9"' });

    const listener = new ListenerHandshake({ identity: n2, isKnownPeer: known });
    const step = listener.receive({ type: 'HELLO', protocolVersion: PROTOCOL_VERSION + 1, clusterId: 'prod', nodeId: 'n1', nonce: Buffer.alloc(NONCE_BYTES, 1) });
    assert.equal(step.kind === 'refused' && step.code, 'REPL_VERSION_MISMATCH');
  });

  it('refuses at the dialer a listener that is not the node it dialled', () => {
    const result = run(new DialerHandshake({ identity: n1, listenerId: 'n3' }), new ListenerHandshake({ identity: n2, isKnownPeer: known }));
    assert.deepEqual(result.dialer, { kind: 'refused', code: 'REPL_AUTH', reason: 'dialled node "n3" but reached "n2"' });
  });

  it('refuses frames out of order, a peer claiming our own id, and an echoed nonce; a refusal sticks', () => {
    const listener = new ListenerHandshake({ identity: n2, isKnownPeer: known });
    const early = listener.receive({ type: 'AUTH', hmac: Buffer.alloc(32) });
    assert.deepEqual(early, { kind: 'refused', code: 'REPL_AUTH', reason: 'expected HELLO during the handshake, got AUTH' });
    assert.deepEqual(listener.receive({ type: 'HELLO', protocolVersion: 1, clusterId: 'prod', nodeId: 'n1', nonce: Buffer.alloc(NONCE_BYTES) }), early);

    const selfClaim = new ListenerHandshake({ identity: n2, isKnownPeer: () => true });
    const own = selfClaim.receive({ type: 'HELLO', protocolVersion: 1, clusterId: 'prod', nodeId: 'n2', nonce: Buffer.alloc(NONCE_BYTES, 2) });
    assert.equal(own.kind === 'refused' && own.code, 'REPL_AUTH');

    const dialer = new DialerHandshake({ identity: n1, listenerId: 'n2' });
    const hello = dialer.start();
    const echoed = dialer.receive({ ...hello, nodeId: 'n2' });
    assert.match(echoed.kind === 'refused' ? echoed.reason : '', /echoed our nonce/);

    const afterHello = new DialerHandshake({ identity: n1, listenerId: 'n2' });
    afterHello.start();
    const ping = afterHello.receive({ type: 'PING', timestampMs: 1 });
    assert.equal(ping.kind === 'refused' && ping.code, 'REPL_AUTH');
  });

  it('an AUTH recorded on one connection does not authenticate another (fresh nonces)', () => {
    const listenerA = new ListenerHandshake({ identity: n2, isKnownPeer: known });
    const dialerA = new DialerHandshake({ identity: n1, listenerId: 'n2' });
    const recordedHello = wire(dialerA.start());
    const [helloA] = sent(listenerA.receive(recordedHello));
    const [authA] = sent(dialerA.receive(wire(helloA!)));
    // An attacker replays n1's HELLO and AUTH on a new connection: the listener's nonce differs.
    const listenerB = new ListenerHandshake({ identity: n2, isKnownPeer: known });
    sent(listenerB.receive(recordedHello));
    const replay = listenerB.receive(wire(authA!));
    assert.equal(replay.kind === 'refused' && replay.code, 'REPL_AUTH');
    assert.equal(listenerA.receive(wire(authA!)).kind, 'authenticated');
  });
});
