"""A local stand-in for the Hugging Face hub's HTTP API, for testing `push_to_hub` offline.

It answers the endpoints `huggingface_hub` calls to create a repository and a branch, check a
model card's metadata and commit files (`create_repo`, `create_branch`, `upload_folder`), and
`whoami`. Every file is committed as a "regular" (base64) file: the stand-in never asks for LFS
or Xet uploads, so those paths of the client are not exercised. State lives in memory:

    with HubStub() as hub:                      # a free loopback port
        os.environ["HF_ENDPOINT"] = hub.url
        ...                                     # huggingface_hub's HfApi(endpoint=hub.url) calls
        hub.repos["me/model"].files["main"]["config.json"]   # bytes committed to branch main
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlparse

USER = "lampo-user"
"""The account `whoami` reports."""

_REPO_PATH = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/(?P<what>preupload|commit|branch)/(?P<rev>[^/?]+)$")


@dataclass
class StubRepo:
    """One repository: its visibility, and per branch the files committed (path -> bytes) and commits."""

    private: bool
    files: dict[str, dict[str, bytes]] = field(default_factory=lambda: {"main": {}})
    commits: list[dict[str, Any]] = field(default_factory=list)


class HubStub:
    """The stand-in server; `requests` lists (method, path) of every request it answered."""

    def __init__(self) -> None:
        self.repos: dict[str, StubRepo] = {}
        self.requests: list[tuple[str, str]] = []
        self.tokens: list[str | None] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._thread = threading.Thread(target=self._server.serve_forever, name="hub-stub", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> HubStub:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)

    # ------------------------------------------------------------------ the API
    def answer(self, method: str, path: str, body: bytes) -> tuple[int, dict[str, Any]]:
        if method == "GET" and path == "/api/whoami-v2":
            return 200, {"type": "user", "name": USER, "auth": {"type": "access_token"}}
        if method == "POST" and path == "/api/repos/create":
            req = json.loads(body)
            repo_id = f"{req.get('organization') or USER}/{req['name']}"
            if repo_id in self.repos:  # as the hub: the conflict names the existing repository's URL
                return 409, {"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"}
            private = req.get("private", req.get("visibility") == "private")
            self.repos[repo_id] = StubRepo(private=bool(private))
            return 200, {"url": f"{self.url}/{repo_id}", "name": repo_id}
        if method == "POST" and path == "/api/validate-yaml":
            return 200, {"errors": [], "warnings": []}
        m = _REPO_PATH.match(path)
        if method == "POST" and m:
            repo = self.repos.get(m["repo"])
            rev = unquote(m["rev"])
            if repo is None:
                return 404, {"error": f"Repository {m['repo']} not found"}
            if m["what"] == "branch":
                if rev in repo.files:
                    return 409, {"error": "Branch already exists"}
                repo.files[rev] = dict(repo.files["main"])
                return 200, {}
            if rev not in repo.files:
                return 404, {"error": f"Revision {rev} not found"}
            if m["what"] == "preupload":
                files = json.loads(body)["files"]
                return 200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                                        "oid": None} for f in files]}
            return self._commit(m["repo"], repo, rev, body)
        return 404, {"error": f"the hub stand-in does not answer {method} {path}"}

    def _commit(self, repo_id: str, repo: StubRepo, rev: str, body: bytes) -> tuple[int, dict[str, Any]]:
        header: dict[str, Any] = {}
        added = []
        for line in body.decode().splitlines():
            item = json.loads(line)
            if item["key"] == "header":
                header = item["value"]
            elif item["key"] == "file":
                value = item["value"]
                repo.files[rev][value["path"]] = base64.b64decode(value["content"])
                added.append(value["path"])
            else:
                return 400, {"error": f"the hub stand-in takes regular files only, not {item['key']}"}
        oid = hashlib.sha1(body).hexdigest()
        repo.commits.append({"revision": rev, "summary": header.get("summary"), "files": added, "oid": oid})
        return 200, {"commitUrl": f"{self.url}/{repo_id}/commit/{oid}", "commitOid": oid, "success": True}


def _handler(stub: HubStub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _reply(self, method: str) -> None:
            path = urlparse(self.path).path
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            stub.requests.append((method, path))
            stub.tokens.append(self.headers.get("Authorization"))
            status, payload = stub.answer(method, path, body)
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if status >= 400:
                self.send_header("X-Error-Message", payload.get("error", ""))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 - http.server's names
            self._reply("GET")

        def do_POST(self) -> None:  # noqa: N802
            self._reply("POST")

        def log_message(self, *args: Any) -> None:  # quiet: the test reads `requests`
            pass

    return Handler
