// The grant protocol's messages (docs/replication.md, "Grant protocol"): the four wire
// messages of src/replication/codec.ts, plus two that travel as generation 0 of an existing
// type (real generations start at 1), so the codec needs no new type:
//   GRANT_REFUSED = GRANT with generation 0, and DRAINED = RELEASE with generation 0.
//
// What `generation` means in each message:
//   GRANT_REQUEST  the highest generation of this region the requester was ever granted
//                  (0: none). Lets the arbiter tell a retried request ("I never got your
//                  GRANT": resend it) from a new one after a RELEASE that was lost in a link
//                  failure ("I released it": treat as released, then queue the request).
//   GRANT          the generation granted: the region's previous generation + 1.
//   REVOKE         the generation the arbiter wants back.
//   RELEASE        the generation given back; a RELEASE of any other generation is stale.
//   GRANT_REFUSED  always 0: the arbiter's queue for the region is full.
//   DRAINED        always 0 (region 0): holder -> arbiter, "I hold no grant and have no
//                  unacknowledged write of any earlier epoch"; the arbiter echoes it back as
//                  its acknowledgement. A new epoch's arbiter grants nothing until every member
//                  said so: otherwise a write of the old epoch could still be in flight on a
//                  region the new epoch grants to another node.
import type { GrantMessage } from '../replication/codec.js';

/** A node id, as in the coordinator's records and the peer handshake. */
export type NodeId = string;

export interface GrantRefusedMessage {
  type: 'GRANT_REFUSED';
  volume: string;
  epoch: number;
  region: number;
  generation: 0;
}

export interface DrainedMessage {
  type: 'DRAINED';
  volume: string;
  epoch: number;
  region: 0;
  generation: 0;
}

export type PolicingMessage = GrantMessage | GrantRefusedMessage | DrainedMessage;

/** The wire form (codec's GrantMessage): GRANT_REFUSED and DRAINED become generation 0 of GRANT and RELEASE. */
export function toWireGrantMessage(message: PolicingMessage): GrantMessage {
  if (message.type === 'GRANT_REFUSED') return { type: 'GRANT', volume: message.volume, epoch: message.epoch, region: message.region, generation: 0 };
  if (message.type === 'DRAINED') return { type: 'RELEASE', volume: message.volume, epoch: message.epoch, region: 0, generation: 0 };
  return message;
}

/** The inverse of toWireGrantMessage, for the peer-link shell's receive path. */
export function fromWireGrantMessage(message: GrantMessage): PolicingMessage {
  if (message.type === 'GRANT' && message.generation === 0) {
    return { type: 'GRANT_REFUSED', volume: message.volume, epoch: message.epoch, region: message.region, generation: 0 };
  }
  if (message.type === 'RELEASE' && message.generation === 0) return { type: 'DRAINED', volume: message.volume, epoch: message.epoch, region: 0, generation: 0 };
  return message;
}

/** One line for logs and simulation traces. */
export function describePolicingMessage(message: PolicingMessage): string {
  return `${message.type} ${message.volume}@${message.epoch} region=${message.region} gen=${message.generation}`;
}

/**
 * Which state machine of the receiving node takes a message: the Arbiter (requests, releases,
 * a member's DRAINED) or the Holder (grants, revokes, refusals, the arbiter's DRAINED echo).
 * DRAINED travels both ways; it is for the arbiter exactly when this node arbitrates its epoch
 * (one arbiter per epoch, so the sender of the other direction cannot be that node's peer).
 */
export function policingRecipient(message: PolicingMessage, arbitratesEpoch: (epoch: number) => boolean): 'arbiter' | 'holder' {
  switch (message.type) {
    case 'GRANT_REQUEST':
    case 'RELEASE':
      return 'arbiter';
    case 'GRANT':
    case 'REVOKE':
    case 'GRANT_REFUSED':
      return 'holder';
    case 'DRAINED':
      return arbitratesEpoch(message.epoch) ? 'arbiter' : 'holder';
  }
}
