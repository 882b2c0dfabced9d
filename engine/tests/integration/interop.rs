//! Interoperability with Python's `websockets` client, an independent
//! WebSocket implementation (`pip install websockets`).

use crate::common::*;

const SCRIPT: &str = r#"
import asyncio, json, sys, urllib.request
import websockets

async def main(base):
    async with websockets.connect(f"ws://{base}/ws?channel=py") as sub, websockets.connect(f"ws://{base}/ws") as pub:
        await pub.send(json.dumps({"op": "subscribe", "channel": "other", "id": 7}))
        reply = json.loads(await pub.recv())
        assert reply["op"] == "subscribed" and reply["id"] == 7, reply
        for i in range(1, 101):
            await pub.send(json.dumps({"op": "publish", "channel": "py", "data": {"i": i, "s": "é\n\"x\""}}))
        offsets = []
        for i in range(1, 101):
            m = json.loads(await asyncio.wait_for(sub.recv(), 10))
            assert m["channel"] == "py" and m["data"] == {"i": i, "s": "é\n\"x\""}, m
            offsets.append(m["offset"])
        assert offsets == list(range(1, 101)), offsets
        # A large message crosses the 16-bit length form.
        big = "b" * 70000
        req = urllib.request.Request(f"http://{base}/publish/py", data=big.encode(), method="POST")
        urllib.request.urlopen(req).read()
        m = json.loads(await asyncio.wait_for(sub.recv(), 10))
        assert m["data"] == big and m["offset"] == 101
        await sub.ping()
    print("interop ok")

asyncio.run(main(sys.argv[1]))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_websockets_client_interoperates() {
    let h = start(2, |c| {
        c.max_message_bytes(128 * 1024);
    });
    let a = addr(&h);
    let out = tokio::process::Command::new("python3").arg("-c").arg(SCRIPT).arg(a.to_string()).output().await.expect("python3 runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "python client failed (is the `websockets` package installed?)\n{stdout}\n{stderr}");
    assert!(stdout.contains("interop ok"));
}
