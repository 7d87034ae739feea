"""PixelCraft gateway: the rate-limiting TLS edge in front of the chat service."""
