"""The process around the engine: worker processes, the event loop choice, privileges, log
targets, and systemd's notify protocol and socket activation. The composition root calls it;
it calls no role.
"""
