"""The wire, sans-io: Phoenix messages and serializers, websocket frames, close codes."""
