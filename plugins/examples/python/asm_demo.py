"""The ASM demo plugin in Python: tags every request with `x-ext-proc-header: hello-to-asm`
and every response with `hello-from-asm`.

Built with componentize-py against wit/processor.wit (see README.md).
"""

from wit_world import exports
from wit_world.imports.types import Action_Continue, BodyDelivery, Phases, Registration


class Handler(exports.Handler):
    def register(self) -> Registration:
        return Registration(
            phases=Phases.REQUEST_HEADERS | Phases.RESPONSE_HEADERS,
            request_body=BodyDelivery.CHUNKS,
            response_body=BodyDelivery.CHUNKS,
        )

    def on_request_headers(self, headers, end_of_stream):
        headers.set("x-ext-proc-header", b"hello-to-asm")
        return Action_Continue()

    def on_response_headers(self, headers, end_of_stream):
        headers.set("x-ext-proc-header", b"hello-from-asm")
        return Action_Continue()

    # Not registered, so never called; the contract still requires every handler.
    def on_request_body(self, body, headers):
        return Action_Continue()

    def on_request_trailers(self, trailers):
        return Action_Continue()

    def on_response_body(self, body, headers):
        return Action_Continue()

    def on_response_trailers(self, trailers):
        return Action_Continue()
