"""The response a handler returns; the application hands it to the server."""

import json

JSON_TYPE = "application/json; charset=utf-8"


class Response:
    def __init__(self, status, headers, body, length):
        self.status = status
        self.headers = headers
        self.body = body
        self.length = length

    @classmethod
    def json(cls, status, payload, headers=()):
        data = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        return cls(status, [("Content-Type", JSON_TYPE), ("Content-Length", str(len(data)))] + list(headers),
                   [data], len(data))
