"""Pieces both PixelCraft services share: boot-time config handling, logging, dev services."""
