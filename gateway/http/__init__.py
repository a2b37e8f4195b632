"""Pure HTTP/1.1 pieces: status lines, header rules, error bodies. No asyncio, no sockets."""
