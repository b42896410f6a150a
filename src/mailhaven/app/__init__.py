"""The composition root: builds every role from the configuration and runs them in one process.

`settings` turns the configuration into each role's settings; `live` holds what a reload swaps
(configuration, users, router); `engine` wires the roles of one queue shard, the same for the
daemon and for each worker process; `listeners` binds the sockets and builds the per-listener
profiles; `front` is what the listeners share across reloads (login limits, certificate,
profiles); `reload` validates a new configuration and applies all of it or none;
`local_submission` wires the pickup and the control socket; `alerts` queues notices to the
postmaster; `daemon` is the process's life cycle (`App`). Nothing else here has logic of its
own: each role gets only the narrow callables it needs. The top of the layers (below `cli`): it may import every role.
"""

from mailhaven.app.daemon import App

__all__ = ["App"]
