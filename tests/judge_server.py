"""A tiny OpenAI-compatible chat server on 127.0.0.1 for the OpenAIJudge tests (real sockets, a thread)."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class JudgeServer:
    """Serves ``GET /models`` and ``POST /chat/completions``; behaviour is set by the attributes below."""

    def __init__(self):
        self.rating = 7  # the score in every reply
        self.fail_first = 0  # answer the first N chat requests with HTTP 500
        self.delay = 0.0  # seconds before answering a chat request
        self.models_status = 200
        self.drip = 0.0  # > 0: send the reply body one byte at a time, this many seconds apart
        self.script: list[tuple[int, dict]] = []  # (status, headers) answers for the next chat requests, in order
        self.content: str | None = None  # the reply text instead of the default one
        self.contents: list[str] | None = None  # the texts of the ``n`` choices of a reply, in order (cycled)
        self.requests: list[dict] = []  # {"path", "authorization", "body"}
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def _reply(self, status, payload, headers=None, drip=0.0):
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for key, value in (headers or {}).items():
                        self.send_header(key, value)
                    self.end_headers()
                    if not drip:
                        self.wfile.write(data)
                        return
                    for i in range(len(data)):  # a server that never stalls long enough for a read timeout
                        self.wfile.write(data[i : i + 1])
                        self.wfile.flush()
                        time.sleep(drip)
                except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
                    pass

            def do_GET(self):
                server._record(self, None)
                self._reply(server.models_status, {"data": [{"id": "judge-model"}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                n = server._record(self, body)
                if server.delay:
                    time.sleep(server.delay)
                if n <= server.fail_first:
                    self._reply(500, {"error": "internal"})
                    return
                with server.lock:
                    scripted = server.script.pop(0) if server.script else None
                if scripted is not None:
                    self._reply(scripted[0], {"error": "scripted"}, scripted[1])
                    return
                content = server.content
                if content is None:
                    content = f"<think>weighing it up: 3 or 9?</think>The question is fine.\nScore: {server.rating}"
                texts = server.contents or [content]  # one choice per requested sample (``n``), cycling
                choices = [{"index": i, "message": {"role": "assistant", "content": texts[i % len(texts)]}}
                           for i in range(int(body.get("n", 1)))]  # fmt: skip
                self._reply(200, {"choices": choices}, drip=server.drip)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def _record(self, handler, body) -> int:
        with self.lock:
            self.requests.append({"path": handler.path, "authorization": handler.headers.get("Authorization"),
                                  "body": body})  # fmt: skip
            return sum(r["path"].endswith("/chat/completions") for r in self.requests)

    def chat_requests(self) -> int:
        return sum(r["path"].endswith("/chat/completions") for r in self.requests)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
