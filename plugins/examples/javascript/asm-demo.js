// The ASM demo plugin in JavaScript: tags every request with
// `x-ext-proc-header: hello-to-asm` and every response with `hello-from-asm`.
//
// Built with componentize-js (StarlingMonkey) against wit/processor.wit (see README.md).

const encoder = new TextEncoder();

export const handler = {
  register() {
    return {
      phases: { requestHeaders: true, responseHeaders: true },
      requestBody: "chunks",
      responseBody: "chunks",
    };
  },
  onRequestHeaders(headers, _endOfStream) {
    headers.set("x-ext-proc-header", encoder.encode("hello-to-asm"));
    return { tag: "continue" };
  },
  onResponseHeaders(headers, _endOfStream) {
    headers.set("x-ext-proc-header", encoder.encode("hello-from-asm"));
    return { tag: "continue" };
  },
  // Not registered, so never called; the contract still requires every handler.
  onRequestBody: () => ({ tag: "continue" }),
  onRequestTrailers: () => ({ tag: "continue" }),
  onResponseBody: () => ({ tag: "continue" }),
  onResponseTrailers: () => ({ tag: "continue" }),
};
