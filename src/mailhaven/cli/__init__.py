"""The command line: `mailhaven serve|queue|user|config|status|tls|salvage` and the
sendmail/mailq entries. Parses arguments, loads the configuration and calls into the roles;
it is the top layer and nothing imports it.
"""
