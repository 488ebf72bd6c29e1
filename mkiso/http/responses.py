"""The response a handler returns; the application hands it to the server."""

import json

JSON_TYPE = "application/json; charset=utf-8"


class Response:
    """``closer``, for a body sent after the handler returned, says when sending ended.

    The web layer sets ``closer.on_close(sent)`` so that the access log line
    of such an answer is written then, with the bytes really sent.
    ``length`` None: a stream whose length nobody knows before it ends.
    """

    def __init__(self, status, headers, body, length, closer=None):
        self.status = status
        self.headers = headers
        self.body = body
        self.length = length
        self.closer = closer

    @classmethod
    def json(cls, status, payload, headers=()):
        data = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        return cls(status, [("Content-Type", JSON_TYPE), ("Content-Length", str(len(data)))] + list(headers),
                   [data], len(data))
