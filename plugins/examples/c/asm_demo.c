// The ASM demo plugin in C: tags every request with `x-ext-proc-header: hello-to-asm` and
// every response with `x-ext-proc-header: hello-from-asm`.
//
// Against the bindings `wit-bindgen c --world plugin` generates from wit/processor.wit
// (see README.md).

#include <string.h>

#include "plugin.h"

typedef exports_wasm_extproc_processor_handler_action_t action_t;

static void set_header(exports_wasm_extproc_processor_handler_borrow_fields_t headers,
                       const char *name, const char *value) {
    plugin_string_t name_string;
    plugin_string_set(&name_string, name);
    plugin_list_u8_t value_bytes = {(uint8_t *)value, strlen(value)};
    wasm_extproc_processor_types_method_fields_set(headers, &name_string, &value_bytes);
}

static void continue_with(action_t *ret) {
    ret->tag = WASM_EXTPROC_PROCESSOR_TYPES_ACTION_CONTINUE;
}

// A handler must drop the handle it was lent before it returns (the component model's rule for
// borrows); the host's headers themselves live on.
static void done_with_fields(exports_wasm_extproc_processor_handler_borrow_fields_t fields) {
    wasm_extproc_processor_types_fields_drop_borrow(fields);
}

// A body handler is lent the direction's headers too while they can still change (NULL when
// not): those are dropped the same way.
static void done_with_body(exports_wasm_extproc_processor_handler_borrow_body_t body,
                           exports_wasm_extproc_processor_handler_borrow_fields_t *maybe_headers) {
    wasm_extproc_processor_types_body_drop_borrow(body);
    if (maybe_headers != NULL) {
        done_with_fields(*maybe_headers);
    }
}

void exports_wasm_extproc_processor_handler_register(
    exports_wasm_extproc_processor_handler_registration_t *ret) {
    ret->phases = WASM_EXTPROC_PROCESSOR_TYPES_PHASES_REQUEST_HEADERS |
                  WASM_EXTPROC_PROCESSOR_TYPES_PHASES_RESPONSE_HEADERS;
    ret->request_body = WASM_EXTPROC_PROCESSOR_TYPES_BODY_DELIVERY_CHUNKS;
    ret->response_body = WASM_EXTPROC_PROCESSOR_TYPES_BODY_DELIVERY_CHUNKS;
}

void exports_wasm_extproc_processor_handler_on_request_headers(
    exports_wasm_extproc_processor_handler_borrow_fields_t headers, bool end_of_stream,
    action_t *ret) {
    (void)end_of_stream;
    set_header(headers, "x-ext-proc-header", "hello-to-asm");
    done_with_fields(headers);
    continue_with(ret);
}

void exports_wasm_extproc_processor_handler_on_response_headers(
    exports_wasm_extproc_processor_handler_borrow_fields_t headers, bool end_of_stream,
    action_t *ret) {
    (void)end_of_stream;
    set_header(headers, "x-ext-proc-header", "hello-from-asm");
    done_with_fields(headers);
    continue_with(ret);
}

// Not registered, so never called; the contract still requires every handler.

void exports_wasm_extproc_processor_handler_on_request_body(
    exports_wasm_extproc_processor_handler_borrow_body_t body,
    exports_wasm_extproc_processor_handler_borrow_fields_t *maybe_headers, action_t *ret) {
    done_with_body(body, maybe_headers);
    continue_with(ret);
}

void exports_wasm_extproc_processor_handler_on_request_trailers(
    exports_wasm_extproc_processor_handler_borrow_fields_t trailers, action_t *ret) {
    done_with_fields(trailers);
    continue_with(ret);
}

void exports_wasm_extproc_processor_handler_on_response_body(
    exports_wasm_extproc_processor_handler_borrow_body_t body,
    exports_wasm_extproc_processor_handler_borrow_fields_t *maybe_headers, action_t *ret) {
    done_with_body(body, maybe_headers);
    continue_with(ret);
}

void exports_wasm_extproc_processor_handler_on_response_trailers(
    exports_wasm_extproc_processor_handler_borrow_fields_t trailers, action_t *ret) {
    done_with_fields(trailers);
    continue_with(ret);
}
