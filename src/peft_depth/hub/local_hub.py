"""An in-process stand-in for the Hugging Face Hub, for offline tests of push/download round trips.

``LocalHub.activate()`` points ``huggingface_hub`` at ``http://127.0.0.1:<port>`` and installs an ``httpx2`` client
whose ``MockTransport`` answers the documented model-repo endpoints from memory, so huggingface_hub's real client code
(``create_repo``, ``create_branch``, ``create_commit`` with preupload and NDJSON commit, ``hf_hub_download`` with its
HEAD/GET, ETag and cache handling, ``file_exists``, ``ModelCard.load``) runs unchanged. No socket is opened; a request
to any other host fails the test.

Served endpoints (model repos only):

- ``POST /api/repos/create``; ``POST /api/models/{repo}/branch/{branch}``
- ``POST /api/models/{repo}/preupload/{rev}`` (every file "regular": contents travel inline in the commit)
- ``POST /api/models/{repo}/commit/{rev}`` (NDJSON: header, file, deletedFile)
- ``POST /api/validate-yaml`` (parses the card's YAML front matter)
- ``GET /api/models/{repo}`` and ``/api/models/{repo}/revision/{rev}`` (sha and file list)
- ``GET /api/models/{repo}/tree/{rev}[/{path}]`` (``list_repo_tree``, one page, ``recursive`` honoured)
- ``HEAD``/``GET /{repo}/resolve/{rev}/{path}`` (``X-Repo-Commit``, ``ETag``, ``Content-Length``; 404s carry the
  Hub's ``X-Error-Code``: RepoNotFound, RevisionNotFound, EntryNotFound)
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import yaml
from huggingface_hub.utils import _http as _hub_http

# The HTTP client module huggingface_hub itself uses: httpx2 from huggingface-hub 2.x, httpx before. Taking the one
# it imported (rather than one by name) keeps the transport the type huggingface_hub expects on every version.
httpx2 = getattr(_hub_http, "httpx2", None) or _hub_http.httpx

__all__ = ["LocalHub"]


@dataclass
class _Repo:
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)

    def resolve(self, revision: str) -> str | None:
        if revision in self.branches:
            return self.branches[revision]
        return revision if revision in self.commits else None


def _git_blob_sha(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


class LocalHub:
    """Model repos held in memory and served to huggingface_hub through an in-process transport."""

    def __init__(self, endpoint: str = "http://127.0.0.1:18080") -> None:
        host = httpx2.URL(endpoint).host
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError(f"LocalHub only serves loopback endpoints, got {endpoint!r}.")
        self.endpoint = endpoint.rstrip("/")
        self.host = host
        self.repos: dict[str, _Repo] = {}
        #: (method, path) of every request served, for tests to inspect.
        self.requests: list[tuple[str, str]] = []
        #: requests the stand-in could not answer (should stay empty).
        self.unhandled: list[tuple[str, str]] = []

    # ------------------------------------------------------------------ activation

    @contextlib.contextmanager
    def activate(self) -> Iterator[LocalHub]:
        """Route huggingface_hub (and transformers' shared HfApi) to this stand-in for the duration."""
        import huggingface_hub
        import huggingface_hub.hf_api
        from huggingface_hub import constants, set_client_factory

        try:
            import transformers.utils.hub as transformers_hub
        except ImportError:  # pragma: no cover - transformers is a dependency
            transformers_hub = None

        saved = {
            "ENDPOINT": constants.ENDPOINT,
            "HUGGINGFACE_CO_URL_TEMPLATE": constants.HUGGINGFACE_CO_URL_TEMPLATE,
            "HF_HUB_OFFLINE": constants.HF_HUB_OFFLINE,
        }
        saved_api_endpoint = huggingface_hub.hf_api.api.endpoint
        saved_transformers_api = getattr(transformers_hub, "_hf_api", None)
        constants.ENDPOINT = self.endpoint
        constants.HUGGINGFACE_CO_URL_TEMPLATE = self.endpoint + "/{repo_id}/resolve/{revision}/{filename}"
        constants.HF_HUB_OFFLINE = False
        huggingface_hub.hf_api.api.endpoint = self.endpoint
        if transformers_hub is not None:
            transformers_hub._hf_api = None  # rebuilt on first use, with the stand-in's endpoint
        set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(self._handle), follow_redirects=True))
        try:
            yield self
        finally:
            from huggingface_hub.utils._http import default_client_factory

            set_client_factory(default_client_factory)
            for name, value in saved.items():
                setattr(constants, name, value)
            huggingface_hub.hf_api.api.endpoint = saved_api_endpoint
            if transformers_hub is not None:
                transformers_hub._hf_api = saved_transformers_api

    # ------------------------------------------------------------------ helpers for tests

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        return dict(repo.commits[repo.resolve(revision)])

    # ------------------------------------------------------------------ transport

    def _handle(self, request: httpx2.Request) -> httpx2.Response:
        method, path = request.method, unquote(request.url.path)
        if request.url.host != self.host:
            # Nothing may reach a real host; fail loudly instead of pretending.
            raise httpx2.ConnectError(f"LocalHub refuses non-loopback host {request.url.host!r}", request=request)
        self.requests.append((method, path))
        parts = [p for p in request.url.path.split("/") if p]
        try:
            if method == "POST" and path == "/api/repos/create":
                return self._create_repo(json.loads(request.content))
            if method == "POST" and path == "/api/validate-yaml":
                return self._validate_yaml(json.loads(request.content))
            if parts[:2] == ["api", "models"] and len(parts) >= 4:
                repo_id = f"{parts[2]}/{parts[3]}"
                action, rest = (parts[4], "/".join(parts[5:])) if len(parts) > 4 else ("info", "main")
                revision = unquote(rest) or "main"
                if method == "POST" and action == "branch":
                    return self._create_branch(repo_id, revision, request)
                if method == "POST" and action == "preupload":
                    return self._preupload(repo_id, json.loads(request.content))
                if method == "POST" and action == "commit":
                    return self._commit(repo_id, revision, request.content)
                if method == "GET" and action in ("info", "revision"):
                    return self._info(repo_id, revision)
                if method == "GET" and action == "tree":
                    tree_revision, _, folder = revision.partition("/")
                    recursive = request.url.params.get("recursive", "").lower() in ("true", "1")
                    return self._tree(repo_id, tree_revision or "main", folder, recursive)
            if len(parts) >= 5 and parts[2] == "resolve" and method in ("GET", "HEAD"):
                repo_id = f"{parts[0]}/{parts[1]}"
                return self._resolve(repo_id, unquote(parts[3]), unquote("/".join(parts[4:])), method)
        except (KeyError, ValueError, json.JSONDecodeError) as error:
            return httpx2.Response(400, json={"error": f"bad request: {error}"})
        if path == "/api/agent-harnesses":
            # huggingface_hub's user-agent helper fetches this registry once a day; not a repo endpoint.
            return httpx2.Response(404, json={"error": "not served"})
        if path.startswith("/api/telemetry/"):
            # libraries' usage pings (TRL sends one on push); the Hub answers them with an empty 200
            return httpx2.Response(200)
        self.unhandled.append((method, path))
        return httpx2.Response(404, json={"error": f"LocalHub does not serve {method} {path}"})

    @staticmethod
    def _error(status: int, code: str, message: str) -> httpx2.Response:
        return httpx2.Response(
            status, headers={"X-Error-Code": code, "X-Error-Message": message}, json={"error": message}
        )

    def _create_repo(self, payload: dict[str, Any]) -> httpx2.Response:
        if payload.get("type", "model") not in (None, "model"):
            return httpx2.Response(400, json={"error": "LocalHub serves model repos only"})
        name, organization = payload["name"], payload.get("organization")
        repo_id = f"{organization}/{name}" if organization else name
        if repo_id.count("/") != 1:
            repo_id = f"local-user/{repo_id}"
        if repo_id in self.repos:
            return httpx2.Response(
                409, json={"error": "You already created this model repo", "url": f"{self.endpoint}/{repo_id}"}
            )
        sha = uuid.uuid4().hex + uuid.uuid4().hex[:8]
        self.repos[repo_id] = _Repo(commits={sha: {}}, branches={"main": sha})
        return httpx2.Response(200, json={"url": f"{self.endpoint}/{repo_id}", "name": repo_id})

    def _repo_or_error(self, repo_id: str) -> _Repo | httpx2.Response:
        repo = self.repos.get(repo_id)
        if repo is None:
            return self._error(404, "RepoNotFound", f"Repository {repo_id} not found")
        return repo

    def _create_branch(self, repo_id: str, branch: str, request: httpx2.Request) -> httpx2.Response:
        repo = self._repo_or_error(repo_id)
        if isinstance(repo, httpx2.Response):
            return repo
        if branch in repo.branches:
            return httpx2.Response(409, json={"error": "Reference already exists"})
        payload = json.loads(request.content) if request.content else {}
        start = repo.resolve(payload.get("startingPoint") or "main")
        repo.branches[branch] = start
        return httpx2.Response(200, json={})

    def _preupload(self, repo_id: str, payload: dict[str, Any]) -> httpx2.Response:
        repo = self._repo_or_error(repo_id)
        if isinstance(repo, httpx2.Response):
            return repo
        files = [
            {"path": entry["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
            for entry in payload["files"]
        ]
        return httpx2.Response(200, json={"files": files})

    def _commit(self, repo_id: str, revision: str, body: bytes) -> httpx2.Response:
        repo = self._repo_or_error(repo_id)
        if isinstance(repo, httpx2.Response):
            return repo
        if revision not in repo.branches:
            return self._error(404, "RevisionNotFound", f"Branch {revision} not found")
        files = dict(repo.commits[repo.branches[revision]])
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "file":
                if value.get("encoding") != "base64":
                    raise ValueError("files must be base64-encoded")
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                files.pop(value["path"], None)
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                files = {p: c for p, c in files.items() if not p.startswith(prefix)}
            elif key != "header":
                raise ValueError(f"LocalHub does not support commit operation {key!r} (only regular files)")
        sha = hashlib.sha1(uuid.uuid4().bytes).hexdigest()
        repo.commits[sha] = files
        repo.branches[revision] = sha
        return httpx2.Response(
            200,
            json={"commitUrl": f"{self.endpoint}/{repo_id}/commit/{sha}", "commitOid": sha, "pullRequestUrl": None},
        )

    @staticmethod
    def _validate_yaml(payload: dict[str, Any]) -> httpx2.Response:
        content = payload.get("content", "")
        if content.startswith("---"):
            try:
                metadata = yaml.safe_load(content.split("---", 2)[1])
            except yaml.YAMLError as error:
                return httpx2.Response(400, json={"errors": [{"message": str(error)}], "warnings": []})
            if metadata is not None and not isinstance(metadata, dict):
                return httpx2.Response(400, json={"errors": [{"message": "metadata must be a mapping"}]})
        return httpx2.Response(200, json={"errors": [], "warnings": []})

    def _files_at(self, repo_id: str, revision: str) -> tuple[str, dict[str, bytes]] | httpx2.Response:
        """``(commit sha, files)`` of the repo at ``revision``, or the Hub's error response."""
        repo = self._repo_or_error(repo_id)
        if isinstance(repo, httpx2.Response):
            return repo
        sha = repo.resolve(revision)
        if sha is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return sha, repo.commits[sha]

    def _info(self, repo_id: str, revision: str) -> httpx2.Response:
        found = self._files_at(repo_id, revision)
        if isinstance(found, httpx2.Response):
            return found
        sha, files = found
        siblings = [{"rfilename": path} for path in sorted(files)]
        return httpx2.Response(200, json={"id": repo_id, "modelId": repo_id, "sha": sha, "siblings": siblings})

    def _tree(self, repo_id: str, revision: str, folder: str, recursive: bool) -> httpx2.Response:
        """``list_repo_tree``: the files and folders under ``folder`` (one page; EntryNotFound for a missing one)."""
        found = self._files_at(repo_id, revision)
        if isinstance(found, httpx2.Response):
            return found
        sha, files = found
        prefix = folder.strip("/") + "/" if folder.strip("/") else ""
        entries: dict[str, dict[str, Any]] = {}
        for path, content in sorted(files.items()):
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix) :].split("/")
            depth = len(parts) if recursive else 1
            for level in range(1, min(depth, len(parts) - 1) + 1):  # the folders on the way
                folder_path = prefix + "/".join(parts[:level])
                entries.setdefault(folder_path, {"type": "directory", "oid": "0" * 40, "size": 0, "path": folder_path})
            if recursive or len(parts) == 1:
                oid = hashlib.sha1(content).hexdigest()
                entries[path] = {"type": "file", "oid": oid, "size": len(content), "path": path}
        if prefix and not entries:
            return self._error(404, "EntryNotFound", f"{folder} does not exist on {revision}")
        return httpx2.Response(200, json=list(entries.values()))

    def _resolve(self, repo_id: str, revision: str, path: str, method: str) -> httpx2.Response:
        found = self._files_at(repo_id, revision)
        if isinstance(found, httpx2.Response):
            return found
        sha, files = found
        content = files.get(path)
        if content is None:
            return self._error(404, "EntryNotFound", f"{path} does not exist at {revision}")
        headers = {
            "X-Repo-Commit": sha,
            "ETag": f'"{_git_blob_sha(content)}"',
            "Content-Length": str(len(content)),
        }
        return httpx2.Response(200, headers=headers, content=b"" if method == "HEAD" else content)
