"""The Lua scripts Redis runs for the limiter (package data; loaded by gateway.limiting.scripts)."""
