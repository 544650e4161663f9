"""The default app: every message goes back as it came, text as text, binary as binary."""

from websockets.asyncio.server import ServerConnection


async def echo(websocket: ServerConnection) -> None:
    async for message in websocket:
        await websocket.send(message)
