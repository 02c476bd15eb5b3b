// The `mirrorsan` command: thin commands over the library. Every failure prints one line
// with the error code and exits non-zero; stack traces only for programmer errors.
import { Command, Option } from 'commander';
import { createRequire } from 'node:module';
import { isMirrorsanError } from '../errors.js';
import { runAttachCommand } from './attach-command.js';
import { runNodeCommand } from './node-command.js';
import { runVolumeReattach } from './reattach-command.js';
import { runStatusCommand } from './status-command.js';
import { runUpCommand } from './up-command.js';
import { runVolumeCreate, runVolumeDelete, runVolumeList } from './volume-command.js';

function reportAndExit(error: unknown): never {
  if (isMirrorsanError(error)) {
    process.stderr.write(`mirrorsan: ${error.message} (${error.code})\n`);
  } else {
    process.stderr.write(`mirrorsan: internal error: ${error instanceof Error ? error.stack : String(error)}\n`);
  }
  process.exit(1);
}

const program = new Command();
program
  .name('mirrorsan')
  .description('A virtual SAN: servers with local disks export mirrored block volumes over NBD.')
  .version((createRequire(import.meta.url)('../../../package.json') as { version: string }).version)
  .showHelpAfterError();

program
  .command('up')
  .description('Start the embedded default: N nodes on this host serving one volume, until SIGINT/SIGTERM.')
  .option('--nodes <count>', 'number of nodes', '1')
  .option('--dir <path>', 'data directory (one subdirectory per node)', './mirrorsan-data')
  .option('--volume <name>', 'volume name (the NBD export name)', 'vol0')
  .option('--size <size>', 'volume size, e.g. 1GiB, 512MiB, or bytes', '1GiB')
  .option('--base-port <port>', 'node i uses NBD port P+i, peer port P+100+i, admin port P+200+i', '10809')
  .option('--host <address>', 'address to listen on', '127.0.0.1')
  .option('--tls-cert <file>', 'PEM certificate for NBD STARTTLS')
  .option('--tls-key <file>', 'PEM private key for NBD STARTTLS')
  .option('--tls-required', 'refuse clients that do not use TLS')
  .option('--coordinator <url>', 'embedded:///dir or etcd://host:port (default: embedded in DIR/coordinator)')
  .option('--region-size <size>', 'write-priority region size (power of two, at least 4KiB), or "single" for one writer at a time', '1MiB')
  .option('--lease-ttl <ms>', "each node's coordinator lease TTL in ms (node config leaseTtlMs; default 5000)")
  .option('--failure-timeout <ms>', 'a peer silent this long (and without a lease) leaves the in-sync set (node config failureTimeoutMs; default 1000)')
  .option('--json', 'print one JSON line describing the nodes when ready')
  .action((options) => runUpCommand(options).catch(reportAndExit));

program
  .command('node')
  .description('Start (or restart) one node from its config file, as written by `mirrorsan up`.')
  .requiredOption('--config <file>', 'node config file (DIR/<id>/node.json)')
  .option('--json', 'print one JSON line describing the node when ready')
  .action((options) => runNodeCommand(options).catch(reportAndExit));

const volume = program.command('volume').description('Create, list and delete volumes of a running (or stopped) cluster.');
const coordinatorOptions = (command: Command): Command =>
  command
    .option('--dir <path>', 'data directory given to `mirrorsan up` (its embedded coordinator)', './mirrorsan-data')
    .option('--coordinator <url>', 'coordinator URL instead: embedded:///dir or etcd://host:port');
coordinatorOptions(
  volume
    .command('create <name>')
    .description('Create a volume; running nodes export it within a second.')
    .requiredOption('--size <size>', 'volume size, e.g. 1GiB')
    .option('--replicas <count>', 'replicas (nodes holding a copy)', '1')
    .option('--mode <mode>', 'replication mode: sync or async', 'sync')
    .option('--strict', 'refuse writes while a replica is missing')
    .option('--region-size <size>', 'write-priority region size (power of two, at least 4KiB), or "single" for one writer at a time', '1MiB')
    .option('--json', 'print the created spec as JSON'),
).action((name: string, options) => runVolumeCreate(name, options).catch(reportAndExit));
coordinatorOptions(volume.command('list').description('List volumes.').option('--json', 'print JSON')).action((options) =>
  runVolumeList(options).catch(reportAndExit),
);
coordinatorOptions(
  volume.command('delete <name>').description('Delete a volume: nodes close its export and remove its data.'),
).action((name: string, options) => runVolumeDelete(name, options).catch(reportAndExit));
volume
  .command('reattach <name>')
  .description("Re-attach a node's disk for a volume after a disk failure (the node is diskless, forwarding I/O): it reopens its replica, catches up, and serves from it again.")
  .option('--admin <url>', 'admin URL of the diskless node (default http://127.0.0.1:11009)')
  .option('--node <id>', "the diskless node's id: its admin URL is read from DIR/<id>/node.json")
  .option('--dir <path>', 'data directory given to `mirrorsan up` (with --node)', './mirrorsan-data')
  .option('--wait', 'wait until the replica is back in sync')
  .option('--timeout <seconds>', 'with --wait: give up after this long', '600')
  .option('--json', 'print JSON')
  .action((name: string, options) => runVolumeReattach(name, options).catch(reportAndExit));

program
  .command('status')
  .description("Show a node's view of the cluster: volumes, replicas, logs.")
  .addOption(new Option('--admin <url>', 'admin URL of any node').default('http://127.0.0.1:11009'))
  .option('--json', 'print the raw JSON status')
  .action((options) => runStatusCommand(options).catch(reportAndExit));

program
  .command('attach <volume>')
  .description('Serve VOLUME on a local NBD endpoint for any NBD client, forwarding to the nodes and failing over between them.')
  .requiredOption('--listen <address>', 'where to listen: unix:PATH or HOST:PORT')
  .requiredOption('--nodes <uris>', 'nodes serving the volume, comma-separated: nbd://HOST:PORT[,nbd://HOST:PORT...]')
  .option('--failover-timeout <duration>', 'how long requests wait for a node to come back before they fail with EIO (e.g. 60s, 1500ms)', '60s')
  .option('--request-timeout <duration>', "a node that answers nothing this long is given up on and its requests replayed on the next; must exceed the nodes' lease TTL plus failure timeout", '15s')
  .option('--json', 'print one JSON line with the endpoint when ready')
  .action((volumeName: string, options) => runAttachCommand(volumeName, options).catch(reportAndExit));

program.parseAsync(process.argv).catch(reportAndExit);
