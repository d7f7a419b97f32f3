"""What the sender and the consumer must agree on: configuration helpers and the RPC messages."""
