// A fixed set of exports by name: what a single-process server (tests, `mirrorsan attach`,
// the simulator) hands to NbdServer. The node wiring supplies its own registry over volumes.
import { MirrorsanError } from '../errors.js';
import type { BlockDevice, ExportRegistry } from '../volume/device.js';

export class StaticExportRegistry implements ExportRegistry {
  private readonly devices = new Map<string, BlockDevice>();
  private defaultExportName: string | undefined;

  /** `defaultName`: served for the empty name; defaults to the first device. */
  constructor(devices: readonly BlockDevice[] = [], defaultName?: string) {
    for (const device of devices) this.add(device);
    this.defaultExportName = defaultName ?? devices[0]?.name;
  }

  add(device: BlockDevice): void {
    if (this.devices.has(device.name)) throw new MirrorsanError('CONFIG_INVALID', `export ${device.name} is already registered`);
    this.devices.set(device.name, device);
  }

  remove(name: string): boolean {
    if (this.defaultExportName === name) this.defaultExportName = undefined;
    return this.devices.delete(name);
  }

  setDefault(name: string | undefined): void {
    this.defaultExportName = name;
  }

  list(): BlockDevice[] {
    return [...this.devices.values()];
  }

  get(name: string): BlockDevice | undefined {
    return this.devices.get(name);
  }

  defaultName(): string | undefined {
    return this.defaultExportName;
  }
}
