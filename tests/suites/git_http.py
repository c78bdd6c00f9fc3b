"""Smart HTTP git server for tests: git http-backend behind a tiny CGI bridge, on 127.0.0.1.

Usage: git_http.py PROJECT_ROOT  -- prints the port, then serves until killed.

Environment: GIT_HTTP_AUTH=user:password requires that HTTP Basic login (401 otherwise);
GIT_HTTP_REDIRECT=URL answers every request with a redirect to URL + path;
GIT_HTTP_LOG=FILE appends each request's path and Authorization header (or "-") to FILE.
"""
import base64
import http.server
import os
import subprocess
import sys

ROOT = sys.argv[1]


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def read_body(self):
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = b""
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    return data
                data += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def handle_any(self):
        path, _, query = self.path.partition("?")
        body = self.read_body()
        auth = self.headers.get("Authorization")
        if os.environ.get("GIT_HTTP_LOG"):
            with open(os.environ["GIT_HTTP_LOG"], "a") as log:
                log.write(f"{path} {auth or '-'}\n")
        if os.environ.get("GIT_HTTP_REDIRECT"):
            self.send_response(302)
            self.send_header("Location", os.environ["GIT_HTTP_REDIRECT"] + self.path)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        wanted = os.environ.get("GIT_HTTP_AUTH")
        if wanted and auth != "Basic " + base64.b64encode(wanted.encode()).decode():
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="git"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        env = dict(os.environ)
        env.update(
            GIT_PROJECT_ROOT=ROOT,
            GIT_HTTP_EXPORT_ALL="1",
            PATH_INFO=path,
            QUERY_STRING=query,
            REQUEST_METHOD=self.command,
            CONTENT_TYPE=self.headers.get("Content-Type", ""),
            CONTENT_LENGTH=str(len(body)),
            HTTP_CONTENT_ENCODING=self.headers.get("Content-Encoding", ""),
            GIT_PROTOCOL=self.headers.get("Git-Protocol", ""),
            REMOTE_ADDR="127.0.0.1",
        )
        out = subprocess.run(["git", "http-backend"], input=body, env=env, capture_output=True).stdout
        head, _, rest = out.partition(b"\r\n\r\n")
        status, headers = 200, []
        for line in head.split(b"\r\n"):
            key, _, value = line.decode().partition(":")
            if key.lower() == "status":
                status = int(value.strip().split()[0])
            elif key:
                headers.append((key, value.strip()))
        self.send_response(status)
        for key, value in headers:
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(rest)))
        self.end_headers()
        self.wfile.write(rest)

    do_GET = handle_any
    do_POST = handle_any


server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
print(server.server_address[1], flush=True)
server.serve_forever()
