// Rejects requests without a valid API key: the configuration string is JSON,
//   {"header": "x-api-key", "keys": ["key-1", "key-2"]}
// A request whose header is missing or holds another key gets 401 before the upstream is
// touched; a valid one goes on, with the key removed so the upstream never sees it.

import { config, log } from "wasm-extproc:processor/host@0.4.0";

const encoder = new TextEncoder();
const decoder = new TextDecoder();

let settings;
function load() {
  if (settings === undefined) {
    try {
      const parsed = JSON.parse(config() || "{}");
      settings = {
        header: (parsed.header || "x-api-key").toLowerCase(),
        keys: new Set(parsed.keys || []),
      };
    } catch (error) {
      log("error", `configuration is not JSON: ${error}`);
      settings = { header: "x-api-key", keys: new Set() };
    }
  }
  return settings;
}

export const handler = {
  register() {
    return {
      phases: { requestHeaders: true },
      requestBody: "chunks",
      responseBody: "chunks",
    };
  },
  onRequestHeaders(headers, _endOfStream) {
    const { header, keys } = load();
    const presented = headers.get(header);
    if (presented !== undefined && keys.has(decoder.decode(presented))) {
      headers.remove(header);
      return { tag: "continue" };
    }
    return {
      tag: "respond",
      val: {
        status: 401,
        headers: [["content-type", encoder.encode("application/json")]],
        body: encoder.encode(JSON.stringify({ error: `missing or invalid ${header}` })),
        grpcStatus: undefined,
        details: "api_key_denied",
      },
    };
  },
  onRequestBody: () => ({ tag: "continue" }),
  onRequestTrailers: () => ({ tag: "continue" }),
  onResponseHeaders: () => ({ tag: "continue" }),
  onResponseBody: () => ({ tag: "continue" }),
  onResponseTrailers: () => ({ tag: "continue" }),
};
