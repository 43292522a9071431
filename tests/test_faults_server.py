"""Faults against a real `llamagen serve` with its real vLLM engine: a deadline aborts the
engine's requests (504, KV blocks freed); the engine core killed under load gives 503s and
never a 500 or a dropped connection, /ready flips, and the process exits with status 3 so
that its orchestrator restarts it."""

from __future__ import annotations

import collections
import json
import signal
import socket
import threading
import time

import httpx
import psutil

from .helpers import API_KEY, ServerProcess, metric

AUTH = {"Authorization": f"Bearer {API_KEY}"}


def wait_for(condition, timeout: float = 30, step: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(step)
    return False


def test_a_deadline_aborts_the_engine_requests(tiny_model, tmp_path):
    # 256 decode steps take far longer than 50 ms: every generation passes its deadline.
    with ServerProcess([tiny_model.path], tmp_path, "--request-timeout-s", "0.05") as server:
        response = httpx.post(f"{server.url}/v1/generate", json={"labels": [1, 2, 3]},
                              headers=AUTH, timeout=60)
        assert response.status_code == 504, response.text
        assert response.json()["error"]["code"] == "request_timeout"
        stream = httpx.post(f"{server.url}/v1/images/generations", headers=AUTH, timeout=60,
                            json={"prompt": "1", "stream": True})
        assert "event: error" in stream.text and "request_timeout" in stream.text
        # Aborted in vLLM: nothing left running, the KV cache empty again.
        assert wait_for(lambda: metric(server.metrics(), "vllm:num_requests_running") == 0
                        and metric(server.metrics(), "vllm:kv_cache_usage_perc") == 0)
        assert metric(server.metrics(), "llamagen_request_timeouts_total") == 2
        assert httpx.get(f"{server.url}/health").status_code == 200


def read_all(s: socket.socket) -> bytes:
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    return data


def test_idle_and_slow_clients_neither_block_others_nor_hold_connections(tiny_model, tmp_path):
    with ServerProcess([tiny_model.path], tmp_path, "--header-timeout-s", "1",
                       "--body-timeout-s", "1") as server:
        stalled_connections(server)


def stalled_connections(server: ServerProcess) -> None:
    host, port = "127.0.0.1", server.port
    idle = [socket.create_connection((host, port), timeout=10) for _ in range(50)]
    slow = [socket.create_connection((host, port), timeout=10) for _ in range(10)]
    for s in slow:  # a request line and half the headers, then nothing (slowloris)
        s.sendall(b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: appl")
    started = time.monotonic()
    response = httpx.post(f"{server.url}/v1/generate", json={"labels": [1]}, headers=AUTH,
                          timeout=30)
    served_after = time.monotonic() - started
    assert response.status_code == 200, response.text
    # The server closes every one of them once its header deadline passes.
    for s in idle + slow:
        assert s.recv(1024) == b""  # EOF (a hung server would raise socket.timeout)
        s.close()
    # A body that stops arriving: 408 in the error envelope.
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                  + API_KEY.encode() + b"\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100\r\n\r\n{\"labels\": ")
        reply = read_all(s).decode()  # the server answers, then closes
    assert reply.startswith("HTTP/1.1 408"), reply
    assert json.loads(reply.split("\r\n\r\n", 1)[1])["error"]["code"] == "body_timeout"
    print(json.dumps({"served_beside_60_stalled_connections_s": round(served_after, 3)}))


def engine_core(server: ServerProcess) -> psutil.Process:
    for child in psutil.Process(server.proc.pid).children(recursive=True):
        if "EngineCore" in child.name() or "EngineCore" in " ".join(child.cmdline()):
            return child
    raise AssertionError("no VLLM::EngineCore process under the server")


def test_engine_killed_under_load(tiny_model, tmp_path):
    with ServerProcess([tiny_model.path], tmp_path, "--drain-timeout-s", "10") as server:
        kill_engine_under_load(server)


def kill_engine_under_load(server: ServerProcess) -> None:
    outcomes: collections.Counter[str] = collections.Counter()
    lock, stop = threading.Lock(), threading.Event()

    def count(what: str) -> None:
        with lock:
            outcomes[what] += 1

    def client(i: int, stream: bool) -> None:
        # A new connection per request, as clients behind a load balancer, which honour
        # Retry-After (stop.wait): once the server has exited, a request is refused
        # (ConnectError), never half-answered.
        with httpx.Client(timeout=60, headers={**AUTH, "Connection": "close"}) as http:
            while not stop.is_set():
                try:
                    if stream:
                        r = http.post(f"{server.url}/v1/images/generations",
                                      json={"prompt": str(i % 10), "stream": True})
                        if r.headers["content-type"].startswith("text/event-stream"):
                            data = [ln for ln in r.text.splitlines() if ln.startswith("data:")]
                            if not data:  # a stream ended without a word: dropped
                                count("dropped stream")
                                continue
                            error = json.loads(data[-1][5:]).get("error")
                        else:
                            error = r.json().get("error")
                        count(f"stream {r.status_code} {error['code'] if error else 'ok'}")
                    else:
                        r = http.post(f"{server.url}/v1/generate",
                                      json={"labels": [i % 10, (i + 1) % 10]})
                        count(f"{r.status_code} {r.json().get('error', {}).get('code', 'ok')}")
                    if "retry-after" in r.headers:
                        stop.wait(float(r.headers["retry-after"]))
                except httpx.ConnectError:
                    count("refused")  # the server is gone: nobody was answered wrongly
                    time.sleep(0.05)
                except httpx.TransportError as e:
                    count(f"dropped {type(e).__name__}")

    threads = [threading.Thread(target=client, args=(i, i >= 6)) for i in range(8)]
    for t in threads:
        t.start()
    assert wait_for(lambda: outcomes["200 ok"] >= 10, timeout=120)
    core = engine_core(server)
    core.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    ready = []
    while server.proc.poll() is None and time.monotonic() - killed < 60:
        try:
            status = httpx.get(f"{server.url}/ready", timeout=2).status_code
            ready.append((round(time.monotonic() - killed, 3), status))
        except httpx.TransportError:
            pass
        time.sleep(0.02)
    exit_status = server.proc.wait(60)
    stop.set()
    for t in threads:
        t.join(90)
    flipped = [t for t, status in ready if status == 503]
    print(json.dumps({"outcomes": outcomes, "ready_503_after_s": flipped[:1],
                      "exit_status": exit_status}))
    assert exit_status == 3, server.tail()
    assert flipped, ready  # /ready answered 503 before the server went away
    assert not [k for k in outcomes if k.startswith("dropped")], outcomes
    assert not [k for k in outcomes if "500" in k], outcomes
    errors = {k for k in outcomes if k not in ("200 ok", "stream 200 ok", "refused")}
    assert errors <= {"503 engine_unavailable", "stream 200 engine_unavailable",
                      "stream 503 engine_unavailable"}, outcomes
    assert "engine core" in server.log.read_text()
