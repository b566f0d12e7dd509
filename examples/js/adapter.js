// Lets a module written in Cloudflare's shape,
//   export default { async fetch(request, env, ctx) { ... } }
// run as a wasi:http/proxy component built with componentize-js (StarlingMonkey),
// whose entry point is the service-worker `fetch` event. `env` is the process
// environment (wasi:cli/environment), `ctx.waitUntil` the event's own.
import worker from './worker.js';
import { getEnvironment } from 'wasi:cli/environment@0.2.10';

addEventListener('fetch', (event) => {
  const env = Object.fromEntries(getEnvironment());
  const ctx = {
    waitUntil: (promise) => event.waitUntil(promise),
    passThroughOnException() {},
  };
  event.respondWith(Promise.resolve().then(() => worker.fetch(event.request, env, ctx)));
});
