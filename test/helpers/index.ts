// Shared helpers for the end-to-end suites: one import for processes, clusters, data and TLS.
export * from './process.js';
export * from './ports.js';
export * from './data.js';
export * from './tls.js';
export * from './nbdkit.js';
export * from './cluster.js';
export * from './tools.js';
export * from './netns.js';
