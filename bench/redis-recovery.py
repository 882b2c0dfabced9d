#!/usr/bin/env python3
"""Recovery time of two Herald nodes after a Redis restart.

Starts a redis-server of its own and two release `herald` nodes on it, a
WebSocket subscriber on node A and a publisher posting to node B every
10 ms. Then, ROUNDS times: kill Redis (SIGKILL), wait 1 s, start it again,
and time from the moment Redis answers PING to

  - the first publish node B accepts again (HTTP 200), and
  - the first of those messages that reaches the subscriber on node A.

    cargo build --release -p herald && python3 bench/redis-recovery.py

Needs `redis-server`, `redis-cli` and Python's `websockets` package.
"""
import asyncio
import http.client
import json
import os
import signal
import statistics
import subprocess
import sys
import time

import websockets

ROUNDS = int(os.environ.get("ROUNDS", "5"))
RPORT = int(os.environ.get("REDIS_PORT", "16479"))
A, B = 18181, 18182
HERALD = os.path.join(os.path.dirname(__file__), "..", "target", "release", "herald")


def start_redis():
    p = subprocess.Popen(["redis-server", "--port", str(RPORT), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while subprocess.run(["redis-cli", "-p", str(RPORT), "PING"], capture_output=True).stdout.strip() != b"PONG":
        time.sleep(0.005)
    return p, time.monotonic()


def herald(port):
    return subprocess.Popen([HERALD, "--listen", f"127.0.0.1:{port}", "--redis", f"redis://127.0.0.1:{RPORT}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def main():
    redis, _ = start_redis()
    nodes = [herald(A), herald(B)]
    await asyncio.sleep(0.5)
    ws = await websockets.connect(f"ws://127.0.0.1:{A}/ws")
    await ws.send(json.dumps({"op": "subscribe", "channel": "rec"}))
    assert json.loads(await ws.recv())["op"] == "subscribed"

    state = {"ok_at": None, "sent_after": set(), "restart_at": None}
    received = asyncio.Queue()

    async def reader():
        async for m in ws:
            d = json.loads(m)
            if "data" in d:
                await received.put((time.monotonic(), d["data"]))

    def post(conn, body):
        try:
            conn.request("POST", "/publish/rec", body=body)
            r = conn.getresponse()
            r.read()
            return r.status
        except (OSError, http.client.HTTPException):
            return None

    async def publisher():
        conn = http.client.HTTPConnection("127.0.0.1", B, timeout=2)
        n = 0
        while True:
            n += 1
            body = f"m{n}"
            status = await asyncio.to_thread(post, conn, body)
            if status is None:
                conn = http.client.HTTPConnection("127.0.0.1", B, timeout=2)
            if status == 200 and state["restart_at"] is not None:
                state["sent_after"].add(body)
                if state["ok_at"] is None:
                    state["ok_at"] = time.monotonic()
            await asyncio.sleep(0.01)

    tasks = [asyncio.create_task(reader()), asyncio.create_task(publisher())]
    publish_s, deliver_s = [], []
    for _ in range(ROUNDS):
        await asyncio.sleep(1)
        redis.send_signal(signal.SIGKILL)
        redis.wait()
        await asyncio.sleep(1)
        state.update(ok_at=None, sent_after=set(), restart_at=None)
        while not received.empty():
            received.get_nowait()
        redis, up = await asyncio.to_thread(start_redis)
        state["restart_at"] = up
        while True:
            at, data = await asyncio.wait_for(received.get(), 30)
            if data in state["sent_after"]:
                break
        publish_s.append(state["ok_at"] - up)
        deliver_s.append(at - up)
        print(f"round: publish accepted after {publish_s[-1] * 1000:.0f} ms, delivered on the other node after {deliver_s[-1] * 1000:.0f} ms",
              flush=True)
    for t in tasks:
        t.cancel()
    for p in nodes:
        p.terminate()
    redis.terminate()
    print(f"median over {ROUNDS} restarts: publish {statistics.median(publish_s) * 1000:.0f} ms, "
          f"cross-node delivery {statistics.median(deliver_s) * 1000:.0f} ms "
          f"(max {max(deliver_s) * 1000:.0f} ms)")


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
