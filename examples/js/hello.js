// A User Worker in Cloudflare's shape, run through adapter.js.
export default {
  async fetch(request, env, ctx) {
    const url = new URL(request.url);
    return new Response(`hello from JavaScript at ${url.pathname}\n`, {
      headers: { 'content-type': 'text/plain' },
    });
  },
};
