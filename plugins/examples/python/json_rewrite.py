"""Rewrites JSON request bodies: adds the fields of the configuration string (a JSON object)
to every JSON object body, e.g. `{"source": "mesh"}`. Non-JSON bodies pass unchanged. It asks
for whole bodies, so run Envoy with BUFFERED (or FULL_DUPLEX_STREAMED) request bodies.
"""

import json

from wit_world import exports
from wit_world.imports import host
from wit_world.imports.host import LogLevel
from wit_world.imports.types import Action_Continue, BodyDelivery, Phases, Registration


def additions():
    try:
        parsed = json.loads(host.config() or "{}")
        return parsed if isinstance(parsed, dict) else {}
    except ValueError:
        host.log(LogLevel.ERROR, "configuration is not a JSON object")
        return {}


class Handler(exports.Handler):
    def register(self) -> Registration:
        return Registration(
            phases=Phases.REQUEST_BODY,
            request_body=BodyDelivery.WHOLE,
            response_body=BodyDelivery.CHUNKS,
        )

    def on_request_body(self, body, headers):
        if not body.end_of_stream():
            return Action_Continue()
        try:
            document = json.loads(bytes(body.bytes()))
        except ValueError:
            return Action_Continue()
        if isinstance(document, dict):
            document.update(additions())
            body.replace(json.dumps(document, separators=(",", ":")).encode())
        return Action_Continue()

    def on_request_headers(self, headers, end_of_stream):
        return Action_Continue()

    def on_request_trailers(self, trailers):
        return Action_Continue()

    def on_response_headers(self, headers, end_of_stream):
        return Action_Continue()

    def on_response_body(self, body, headers):
        return Action_Continue()

    def on_response_trailers(self, trailers):
        return Action_Continue()
