// Asks a policy service whether each request may go on, with the language's own HTTP client:
// `fetch` (the host provides `wasi:http/outgoing-handler` to the origins the operator allows).
// The configuration string is JSON:
//   {"url": "http://opa.default.svc:8181/v1/data/httpapi/allow", "on_error": "deny"}
// The plugin POSTs `{"input": {"method", "path", "user"}}` (an Open Policy Agent data API
// request; `user` is the `x-user` header) and lets the request through when the answer's
// `result` is true; otherwise it answers 403. If the service cannot be reached within the
// plugin's budget, it answers 503 (`"on_error": "deny"`, the default) or lets the request
// through (`"allow"`).
//
// Built with componentize-js's `http` feature, which brings `fetch`; a handler may be `async`:
// componentize-js runs the event loop until its promise settles.

import { config, log } from "wasm-extproc:processor/host@0.4.0";

const encoder = new TextEncoder();
const decoder = new TextDecoder();

let settings;
function load() {
  if (settings === undefined) {
    try {
      const parsed = JSON.parse(config() || "{}");
      settings = { url: parsed.url, allowOnError: parsed.on_error === "allow" };
    } catch (error) {
      log("error", `configuration is not JSON: ${error}`);
      settings = { url: undefined, allowOnError: false };
    }
  }
  return settings;
}

function respond(status, error, details) {
  return {
    tag: "respond",
    val: {
      status,
      headers: [["content-type", encoder.encode("application/json")]],
      body: encoder.encode(JSON.stringify({ error })),
      grpcStatus: undefined,
      details,
    },
  };
}

function text(headers, name) {
  const value = headers.get(name);
  return value === undefined ? null : decoder.decode(value);
}

export const handler = {
  register() {
    return {
      phases: { requestHeaders: true },
      requestBody: "chunks",
      responseBody: "chunks",
    };
  },
  async onRequestHeaders(headers, _endOfStream) {
    const { url, allowOnError } = load();
    const input = {
      method: text(headers, ":method"),
      path: text(headers, ":path"),
      user: text(headers, "x-user"),
    };
    let allowed;
    try {
      const answer = await fetch(url, {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({ input }),
      });
      if (!answer.ok) {
        throw new Error(`the policy service answered ${answer.status}`);
      }
      allowed = (await answer.json()).result === true;
    } catch (error) {
      if (allowOnError) {
        log("warn", `policy check failed, letting through: ${error}`);
        return { tag: "continue" };
      }
      log("error", `policy check failed, refusing: ${error}`);
      return respond(503, "policy service unavailable", "policy_unavailable");
    }
    return allowed ? { tag: "continue" } : respond(403, "forbidden by policy", "policy_denied");
  },
  onRequestBody: () => ({ tag: "continue" }),
  onRequestTrailers: () => ({ tag: "continue" }),
  onResponseHeaders: () => ({ tag: "continue" }),
  onResponseBody: () => ({ tag: "continue" }),
  onResponseTrailers: () => ({ tag: "continue" }),
};
