// A one-page dashboard: a summary of the replicated volumes (who is in sync, catching up or
// fenced, who holds write grants, how far a catch-up is), then the same status the JSON API
// returns, refreshed every two seconds. No scripts from anywhere else; it works offline.

function escapeHtml(text: string): string {
  return text.replace(/[&<>"']/g, (char) => `&#${char.charCodeAt(0)};`);
}

/** The fields of a replicated volume's status the summary shows (the rest is in the JSON). */
interface ReplicatedSummary {
  name?: string;
  epoch?: number;
  replicaStates?: { node: string; state: string }[];
  fence?: string | null;
  degraded?: boolean;
  policing?: { mode?: string; regionSizeBytes?: number; arbiter?: { regionsHeld?: Record<string, number>; waiters?: number } | null };
  catchUp?: { state?: string; percent?: number; bytesCopied?: number } | null;
  /** Set while this node's disk for the volume is detached (src/volume/diskless-volume.ts). */
  diskless?: { mode?: string; forwardingTo?: string | null; error?: { code?: string; message?: string } } | null;
}

const STATE_COLOURS: Record<string, string> = { 'in-sync': '#1a7f37', 'catching-up': '#9a6700', 'out-of-sync': '#cf222e', fenced: '#cf222e', diskless: '#8250df' };

/** One table row per replicated volume; empty when there is none. */
export function replicatedSummaryHtml(volumes: readonly ReplicatedSummary[]): string {
  if (volumes.length === 0) return '';
  const rows = volumes.map((volume) => {
    const replicas = (volume.replicaStates ?? [])
      .map((replica) => `<span style="color:${STATE_COLOURS[replica.state] ?? '#000'}">${escapeHtml(replica.node)}: ${escapeHtml(replica.state)}</span>`)
      .join(' · ');
    const holders = Object.entries(volume.policing?.arbiter?.regionsHeld ?? {})
      .map(([node, count]) => `${escapeHtml(node)}: ${count}`)
      .join(', ');
    const catchUp = volume.catchUp ? `${escapeHtml(volume.catchUp.state ?? '')} ${volume.catchUp.percent ?? 0}%` : '';
    const diskless = volume.diskless
      ? `<span style="color:${STATE_COLOURS.diskless}">diskless (${escapeHtml(volume.diskless.mode ?? '')}): forwarding to ${escapeHtml(volume.diskless.forwardingTo ?? 'no peer yet')}; disk error ${escapeHtml(volume.diskless.error?.code ?? '')}: ${escapeHtml(volume.diskless.error?.message ?? '')}</span>`
      : '';
    const notes = [diskless, volume.degraded ? 'degraded' : '', volume.fence ? `fenced: ${escapeHtml(volume.fence)}` : ''].filter(Boolean).join('; ');
    return `<tr><td>${escapeHtml(volume.name ?? '')}</td><td>${volume.epoch ?? ''}</td><td>${replicas}</td><td>${holders || '-'}</td><td>${catchUp || '-'}</td><td>${notes || 'ok'}</td></tr>`;
  });
  return `<h2>Replicated volumes</h2>
<table><tr><th>volume</th><th>epoch</th><th>replicas</th><th>regions held (arbiter's view)</th><th>catch-up here</th><th>state here</th></tr>
${rows.join('\n')}
</table>`;
}

export function renderDashboard(status: object): string {
  const json = escapeHtml(JSON.stringify(status, null, 2));
  const replicated = (status as { replicatedVolumes?: ReplicatedSummary[] }).replicatedVolumes ?? [];
  return `<!doctype html>
<html><head><meta charset="utf-8"><meta http-equiv="refresh" content="2">
<title>mirrorsan</title>
<style>body{font-family:system-ui,sans-serif;margin:2em;background:#fafafa}pre{background:#fff;border:1px solid #ddd;padding:1em;overflow:auto}table{border-collapse:collapse;background:#fff}td,th{border:1px solid #ddd;padding:.3em .6em;text-align:left}</style>
</head><body><h1>mirrorsan node status</h1>
<p>JSON: <a href="/v1/status">/v1/status</a> · Prometheus: <a href="/metrics">/metrics</a></p>
${replicatedSummaryHtml(replicated)}
<pre>${json}</pre></body></html>
`;
}
