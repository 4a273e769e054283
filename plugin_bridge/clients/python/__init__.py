"""The Python client: `from plugin_bridge.clients.python.npcforge_client import Client, AsyncClient`."""
