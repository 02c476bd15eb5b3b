// A one-page dashboard: the same status the JSON API returns, rendered for a person, and
// refreshed every two seconds. No scripts from anywhere else; it works offline.

function escapeHtml(text: string): string {
  return text.replace(/[&<>"']/g, (char) => `&#${char.charCodeAt(0)};`);
}

export function renderDashboard(status: object): string {
  const json = escapeHtml(JSON.stringify(status, null, 2));
  return `<!doctype html>
<html><head><meta charset="utf-8"><meta http-equiv="refresh" content="2">
<title>mirrorsan</title>
<style>body{font-family:system-ui,sans-serif;margin:2em;background:#fafafa}pre{background:#fff;border:1px solid #ddd;padding:1em;overflow:auto}</style>
</head><body><h1>mirrorsan node status</h1>
<p>JSON: <a href="/v1/status">/v1/status</a> · Prometheus: <a href="/metrics">/metrics</a></p>
<pre>${json}</pre></body></html>
`;
}
