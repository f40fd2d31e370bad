"""Real processes for multi-replica tests: `GatewayProcess` runs ``gateway serve`` as a child
process, `LoadBalancer` runs HAProxy in front of several of them, and `Replicas` holds both.

::

    replicas = Replicas.start(3, config_path, environ, work_dir)
    with replicas:
        response = httpx.post(replicas.url + "/twilio/inbound", ...)  # through HAProxy
        replicas.served_by(response)        # the GatewayProcess that answered it
        replicas.processes[0].kill()         # SIGKILL, mid-run
        replicas.balancer.wait_for_status(replicas.processes[0].name, "DOWN")

Each process writes its stdout and stderr to files in the work directory, which tests read
(`GatewayProcess.stderr_text`). HAProxy comes from the operating system's packages
(Debian: ``apt-get install haproxy``); `haproxy_path` says whether it is there. Nothing here
needs root: each gateway binds a loopback port of its own (port 0, read back from its log),
and HAProxy's are free loopback ports picked when it starts.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import contextlib
import csv
import functools
import io
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import httpx

__all__ = [
    "Backend",
    "GatewayProcess",
    "LoadBalancer",
    "ProcessFailed",
    "REPLICA_HEADER",
    "Replicas",
    "free_port",
    "haproxy_path",
]

# The header the load balancer adds to every answer: the name of the replica that served it
# (empty when HAProxy answered by itself before choosing one).
REPLICA_HEADER = "X-Gateway-Replica"

_POLL_SECONDS = 0.05
# What uvicorn logs (at info) once it listens, with the port it bound; in a JSON line too.
_LISTENING = re.compile(r"Uvicorn running on https?://[^\s:\]]+(?::|\]:)(\d+)")
_TAIL_CHARS = 4000


# Every child still running: killed when this interpreter exits, should a test leave one behind.
_LIVE: set[subprocess.Popen] = set()


@atexit.register
def _kill_leftovers() -> None:
    for process in list(_LIVE):
        if process.poll() is None:
            process.kill()


class ProcessFailed(RuntimeError):
    """A child process exited, or did not become ready in time; the message quotes its stderr."""


@functools.cache
def _loopback() -> httpx.Client:
    """One client for the polls and reads of this module (health, metrics, HAProxy's statistics):
    each new client builds a TLS context (~20 ms of CPU), and a wait polls every 50 ms. Not from
    the environment: a proxy must not see loopback traffic."""
    return httpx.Client(trust_env=False, timeout=5.0)


def _logs_where_it_listens(serve_args: Sequence[str]) -> bool:
    """Whether `gateway serve` with these arguments logs uvicorn's "running on" line (info level)."""
    args = list(serve_args)
    level = next((value for flag, value in zip(args, args[1:]) if flag == "--log-level"), "info")
    return level in ("debug", "info")


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on now (the kernel's pick; another process could take it before us)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def haproxy_path() -> str | None:
    """The haproxy executable, if installed (Debian puts it in /usr/sbin, not always on PATH)."""
    return shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/usr/local/sbin")


def _tail(path: Path) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
    return text if len(text) <= _TAIL_CHARS else "…" + text[-_TAIL_CHARS:]


class _ChildProcess:
    """A child process whose stdout and stderr go to files in `work_dir`; killed if left running."""

    def __init__(self, name: str, work_dir: Path) -> None:
        self.name = name
        self.work_dir = Path(work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.stdout_path = self.work_dir / f"{name}.stdout.log"
        self.stderr_path = self.work_dir / f"{name}.stderr.log"
        self._process: subprocess.Popen | None = None

    def _spawn(self, command: Sequence[str], environ: Mapping[str, str] | None) -> None:
        if self._process is not None:
            raise RuntimeError(f"{self.name} was already started")
        with open(self.stdout_path, "ab") as stdout, open(self.stderr_path, "ab") as stderr:
            self._process = subprocess.Popen(
                list(command), env=dict(environ) if environ is not None else None,
                stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, cwd=self.work_dir,
            )
        _LIVE.add(self._process)

    @property
    def pid(self) -> int:
        return self._started.pid

    @property
    def _started(self) -> subprocess.Popen:
        if self._process is None:
            raise RuntimeError(f"{self.name} has not been started")
        return self._process

    @property
    def returncode(self) -> int | None:
        """None while it runs; negative: the signal that ended it (-9 for SIGKILL)."""
        return self._started.poll()

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def terminate(self) -> None:
        """SIGTERM: the process shuts down in its own way."""
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL: the process dies at once, mid-request, with nothing cleaned up."""
        self._signal(signal.SIGKILL)

    def _signal(self, signum: int) -> None:
        if self.running:
            self._started.send_signal(signum)

    def wait(self, timeout: float | None = None) -> int:
        """Its exit status (see `returncode`); subprocess.TimeoutExpired if it runs on."""
        return self._started.wait(timeout)

    def stdout_text(self) -> str:
        return self.stdout_path.read_text(errors="replace") if self.stdout_path.exists() else ""

    def stderr_text(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    def _failure(self, what: str) -> ProcessFailed:
        return ProcessFailed(
            f"{self.name} (pid {self._process.pid if self._process else '-'}) {what}\n"
            f"--- its stderr ({self.stderr_path}) ---\n{_tail(self.stderr_path)}"
            f"--- its stdout ---\n{_tail(self.stdout_path)}"
        )

    def _check_running(self, doing: str) -> None:
        code = self._started.poll()
        if code is not None:
            raise self._failure(f"exited with status {code} {doing}")

    def close(self, grace_seconds: float = 5.0) -> None:
        """Stop it if it still runs: SIGTERM, then SIGKILL after `grace_seconds`."""
        if self._process is None:
            return
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(grace_seconds)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        _LIVE.discard(self._process)

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class GatewayProcess(_ChildProcess):
    """The real ``gateway serve`` command in a child process, on a free loopback port.

    `start` launches it and returns at once (so several can start in parallel); `wait_ready`
    waits until ``/healthz`` answers. Without a `port`, it serves on port 0 (the kernel's pick,
    bound by the process itself: no port picked free here that another process could take
    first), and `port` and `url` are known once it logged where it listens; `wait_ready` waits
    for that too. (With ``--log-level warning`` or above it would not say: a port is picked free
    here then.) Its environment is this process's (PATH
    and the like) without the GATEWAY_* variables (a developer's own GATEWAY_CONFIG must not
    steer a test's replicas), with ``environ`` on top.
    """

    def __init__(
        self,
        config_path: str | Path,
        environ: Mapping[str, str],
        *,
        work_dir: str | Path,
        name: str = "gateway",
        host: str = "127.0.0.1",
        port: int | None = None,
        extra_args: Sequence[str] = ("--log-level", "info"),
        inherit_environ: bool = True,
    ) -> None:
        super().__init__(name, Path(work_dir))
        self.config_path = Path(config_path)
        self.host = host
        self.extra_args = list(extra_args)
        if not port and not _logs_where_it_listens(self.extra_args):
            port = free_port(host)  # it will not say which port it bound: one picked free here
        self._requested_port = port or 0
        self._port: int | None = port or None
        base = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")} if inherit_environ else {}
        # Unbuffered: a line the gateway logged is in the file when a test reads it, and survives a SIGKILL.
        self.environ = {**base, "PYTHONUNBUFFERED": "1", **environ}

    @property
    def port(self) -> int:
        """The port it listens on: the one asked for, or the one it logged it bound (see `wait_ready`)."""
        if self._port is None:
            self._port = self._logged_port()
            if self._port is None:
                raise RuntimeError(f"{self.name} has not said yet which port it listens on (wait_ready first)")
        return self._port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def command(self) -> list[str]:
        return [sys.executable, "-m", "gateway.cli", "serve", "--config", str(self.config_path),
                "--host", self.host, "--port", str(self._requested_port), *self.extra_args]

    def start(self) -> "GatewayProcess":
        self._spawn(self.command, self.environ)
        return self

    def _logged_port(self) -> int | None:
        """The port of uvicorn's "Uvicorn running on http://HOST:PORT" line (text or JSON), if logged."""
        found = _LISTENING.search(self.stderr_text())
        return int(found.group(1)) if found else None

    def wait_ready(self, timeout: float = 30.0) -> "GatewayProcess":
        """Wait until GET /healthz answers 200; ProcessFailed (with its stderr) if it exits or takes too long."""
        deadline = time.monotonic() + timeout
        client = _loopback()
        while True:
            self._check_running("before answering /healthz")
            if self._port is None:
                self._port = self._logged_port()
            if self._port is not None:
                try:
                    if client.get(self.url + "/healthz", timeout=1.0).status_code == 200:
                        return self
                except httpx.TransportError:
                    pass
            if time.monotonic() > deadline:
                where = self.url if self._port is not None else "its port (no 'Uvicorn running on' line logged)"
                raise self._failure(f"did not answer {where}/healthz within {timeout:g} s")
            time.sleep(_POLL_SECONDS)

    def wait_for_log(self, text: str, timeout: float = 10.0) -> str:
        """Wait until a line of its stderr (where the gateway logs) contains `text`; that line."""
        deadline = time.monotonic() + timeout
        while True:
            line = next((line for line in self.stderr_text().splitlines() if text in line), None)
            if line is not None:
                return line
            if time.monotonic() > deadline:
                raise self._failure(f"logged no line containing {text!r} within {timeout:g} s")
            time.sleep(_POLL_SECONDS)

    def metric(self, name: str, **labels: str) -> float:
        """One sample of its /metrics (0 if absent), e.g. ``metric("gateway_inbound_webhooks_total", carrier="twilio")``
        sums every series of that name whose labels include these."""
        from prometheus_client.parser import text_string_to_metric_families

        text = _loopback().get(self.url + "/metrics", timeout=5).text
        return sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
        )

    def __repr__(self) -> str:
        state = "running" if self.running else f"exited {self._process.returncode}" if self._process else "not started"
        where = self.url if self._port is not None else f"{self.host}:?"
        return f"<GatewayProcess {self.name} {where} {state}>"


@dataclass(frozen=True)
class Backend:
    """One server behind the balancer."""

    name: str
    host: str
    port: int


class LoadBalancer(_ChildProcess):
    """HAProxy in the foreground (``haproxy -f CFG -db``), round robin over `backends`.

    Each backend is health-checked with ``GET /readyz`` every 500 ms and taken out after one
    failed check (back in after one good one), so a dead or draining replica leaves quickly.
    A request whose connection is refused (a replica just killed, not yet marked down) is
    retried on another replica; a request already sent is never retried (a POST must not be
    replayed by the balancer: that is the carrier's decision). WebSockets pass through
    (``timeout tunnel 1h``). Every answer carries `REPLICA_HEADER` naming the replica that
    served it. The statistics page (`statuses`) tells which backends HAProxy sees UP or DOWN.
    """

    def __init__(
        self,
        backends: Iterable[Backend],
        *,
        work_dir: str | Path,
        name: str = "haproxy",
        host: str = "127.0.0.1",
        check_interval_ms: int = 500,
    ) -> None:
        super().__init__(name, Path(work_dir))
        self.backends = list(backends)
        self.host = host
        self.port = free_port(host)
        self.stats_port = free_port(host)
        self.check_interval_ms = check_interval_ms
        self.config_path = self.work_dir / f"{name}.cfg"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def config(self) -> str:
        servers = "\n".join(
            f"    server {b.name} {b.host}:{b.port} check" for b in self.backends
        )
        every = self.check_interval_ms
        checks = f"inter {every}ms fastinter {every}ms downinter {every}ms fall 1 rise 1"
        return f"""\
global
    maxconn 2000

defaults
    mode http
    timeout connect 500ms
    timeout client 30s
    timeout server 30s
    timeout http-request 10s
    timeout http-keep-alive 10s
    # WebSocket media streams: as long as a call may last.
    timeout tunnel 1h
    # A refused connection (a replica just died) goes to another replica at once.
    retries 2
    option redispatch 1
    # As a real deployment's balancer would (the gateway does not trust it: see the README).
    option forwardfor

frontend gateway
    bind {self.host}:{self.port}
    default_backend replicas
    http-after-response set-header {REPLICA_HEADER} %[srv_name]

backend replicas
    balance roundrobin
    option httpchk GET /readyz
    http-check expect status 200
    default-server {checks}
{servers}

listen stats
    bind {self.host}:{self.stats_port}
    stats enable
    stats uri /
"""

    def start(self, timeout: float = 15.0, *, wait_for_up: bool = True) -> "LoadBalancer":
        """Write the config, start HAProxy, wait until it listens (and, `wait_for_up`, every backend is UP)."""
        executable = haproxy_path()
        if executable is None:
            raise ProcessFailed("haproxy is not installed (Debian: apt-get install haproxy)")
        self.config_path.write_text(self.config())
        self._spawn([executable, "-f", str(self.config_path), "-db"], None)
        deadline = time.monotonic() + timeout
        while True:
            self._check_running("while starting")
            try:
                self.statuses()
                break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise self._failure(f"did not listen on {self.stats_port} within {timeout:g} s")
            time.sleep(_POLL_SECONDS)
        if wait_for_up:
            for backend in self.backends:
                self.wait_for_status(backend.name, "UP", timeout=max(0.1, deadline - time.monotonic()))
        return self

    def statuses(self) -> dict[str, str]:
        """Each backend's status as HAProxy's health checks see it: "UP", "DOWN", "MAINT", "no check"…"""
        text = _loopback().get(f"http://{self.host}:{self.stats_port}/;csv", timeout=2).text
        rows = csv.DictReader(io.StringIO(text.removeprefix("# ")))
        return {row["svname"]: row["status"] for row in rows if row["pxname"] == "replicas"
                and row["svname"] not in ("FRONTEND", "BACKEND")}

    def wait_for_status(self, backend: str, status: str, timeout: float = 10.0) -> None:
        """Wait until HAProxy sees `backend` with `status` (its health check, not this test, decides)."""
        deadline = time.monotonic() + timeout
        while True:
            self._check_running(f"while waiting for {backend} to be {status}")
            seen = self.statuses().get(backend)
            if seen == status:
                return
            if time.monotonic() > deadline:
                raise self._failure(f"still sees {backend} as {seen!r}, not {status!r}, after {timeout:g} s")
            time.sleep(_POLL_SECONDS)

    def stop(self) -> None:
        self.close()


class Replicas:
    """Several `GatewayProcess` replicas of one configuration behind one `LoadBalancer`.

    `url` is the balancer's; a test pins a request to one replica by using that replica's own
    ``url``. `served_by` tells which replica answered a request sent through the balancer.
    """

    def __init__(self, processes: Sequence[GatewayProcess], balancer: LoadBalancer) -> None:
        self.processes = list(processes)
        self.balancer = balancer

    @classmethod
    def start(
        cls,
        count: int,
        config_path: str | Path,
        environ: Mapping[str, str],
        work_dir: str | Path,
        *,
        extra_args: Sequence[str] = ("--log-level", "info"),
        timeout: float = 45.0,
    ) -> "Replicas":
        """Start `count` replicas in parallel, then HAProxy in front of them; every one ready, or ProcessFailed."""
        work_dir = Path(work_dir)
        processes = [
            GatewayProcess(config_path, environ, work_dir=work_dir, name=f"replica-{i}", extra_args=extra_args)
            for i in range(count)
        ]
        started: list[GatewayProcess] = []
        try:
            for process in processes:
                process.start()
                started.append(process)
            # Each waits on its own: a failure names the replica that failed, with its stderr.
            with concurrent.futures.ThreadPoolExecutor(count) as pool:
                for ready in [pool.submit(p.wait_ready, timeout) for p in processes]:
                    ready.result()
            # Their ports are known now (each bound its own).
            replicas = cls(processes, LoadBalancer([Backend(p.name, p.host, p.port) for p in processes], work_dir=work_dir))
            try:
                replicas.balancer.start(timeout=timeout)
            except BaseException:
                replicas.close()
                raise
        except BaseException:
            for process in started:
                process.close()
            raise
        return replicas

    @property
    def url(self) -> str:
        return self.balancer.url

    def named(self, name: str) -> GatewayProcess:
        for process in self.processes:
            if process.name == name:
                return process
        raise KeyError(f"no replica named {name!r} (there are {[p.name for p in self.processes]})")

    def served_by(self, response: httpx.Response) -> GatewayProcess | None:
        """The replica that answered a request sent through the balancer (None: HAProxy answered itself)."""
        name = response.headers.get(REPLICA_HEADER)
        return self.named(name) if name else None

    def logged(self, text: str) -> list[GatewayProcess]:
        """The replicas whose log (stderr) has a line containing `text`: who did a piece of work
        that no request of the test's was answered with (a timer, a delivery)."""
        return [p for p in self.processes if any(text in line for line in p.stderr_text().splitlines())]

    @property
    def alive(self) -> list[GatewayProcess]:
        return [p for p in self.processes if p.running]

    def close(self) -> None:
        """Stop the balancer, then every replica still running (SIGTERM, SIGKILL after a grace period)."""
        with contextlib.suppress(Exception):
            self.balancer.close()
        for process in self.processes:
            if process.running:
                process.terminate()
        for process in self.processes:
            process.close()

    def __enter__(self) -> "Replicas":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
