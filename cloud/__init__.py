"""The cloud: deep layers for many edge sessions, their KV context, batching, and the server."""
