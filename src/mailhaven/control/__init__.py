"""The control role: how the command line talks to the running daemon about its queue.

`channel` is the local socket (server and client, one JSON request per line), `queue_admin` the
verbs on one spool, `forwarding` the same verbs across worker processes. In: requests from the
`mailhaven queue`/`status`/`sendmail` commands and from worker processes. Out: counts and
answers. It may import the spool, the scheduler's ports and proto vocabulary; nothing here runs
a protocol of its own.
"""
