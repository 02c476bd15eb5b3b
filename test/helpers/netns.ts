// A private test network of Linux network namespaces: one namespace per simulated host, each
// joined by a veth pair to a bridge in the root namespace (which also holds the bridge address,
// where etcd can listen for every host). Partitions are iptables DROP rules inside a host's
// namespace. Needs root and iproute2/iptables (what .ci/run installs); `netnsAvailable()` says
// whether this machine can do it. Everything is removed by destroy(), and namespaces carry a
// per-lab random tag so parallel or crashed runs never collide.
import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';

export interface NetnsHost {
  /** The namespace name (`ip netns exec NAME ...`). */
  readonly namespace: string;
  /** The host's address on the lab network. */
  readonly address: string;
  /** The host-side end of its veth pair. */
  readonly device: string;
}

function ip(args: readonly string[]): void {
  execFileSync('ip', args, { stdio: ['ignore', 'ignore', 'pipe'] });
}

function tryIp(args: readonly string[]): void {
  try {
    ip(args);
  } catch {
    // Already gone.
  }
}

/** Whether namespaces can be created here (root, iproute2 and iptables present). */
export function netnsAvailable(): boolean {
  if (process.getuid?.() !== 0) return false;
  const probe = `msprobe${randomBytes(3).toString('hex')}`;
  try {
    ip(['netns', 'add', probe]);
    ip(['netns', 'del', probe]);
    execFileSync('iptables', ['--version'], { stdio: 'ignore' });
    return true;
  } catch {
    tryIp(['netns', 'del', probe]);
    return false;
  }
}

export class NetnsLab {
  readonly hosts: NetnsHost[] = [];
  /** The bridge's address in the root namespace: reachable from every host. */
  readonly bridgeAddress: string;
  private readonly bridge: string;
  private destroyed = false;

  private constructor(tag: string, subnet: number) {
    this.bridge = `msbr${tag}`;
    this.bridgeAddress = `10.213.${subnet}.254`;
  }

  /** Creates `count` hosts at 10.213.S.1 .. 10.213.S.count on a fresh bridge. */
  static create(count: number): NetnsLab {
    const tag = randomBytes(3).toString('hex');
    const subnet = 1 + (randomBytes(1)[0]! % 250);
    const lab = new NetnsLab(tag, subnet);
    try {
      ip(['link', 'add', lab.bridge, 'type', 'bridge']);
      ip(['addr', 'add', `${lab.bridgeAddress}/24`, 'dev', lab.bridge]);
      ip(['link', 'set', lab.bridge, 'up']);
      for (let index = 0; index < count; index++) {
        const namespace = `ms${tag}n${index + 1}`;
        const device = `ms${tag}v${index + 1}`;
        const inside = `ms${tag}i${index + 1}`;
        const address = `10.213.${subnet}.${index + 1}`;
        ip(['netns', 'add', namespace]);
        lab.hosts.push({ namespace, address, device });
        ip(['link', 'add', device, 'type', 'veth', 'peer', 'name', inside]);
        ip(['link', 'set', inside, 'netns', namespace]);
        ip(['link', 'set', device, 'master', lab.bridge]);
        ip(['link', 'set', device, 'up']);
        ip(['netns', 'exec', namespace, 'ip', 'link', 'set', 'lo', 'up']);
        ip(['netns', 'exec', namespace, 'ip', 'addr', 'add', `${address}/24`, 'dev', inside]);
        ip(['netns', 'exec', namespace, 'ip', 'link', 'set', inside, 'up']);
      }
    } catch (error) {
      lab.destroy();
      throw error;
    }
    return lab;
  }

  /** The command line that runs `cmd args` inside host `index`'s namespace. */
  command(index: number, cmd: string, args: readonly string[]): [string, string[]] {
    return ['ip', ['netns', 'exec', this.host(index).namespace, cmd, ...args]];
  }

  /** Cuts host `index` off the lab network (everything in or out of it is dropped silently). */
  isolate(index: number): void {
    const { namespace } = this.host(index);
    for (const chain of [['INPUT', '-i'], ['OUTPUT', '-o']] as const) {
      execFileSync('ip', ['netns', 'exec', namespace, 'iptables', '-A', chain[0], chain[1], `ms${this.bridge.slice(4)}i${index + 1}`, '-j', 'DROP'], { stdio: ['ignore', 'ignore', 'pipe'] });
    }
  }

  /** Ends an isolate(). */
  heal(index: number): void {
    execFileSync('ip', ['netns', 'exec', this.host(index).namespace, 'iptables', '-F'], { stdio: ['ignore', 'ignore', 'pipe'] });
  }

  /** Removes every namespace, veth and the bridge (processes inside must be gone first). Idempotent. */
  destroy(): void {
    if (this.destroyed) return;
    this.destroyed = true;
    for (const host of this.hosts) tryIp(['netns', 'del', host.namespace]);
    for (const host of this.hosts) tryIp(['link', 'del', host.device]);
    tryIp(['link', 'del', this.bridge]);
  }

  private host(index: number): NetnsHost {
    const host = this.hosts[index];
    if (!host) throw new Error(`no host ${index} in this lab`);
    return host;
  }
}
