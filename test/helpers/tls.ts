// A throwaway certificate authority and server certificate for TLS tests, made with the
// openssl CLI. The directory follows the layout GnuTLS tools expect (nbdkit --tls-certificates,
// libnbd tls-certificates=DIR): ca-cert.pem, server-cert.pem, server-key.pem.
import { writeFile } from 'node:fs/promises';
import path from 'node:path';
import { runOk } from './process.js';

export interface TlsFixture {
  /** Directory holding the files below; pass it to libnbd as `tls-certificates=DIR`. */
  dir: string;
  caCertPath: string;
  caKeyPath: string;
  serverCertPath: string;
  serverKeyPath: string;
}

const CERT_VALIDITY_DAYS = '2';

/**
 * Creates a CA and a server certificate signed by it, valid for 127.0.0.1, ::1 and
 * localhost (clients verify the address they dialled against the subjectAltName).
 */
export async function makeTlsFixture(dir: string): Promise<TlsFixture> {
  const fixture: TlsFixture = {
    dir,
    caCertPath: path.join(dir, 'ca-cert.pem'),
    caKeyPath: path.join(dir, 'ca-key.pem'),
    serverCertPath: path.join(dir, 'server-cert.pem'),
    serverKeyPath: path.join(dir, 'server-key.pem'),
  };
  const csrPath = path.join(dir, 'server.csr');
  const extPath = path.join(dir, 'server-ext.cnf');
  await runOk('openssl', [
    'req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes',
    '-keyout', fixture.caKeyPath, '-out', fixture.caCertPath, '-days', CERT_VALIDITY_DAYS,
    '-subj', '/CN=mirrorsan test CA',
    '-addext', 'basicConstraints=critical,CA:TRUE', '-addext', 'keyUsage=critical,keyCertSign,cRLSign',
  ]);
  await runOk('openssl', [
    'req', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes',
    '-keyout', fixture.serverKeyPath, '-out', csrPath, '-subj', '/CN=localhost',
  ]);
  await writeFile(
    extPath,
    [
      'basicConstraints=CA:FALSE',
      'keyUsage=critical,digitalSignature,keyEncipherment',
      'extendedKeyUsage=serverAuth',
      'subjectAltName=IP:127.0.0.1,IP:::1,DNS:localhost',
      '',
    ].join('\n'),
  );
  await runOk('openssl', [
    'x509', '-req', '-in', csrPath, '-CA', fixture.caCertPath, '-CAkey', fixture.caKeyPath,
    '-CAcreateserial', '-out', fixture.serverCertPath, '-days', CERT_VALIDITY_DAYS, '-extfile', extPath,
  ]);
  return fixture;
}

/** An nbds:// URI for `plainUri` that trusts only the fixture's CA. */
export function tlsUri(plainUri: string, fixture: TlsFixture): string {
  const url = plainUri.replace(/^nbd:\/\//, 'nbds://');
  return `${url}${url.includes('?') ? '&' : '?'}tls-certificates=${fixture.dir}`;
}
