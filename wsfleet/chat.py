"""A chat room on wsfleet's pub/sub: the README's example, with its page for a browser.

``wsfleet start -w 2 --app wsfleet.chat:chat``, then open http://127.0.0.1:8765/ in two
browser tabs: whatever worker each tab lands on, every tab sees every message, in one order.
Each message reaches the page with its topic's epoch and offset; when the page is closed
with 1012 (``wsfleet reload``), 1001 or 1013, it reconnects with the last ones it saw and the
server resumes it from the history: nothing missed, nothing twice.
"""

from __future__ import annotations

import http
import json
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import ServerConnection
from websockets.http11 import Request, Response

import wsfleet


def envelope(topic: str, epoch: str, offset: int, message: str | bytes) -> str:
    """What each client receives: the message with where it stands in its room."""
    text = message if isinstance(message, str) else message.decode(errors="replace")
    return json.dumps({"epoch": epoch, "offset": offset, "text": text})


async def chat(websocket: ServerConnection) -> None:
    query = parse_qs(urlsplit(websocket.request.path).query)  # type: ignore[union-attr]  # a handler's connection has its request
    room = "chat:" + query.get("room", ["lobby"])[0][:64]
    since = None
    if "epoch" in query and query.get("offset", [""])[0].isdigit():
        since = (query["epoch"][0], int(query["offset"][0]))
    subscription = await wsfleet.subscribe(websocket, room, since=since, envelope=envelope)
    # Where the client stands: it resumes from here, and knows whether it missed messages.
    hello = {"epoch": subscription.epoch, "offset": subscription.offset}
    await websocket.send(json.dumps({**hello, "recovered": subscription.recovered}))
    async for message in websocket:
        if isinstance(message, str) and message.strip():
            await wsfleet.publish(room, message[:2000])


PAGE = """<!doctype html>
<meta charset="utf-8"><title>wsfleet chat</title>
<style>
body { font: 16px sans-serif; max-width: 40em; margin: 2em auto }
#log { height: 60vh; overflow: auto }
</style>
<p id="state">connecting...</p><ul id="log"></ul>
<form id="form">
<input id="text" autocomplete="off" size="50" autofocus> <button>Send</button>
</form>
<script>
const log = document.getElementById("log"), state = document.getElementById("state");
const text = document.getElementById("text");
let epoch = null, offset = 0, ws = null;
function show(line) {
  const item = document.createElement("li");
  item.textContent = line;
  log.append(item);
  log.scrollTop = log.scrollHeight;
}
function connect() {
  const url = new URL(location.href);
  url.protocol = url.protocol.replace("http", "ws");
  if (epoch !== null) {
    url.searchParams.set("epoch", epoch);
    url.searchParams.set("offset", offset);
  }
  ws = new WebSocket(url);
  ws.onopen = () => { state.textContent = "connected"; };
  ws.onmessage = (event) => {
    const data = JSON.parse(event.data);
    if ("text" in data) show(data.text);
    else if (epoch !== null && !data.recovered) show("(some messages were missed)");
    // The last position seen: a later one, or a new epoch (its offsets start anew).
    if (data.epoch !== epoch || data.offset > offset) {
      epoch = data.epoch;
      offset = data.offset;
    }
  };
  ws.onclose = (event) => {
    state.textContent = `closed (${event.code}): reconnecting`;
    setTimeout(connect, 100 + Math.random() * 900);  // (spread: not every tab at once)
  };
}
document.getElementById("form").onsubmit = (event) => {
  event.preventDefault();
  if (ws && ws.readyState === WebSocket.OPEN && text.value) ws.send(text.value);
  text.value = "";
};
connect();
</script>
"""


def page(connection: ServerConnection, request: Request) -> Response | None:
    """The page, for a browser's plain GET of any path; WebSocket handshakes go on."""
    if "Upgrade" in request.headers:
        return None
    response = connection.respond(http.HTTPStatus.OK, PAGE)
    response.headers["Content-Type"] = "text/html; charset=utf-8"
    return response


chat.process_request = page  # type: ignore[attr-defined]  # wsfleet's hook: see the README
