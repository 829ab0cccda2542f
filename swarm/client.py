"""Python client of the REST API, for notebooks and the CLI.

    from swarm.client import Swarm
    sw = Swarm("http://127.0.0.1:8321")
    job = sw.submit("Which of the G7 capitals has the most people?")
    print(sw.wait(job).result)
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import orjson

from swarm.events import Event, JobFinished, event_from_dict
from swarm.plans import JobSpec, JobState, JobStatus

DEFAULT_ADDRESS = "http://127.0.0.1:8321"


class SwarmClientError(RuntimeError):
    """The service could not be reached or refused the request; the message says why."""

    def __init__(self, message: str, status_code: int | None = None, body: Any = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.body = body


class Swarm:
    """Client of a running `swarm serve`."""

    def __init__(self, address: str = DEFAULT_ADDRESS, token: str | None = None, timeout: float = 30.0) -> None:
        self.address = address.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.address, headers=headers, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "Swarm":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- requests ---------------------------------------------------------------------------

    def _unreachable(self, e: Exception) -> SwarmClientError:
        return SwarmClientError(
            f"cannot reach the swarm service at {self.address} ({type(e).__name__}: {e}); "
            "start it with `swarm serve` or pass the right --server URL"
        )

    def _request(self, method: str, path: str, **kw: Any) -> Any:
        try:
            r = self._http.request(method, path, **kw)
        except httpx.TransportError as e:
            raise self._unreachable(e) from None
        return self._parse(r)

    @staticmethod
    def _parse(r: httpx.Response) -> Any:
        if r.status_code < 400:
            return r.json() if r.content else None
        try:
            body = r.json()
            detail = body.get("detail", body) if isinstance(body, dict) else body
        except ValueError:
            body, detail = r.text, r.text
        if not isinstance(detail, str):  # FastAPI's own 422s carry a list
            detail = orjson.dumps(detail).decode()
        raise SwarmClientError(f"HTTP {r.status_code}: {detail}", r.status_code, body)

    # ---- API --------------------------------------------------------------------------------

    def submit(self, spec: JobSpec | dict[str, Any] | str, **kw: Any) -> str:
        """Submit a job: a JobSpec, its dict, or a task string (`kw` are more JobSpec fields).
        Returns the job id."""
        if isinstance(spec, str):
            body: dict[str, Any] = {"task": spec, **kw}
        elif isinstance(spec, JobSpec):
            body = {**spec.model_dump(mode="json", exclude_unset=True), **kw}
        elif isinstance(spec, dict):
            body = {**spec, **kw}
        else:
            raise TypeError(f"submit needs a JobSpec, a dict or a task string, got {type(spec).__name__}")
        out = self._request("POST", "/jobs", content=orjson.dumps(body), headers={"Content-Type": "application/json"})
        return out["id"]

    def status(self, job_id: str) -> JobStatus:
        return JobStatus.model_validate(self._request("GET", f"/jobs/{job_id}"))

    def list(self, state: JobState | str | None = None, limit: int = 50, offset: int = 0) -> list[JobStatus]:
        params: dict[str, Any] = {"limit": limit, "offset": offset}
        if state is not None:
            params["state"] = JobState(state).value
        out = self._request("GET", "/jobs", params=params)
        return [JobStatus.model_validate(j) for j in out["jobs"]]

    def cancel(self, job_id: str) -> JobStatus:
        return JobStatus.model_validate(self._request("POST", f"/jobs/{job_id}/cancel"))

    def health(self) -> dict[str, Any]:
        return self._request("GET", "/healthz")

    def wait(self, job_id: str, timeout: float | None = None, poll_s: float = 0.5) -> JobStatus:
        """Block until the job ends. Raises TimeoutError after `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            st = self.status(job_id)
            if st.state.terminal:
                return st
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"job {job_id} still {st.state.value} after {timeout:g} s")
            time.sleep(poll_s)

    def events(self, job_id: str, follow: bool = False, after: int = 0, max_reconnects: int = 5) -> Iterator[Event]:
        """The job's events with seq > `after`. With follow=True, streams until the job finishes,
        reconnecting after a dropped connection from the last seen event id."""
        last = after
        reconnects = 0
        while True:
            params = {"follow": "true" if follow else "false", "after": last}
            try:
                with self._http.stream("GET", f"/jobs/{job_id}/events", params=params, timeout=httpx.Timeout(
                        self._http.timeout.connect, read=None)) as r:
                    if r.status_code >= 400:
                        r.read()
                        self._parse(r)
                    for ev in _parse_sse(r.iter_lines()):
                        last = ev.seq
                        reconnects = 0
                        yield ev
                        if isinstance(ev, JobFinished):
                            return
                if not follow:
                    return
                # The stream closed without JobFinished: either the cursor is past the job's end,
                # or the server is restarting (then reconnect from the last seq).
                if self.status(job_id).state.terminal:
                    return
                raise httpx.StreamError("the server closed the event stream")
            except (httpx.TransportError, httpx.StreamError, SwarmClientError) as e:
                if isinstance(e, SwarmClientError) and e.status_code is not None:
                    raise  # a real answer (404, 401 ...), not a lost connection
                reconnects += 1
                if reconnects > max_reconnects:
                    raise e if isinstance(e, SwarmClientError) else self._unreachable(e) from None
                time.sleep(min(0.2 * 2**reconnects, 5.0))


def _parse_sse(lines: Iterator[str]) -> Iterator[Event]:
    """Events from SSE lines: `id:`/`event:`/`data:` fields, blank line ends one; `:` comments skipped."""
    data: list[str] = []
    for line in lines:
        if not line:
            if data:
                yield event_from_dict(orjson.loads("\n".join(data)))
                data = []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        if name == "data":
            data.append(value[1:] if value.startswith(" ") else value)
    if data:
        yield event_from_dict(orjson.loads("\n".join(data)))
