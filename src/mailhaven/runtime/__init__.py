"""The process around the engine: how it meets its service manager (systemd's notify protocol
and socket activation). Imports nothing of ours; the composition root calls it."""
