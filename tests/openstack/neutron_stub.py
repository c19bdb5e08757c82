#!/usr/bin/python3
"""A stand-in for Neutron: Nova asks the network service for ports, networks and security groups
even for servers booted with `"networks": "none"`. Every `GET /v2.0/<resource>` answers an empty
list, `GET /` the version document; anything else 404. `neutron_stub.py PORT`."""

import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PORT = 0


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        if path in ("", "/v2.0"):
            body: object = {"versions": [{"id": "v2.0", "status": "CURRENT", "links": [
                {"rel": "self", "href": f"http://127.0.0.1:{PORT}/v2.0/"}]}]}
        elif path.startswith("/v2.0/") and path.count("/") == 2:
            resource = path.rsplit("/", 1)[1].removesuffix(".json")
            body = {resource: []}
        else:
            self.send_error(404)
            return
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        sys.stderr.write(f"{self.command} {self.path} -> {args[1] if len(args) > 1 else ''}\n")


if __name__ == "__main__":
    PORT = int(sys.argv[1])
    ThreadingHTTPServer(("127.0.0.1", PORT), Handler).serve_forever()
